"""Running the `job` CLI as users do (a subprocess with settings in its environment), the settings of a test, and
hooks that watch what the job's processes do."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
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


def settings(**overrides) -> Settings:
    """Settings as job.config resolves them, for a test: a lowercase name is a flag (`max_length=4096`), an UPPERCASE
    one an environment variable (`STRATEGY="fsdp"`, `SLURM_NODEID="1"`); nothing comes from this process's own
    environment."""
    from job import config

    flags = {k: v for k, v in overrides.items() if not k.isupper()}
    return config.load(flags, environ={k: str(v) for k, v in overrides.items() if k.isupper()})


def settings_for(output: Path, **extra) -> Settings:
    """Settings for a later stage (merge, push) on a copy of `trained_output`, merging into SHARD-sized shards."""
    return settings(OUTPUT_DIR=output, MERGE_MAX_SHARD_SIZE=SHARD, **TRAINED, **extra)


def start_job(hf_home: Path, command: str, log_path: Path, **settings) -> subprocess.Popen:
    """`job <command>` in the background, in a session of its own, its output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "job", command], cwd=REPO, stdout=log, stderr=log,
                                env=job_env(hf_home, **settings), start_new_session=True)


# `job run`'s training stage alone (launch.run_training, as test_multiprocess.py calls it) in a process of its own, so
# a test can stop it with a signal as `job run` is stopped, without evaluating and merging after it.
TRAIN_ONLY = "import sys; from job import config, launch; sys.exit(launch.run_training(config.load()))"


def start_training(hf_home: Path, log_path: Path, **settings) -> subprocess.Popen:
    """The training processes of one machine (NUM_PROCESSES of them) in the background, their output appended to
    log_path; the returned process passes SIGTERM on to them, and exits with their code (75 once stopped)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", TRAIN_ONLY], cwd=REPO, stdout=log, stderr=log,
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


# What `import_hook` fills in: a finder first on sys.meta_path that lets `module` load as it would, then runs
# `patch(module)` on it.
_IMPORT_HOOK = """
import importlib.abc, importlib.machinery, sys

{patch}

class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != {module!r}:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _PatchOnImport())
"""


def import_hook(module: str, patch: str) -> str:
    """The source of a sitecustomize that runs `patch` (source defining `patch(module)`, and what it imports) on
    `module` when a process imports it."""
    return _IMPORT_HOOK.format(module=module, patch=textwrap.dedent(patch).strip())


def sitecustomize(directory: Path, source: str, monkeypatch) -> Path:
    """Make `source` the sitecustomize of every Python process started from here on (first on PYTHONPATH)."""
    directory.mkdir(parents=True)
    (directory / "sitecustomize.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")])))
    return directory


# With JOB_TEST_ROW_LOG naming a directory: each training step of job.train's trainer appends "<optimizer step>
# <row hash>" for every row it trains on to row-<RANK>.txt there. Rows are told apart within a packed sequence by
# their positions restarting at 0; the hash is of the row's token ids. The trainer's own code runs unchanged.
ROW_LOG_HOOK = import_hook("job.train", '''
    import hashlib, os

    def patch(module):
        training_step = module.JobTrainer.training_step

        def logged(self, model, inputs, *args, **kwargs):
            ids, positions = inputs["input_ids"][0].tolist(), inputs["position_ids"][0].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            step = self.state.global_step + 1  # the optimizer step this micro-batch is part of
            path = os.path.join(os.environ["JOB_TEST_ROW_LOG"], f"row-{os.environ.get('RANK', '0')}.txt")
            with open(path, "a") as log:
                for start, end in zip(starts, starts[1:]):
                    digest = hashlib.sha1(str(ids[start:end]).encode()).hexdigest()[:16]
                    log.write(f"{step} {digest}\\n")
            return training_step(self, model, inputs, *args, **kwargs)

        module.JobTrainer.training_step = logged
''')


def log_rows(directory: Path, monkeypatch) -> Path:
    """Make the training processes started from here on log the rows they train on (ROW_LOG_HOOK) under
    `directory`; returns the log directory, read with `trained_rows`."""
    rows = directory / "rows"
    sitecustomize(directory / "row-hook", ROW_LOG_HOOK, monkeypatch)
    rows.mkdir()
    monkeypatch.setenv("JOB_TEST_ROW_LOG", str(rows))
    return rows


def trained_rows(rows: Path) -> dict[int, collections.Counter]:
    """Optimizer step -> how many times each row (by hash) was trained on in it, over every rank and attempt."""
    steps: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in rows.glob("row-*.txt"):
        for line in path.read_text().splitlines():
            step, digest = line.split()
            steps[int(step)][digest] += 1
    return dict(steps)
