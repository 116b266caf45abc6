"""Two CPU training processes (torchrun, gloo, 4-bit QLoRA) through the launcher `job run` uses on GPUs too
(job.launch.run_training): they train the tiny default to a loss comparable with one process at the same
global batch, and only the main process tokenizes the data (the other loads the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from job import errors, launch
from tests.jobtools import import_hook, settings, sitecustomize

pytestmark = pytest.mark.slow

TINY = {"MAX_STEPS": "8", "MAX_LENGTH": "128", "MICRO_BATCH_SIZE": "4", "EVAL_STEPS": "1000", "SAVE_STEPS": "4",
        "LOGGING_STEPS": "2", "REPORT_TO": "none"}

# Appends the caller's RANK to the file JOB_TEST_TOKENIZED names each time job.data.prepare (reading, rendering and
# tokenizing the data set) runs: wrapped in job.data.preparation, the module whose load calls it.
COUNT_TOKENIZATION = import_hook("job.data.preparation", '''
    import os

    def patch(module):
        prepare = module.prepare

        def counted(*args, **kwargs):
            with open(os.environ["JOB_TEST_TOKENIZED"], "a") as log:
                log.write(os.environ.get("RANK", "-") + "\\n")
            return prepare(*args, **kwargs)

        module.prepare = counted
''')


def _train(output: Path, **extra) -> dict:
    s = settings(OUTPUT_DIR=output, **TINY, **extra)
    assert launch.run_training(s) == errors.EXIT_OK
    return json.loads((output / "metrics" / "train.json").read_text())


def test_two_cpu_processes_train_like_one_and_tokenize_once(tmp_path, hf_home, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))  # the training processes use the session's tiny model
    sitecustomize(tmp_path / "hook", COUNT_TOKENIZATION, monkeypatch)
    tokenized = tmp_path / "tokenized.txt"
    monkeypatch.setenv("JOB_TEST_TOKENIZED", str(tokenized))

    two = _train(tmp_path / "two", NUM_PROCESSES="2")
    assert tokenized.read_text().split() == ["0"], "every rank but the main one must load the cached tokens"
    logs = tmp_path / "two" / "logs"
    assert (logs / "job-rank0.log").is_file() and (logs / "job-rank1.log").is_file()
    assert "starting (rows:" in (logs / "job-rank1.log").read_text()

    one = _train(tmp_path / "one", NUM_PROCESSES="1", GRAD_ACCUM="2")  # the same 8 sequences per step
    assert two["steps"] == one["steps"] == 8
    assert abs(two["train_loss"] - one["train_loss"]) < 0.1 * one["train_loss"], (two["train_loss"],
                                                                                  one["train_loss"])
    first = [h["loss"] for h in two["log_history"] if "loss" in h]
    assert first[-1] < first[0], first  # and it learns
