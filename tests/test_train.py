"""The training stage on the real 4-bit path: outputs, retention, idempotent reruns."""

import json

import pytest

from job import checkpoint
from job.checkpoint import Layout
from tests.jobtools import read_summary, run_job
from tests.modeltools import tiny_trainer

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



def _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path, overrides=(), **arguments):
    """The job's trainer on the tiny model and bench-style rows, nothing saved."""
    from transformers import AutoConfig

    from job.bench import workload

    rows = workload.make_rows(64, AutoConfig.from_pretrained(tiny_model).vocab_size, 256, seed=0, median=60)
    return tiny_trainer(tiny_model, tiny_tokenizer, workload.dataset(rows), tmp_path, overrides, seed=0, **arguments)


def test_the_job_trainer_logs_what_trl_logs(tiny_model, tiny_tokenizer, tmp_path):
    """JobTrainer reads its metrics back once per log instead of after every forward: the same loss, gradient
    norm, entropy, token accuracy and token count as TRL's SFTTrainer, in training and in evaluation, with
    gradient accumulation."""
    from trl import SFTTrainer

    from job.trainer import JobTrainer

    histories = []
    for trainer_class in (SFTTrainer, JobTrainer):
        trainer = _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path / trainer_class.__name__,
                                overrides={"micro_batch_size": "2", "grad_accum": "2"}, trainer_class=trainer_class,
                                max_steps=6, logging_steps=2)
        assert type(trainer).compute_loss is trainer_class.compute_loss
        trainer.train()
        trainer.evaluate(trainer.train_dataset.select(range(8)))
        histories.append(trainer.state.log_history)
    trl_history, job_history = histories
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens",
            "eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens")
    assert len(trl_history) == len(job_history) == 5  # 3 train logs, the summary, the evaluation
    for trl_entry, job_entry in zip(trl_history, job_history):
        shared = [k for k in keys if k in trl_entry]
        assert shared == [k for k in keys if k in job_entry]
        for key in shared:
            assert job_entry[key] == pytest.approx(trl_entry[key], rel=1e-5, abs=1e-7), key
    assert [k for k in keys if k in job_history[0]] == list(keys[:5])
    assert job_history[2]["num_tokens"] > job_history[0]["num_tokens"] > 0
    assert [k for k in keys if k in job_history[-1]] == list(keys[5:])


def test_a_nan_between_log_lines_stops_the_run_at_the_next_log(tiny_model, tiny_tokenizer, tmp_path):
    """The guard sees every optimizer step, not only logged ones: weights gone NaN at step 3 stop the run at the
    next log (step 4 of 8, LOGGING_STEPS=4) with TrainingFailed, before anything NaN is logged or saved. (Before,
    only logged values were checked, so a NaN between log lines was sealed into the adapter.)"""
    import torch
    from transformers import TrainerCallback

    from job.errors import TrainingFailed
    from job.train import AtomicCheckpointTrainer

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    trainer = _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path, callbacks=[Poison()], eval_strategy="no",
                            max_steps=8, logging_steps=4, trainer_class=AtomicCheckpointTrainer)
    with pytest.raises(TrainingFailed, match="between steps 0 and 4: LEARNING_RATE="):
        trainer.train()
    assert trainer.state.global_step == 4  # the first read-back after the NaN step, not after all 8
    assert not [h for h in trainer.state.log_history if "loss" in h]  # the NaN was never logged


def test_trainer_args_reach_the_trainer(tiny_model, tiny_tokenizer, tmp_path):
    trainer = _tiny_trainer(tiny_model, tiny_tokenizer, tmp_path,
                            overrides={"trainer_args": '{"weight_decay": 0.05, "max_grad_norm": 0.3}'})
    assert (trainer.args.weight_decay, trainer.args.max_grad_norm) == (0.05, 0.3)
