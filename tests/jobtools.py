"""Running the `job` CLI as users do: a subprocess with settings in its environment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from job.config import Settings

REPO = Path(__file__).resolve().parent.parent
# The settings `trained_output` (tests/conftest.py) trains with. MAX_STEPS is part of a run's identity, so a
# later stage run on (a copy of) that output passes the same ones.
TRAINED = {"MAX_STEPS": "12", "SAVE_STEPS": "5", "EVAL_STEPS": "6"}
SHARD = "1MB"
STEP_LINE = re.compile(r"step (\d+)/\d+ loss=([\d.]+)")  # the training log's progress line  # the tiny model is ~1.6 MB in bf16: two shards, so sharding is exercised everywhere


def job_env(hf_home: Path, **settings) -> dict[str, str]:
    """A clean environment for a `job` subprocess: no stray settings or tokens from the caller."""
    from job.config import FIELDS, env_name

    ours = {env_name(f) for f in FIELDS.values()} | {"CONFIG_FILE", "HF_TOKEN", "HF_TOKEN_FILE"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(HF_HOME=str(hf_home), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_job(hf_home: Path, *args: str, timeout: float = 600, **settings) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job", *args], env=job_env(hf_home, **settings), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def read_summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text(encoding="utf-8"))


def copy_output(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def settings_for(output: Path, **extra) -> Settings:
    """Settings for a later stage (merge, push) on a copy of `trained_output`, merging into SHARD-sized shards."""
    from job import config

    return config.load(environ={"OUTPUT_DIR": str(output), "MERGE_MAX_SHARD_SIZE": SHARD, **TRAINED,
                                **{k: str(v) for k, v in extra.items()}})


def start_job(hf_home: Path, command: str, log_path: Path, **settings) -> subprocess.Popen:
    """`job <command>` in the background, in a session of its own, its output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "job", command], cwd=REPO, stdout=log, stderr=log,
                                env=job_env(hf_home, **settings), start_new_session=True)


def wait_for_step(log_path: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the log shows optimizer step `step` (LOGGING_STEPS=1), failing if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = [int(m.group(1)) for m in STEP_LINE.finditer(log_path.read_text(errors="replace"))]
        if seen and max(seen) >= step:
            return
        assert process.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached")
