"""Shared fixtures: a private HF_HOME, the tiny model built once, settings without dropout, one trained and one
merged output."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.jobtools import TRAINED, copy_output, run_job, settings, settings_for


@pytest.fixture(autouse=True)
def stop_signal_handlers():
    """A test that runs `job.cli.main` in this process leaves its exit-time handlers behind; the next test starts
    with the ones it found."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


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


@pytest.fixture(scope="session")
def quiet():
    """Settings without LoRA dropout, so that two forward passes of one adapted model agree."""
    return settings(lora_dropout=0.0)


@pytest.fixture(scope="session")
def trained_output(tmp_path_factory, hf_home) -> Path:
    """One short real 4-bit training run (train stage only) shared by the tests that inspect its outputs."""
    output = tmp_path_factory.mktemp("trained")
    result = run_job(hf_home, "train", OUTPUT_DIR=output, **TRAINED)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="session")
def merged_output(trained_output, tmp_path_factory) -> Path:
    """A copy of `trained_output` with a verified merged model (merge stage only). Shared by test_merge.py and
    test_publish.py: treat it as read-only and copy it (copy_output) before changing anything."""
    from job import merge

    output = copy_output(trained_output, tmp_path_factory.mktemp("merged") / "out")
    merge.merge(settings_for(output))
    return output
