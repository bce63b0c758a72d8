#!/usr/bin/env bash
# The main job: provision, then run the paper-pipeline example workflow (two real LLMs + the
# demo checkpoint) on a headless ComfyUI and write the PNG under out/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LIDIT_SKIP_BROWSER=1 LIDIT_SKIP_EMOJI=1 bash scripts/provision.sh  # the workflow needs neither
exec .venv/bin/python scripts/run_workflow.py workflows/api/lidit_paper_pipeline.json --out out "$@"
