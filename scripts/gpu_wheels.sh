#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine without network: run this here, with network.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION [PLATFORM...]]
#   PYTHON_VERSION=3.12 PLATFORM="manylinux2014_x86_64 manylinux_2_28_x86_64" scripts/gpu_wheels.sh
#
# Downloads into $WHEELS (default scripts/wheels/, ignored by git), for the GPU machine's Python version
# (PYTHON_VERSION, default 3.11; `python -V` there) and platform (PLATFORM, default manylinux2014_x86_64; several,
# space-separated, are all accepted), every dependency wheel of the project except torch and the nvidia-* CUDA
# wheels (the GPU machine keeps its own torch), plus pytest (the tests section) and hatchling (the build backend,
# as gpu_check.sh installs the checkout itself), and the project's own wheel.
# Copy the checkout with scripts/wheels/ to the GPU machine, then run scripts/gpu_check.sh there.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON_VERSION="${1:-${PYTHON_VERSION:-3.11}}"
if [ $# -ge 2 ]; then shift; PLATFORM="$*"; fi
PLATFORM="${PLATFORM:-manylinux2014_x86_64}"
WHEELS="${WHEELS:-$HERE/wheels}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WHEELS"

# The project's requirements (pyproject.toml [project] dependencies) without torch, plus pytest and hatchling.
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$PYTHON" - "$REPO/pyproject.toml" >"$reqs" <<'PY'
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
requirements = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["test"]]
for req in requirements:
    name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0].lower()
    if name != "torch" and not name.startswith("nvidia-cu") and name != "ruff":
        print(req)
PY
echo "gpu_wheels.sh: Python $PYTHON_VERSION, platform(s) $PLATFORM -> $WHEELS"
cat "$reqs"

platforms=()
for p in $PLATFORM; do platforms+=(--platform "$p"); done
"$PYTHON" -m pip download --only-binary=:all: --python-version "$PYTHON_VERSION" "${platforms[@]}" \
  -d "$WHEELS" -r "$reqs"
"$PYTHON" -m pip wheel --no-deps "$REPO" -w "$WHEELS"

# A dependency that itself asks for torch or the CUDA wheels must not bring them: the GPU machine keeps its own.
# (nvidia-ml-py, the NVML binding isubg gpu uses, is a plain dependency and stays.)
if ls "$WHEELS" | grep -Ei '^(torch-|triton-|nvidia[-_])' | grep -Eiv '^nvidia[-_]ml[-_]py'; then
  echo "gpu_wheels.sh: the wheels above are torch / CUDA wheels some dependency pulled in; delete them" >&2
  exit 1
fi
echo "gpu_wheels.sh: $(ls "$WHEELS" | wc -l) wheels in $WHEELS"
