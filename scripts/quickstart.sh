#!/usr/bin/env bash
# The main job: set up, build the bundled benchmark, run every editor (the trained ones with their
# bundled weights) on E-VQA-lite and E-IC-lite with the bundled default model, and print the
# paper-style table. LIMIT (cases per run, default 20), OUT (default runs/quickstart) and METHODS
# (space-separated, default: all) can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LIMIT=${LIMIT:-20}
OUT=${OUT:-runs/quickstart}
METHODS=${METHODS:-"ft-lm ft-vision ike t-patcher mend mend-vision ke serac unike"}
MMKE=.venv/bin/mmke
$MMKE data build
for task in vqa caption; do
  for method in $METHODS; do
    echo "== $method on $task ($LIMIT cases)"
    $MMKE run --method "$method" --task "$task" --limit "$LIMIT" --out "$OUT/$task-$method"
  done
done
echo
$MMKE report "$OUT"
