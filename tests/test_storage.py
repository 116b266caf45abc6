"""Storage that fails the job, and directories the job must leave alone: each with its documented exit code.

Real storage faults, made as root: a read-only bind mount (in a private mount namespace) and a small tmpfs that
fills up mid-run. Tests that need them are skipped where mounting is not allowed.
"""

import contextlib
import os
import subprocess
import sys

import pytest

from job import checkpoint
from job.checkpoint import Layout
from job.errors import EXIT_BAD_INPUT
from tests.jobtools import (
    REPO,
    TRAINED,
    copy_output,
    job_env,
    read_summary,
    run_job,
    start_job,
    wait_for_step,
)


def _can_mount() -> bool:
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not _can_mount(), reason="mounting needs root")


@contextlib.contextmanager
def tmpfs(path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory) -> None:
    """Take every free byte of the file system under `directory`."""
    with open(directory / "ballast", "wb", buffering=0) as ballast:
        for size in (2**20, 2**12, 1):
            with contextlib.suppress(OSError):
                while True:
                    ballast.write(b"\0" * size)


def test_empty_output_dir_is_refused_and_nothing_is_written(tmp_path, hf_home):
    env = job_env(hf_home, OUTPUT_DIR="", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "job", "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert "OUTPUT_DIR is empty" in result.stderr
    assert list(tmp_path.iterdir()) == []  # before: it wrote into the current directory


@needs_mount
def test_a_read_only_output_dir_exits_2_naming_it(tmp_path, hf_home):
    output = tmp_path / "out"
    output.mkdir()
    script = f"mount --bind {output} {output} && mount -o remount,ro,bind {output} && exec {sys.executable} -m job run"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                            env=job_env(hf_home, OUTPUT_DIR=output, **TRAINED), timeout=300)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]  # before: 1, the summary write masked it
    assert f"OUTPUT_DIR={output}: not writable (Read-only file system)" in result.stderr


@needs_mount
@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_exits_2_naming_it_and_keeps_the_checkpoint_before(tmp_path, hf_home):
    output, log_path = tmp_path / "out", tmp_path / "run.log"
    with tmpfs(output, "64m"):
        process = start_job(hf_home, "run", log_path, OUTPUT_DIR=output, MAX_STEPS=40, SAVE_STEPS=3, EVAL_STEPS=100,
                            LOGGING_STEPS=1)
        wait_for_step(log_path, 4, process)  # checkpoint-3 is sealed
        fill(output)
        code = process.wait(timeout=300)
        text = log_path.read_text(errors="replace")
        assert code == EXIT_BAD_INPUT, text[-3000:]  # before: 1, "basic_ios::clear"
        assert f"OUTPUT_DIR={output}: the disk is full" in text and "while writing checkpoint-6" in text
        layout = Layout(output)
        kept = checkpoint.complete_checkpoints(layout.checkpoints)
        assert [checkpoint.step_of(c) for c in kept] == [3] and checkpoint.damage(kept[0]) is None
        # nothing half-written: no temporary file, no staged checkpoint or adapter
        assert not [p for p in output.rglob("*") if ".tmp" in p.name or p.parent == layout.staging
                    or p.name == ".adapter.staging"]
        summary = read_summary(output)
        assert summary["status"] == "failed" and summary["exit_code"] == EXIT_BAD_INPUT

        (output / "ballast").unlink()  # space again: the rerun resumes from the checkpoint before
        rerun = run_job(hf_home, "train", OUTPUT_DIR=output, MAX_STEPS=40, SAVE_STEPS=3, EVAL_STEPS=100,
                        LOGGING_STEPS=1)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "resuming from checkpoint-3" in rerun.stderr


def test_a_refused_rerun_leaves_the_finished_run_untouched(tmp_path, hf_home, trained_output):
    output = copy_output(trained_output, tmp_path / "out")
    layout = Layout(output)
    layout.summary.write_text('{"status": "done"}\n')
    before = {path: path.read_bytes() for path in (layout.summary, layout.run)}
    result = run_job(hf_home, "run", OUTPUT_DIR=output, **{**TRAINED, "LEARNING_RATE": "0.001"})
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert "holds checkpoints of a different run (LEARNING_RATE: " in result.stderr
    assert {path: path.read_bytes() for path in before} == before  # before: summary.json rewritten as failed


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_checkpoints_without_a_readable_run_json_are_refused(damage, tmp_path, hf_home, trained_output):
    output = copy_output(trained_output, tmp_path / "out")
    run_json = Layout(output).run
    if damage == "missing":
        run_json.unlink()
    else:
        run_json.write_text('{"lora_r": 1')
    result = run_job(hf_home, "run", OUTPUT_DIR=output, **TRAINED)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert f"{run_json} {'is missing' if damage == 'missing' else 'cannot be read'}" in result.stderr
    assert (not run_json.exists()) if damage == "missing" else run_json.read_text() == '{"lora_r": 1'
