"""STRATEGY=fsdp keeps the adapter: on 2 H100s FSDP1 saved an adapter with 0 tensors and resumed without the LoRA
weights (PEFT 0.21 matches adapter keys against module names that still hold FSDP's nested wrapper names).
job.train.patch_peft_for_fsdp1 mends both; here on 2 gloo processes on CPU, FSDP1 wrapped as the Trainer does."""

import json
import os
import subprocess
import sys

from tests.jobtools import REPO


def run_workers(out, patched: bool) -> dict:
    env = {**os.environ, "PATCHED": "1" if patched else "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(REPO / "tests" / "fsdp_worker.py"), str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def test_fsdp_saves_and_resumes_the_lora_weights(tmp_path):
    result = run_workers(tmp_path / "patched", patched=True)
    assert result["lora_tensors"] == 28  # 2 layers x 7 linear layers x A and B
    assert result["saved"] == result["restored"] == 28


def test_without_the_patch_peft_loses_them(tmp_path):
    """The negative control: what the H100 run showed, so the test above is testing the patch."""
    result = run_workers(tmp_path / "plain", patched=False)
    assert result["saved"] == 0 and result["restored"] == 0
