#!/usr/bin/env bash
# Everything a GPU visit should produce, in one command and under 10 minutes on one H100:
# build the CUDA extension for sm_90, the GPU tests, every benchmark,
# all into one new folder, by default benchmarks/results/<date>-<HHMM UTC>-<device>/ (tables and
# logs in logs/, JSON and PNG plots from each benchmark, meta.json, summary.md); a folder that
# already holds files is refused (two runs' files would mix). Commit that folder afterwards.
# Without a GPU it refuses to start (RUN_GPU_ALLOW_CPU=1: the steps' tiny modes, as a check of
# the script itself).
#
#   benchmarks/run_gpu.sh [OUT_DIR]          # PYTHON=... to pick the interpreter
#   RUN_GPU_STEPS="bench_group_norm ncu_kernels" benchmarks/run_gpu.sh OUT_DIR   # only those steps
#                                            # (a follow-up call: the first call's build stays)
#
# Budget per step (seconds, enforced with `timeout`; a step that fails or runs out is logged in
# summary.md and the next one still runs; benchmarks with --budget-s start no new case after it
# and still write their JSON), in this order:
#   build 45 | build-check 15 | smoke 200 (gpu_smoke.py: new kernel paths, each alone, 100 s
#   each at most, ~60 s expected: attention's compiles on a cold cache) | pytest -m gpu 240 (93
#   s on the third H200 run, just over 140 on the fourth, 129 for 473 tests on the fifth; 523
#   since, many compiling new kernels) | bench_train 270 (6 timed steps and 1 profiled step of kernels a row; no
#   row starts after its budget less 30 s; JSON written after every row) |
#   bench_attention_cross 60 (the cross-attention shapes and 512 px self-attention at
#   L = 4096) | bench_group_norm 60 | ncu_kernels 45 | bench_layer_norm 25 | bench_geglu 35 |
#   profile_host 30 | bench_ema 35 | bench_attention 55 | bench_data 45 = 1160 s
#   if every step used all of its budget (bench_ddp, 30 s, only runs with several GPUs).
# The whole run must end inside the caller's outer `timeout` (docs/benchmarks.md: at most 575 s
# less the DALI install), or that kills it mid-step and summary.md is never written. So the script ends
# itself by RUN_GPU_BUDGET_S (default 560): each step gets its budget or what is left of the
# total (less 25 s: timeout's 10 s kill grace and the summary), whichever is less, and a step
# with under 10 s left is skipped and logged as such. At 560 s the last steps get little or
# nothing (docs/benchmarks.md: a follow-up call on the warm machine). On the fourth H200 run
# (2026-11-27, 541 s) build took 22 s, pytest 140, bench_train 256 (its headline and
# plain-PyTorch rows; five ablation rows cut), bench_ema 24, bench_attention_cross 48, and
# bench_group_norm got the 24 s that were left.
# bench_precompute is left out for time: its GPU question (training on latents vs encoding
# online, same UNet) is bench_train's "+ precomputed latents" row; run it alone when a visit
# has time left.
# DALI and diffusers are not on the GPU machines: carry them with benchmarks/carry_dali.sh (its
# header lists the run calls); its folder $CARRY_SCRATCH/site is put on PYTHONPATH when present.
set -uo pipefail  # no -e: every step runs even when an earlier one failed
t_all=$(date +%s)  # before anything else: the caller's outer timeout counts from here too
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # a step cut by its timeout keeps what it printed
STEPS="build build-check smoke pytest-gpu bench_train bench_attention_cross bench_group_norm ncu_kernels
       bench_layer_norm bench_geglu profile_host bench_ema bench_ddp bench_attention bench_data"
PY=${PYTHON:-python3}  # the GPU image has python3 (not always python)
SCRATCH=${CARRY_SCRATCH:-/tmp/cc-carry}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$SCRATCH/site" ] && export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
export CCKERNELS_CACHE=${CCKERNELS_CACHE:-/tmp/cckernels-cache}  # generated JPEGs, latents

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" |
         tr -c 'A-Za-z0-9.\n' '-' | tr -s '-')
if [ "$device" = cpu ] && [ -z "${RUN_GPU_ALLOW_CPU:-}" ]; then
    echo "run_gpu.sh: no GPU here (torch.cuda.is_available() is false with $PY); RUN_GPU_ALLOW_CPU=1 runs" \
         "the steps anyway, in their tiny CPU modes" >&2
    exit 2
