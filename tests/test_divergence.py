"""A run that diverges between log lines: exit 3, nothing diverged is saved, and a rerun does not loop."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from job import checkpoint
from job.checkpoint import Layout
from job.errors import EXIT_TRAINING_FAILED, TrainingFailed
from tests.jobtools import read_summary, run_job

# LEARNING_RATE=0.99 on the tiny job: the gradient norm is inf at step 7, long before the first log line (20)
DIVERGING = dict(LEARNING_RATE="0.99", MAX_STEPS=16, LOGGING_STEPS=20, SAVE_STEPS=4, EVAL_STEPS=100)


@pytest.mark.slow
def test_divergence_between_log_lines_exits_3_keeps_good_checkpoints_and_the_rerun_stops_again(tmp_path, hf_home):
    output = tmp_path / "out"
    result = run_job(hf_home, "run", OUTPUT_DIR=output, **DIVERGING)
    assert result.returncode == EXIT_TRAINING_FAILED, result.stderr[-3000:]
    assert "stopped being finite between steps 4 and 8" in result.stderr and "LEARNING_RATE=0.99" in result.stderr
    layout = Layout(output)
    assert not checkpoint.is_complete(layout.adapter)  # never sealed (it was, with NaN weights)
    kept = checkpoint.complete_checkpoints(layout.checkpoints)
    assert [checkpoint.step_of(c) for c in kept] == [4]  # the step-8 checkpoint would have been diverged
    assert all(torch.isfinite(t).all() for t in load_file(kept[0] / "adapter_model.safetensors").values())
    summary = read_summary(output)
    assert summary["status"] == "failed" and summary["exit_code"] == EXIT_TRAINING_FAILED

    # the rerun resumes from the last good checkpoint, meets the same step and stops the same way: exit 3 again,
    # not a crash later in evaluate or merge
    rerun = run_job(hf_home, "run", OUTPUT_DIR=output, **DIVERGING)
    assert rerun.returncode == EXIT_TRAINING_FAILED, rerun.stderr[-3000:]
    assert "resuming from checkpoint-4" in rerun.stderr and "between steps 4 and 8" in rerun.stderr
    assert "a rerun here resumes from checkpoint-4" in rerun.stderr
    assert not checkpoint.is_complete(layout.adapter)


def test_an_adapter_with_values_that_are_not_finite_is_never_sealed(tmp_path):
    from job.train import check_adapter

    tensors = {"model.layers.0.q_proj.lora_A.weight": torch.ones(4, 8),
               "model.layers.0.q_proj.lora_B.weight": torch.full((8, 4), float("nan"))}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(TrainingFailed, match="not finite.*lora_B"):
        check_adapter(tmp_path)
