#!/usr/bin/env bash
# Every STRATEGY on all GPUs of a GPU host (an environment with the job's dependencies and deepspeed, from the
# repository root): the tiny model trains,
# is stopped by SIGUSR1 after its first complete checkpoint (expect 75), resumes (expect 0) and is saved, evaluated and merged.
# $OUT/summary.txt: one line per strategy; $OUT/logs.tgz: the logs. docs/launch.md says more.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L; python3 -c "import torch,transformers,accelerate,deepspeed,bitsandbytes as b;print(torch.__version__,transformers.__version__,accelerate.__version__,deepspeed.__version__,b.__version__)"
export HF_HOME=/tmp/hf REPORT_TO=none MAX_STEPS=${MAX_STEPS:-8} SAVE_STEPS=2 LOGGING_STEPS=2 MAX_LENGTH=256 EVAL_STEPS=1000 SAMPLE_PROMPTS=1 MAX_NEW_TOKENS=8
S=$SECONDS
for st in ${STRATEGIES:-ddp fsdp zero3 zero2}; do
 (( SECONDS - S > 420 )) && { echo "$st: skipped (time)" | tee -a $OUT/summary.txt; continue; }
 o=/tmp/o-$st; export STRATEGY=$st OUTPUT_DIR=$o
 # the signal goes to `job run` itself (a `timeout` wrapper would die of SIGUSR1 and leave the job running)
 python3 -m job run >$OUT/$st-1.log 2>&1 & p=$!
 for i in $(seq 300); do ls $o/checkpoints/checkpoint-*/COMPLETE >/dev/null 2>&1 && break; kill -0 $p 2>/dev/null || break; sleep 0.2; done
 kill -USR1 $p; wait $p; r1=$?
 timeout 150 python3 -m job run >$OUT/$st-2.log 2>&1; r2=$?
 echo "$st: stopped=$r1 (75) rerun=$r2 (0) $(grep -ho 'resuming from checkpoint-[0-9]*' $o/logs/job-rank0.log|head -1) steps=$(python3 -c "import json;print(json.load(open('$o/metrics/train.json'))['steps'])" 2>&1|tail -1) lora_not_restored=$(grep -c 'Did not find param.*lora' $OUT/$st-2.log) procs=$(grep -ho 'world size [0-9]*\|num_processes[= ][0-9]*' $OUT/$st-1.log | head -1) adapter=$(ls $o/adapter 2>/dev/null|tr '\n' ' ') t=$((SECONDS-S))s" | tee -a $OUT/summary.txt
 grep -hE "Error|error:" $OUT/$st-*.log | grep -v Warning | head -3
done
cd $OUT && tar czf logs.tgz *.log && rm *.log
