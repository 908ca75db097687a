#!/usr/bin/env bash
# Checks pyproject.toml's dependency floors: a fresh virtual environment with the oldest release each floor allows
# (torch, diffusers, transformers, peft, accelerate; torch comes from PyPI as a CUDA build, about 3 GB), the rest of
# the package's requirements at their newest, then the whole test suite on the CPU. Needs PyPI; run it before
# raising or lowering a floor. docs/design.md ("Dependency floors") has the last result.
#   usage: benchmarks/dependency_floors.sh [VENV_DIR] [pytest args...]     (default VENV_DIR: /tmp/lowmem-floors)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/lowmem-floors}
shift || true
python3 -m venv "$venv"
floors=$("$venv/bin/python" - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pinned = ("torch", "diffusers", "transformers", "peft", "accelerate")
print(" ".join(d.replace(">=", "==") for d in deps if d.split(">=")[0] in pinned))
PY
)
echo "floors: $floors"
"$venv/bin/pip" install -q $floors
"$venv/bin/pip" install -q -e ".[test]"  # everything else at its newest; the floors already satisfy their >=
"$venv/bin/pip" list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|peft|accelerate) "
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
