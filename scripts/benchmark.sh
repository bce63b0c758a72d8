#!/usr/bin/env bash
# The prompt-following benchmark of the README: trains the ablation set under one budget
# (configs/ablation_*.json; a variant whose checkpoint exists is not retrained), scores the
# committed demo and every variant with `python -m lidit.eval`, and writes the table and chart.
# Every variant is sampled alike: Euler, 25 steps, CFG $CFG (the demo's default, chosen on seed 99;
# the benchmark's prompts use seed 1234).
#   COUNT=200 (prompts per set)   CFG=2.0   THREADS=2 (per training run)   OUT=out/eval
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COUNT=${COUNT:-200}
CFG=${CFG:-2.0}
THREADS=${THREADS:-2}
OUT=${OUT:-out/eval}
PY=.venv/bin/python
SMOL=models/LLM/SmolLM2-135M-Instruct
GEMMA=models/LLM/gemma-3-270m
[ -d "$SMOL" ] && [ -d "$GEMMA" ] || LIDIT_SKIP_BROWSER=1 bash scripts/provision.sh
mkdir -p "$OUT"

score() {  # label, checkpoint, result name, LLM folders...
    local label=$1 checkpoint=$2 name=$3
    shift 3
    local llms=()
    for folder in "$@"; do llms+=(--llm "$folder"); done
    "$PY" -m lidit.eval run --checkpoint "$checkpoint" "${llms[@]}" --count "$COUNT" --cfg "$CFG" --label "$label" \
        --out "$OUT/$name.json" --samples "$OUT/$name.png" > "$OUT/$name.log"
    echo "scored $label -> $OUT/$name.json"
}

for variant in full one_llm no_refiner no_instruction; do
    if [ ! -f "out/ablation-$variant/model.safetensors" ]; then
        "$PY" -m lidit.train --config "configs/ablation_$variant.json" threads="$THREADS" progress=plain
    fi
done
steps() { "$PY" -c "import json, sys; from lidit.checkpoint import read_metadata; \
print(json.loads(read_metadata(sys.argv[1])['training_stats'])['step'])" "$1"; }

score "demo ($(steps checkpoints/lidit-demo.safetensors) steps)" checkpoints/lidit-demo.safetensors demo "$SMOL" "$GEMMA"
score "full ($(steps out/ablation-full/model.safetensors) steps)" out/ablation-full/model.safetensors full "$SMOL" "$GEMMA"
score "one LLM" out/ablation-one_llm/model.safetensors one_llm "$SMOL"
score "no token refiner" out/ablation-no_refiner/model.safetensors no_refiner "$SMOL" "$GEMMA"
score "no instruction" out/ablation-no_instruction/model.safetensors no_instruction "$SMOL" "$GEMMA"
"$PY" -m lidit.eval report "$OUT"/{demo,full,one_llm,no_refiner,no_instruction}.json \
    --markdown "$OUT/table.md" --chart docs/benchmark.png
cat "$OUT/table.md"
