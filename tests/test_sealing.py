"""Sealed directories carry their files' sizes and checksums: damage done after sealing is found before use, the
damaged directory is moved aside (never deleted) and the job falls back to the checkpoint before it."""

import shutil

import pytest

from job import checkpoint
from job.checkpoint import Layout
from job.errors import EXIT_BAD_INPUT
from tests.jobtools import TRAINED, copy_output, run_job


def _sealed(tmp_path, name="checkpoint-5"):
    staging = tmp_path / ".staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "weights.bin").write_bytes(b"x" * 1000)
    (staging / "sub" / "state.json").write_text("{}")
    return checkpoint.seal(staging, tmp_path / name)


def test_damage_names_a_missing_truncated_or_changed_file(tmp_path):
    sealed = _sealed(tmp_path)
    assert checkpoint.damage(sealed) is None
    (sealed / "weights.bin").write_bytes(b"x" * 999 + b"y")
    assert "weights.bin changed since it was sealed" in checkpoint.damage(sealed)
    (sealed / "weights.bin").write_bytes(b"x" * 10)
    assert "weights.bin has 10 bytes, 1000 when it was sealed" in checkpoint.damage(sealed)
    (sealed / "sub" / "state.json").unlink()
    (sealed / "weights.bin").write_bytes(b"x" * 1000)
    assert "state.json" in checkpoint.damage(sealed)


def test_a_directory_sealed_before_checksums_is_taken_as_it_is(tmp_path):
    sealed = _sealed(tmp_path)
    (sealed / checkpoint.COMPLETE).write_text("ok\n")
    (sealed / "weights.bin").write_bytes(b"")
    assert checkpoint.damage(sealed) is None


def test_the_newest_damaged_checkpoint_is_moved_aside_and_the_one_before_is_used(tmp_path):
    good = _sealed(tmp_path, "checkpoint-5")
    bad = _sealed(tmp_path, "checkpoint-10")
    (bad / "weights.bin").write_bytes(b"")
    assert checkpoint.latest_intact_checkpoint(tmp_path) == good
    assert not bad.exists()
    (aside,) = tmp_path.glob("checkpoint-10.damaged-*")
    assert (aside / "weights.bin").exists()  # kept for inspection, never deleted
    assert checkpoint.complete_checkpoints(tmp_path) == [good]  # nor read as a checkpoint again
    checkpoint.rotate(tmp_path, 1)
    assert aside.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_truncated_newest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
        damaged, tmp_path, hf_home, trained_output):
    """Before, every rerun exited 1 on the truncated file (a SafetensorError, retried by schedulers, no file
    named)."""
    output = copy_output(trained_output, tmp_path / "out")
    layout = Layout(output)
    shutil.rmtree(layout.adapter)  # as if training had stopped before its end
    older, newest = checkpoint.complete_checkpoints(layout.checkpoints)[-2:]
    target = newest / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    result = run_job(hf_home, "train", OUTPUT_DIR=output, **TRAINED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{target} has " in result.stderr and "Moved aside to" in result.stderr
    assert f"resuming from {older.name}" in result.stderr
    assert list(layout.checkpoints.glob(f"{newest.name}.damaged-*"))
    assert checkpoint.intact(layout.adapter) and checkpoint.intact(newest)  # retrained and sealed again


@pytest.mark.slow
def test_a_damaged_adapter_is_refused_by_merge_and_rebuilt_by_train(tmp_path, hf_home, trained_output):
    output = copy_output(trained_output, tmp_path / "out")
    layout = Layout(output)
    weights = layout.adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    merge = run_job(hf_home, "merge", OUTPUT_DIR=output, **TRAINED)
    assert merge.returncode == EXIT_BAD_INPUT, merge.stderr[-3000:]
    assert f"the adapter is damaged: {weights} has 1000 bytes" in merge.stderr and "job train" in merge.stderr
    assert list(output.glob("adapter.damaged-*")) and not layout.adapter.exists()

    train = run_job(hf_home, "train", OUTPUT_DIR=output, **TRAINED)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "resuming from checkpoint-12" in train.stderr  # the final checkpoint: nothing to train again
    assert checkpoint.intact(layout.adapter)
