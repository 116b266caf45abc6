"""Shared fixtures: a private HF_HOME, the tiny model built once, and a helper to run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """Model caches and the built tiny model live here, never in the developer's own cache."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model(hf_home) -> Path:
    from job.model import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


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


@pytest.fixture(scope="session")
def trained_output(tmp_path_factory, hf_home) -> Path:
    """One short real 4-bit training run (train stage only) shared by the tests that inspect its outputs."""
    output = tmp_path_factory.mktemp("trained")
    result = run_job(hf_home, "train", OUTPUT_DIR=output, MAX_STEPS=12, SAVE_STEPS=5, EVAL_STEPS=6)
    assert result.returncode == 0, result.stderr[-3000:]
    return output
