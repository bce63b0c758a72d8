#!/usr/bin/env bash
# The test command: provision (idempotent; fast when already done), lint with ruff, then run all
# three rings: tests/unit (no ComfyUI), tests/host (one real ComfyUI server), tests/browser
# (headless chromium on that server). Extra arguments go to pytest instead of "tests",
# e.g. `bash scripts/test.sh tests/unit -k refiner` or `bash scripts/test.sh -m "not host"`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

t0=$SECONDS
bash scripts/provision.sh
echo "[test] provision: $((SECONDS - t0))s"

t1=$SECONDS
.venv/bin/ruff check .
echo "[test] ruff: $((SECONDS - t1))s"

args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(tests)
t1=$SECONDS
set +e
.venv/bin/python -m pytest -c tests/pytest.ini -q --durations=10 "${args[@]}"
rc=$?
set -e
echo "[test] pytest: $((SECONDS - t1))s (exit $rc); total $((SECONDS - t0))s"
exit "$rc"
