#!/bin/bash
# Seventh-run follow-up on one call: build this tree and the fifth run's (b44ff14), time both
# (time_gn.py), the GroupNorm GPU tests and smoke checks, bench_group_norm, then bench_train's
# headline row with what is left of LIMIT seconds. Everything lands in /tmp/v -> $OUT/v.tgz.
LIMIT=${1:-500}
R=$PWD
V=/tmp/v
mkdir -p $V/logs
benchmarks/carry_dali.sh install > $V/logs/install.log 2>&1
export PYTHONPATH=$R:/tmp/cc-carry/site CCKERNELS_AUTOTUNE=0
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $V/gpu.txt
(CCKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 python3 setup.py build_ext --inplace > $V/logs/build.log 2>&1; echo "build rc $?") &
(cd .carry-bisect/t/01-b44ff14 && CCKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 python3 setup.py build_ext --inplace > build.log 2>&1; echo "b44ff14 build rc $?") &
wait
echo "built at $SECONDS s"
for d in .carry-bisect/t/01-b44ff14 $R; do
  (cd $d && PYTHONPATH=$PWD timeout 60 python3 $R/.carry-bisect/time_gn.py "$(basename $d)" $R/benchmarks)
done > $V/bisect.jsonl 2> $V/logs/bisect.err
echo "timed at $SECONDS s: $(wc -l < $V/bisect.jsonl) rows"
for check in group_norm_cuda_single_pass group_norm_cuda_split; do
  timeout 60 python3 benchmarks/gpu_smoke.py --check $check >> $V/logs/smoke.log 2>&1; echo "smoke $check rc $?"
done
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 150 python3 -m pytest -m gpu tests/test_group_norm.py -q -p no:cacheprovider $xdist -rs > $V/logs/pytest-gn.log 2>&1
echo "pytest rc $? at $SECONDS s: $(tail -1 $V/logs/pytest-gn.log)"
timeout 150 python3 benchmarks/bench_group_norm.py --out $V --budget-s 120 \
  --impls ck-cuda ck-cuda-split ck-triton copy torch-autocast > $V/logs/bench_group_norm.log 2>&1
echo "bench_group_norm rc $? at $SECONDS s"
t=$((LIMIT - SECONDS - 20))
if [ $t -gt 60 ]; then
  timeout $t python3 benchmarks/bench_train.py --out $V --steps 6 --warmup 2 --no-compile --max-batch 512 \
    --rows "+ larger micro-batch" > $V/logs/bench_train.log 2>&1
  echo "bench_train rc $? at $SECONDS s"
fi
tar -czf $OUT/v.tgz -C /tmp v
