#!/usr/bin/env bash
# The ablation study (docs/study.md), resumable: `python -m lidit study` trains every variant of
# configs/ablation_*.json for each seed (and the long-scene runs of the positional-bias figure),
# scores each run and the committed demo on COUNT unseen prompts per set (Euler, 25 steps, CFG 2),
# and writes $RESULTS/study.json, $RESULTS/table.md and the chart with 95% intervals.
# Rerun the same command after an interruption: finished runs are skipped, a run cut short
# continues from its last checkpoint.
#   SEEDS=3 (a count, or a list like 0,1,2)   COUNT=400 (prompts per set)   THREADS=2
#   VARIANTS / LONG_VARIANTS (comma-separated config names; LONG_VARIANTS= for none)
#   FINISHED_ONLY=1 (train nothing: the table and chart of the runs finished so far)
#   STEPS (override the configs' 3700: the tiny mode, e.g. STEPS=2 COUNT=2 SEEDS=1, which writes to
#   out/study-steps$STEPS and leaves docs/ alone)   OUT (the runs' working folders)   RESULTS   CHART
# The full study records each finished run in docs/study/runs/ (committed: a few KB each), so that
# it accumulates across machines; the checkpoints stay in OUT (out/study, git-ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
[ -d models/LLM/SmolLM2-135M-Instruct ] && [ -d models/LLM/gemma-3-270m ] || LIDIT_SKIP_BROWSER=1 bash scripts/provision.sh
args=(--seeds "${SEEDS:-3}" --count "${COUNT:-400}" --threads "${THREADS:-2}")
[ -n "${VARIANTS:-}" ] && args+=(--variants "$VARIANTS")
[ -n "${LONG_VARIANTS+set}" ] && args+=(--long-variants "$LONG_VARIANTS")
[ -n "${FINISHED_ONLY:-}" ] && args+=(--finished-only)
if [ -n "${STEPS:-}" ]; then
    OUT=${OUT:-out/study-steps$STEPS}
    args+=(--steps "$STEPS" --results "${RESULTS:-$OUT}" --chart "${CHART:-$OUT/positions.png}")
else
    OUT=${OUT:-out/study}
    args+=(--results "${RESULTS:-docs/study}" --chart "${CHART:-docs/study/positions.png}")
fi
exec "$PY" -m lidit study --out "$OUT" "${args[@]}"
