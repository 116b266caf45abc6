"""The training stage on the real 4-bit path: outputs, retention, idempotent reruns."""

import json
import math

import pytest

from tests.jobtools import read_summary, run_job
from job import checkpoint
from job.checkpoint import Layout

pytestmark = pytest.mark.slow


def test_training_leaves_adapter_checkpoints_logs_and_plot(trained_output):
    layout = Layout(trained_output)
    assert checkpoint.is_complete(layout.adapter)
    assert (layout.adapter / "adapter_model.safetensors").stat().st_size > 0
    tokenizer_config = json.loads((layout.adapter / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config.get("chat_template", "") or \
        "<|im_start|>" in (layout.adapter / "chat_template.jinja").read_text()
    kept = checkpoint.complete_checkpoints(layout.checkpoints)
    assert [p.name for p in kept] == ["checkpoint-10", "checkpoint-12"]  # SAVE_TOTAL_LIMIT=2, final step saved
    for path in kept:
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= \
            {p.name for p in path.iterdir()}
    assert list(layout.tensorboard.rglob("events.out.tfevents.*"))
    assert layout.loss_plot.stat().st_size > 1000
    metrics = checkpoint.read_json(layout.metrics / "train.json")
    assert metrics["steps"] == 12 and metrics["data"]["train_rows"] > 2000
    assert any("eval_loss" in h for h in metrics["log_history"])


def test_rerunning_a_finished_training_does_nothing(trained_output, hf_home):
    adapter = Layout(trained_output).adapter / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    result = run_job(hf_home, "train", OUTPUT_DIR=trained_output, MAX_STEPS=12, SAVE_STEPS=5, EVAL_STEPS=6)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training already finished" in result.stderr
    assert adapter.stat().st_mtime_ns == before


def test_default_job_end_to_end(tmp_path, hf_home):
    """What `make run` does: the whole default job; eval loss falls by at least half; a rerun does nothing."""
    result = run_job(hf_home, "run", OUTPUT_DIR=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = read_summary(tmp_path)
    assert summary["status"] == "done" and summary["exit_code"] == 0
    assert summary["eval_loss_after"] <= 0.5 * summary["eval_loss_before"], summary
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert summary["adapter_dir"] and summary["merged_dir"] and summary["push"] is None
    assert (tmp_path / "loss.png").exists()
    changed = [s for s in summary["samples"] if s["before"] != s["after"]]
    assert changed, "sample generations did not change"
    again = run_job(hf_home, "run", OUTPUT_DIR=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting training" not in again.stderr
    assert read_summary(tmp_path)["steps"] == summary["steps"]


def test_an_adapter_saved_without_its_weights_fails_the_run(trained_output, tmp_path):
    """What ZeRO-3 and FSDP have written (no tensors, empty ones, LoRA B never gathered) is refused: exit 3."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from job.errors import TrainingFailed
    from job.train import check_adapter

    check_adapter(Layout(trained_output).adapter)
    weights = load_file(str(Layout(trained_output).adapter / "adapter_model.safetensors"))
    broken = {
        "none": {},
        "empty": {k: (v[:0] if "lora_A" in k else v) for k, v in weights.items()},
        "B zero": {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in weights.items()},
    }
    for name, tensors in broken.items():
        directory = tmp_path / name.replace(" ", "-")
        shutil.copytree(Layout(trained_output).adapter, directory)
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        with pytest.raises(TrainingFailed):
            check_adapter(directory)


def _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path, callbacks=(), **sft):
    from transformers import AutoConfig

    from job import bench, speed
    from job import config as job_config
    from job.train import build_trainer

    s = job_config.load({"base_model": str(tiny_model), "output_dir": str(tmp_path), "max_length": 256}, environ={})
    cfg = AutoConfig.from_pretrained(tiny_model)
    rows = bench.make_rows(64, cfg.vocab_size, 256, seed=0, median=60)
    trainer, _ = build_trainer(s, str(tiny_model), cfg, speed.plan(s, cfg), tiny_tokenizer, bench.dataset(rows),
                               device_map=None, callbacks=callbacks, output_dir=str(tmp_path), report_to="none",
                               save_strategy="no", eval_strategy="no", disable_tqdm=True, **sft)
    return trainer


def test_the_jobs_loss_and_metrics_are_trls_without_a_sync_per_micro_step(tiny_model, tiny_tokenizer, tmp_path):
    """JobTrainer keeps TRL's metrics on the device until a log step (TRL reads them back after every forward);
    the loss, its gradient and every logged metric are TRL's own."""
    import torch
    from trl import SFTTrainer

    from job.train import JobTrainer

    trainer = _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path, max_steps=1)
    assert isinstance(trainer, JobTrainer) and trainer.args.logging_nan_inf_filter is False
    model = trainer.model
    batches = [trainer._prepare_inputs(b) for b, _ in zip(trainer.get_train_dataloader(), range(3))]

    def run(compute_loss, log):
        trainer._total_train_tokens = 0
        losses, grads = [], []
        for batch in batches:
            torch.manual_seed(0)  # the same LoRA dropout masks on both paths
            model.zero_grad()
            loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=None)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        log(trainer, {"loss": 0.0})
        return torch.stack(losses), torch.stack(grads), trainer.state.log_history[-1]

    trl_loss, trl_grads, trl_logged = run(SFTTrainer.compute_loss, SFTTrainer.log)
    job_loss, job_grads, job_logged = run(JobTrainer.compute_loss, JobTrainer.log)
    torch.testing.assert_close(job_loss, trl_loss)
    torch.testing.assert_close(job_grads, trl_grads)
    assert set(job_logged) == set(trl_logged) >= {"entropy", "mean_token_accuracy", "num_tokens"}
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert job_logged[key] == pytest.approx(trl_logged[key], rel=1e-5), key
    assert job_logged["num_tokens"] > 0


def test_a_diverged_loss_stops_the_run_instead_of_being_averaged_away(tiny_model, tiny_tokenizer, tmp_path):
    """transformers' logging_nan_inf_filter (on by default) logs the running mean in place of a NaN loss, so a run
    whose weights went NaN logged finite losses forever; the job turns it off and its guard stops the run."""
    import torch
    from transformers import TrainerCallback

    from job.train import GuardCallback

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    guard = GuardCallback()
    trainer = _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path, callbacks=[guard, Poison()], max_steps=6,
                            logging_steps=1)
    trainer.train()
    assert guard.failed is not None and math.isnan(guard.failed)
    assert trainer.state.global_step == 3  # stopped at the first NaN step's log, not after all 6
