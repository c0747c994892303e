#!/usr/bin/env bash
# Carry DALI and diffusers to a GPU machine that has no package registry (/work/shared/GPU.md:
# at most 64 MiB per call; ignored files on a warm machine survive between back-to-back calls,
# so each call leaves its part in a scratch folder outside the checkout).
#
#   here (registry access):   benchmarks/carry_dali.sh download
#       -> wheels for CPython 3.12 / manylinux x86_64 in .whl/ (git-ignored), of which only what
#          the GPU image lacks (ON_IMAGE below) is carried:
#          .carry-py/     the small wheels (diffusers, DALI's small needs; ~12 MB), as is
#          .dali-partNN/  the DALI binary wheels (~263 MB) as one tar split into 55 MiB parts,
#                         each folder with MANIFEST (part count and the tar's sha256)
#   GPU machine, one call per part, carry=[".dali-partNN"]:   benchmarks/carry_dali.sh stash
#       -> copies the carried part(s) to $CARRY_SCRATCH (default /tmp/cc-carry)
#   GPU machine, carrying .carry-py (and the last part):      benchmarks/carry_dali.sh install
#       -> stash, join and check the parts (when any were stashed), unpack, and
#          `pip install --no-index --no-deps --target $CARRY_SCRATCH/site` every carried wheel
#          whose distribution the machine lacks (its torch, numpy, transformers ... stay);
#          benchmarks/run_gpu.sh puts that folder on PYTHONPATH by itself.
#   anywhere:                 benchmarks/carry_dali.sh join     (join + check + unpack only)
#
# The run calls of a GPU session, back to back (the machine is given back 30 s after a call
# ends, taking the stashed parts with it): docs/benchmarks.md. In short, without DALI one call
# carrying .carry-py runs `install; run_gpu.sh`; with DALI, four calls carrying .dali-part00 to
# .dali-part03 run `stash` first, and the last one also carries .dali-part04.
#
# CARRY_PYTHON_VERSION=3.11 downloads for Python 3.11 instead (to try the whole path on a
# machine without 3.12: the DALI wheels are the same, a few small ones differ).
set -euo pipefail
cd "$(dirname "$0")/.."

SCRATCH=${CARRY_SCRATCH:-/tmp/cc-carry}
PY_VERSION=${CARRY_PYTHON_VERSION:-3.12}
WHEELS=.whl
SMALL=.carry-py
PART_MB=${PART_MB:-55}  # a call carries 64 MiB in all: the tree and one part
# Top-level requirements; pip resolves the rest (DALI pins its nvimgcodec and nvcomp; their CUDA
# libraries come as nvidia-* wheels).
REQUIREMENTS=(nvidia-dali-cuda130 diffusers)
# Distributions of that resolution that the GPU image already has (its package list in the
# device tool's KINDS.md, read 2026-11-17): not carried. `install` checks again on the machine.
ON_IMAGE="annotated-doc anyio certifi charset-normalizer click contourpy cycler filelock fonttools
fsspec h11 hf-xet huggingface-hub idna kiwisolver markdown-it-py matplotlib mdurl numpy packaging
pillow pygments pyparsing python-dateutil pyyaml regex requests rich safetensors shellingham six
tokenizers tqdm transformers typer typing-extensions urllib3 wheel zipp"

# The distribution name of a wheel file, normalized (PEP 503).
dist_name() {
    local base=${1##*/}
    echo "${base%%-*}" | tr 'A-Z_.' 'a-z--'
}

download() {
    rm -rf "$WHEELS" "$SMALL" .dali-part*/
    mkdir -p "$WHEELS" "$SMALL"
    "${PIP:-pip}" download --dest "$WHEELS" --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --abi "cp${PY_VERSION/./}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 "${REQUIREMENTS[@]}"
    local big=() wheel name
    for wheel in "$WHEELS"/*.whl; do
        name=$(dist_name "$wheel")
        case " $(echo $ON_IMAGE) " in *" $name "*) continue ;; esac
        case $name in
            nvidia-dali-*|nvidia-nvimgcodec-*|nvidia-libnvcomp-*|nvidia-nvjpeg*|nvidia-nvtiff-*)
                big+=("${wheel##*/}") ;;
            *) cp "$wheel" "$SMALL/" ;;
        esac
    done
    # One tar (wheels are already compressed) so the parts are plain byte ranges.
    tar -cf "$WHEELS/carry.tar" -C "$WHEELS" "${big[@]}"
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
    du -sh "$SMALL" .dali-part*/
    echo "carry $SMALL with the last part; the others one per call before it, running 'stash'"
}