fi
OUT=${1:-benchmarks/results/$(date -u +%Y-%m-%d-%H%M)-$device}
if [ -n "$(ls -A "$OUT" 2> /dev/null)" ]; then
    echo "run_gpu.sh: $OUT already holds files (another run's: they would mix); name a new folder" >&2
    exit 2
fi
mkdir -p "$OUT/logs"
printf '| step | exit | seconds | budget |\n|---|---|---|---|\n' > "$OUT/steps.md"
TOTAL_S=${RUN_GPU_BUDGET_S:-560}
for name in ${RUN_GPU_STEPS:-}; do  # a misspelt step would be skipped without a word
    [[ " $(echo $STEPS) " == *" $name "* ]] || { echo "RUN_GPU_STEPS: no step $name (steps: $(echo $STEPS))";
        printf '| %s | not a step (RUN_GPU_STEPS) | - | - |\n' "$name" >> "$OUT/steps.md"; }
done
# A follow-up call on a fresh machine (the first call's gone back) has no extension: build it.
if [ -n "${RUN_GPU_STEPS:-}" ] && ! ls cckernels/_C*.so > /dev/null 2>&1; then
    RUN_GPU_STEPS="build build-check $RUN_GPU_STEPS"
fi

# time_left: the seconds a step may still be given: what is left of the run's TOTAL_S, less 25 s
# (a step may run 10 s past its budget before `timeout` kills it; then the summary is written).
time_left() {
    echo $(( TOTAL_S - ($(date +%s) - t_all) - 25 ))
}

# step NAME BUDGET_S COMMAND...: runs it under timeout (BUDGET_S or time_left, whichever is
# less), output to logs/NAME.log; skipped when under 10 s are left, or when RUN_GPU_STEPS
# (space-separated step names) is set and does not name it.
step() {
    local name=$1 budget=$2 left t0 rc
    shift 2
    if [ -n "${RUN_GPU_STEPS:-}" ] && [[ " $RUN_GPU_STEPS " != *" $name "* ]]; then
        printf '| %s | skipped: not in RUN_GPU_STEPS | - | - |\n' "$name" >> "$OUT/steps.md"
        return
    fi
    left=$(time_left)
    if [ "$left" -lt 10 ]; then
        echo "== $name skipped: the run's ${TOTAL_S} s are spent"
        printf '| %s | skipped: RUN_GPU_BUDGET_S=%s spent | - | - |\n' "$name" "$TOTAL_S" >> "$OUT/steps.md"
        return
    fi
    [ "$left" -lt "$budget" ] && budget=$left
    t0=$(date +%s)
    echo "== $name (budget ${budget} s)"
    timeout --kill-after=10 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    case $rc in  # 137: still running 10 s after the TERM, killed (or killed for memory)
        124) echo "TIMEOUT after ${budget} s" >> "$OUT/logs/$name.log" ;;
        137) echo "KILLED (budget ${budget} s + 10 s, or out of memory)" >> "$OUT/logs/$name.log" ;;
    esac
    printf '| %s | %s | %s | %s |\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" >> "$OUT/steps.md"
    tail -n 3 "$OUT/logs/$name.log"
}

# bench NAME BUDGET_S [ARGS...]: benchmarks/NAME.py as a step, its JSON and PNG into $OUT.
bench() {
    local name=$1 budget=$2
    shift 2
    step "$name" "$budget" "$PY" "benchmarks/$name.py" --out "$OUT" "$@"
}

if [ -f setup.py ]; then
    # build_ext --inplace, not `pip install -e .`: it needs no wheel/PEP 660 support from the
    # image's setuptools and writes only into this checkout (PYTHONPATH above finds cckernels._C).
    step build 45 env CCKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
        "$PY" setup.py build_ext --inplace
    # Without a loadable _C the CUDA tests skip rather than fail: say so here, where it shows.
    # The _C of this checkout, not one an installed package's path finds first.
    step build-check 15 "$PY" -c "import os, cckernels, cckernels._C as C; i = cckernels.build_info(); print(i, C.__file__)
assert i['_C'], i; assert C.__file__.startswith(os.getcwd() + '/'), 'not this checkout\'s _C'"
else
    printf '| build | no setup.py in this checkout | - | - |\n' >> "$OUT/steps.md"
fi

