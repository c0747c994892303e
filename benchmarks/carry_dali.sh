#!/usr/bin/env bash
# Carry DALI (and the Hugging Face / plotting packages the trainer's benchmarks need) to a GPU
# machine that has no package registry, in parts small enough for one transfer each
# (/work/shared/GPU.md: at most 64 MiB per call; ignored files on a warm machine survive between
# back-to-back calls, so each call leaves its part in a scratch folder outside the checkout).
#
#   here (registry access):   benchmarks/carry_dali.sh download
#       -> wheels for CPython 3.12 / manylinux x86_64 in .whl/ (git-ignored), one tar of them
#          split into ~55 MB parts, part NN in its own git-ignored folder .dali-partNN/,
#          plus .dali-partNN/MANIFEST (part count and the tar's sha256) in every folder
#   GPU machine, one call per part, carry=[".dali-partNN"]:   benchmarks/carry_dali.sh stash
#       -> copies the carried part(s) to $CARRY_SCRATCH (default /tmp/cc-carry)
#   GPU machine, last call (carrying the last part):          benchmarks/carry_dali.sh install
#       -> stash, join, check the sha256, unpack, and `pip install --no-index --no-deps --target
#          $CARRY_SCRATCH/site` every carried wheel whose distribution the machine lacks (torch,
#          numpy, ... are never replaced); then: export PYTHONPATH=$CARRY_SCRATCH/site:$PYTHONPATH
#          (benchmarks/run_gpu.sh adds it by itself when the folder exists)
#   anywhere:                 benchmarks/carry_dali.sh join     (join + check + unpack only: the
#                             local test of the parts)
set -euo pipefail
cd "$(dirname "$0")/.."

SCRATCH=${CARRY_SCRATCH:-/tmp/cc-carry}
WHEELS=.whl
PART_MB=55
# Top-level requirements; pip resolves the rest for Python 3.12 (DALI pins its nvimgcodec and
# nvcomp; their CUDA libraries come as nvidia-* wheels).
REQUIREMENTS=(nvidia-dali-cuda130 diffusers transformers pyyaml tqdm pillow matplotlib safetensors)

download() {
    rm -rf "$WHEELS" .dali-part*/
    mkdir -p "$WHEELS"
    "${PIP:-pip}" download --dest "$WHEELS" --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 "${REQUIREMENTS[@]}"
    # One tar (wheels are already compressed) so the parts are plain byte ranges.
    tar -cf "$WHEELS/carry.tar" -C "$WHEELS" $(cd "$WHEELS" && ls *.whl)
    local sha count
    sha=$(sha256sum "$WHEELS/carry.tar" | cut -d' ' -f1)
    split -b "${PART_MB}M" -d -a 2 "$WHEELS/carry.tar" "$WHEELS/part."
    count=$(ls "$WHEELS"/part.* | wc -l)
    for part in "$WHEELS"/part.*; do
        local n=${part##*.}
        mkdir -p ".dali-part$n"
        mv "$part" ".dali-part$n/"
        printf 'parts %s\nsha256 %s\n' "$count" "$sha" > ".dali-part$n/MANIFEST"
    done
    rm "$WHEELS/carry.tar"
    du -ch .dali-part*/part.* | tail -1
    echo "carry one folder per call, in order, running 'benchmarks/carry_dali.sh stash' (the last: install):"
    ls -d .dali-part*/
}

stash() {
    mkdir -p "$SCRATCH/parts"
    local found=0
    for dir in .dali-part*/; do
        [ -f "$dir/MANIFEST" ] || continue
        cp "$dir"/part.* "$SCRATCH/parts/"
        cp "$dir/MANIFEST" "$SCRATCH/MANIFEST"
        found=1
    done
    [ "$found" = 1 ] || { echo "no .dali-partNN/ folder in this checkout: carry one" >&2; exit 1; }
    echo "parts in $SCRATCH/parts: $(ls "$SCRATCH/parts" | tr '\n' ' ')"
}

join() {
    local want sha have
    want=$(awk '/^parts/ {print $2}' "$SCRATCH/MANIFEST")
    sha=$(awk '/^sha256/ {print $2}' "$SCRATCH/MANIFEST")
    have=$(ls "$SCRATCH/parts" | wc -l)
    if [ "$have" != "$want" ]; then
        echo "have $have of $want parts in $SCRATCH/parts; carry and stash the others first" >&2
        exit 1
    fi
    cat "$SCRATCH"/parts/part.* > "$SCRATCH/carry.tar"
    echo "$sha  $SCRATCH/carry.tar" | sha256sum -c -
    rm -rf "$SCRATCH/wheels"
    mkdir -p "$SCRATCH/wheels"
    tar -xf "$SCRATCH/carry.tar" -C "$SCRATCH/wheels"
    rm "$SCRATCH/carry.tar"
    echo "$(ls "$SCRATCH/wheels" | wc -l) wheels in $SCRATCH/wheels"
}

install() {
    stash
    join
    local python=${PYTHON:-python} missing=()
    # Only distributions this Python lacks: the machine's torch, triton, numpy stay as they are.
    mapfile -t missing < <("$python" - "$SCRATCH/wheels" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
)
    echo "installing ${#missing[@]} wheels into $SCRATCH/site"
    "$python" -m pip install --no-index --no-deps --target "$SCRATCH/site" "${missing[@]}"
    PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
        "import nvidia.dali, diffusers, transformers; print('DALI', nvidia.dali.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
    echo "export PYTHONPATH=$SCRATCH/site:\$PYTHONPATH"
}

case "${1:-}" in
    download) download ;;
    stash) stash ;;
    join) join ;;
    install) install ;;
    *) echo "usage: $0 download | stash | join | install   (see the comments at the top)" >&2; exit 2 ;;
esac
