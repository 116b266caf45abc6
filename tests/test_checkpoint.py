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