# The paths no GPU has run yet, one call each in a process of its own: one that crashes, hangs
# or is wrong is switched off (an `export NAME=0` in smoke.env, the reason in logs/smoke.log)
# for every step after this, so the tests and benchmarks run on what works instead of failing
# behind it. A follow-up call on the same machine (RUN_GPU_STEPS without smoke) takes the
# switches of the last smoke step there, from $SCRATCH/smoke.env.
step smoke 200 env CCKERNELS_AUTOTUNE=0 "$PY" benchmarks/gpu_smoke.py --out "$OUT" --timeout-s 100
if [ -f "$OUT/smoke.env" ]; then
    mkdir -p "$SCRATCH" && cp "$OUT/smoke.env" "$SCRATCH/smoke.env"
fi
if [ -s "$SCRATCH/smoke.env" ]; then
    . "$SCRATCH/smoke.env"
    sed 's/^/switched off: /' "$SCRATCH/smoke.env"
fi

"$PY" - "$OUT/meta.json" <<'EOF'
import json, os, platform, subprocess, sys
from importlib import metadata
sys.path.insert(0, "benchmarks")
from run_info import run_meta  # what every benchmark's JSON opens with
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
import cckernels
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
meta = {
    **run_meta(),
    "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "python": platform.python_version(), "nvcc": (run("nvcc", "--version") or "").splitlines()[-1:],
    "build_info": cckernels.build_info(),
    "available_backends": cckernels.available_backends(),
    # smoke's switches among them; what this call ran
    "env": {k: v for k, v in os.environ.items() if k.startswith(("CCKERNELS_", "RUN_GPU_"))},
    "carried": {name: version(name) for name in ("diffusers", "transformers", "nvidia-dali-cuda130")},
}
if meta["dirty"]:  # what the run's code was, beyond the commit
    open(os.path.join(os.path.dirname(sys.argv[1]), "dirty.diff"), "w").write(run("git", "diff", "HEAD") or "")
open(sys.argv[1], "w").write(json.dumps(meta, indent=2, default=str))
print(json.dumps(meta, default=str))
EOF

# Only what needs the GPU runs here. The CPU tests (`pytest -m "not gpu"`, Triton's interpreter)
# and `python -m cckernels.inspect` are CI's job; torch 2.11 + triton 3.6 were checked on a CPU
# machine (docs/building.md); this image's numpy 2.5 breaks triton 3.6's interpreter anyway.
# CCKERNELS_AUTOTUNE=0: tests check results, so each shape compiles one config, not a pool;
# xdist spreads those compiles (CPU-bound) over the cores. -v: a line per test as it ends, so a
# run cut by the budget still says what passed; --durations sizes the next visit's budget.
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 60")
step pytest-gpu 240 env CCKERNELS_AUTOTUNE=0 "$PY" -m pytest -m gpu $xdist $per_test -v -rs --durations 15 \
    -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests

# Several GPUs: the training benchmark runs one process per GPU (a world of N), the others on one.
# bench_train right after the tests: it is the headline (issue 11), and the H200 runs cut its
# plain-PyTorch rows twice when it came last. CCKERNELS_AUTOTUNE=0: each attention shape
# compiles the first config of its pool that fits instead of searching the pool (the search
# compiles every config, and no bench_attention has warmed Triton's cache by now), which can
# only make our rows slower than tuned ones. --no-compile: inductor takes minutes on the SD2
# UNet, so a compiled row would use up the step's budget; the plain-PyTorch rows run eagerly and
# "+ torch.compile" is skipped (docs/benchmarks.md has the separate call that measures both
# compiled). Rows start until 30 s before the step's end (they took 26-56 s on the H200); a row
# still running at the end is cut, leaving the earlier rows' JSON and PNG (written after each)
# but no table in the log: the summary below prints it from the JSON. --profile: one step of
# kernels a row for the busy column, and the GPU-time rate; op tables (5-14 s a row on the
# third H200 run) only for the headline row (docs/benchmarks.md has the call for others).
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
left=$(time_left)
train_s=$(( left < 270 ? left : 270 ))
train_rows_s=$(( train_s > 30 ? train_s - 30 : 0 ))
train_args=(--out "$OUT" --steps 6 --warmup 2 --budget-s "$train_rows_s" --no-compile --profile
            --op-tables "+ larger micro-batch")
