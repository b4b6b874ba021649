#!/usr/bin/env bash
# The one device command of a short GPU window: install this tree offline into the `python3` on PATH
# (which has torch and triton but not this project), then run `python -m bench gpu-check` within a budget.
#
#   bash bench/gpu_window.sh --stamp           # here, before the tree is shipped: bench/.commit from git
#   bash bench/gpu_window.sh                   # on the GPU machine: gpu-check --out "${OUT:-<its default>}"
#   bash bench/gpu_window.sh --dry-run         # the plan: boxes, minimum times, items, whether it fits
#   bash bench/gpu_window.sh --smoke           # the same path on a CPU, with the smoke check (harness only)
#
# Any other arguments go to gpu-check (e.g. --stages env,correctness, --configs FILE, --out DIR).
# Environment: GPU_WINDOW_S, the seconds this whole command may take (default 450; give the device
# tool a timeout_s of at least GPU_WINDOW_S + 30); PYTHON (default python3); OUT, the folder that comes
# back; IMF_GIT_COMMIT / IMF_GIT_DIRTY, the commit when the tree carries neither .git nor bench/.commit.
# Nothing here needs the network, the git history or the dev extras: the install is
# `pip install --no-build-isolation --no-deps --no-index -e .`, and where that is impossible (no pip, a
# read-only tree) the tree is put on PYTHONPATH with `imf_kernels` linked to kernels/ (setup.py's mapping).
set -euo pipefail

START=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WINDOW_S=${GPU_WINDOW_S:-450}
EXIT_RESERVE_S=15 # gpu-check's own start-up (torch import) and exit, outside its budget clock

say() { echo "[gpu_window] $*"; }

mode=run
case "${1:-}" in
--stamp)
    cd "$ROOT" && exec "$PY" -m bench.provenance stamp
    ;;
--dry-run | --smoke)
    mode=${1#--}
    shift
    ;;
esac

# Is the project importable from outside the tree, from this tree? (cwd / keeps '' off sys.path)
importable() {
    (cd / && "$PY" - "$ROOT" <<'EOF'
import os, sys
import bench, imf, imf_kernels
root = os.path.realpath(sys.argv[1])
for m in (bench, imf, imf_kernels):
    if not os.path.realpath(m.__file__).startswith(root + os.sep):
        sys.exit(f"{m.__name__} comes from {m.__file__}, not from {root}")
EOF
    ) 2>&1
}

if problem=$(importable); then
    say "the project is importable from $ROOT already"
else
    say "installing $ROOT offline into $("$PY" -c 'import sys; print(sys.prefix)')"
    if ! (cd "$ROOT" && timeout 180 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .) ||
        ! problem=$(importable); then
        say "pip install -e . did not give an importable project (${problem:-see above}); using PYTHONPATH"
        shim=$(mktemp -d "${TMPDIR:-/tmp}/imf-path.XXXXXX")
        ln -s "$ROOT/kernels" "$shim/imf_kernels"
        export PYTHONPATH="$shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        problem=$(importable) || {
            echo "[gpu_window] the project is still not importable: $problem" >&2
            exit 3
        }
    fi
fi
"$PY" -c 'import sys, torch, triton; print(f"[gpu_window] python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, CUDA available: {torch.cuda.is_available()}")'

args=()
if [[ $mode == dry-run ]]; then
    args+=(--dry-run)
elif [[ $mode == smoke ]]; then
    args+=(--smoke)
fi
if [[ " $* " != *" --out "* && " $* " != *" --out="* && $mode != dry-run && -n ${OUT:-} ]]; then
    args+=(--out "$OUT")
fi
if [[ " $* " != *" --budget-s"* ]]; then
    budget=$((WINDOW_S - (SECONDS - START) - EXIT_RESERVE_S))
    if ((budget < 60)); then
        echo "[gpu_window] GPU_WINDOW_S=$WINDOW_S leaves ${budget} s for gpu-check; give at least 60 more" >&2
        exit 2
    fi
    [[ $mode == dry-run ]] && budget=420 # the plan is checked against the window's 420 s
    args+=(--budget-s "$budget")
fi
say "python -m bench gpu-check ${args[*]} $*"
cd "$ROOT"
exec "$PY" -m bench gpu-check "${args[@]}" "$@"
