#!/usr/bin/env bash
# Every GPU check of isubg in one run, on a bare CUDA machine without network (about 5-8 minutes on an H200).
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# 1. Installs this checkout and its missing dependencies from the wheels carried beside this script
#    ($ISUBG_WHEELS, default scripts/wheels/, made on a machine with network by scripts/gpu_wheels.sh) with
#    `pip install --no-index --find-links`. The machine's own torch (its CUDA build) is kept: the project asks
#    for a torch range, and pip leaves an installed torch that satisfies it alone; no torch wheel is carried.
# 2. Runs scripts/gpu_check.py: environment, the gpu-marked tests, memory estimate vs measured peak per preset,
#    throughput and MFU (bf16 / fp32 / TF32), loader vs step demand, syncs per step, a short train + resume.
#    Results: DIR/summary.txt (table), DIR/results.json, DIR/junit.xml, DIR/gpu_check.log (default DIR gpu-check).
#
# --dry-run: the same script on the CPU at toy sizes (CI runs it); the install is skipped when isubg imports.
# Environment: PYTHON (default python), ISUBG_WHEELS. Exit code: non-zero when the install or any check failed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
WHEELS="${ISUBG_WHEELS:-$HERE/wheels}"
PYTHON="${PYTHON:-python}"

dry=0
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry=1; fi
done

if [ "$dry" = 1 ] && "$PYTHON" -c "import isubg" 2>/dev/null; then
  echo "gpu_check.sh: dry run and isubg already imports: skipping the install"
else
  if ! torch_before="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    echo "gpu_check.sh: $PYTHON has no torch; install the machine's CUDA build of torch first (2.2 <= torch < 2.14)" >&2
    exit 2
  fi
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: no wheels folder $WHEELS; make it with scripts/gpu_wheels.sh on a machine with network" >&2
    exit 2
  fi
  echo "gpu_check.sh: installing $REPO from $WHEELS (keeping torch $torch_before)"
  # pytest: the tests section; the project is built with hatchling, also taken from the wheels folder.
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$REPO" pytest
  torch_after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
  if [ "$torch_after" != "$torch_before" ]; then
    echo "gpu_check.sh: pip replaced torch $torch_before by $torch_after" >&2
    exit 2
  fi
fi

cd "$REPO"
exec "$PYTHON" scripts/gpu_check.py "$@"