if [ "$ngpu" -gt 1 ]; then
    step bench_train "$train_s" env CCKERNELS_AUTOTUNE=0 "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node="$ngpu" benchmarks/bench_train.py "${train_args[@]}"
else
    step bench_train "$train_s" env CCKERNELS_AUTOTUNE=0 "$PY" benchmarks/bench_train.py "${train_args[@]}"
fi

# Then the kernels, in the order of what open issues still need measured: the cross-attention
# shapes at 256 and 512 px and the 512 px self-attention at L = 4096 (#3: the short-key forward
# as 64 + 16 keys and the 4-waves backward rows), bench_group_norm's batch-256 shapes (#4; its
# JSON is written after every case), the hardware counters, LayerNorm, GEGLU (its two backward
# tilings), the host profile, then EMA (#5's targets met on the fourth run), the full attention
# and data tables.
step bench_attention_cross 60 "$PY" benchmarks/bench_attention.py --out "$OUT/attention-cross" \
    --only "cross" "512px self L=4096" --budget-s 45
bench bench_group_norm 60 --budget-s 45
# Hardware counters of one call of each kernel that misses its target (#3, #4, GEGLU), so that
# sessions without a GPU reason from measurements: Nsight Compute (Firecracker machines; on
# gVisor it cannot read counters and fails in seconds). ncu prints its report when the program
# ends, so the program stops starting cases before the step's budget would kill it.
ncu=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
ncu_s=$(time_left)
ncu_s=$(( ncu_s < 45 ? ncu_s : 45 ))
if [ -n "$ncu" ] && [ "$ncu_s" -lt 40 ]; then  # ncu writes its report at the end: a cut run leaves nothing
    printf '| ncu_kernels | skipped: %s s left, under 40 | - | - |\n' "$ncu_s" >> "$OUT/steps.md"
elif [ -n "$ncu" ]; then
    step ncu_kernels "$ncu_s" "$ncu" --profile-from-start off --clock-control none --section LaunchStats \
        --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section SchedulerStats "$PY" benchmarks/ncu_kernels.py --budget-s $(( ncu_s - 20 ))
else
    printf '| ncu_kernels | skipped: no ncu on PATH or in /opt/nvidia | - | - |\n' >> "$OUT/steps.md"
fi
bench bench_layer_norm 25 --budget-s 12  # bench_geglu's token counts, whose 3 rows a shape took 22 s of 25 (H200)
bench bench_geglu 35 --budget-s 20  # with its backward tilings: 6 rows a shape
# Where eager calls spend their host time (our kernels' were 2-4x PyTorch's); one config each.
step profile_host 30 env CCKERNELS_AUTOTUNE=0 "$PY" benchmarks/profile_host.py --out "$OUT"
bench bench_ema 35
# bench_ddp needs two GPUs for NCCL; on one it would time two gloo processes on the CPU, which
# CI's smoke test already covers.
if [ "$ngpu" -gt 1 ]; then
    bench bench_ddp 30
else
    printf '| bench_ddp | skipped: one GPU | - | - |\n' >> "$OUT/steps.md"
fi
bench bench_attention 55 --budget-s 35
bench bench_data 45 --images 512

{
    echo "# GPU run $(date -u +%Y-%m-%dT%H:%MZ) on $device ($(( $(date +%s) - t_all )) s)"
    echo
    cat "$OUT/steps.md"
    echo
    if [ -s "$SCRATCH/smoke.env" ]; then
        echo "Switched off for the steps after smoke (gpu_smoke.py; the reason in logs/smoke.log of the run that set it):"
        sed 's/^export \([A-Z_]*=0\).*/- `\1`/' "$SCRATCH/smoke.env"
        echo
    fi
    echo "Logs (with every benchmark's table) in logs/; JSON and PNG next to this file; versions in meta.json."
    if [ -f "$OUT/logs/bench_train.log" ]; then
        echo
        echo '```'
        if grep -q '^recipe ' "$OUT/logs/bench_train.log"; then
            sed -n '/^recipe /,/^wrote /p' "$OUT/logs/bench_train.log"
        elif [ -f "$OUT/bench_train.json" ]; then  # cut before its table: the rows it wrote
            timeout 15 "$PY" benchmarks/bench_train.py --print-table "$OUT/bench_train.json" 2>&1
        fi
        echo '```'
    fi
} > "$OUT/summary.md"
rm "$OUT/steps.md"
cat "$OUT/summary.md"
