#!/usr/bin/env bash
# The main job: set up, then run every method on E-VQA-lite and E-IC-lite (the bundled benchmark v2,
# built on first use) with the bundled default model — one process, the model loaded once, the
# trained editors with their bundled weights — and print one table per task, every cell with its
# 95% bootstrap interval. Overrides: LIMIT (cases per method and task, default 5: a smoke-sized
# table; LIMIT=200 is the full table of docs/RESULTS.md), OUT (default runs/quickstart), METHODS
# (space- or comma-separated, default below). Re-running the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LIMIT=${LIMIT:-5}
OUT=${OUT:-runs/quickstart}
METHODS=${METHODS:-"null ft-lm ft-vision ike t-patcher mend mend-vision ke serac serac-mm unike unike-plus"}
METHODS=$(echo "$METHODS" | tr ' ' ',' | tr -s ',' | sed 's/^,//; s/,$//')
MMKE=.venv/bin/mmke
echo "== one-step editing, $LIMIT cases per method and task: $METHODS"
$MMKE run --method "$METHODS" --task vqa,caption --limit "$LIMIT" --out "$OUT"
echo
$MMKE report "$OUT"
