#!/usr/bin/env bash
# The long-context trials of docs/long-context.md on a GPU host, in an environment with the job's dependencies,
# from the repository root, within BUDGET_S seconds: the trials run in order of importance, each its own process
# with its own timeout, and a trial is skipped when the time left cannot hold it.
# Results: one JSON line per trial in $OUT/longctx.jsonl.
set -uo pipefail
budget=${BUDGET_S:-570}
start=$SECONDS
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TMPDIR=${TMPDIR:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
free -g | tee -a "$out/gpu.txt"
python3 -c "from pathlib import Path; from job.bench.workload import build_model; print(build_model('llama-3-8b', Path('/tmp/job-bench')))" \
  2>&1 | tail -3
echo "model ready at $((SECONDS - start)) s"
if [ -n "${GPU_TESTS-1}" ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_longctx.py -k gpu 2>&1 | grep -E "Error|assert|passed|failed" | head -12
  [ -n "${ATTN_BENCH:-}" ] && timeout 60 python3 scripts/gpu/attention_bench.py 65536 | tee "$out/attention.jsonl" | grep -v '^_'
fi
# mode:length:steps:cap_gib:seconds it may take
for spec in ${TRIALS:-long:262144:1:0:330 long:65536:2:0:90 stock:65536:2:0:90 long:65536:1:24:70 long:131072:2:0:150}; do
  IFS=: read -r mode length steps cap limit <<<"$spec"
  left=$((budget - (SECONDS - start)))
  if ((left < limit / 2)); then echo "skip $spec: ${left}s left"; continue; fi
  ((limit > left)) && limit=$left
  echo "trial $spec (limit ${limit}s) at $((SECONDS - start)) s"
  timeout -k 5 "$limit" python3 -m job.bench.longest trial --model-dir /tmp/job-bench/llama-3-8b-nf4 --mode "$mode" \
    --length "$length" --steps "$steps" --cap-gib "$cap" 2>"$out/trial-$mode-$length-$cap.log" \
    | grep '^{' | tee -a "$out/longctx.jsonl"
  echo "exit ${PIPESTATUS[0]}; $(tail -2 "$out/trial-$mode-$length-$cap.log" | cut -c1-300)"
done
echo "done at $((SECONDS - start)) s"