stash() {
    local dir found=0
    for dir in .dali-part*/; do
        [ -f "$dir/MANIFEST" ] || continue
        mkdir -p "$SCRATCH/parts"
        cp "$dir"/part.* "$SCRATCH/parts/"
        cp "$dir/MANIFEST" "$SCRATCH/MANIFEST"
        found=1
    done
    if [ "$found" = 1 ]; then
        echo "parts in $SCRATCH/parts: $(ls "$SCRATCH/parts" | tr '\n' ' ')"
    else
        echo "no .dali-partNN/ folder in this checkout" >&2
        return 1
    fi
}

join() {
    local want sha have
    if [ ! -f "$SCRATCH/MANIFEST" ]; then
        echo "no $SCRATCH/MANIFEST: stash the carried parts first ($0 stash in each call that carries one)" >&2
        return 1
    fi
    want=$(awk '/^parts/ {print $2}' "$SCRATCH/MANIFEST")
    sha=$(awk '/^sha256/ {print $2}' "$SCRATCH/MANIFEST")
    have=$(ls "$SCRATCH/parts" 2> /dev/null | wc -l)
    if [ "$have" != "$want" ]; then
        echo "have $have of $want parts in $SCRATCH/parts; carry and stash the others first" >&2
        return 1
    fi
    # Explicit returns: `install` calls this where a failure must not stop it (set -e is off there).
    cat "$SCRATCH"/parts/part.* > "$SCRATCH/carry.tar" || return 1
    echo "$sha  $SCRATCH/carry.tar" | sha256sum -c - || return 1
    mkdir -p "$SCRATCH/wheels"
    tar -xf "$SCRATCH/carry.tar" -C "$SCRATCH/wheels" || return 1
    rm "$SCRATCH/carry.tar"
    echo "$(ls "$SCRATCH/wheels" | wc -l) wheels in $SCRATCH/wheels"
}

install() {
    local python=${PYTHON:-python3} missing=() wheel
    rm -rf "$SCRATCH/wheels" && mkdir -p "$SCRATCH/wheels"
    # Without all the DALI parts the small wheels still go in: the tests and bench_train need
    # diffusers, and a run_gpu.sh after this only loses DALI's rows.
    if stash 2>/dev/null || [ -f "$SCRATCH/MANIFEST" ]; then
        join || echo "DALI NOT installed (see above); installing the other wheels" >&2
    else
        echo "no DALI parts carried or stashed: installing the small wheels only"
    fi
    if compgen -G "$SMALL/*.whl" > /dev/null; then
        cp "$SMALL"/*.whl "$SCRATCH/wheels/"
    else
        echo "no wheels in $SMALL/ in this checkout: diffusers is not carried" >&2
    fi
    # Only distributions this Python lacks: the machine's torch, triton, numpy stay as they are.
    local wheels=("$SCRATCH"/wheels/*.whl)
    [ -e "${wheels[0]}" ] || wheels=()  # no match: the pattern itself, not a wheel
    for wheel in "${wheels[@]}"; do
        "$python" -c "import sys; from importlib import metadata; metadata.version(sys.argv[1])" \
            "$(dist_name "$wheel")" 2>/dev/null || missing+=("$wheel")
    done
    echo "installing ${#missing[@]} of ${#wheels[@]} wheels into $SCRATCH/site"
    rm -rf "$SCRATCH/site"  # pip --target skips folders that exist: start clean
    # with nothing missing, pip would fail for want of arguments (set -e) before the check below
    [ ${#missing[@]} -eq 0 ] || "$python" -m pip install --no-index --no-deps --no-compile --target "$SCRATCH/site" "${missing[@]}"
    # nvimgcodec, nvjpeg2k and nvtiff each ship nvidia/__init__.py, some empty; whichever pip
    # wrote last decides. An empty one, first on PYTHONPATH, would hide the machine's own
    # nvidia-* packages (torch's CUDA headers, which setup.py finds through nvidia.__path__).
    if [ -f "$SCRATCH/site/nvidia/__init__.py" ]; then
        echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > "$SCRATCH/site/nvidia/__init__.py"
    fi
    PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}" "$python" - <<'EOF'
import importlib
for name in ("diffusers", "transformers", "nvidia.dali"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "NOT importable:", e)
EOF
}

case "${1:-}" in
    download) download ;;
    stash) stash ;;
    join) join ;;
    install) install ;;
    *) echo "usage: $0 download | stash | join | install   (see the comments at the top)" >&2; exit 2 ;;
esac
