"""Complete-or-absent directories, retention that never counts broken checkpoints, run identity."""

import pytest

from job import checkpoint
from job.checkpoint import Layout
from job.errors import ConfigError


def fake_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x" * 10)
    if complete:
        (path / checkpoint.COMPLETE).write_text("ok")
    return path


def test_seal_marks_and_replaces(tmp_path):
    staging = tmp_path / "stage"
    staging.mkdir()
    (staging / "a").write_text("new")
    final = tmp_path / "final"
    final.mkdir()
    (final / "old").write_text("old")
    checkpoint.seal(staging, final)
    assert checkpoint.is_complete(final) and (final / "a").read_text() == "new"
    assert not (final / "old").exists() and not staging.exists()


def test_latest_ignores_incomplete(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_rotation_counts_only_complete_and_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 25, complete=False)
    fake_checkpoint(tmp_path, 40, complete=False)  # being written right now
    checkpoint.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    checkpoint.rotate(tmp_path, keep=0)  # a limit below one still keeps the newest complete
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-30"


def test_claim_refuses_a_different_run_with_checkpoints(tmp_path):
    layout = Layout(tmp_path)
    checkpoint.claim(layout, {"lora_r": 16, "data_fingerprint": "a"})
    fake_checkpoint(layout.checkpoints, 5)
    checkpoint.claim(layout, {"lora_r": 16, "data_fingerprint": "a"})  # same run: fine
    with pytest.raises(ConfigError, match=r"different run \(DATA_FINGERPRINT: 'a' -> 'b', LORA_R: 16 -> 8\)"):
        checkpoint.claim(layout, {"lora_r": 8, "data_fingerprint": "b"})
    assert (layout.checkpoints / "checkpoint-5").exists()  # nothing lost


def test_claim_takes_over_a_directory_without_work(tmp_path):
    layout = Layout(tmp_path)
    checkpoint.claim(layout, {"lora_r": 16})
    checkpoint.claim(layout, {"lora_r": 8})
    assert checkpoint.read_json(layout.run) == {"lora_r": 8}


def batch(world_size, grad_accum, micro=4):
    return {"global_batch_size": world_size * grad_accum * micro, "world_size": world_size,
            "micro_batch_size": micro, "grad_accum": grad_accum}


def test_resume_batch_keeps_the_global_batch_across_layouts(tmp_path):
    assert checkpoint.resume_batch(tmp_path, batch(2, 1), strategy="ddp", allow_change=False) == \
        {**batch(2, 1), "layouts": [{"from_step": 0, **batch(2, 1)}]}
    old = fake_checkpoint(tmp_path, 4)  # written before checkpoints recorded their batch: resumed as before
    assert checkpoint.resume_batch(tmp_path, batch(1, 1), strategy="fsdp", allow_change=False)["layouts"] == \
        [{"from_step": 4, **batch(1, 1)}]
    checkpoint.write_json(old / checkpoint.BATCH, {**batch(2, 1), "layouts": [{"from_step": 0, **batch(2, 1)}]})
    assert checkpoint.resume_batch(tmp_path, batch(1, 2), strategy="ddp", allow_change=False)["layouts"] == \
        [{"from_step": 0, **batch(2, 1)}, {"from_step": 4, **batch(1, 2)}]
    with pytest.raises(ConfigError, match="Set GLOBAL_BATCH_SIZE=8 to resume it here, or ALLOW_BATCH_CHANGE=true"):
        checkpoint.resume_batch(tmp_path, batch(1, 1), strategy="ddp", allow_change=False)
    with pytest.raises(ConfigError, match=r"does not divide into 12 rows a micro-step: run on 1, 2 process\(es\)"):
        checkpoint.resume_batch(tmp_path, batch(3, 1), strategy="ddp", allow_change=False)
    changed = checkpoint.resume_batch(tmp_path, batch(1, 1), strategy="ddp", allow_change=True)
    assert changed["layouts"][-1] == {"from_step": 4, **batch(1, 1), "global_batch_size_before": 8}


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_resume_batch_refuses_another_world_size_under_sharded_optimizer_state(tmp_path, strategy):
    checkpoint.write_json(fake_checkpoint(tmp_path, 4) / checkpoint.BATCH, {**batch(2, 1), "layouts": []})
    with pytest.raises(ConfigError, match=f"STRATEGY={strategy} keeps the optimizer state sharded per process, so "
                                          r"its checkpoints resume only on 2 processes"):
        checkpoint.resume_batch(tmp_path, batch(1, 2), strategy=strategy, allow_change=True)
    assert checkpoint.resume_batch(tmp_path, batch(2, 1), strategy=strategy, allow_change=False)["world_size"] == 2


def test_claim_records_the_batch_without_comparing_it(tmp_path):
    layout = Layout(tmp_path)
    fake_checkpoint(layout.checkpoints, 5)
    checkpoint.write_json(layout.run, {"lora_r": 16})  # run.json of a run from before the batch was recorded
    checkpoint.claim(layout, {"lora_r": 16}, batch(2, 1))
    assert checkpoint.read_json(layout.run) == {"lora_r": 16, "batch": batch(2, 1)}
    checkpoint.claim(layout, {"lora_r": 16}, batch(1, 2))  # another layout: resume_batch judges it
    assert checkpoint.read_json(layout.run)["batch"] == batch(1, 2)
    checkpoint.claim(layout, {"lora_r": 16})  # a finished run's rerun trains nothing: the recorded layout stands
    assert checkpoint.read_json(layout.run)["batch"] == batch(1, 2)


def test_a_setting_added_since_run_json_was_written_counts_as_its_default(tmp_path):
    """Upgrading the job adds settings to the run's identity (COLUMN_MAP, ROLE_MAP): a run whose run.json predates
    them resumes while they keep their defaults, and is refused, naming one, when it is set."""
    layout = Layout(tmp_path)
    fake_checkpoint(layout.checkpoints, 5)
    checkpoint.write_json(layout.run, {"lora_r": 16})
    checkpoint.claim(layout, {"lora_r": 16, "column_map": None, "role_map": None})
    with pytest.raises(ConfigError, match="COLUMN_MAP: None -> 'dialog=messages'"):
        checkpoint.claim(layout, {"lora_r": 16, "column_map": "dialog=messages", "role_map": None})


def test_the_data_fingerprint_of_a_run_without_column_or_role_maps_is_unchanged(tiny_tokenizer):
    """The fingerprint is part of the run's identity: the one every run of the bundled data with the built-in
    tokenizer and default settings recorded before COLUMN_MAP and ROLE_MAP existed (computed with that code)."""
    from job import config, data

    s = config.load(environ={})
    assert data.fingerprint(s, tiny_tokenizer) == "23f5fdd4d3f64975"
    assert data.fingerprint(config.load(environ={"ROLE_MAP": "bot=assistant"}), tiny_tokenizer) != "23f5fdd4d3f64975"
