#!/usr/bin/env bash
# The GPU end-to-end matrix (docs/gpu-e2e.md): every row runs `job run` on a random-init checkpoint of a real
# architecture with a real tokenizer, through merge, verification and a push to the local Hub stand-in, loads the
# pushed repo back and reruns the job, which must push nothing. On a GPU host, from anywhere:
#
#   pip install --no-deps --target /tmp/job-e2e/packages mistral-common llama-models   # tokenizer files, once
#   bash scripts/gpu/e2e.sh                                        # every row
#   ROWS="mistral-7b llama3-dora" bash scripts/gpu/e2e.sh          # some rows
#
# WORK (default /tmp/job-e2e): tokenizers, checkpoints (each built once, deleted after the last row that uses it
# unless KEEP_MODELS=1), runs. OUT (default ./e2e-out): e2e.jsonl and the table, table.md. ROW_TIMEOUT (whole
# seconds, default 600) stops a row's job runs; building a checkpoint gets as long again. PYTHON (default
# python3) must have the job's dependencies; the caller's PYTHONPATH (packages installed with --target) is kept.
set -uo pipefail
WORK=$(realpath -m "${WORK:-/tmp/job-e2e}") OUT=$(realpath -m "${OUT:-e2e-out}")
export WORK OUT ROW_TIMEOUT=${ROW_TIMEOUT:-600}
PY=${PYTHON:-python3}
E2E=$(dirname "$(realpath "$0")")/e2e.py

mkdir -p "$WORK" "$OUT"
if [ -f "$OUT/e2e.jsonl" ]; then mv "$OUT/e2e.jsonl" "$OUT/e2e.previous.jsonl"; fi  # the table covers this run only
read -ra rows <<<"${ROWS:-$("$PY" "$E2E" rows)}"
dirs=()
for row in "${rows[@]}"; do dirs+=("$("$PY" "$E2E" model-dir "$row")") || exit 2; done
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
"$PY" "$E2E" tokenizers "$WORK/tokenizers" || exit 1

failed=0
for i in "${!rows[@]}"; do
  row=${rows[i]} dir=${dirs[i]}
  echo "=== $row ($(date -u +%H:%M:%S) UTC)"
  if [ ! -f "$dir/config.json" ]; then
    timeout -k 30 "$ROW_TIMEOUT" "$PY" "$E2E" model "$row" "$dir"
  fi
  # The driver stops the job itself at ROW_TIMEOUT (SIGTERM, as a scheduler would) and records the row; this
  # outer limit only catches a driver that hangs.
  timeout -k 30 $((ROW_TIMEOUT + 180)) "$PY" "$E2E" row "$row" || failed=$((failed + 1))
  later=" ${dirs[*]:i+1} "
  if [ -z "${KEEP_MODELS:-}" ] && [[ $later != *" $dir "* ]]; then rm -rf "$dir"; fi
done

"$PY" "$E2E" table "$OUT/e2e.jsonl" | tee "$OUT/table.md"
echo "$failed of ${#rows[@]} rows failed"
exit $((failed > 0))
