"""Two CPU training processes (torchrun, gloo, 4-bit QLoRA) through the launcher `job run` uses on GPUs too
(job.launch.run_training): they train the tiny default to a loss comparable with one process at the same
global batch, and only the main process tokenizes the data (the other loads the cache)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from job import config, errors, launch

pytestmark = pytest.mark.slow

TINY = {"MAX_STEPS": "8", "MAX_LENGTH": "128", "MICRO_BATCH_SIZE": "4", "EVAL_STEPS": "1000", "SAVE_STEPS": "4",
        "LOGGING_STEPS": "2", "REPORT_TO": "none"}

# Loaded by every Python process started with it on PYTHONPATH: appends the caller's RANK to a file each
# time job.data.prepare (reading, rendering and tokenizing the data set) runs. It wraps prepare in the module
# whose load calls it, job.data.preparation.
COUNT_TOKENIZATION = textwrap.dedent('''
    import importlib.abc, importlib.machinery, os, sys

    class _CountPrepare(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "job.data.preparation":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                prepare = module.prepare

                def counted(*args, **kwargs):
                    with open(os.environ["JOB_TEST_TOKENIZED"], "a") as log:
                        log.write(os.environ.get("RANK", "-") + "\\n")
                    return prepare(*args, **kwargs)

                module.prepare = counted

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _CountPrepare())
''')


def _train(output: Path, **extra) -> dict:
    s = config.load({}, environ={"OUTPUT_DIR": str(output), **TINY, **extra})
    assert launch.run_training(s) == errors.EXIT_OK
    return json.loads((output / "metrics" / "train.json").read_text())


def test_two_cpu_processes_train_like_one_and_tokenize_once(tmp_path, hf_home, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))  # the training processes use the session's tiny model
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(COUNT_TOKENIZATION)
    monkeypatch.setenv("PYTHONPATH", str(hook))
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
