"""Running the `job` CLI as users do: a subprocess with settings in its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
