"""Rows per second of the job's data preparation (render each row with the chat template, tokenize, mask), in one
process and in one worker per CPU core: `python scripts/bench_tokenize.py [--rows 100000] [--tokenizer DIR]`.

Rows are two-turn conversations of about 440 tokens; the tokenizer is the built-in tiny model's (a Llama-3-sized
vocabulary would tokenize a little slower per row, in both modes alike) unless --tokenizer names a model folder.
Prints one JSON line; docs/performance.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from job import config, data  # noqa: E402
from job.model import build_tiny  # noqa: E402

WORDS = "the model reads a long question about the weather in Seoul and answers it in a few sentences".split()


def rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    return [{"messages": [{"role": "user", "content": text(120)}, {"role": "assistant", "content": text(60)},
                         {"role": "user", "content": text(100)}, {"role": "assistant", "content": text(60)}]}
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", help="model folder whose tokenizer to use (default: the built-in tiny one)")
    opts = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer or build_tiny())
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(opts.rows)))
        s = config.load({}, environ={"DATASET": str(path), "BASE_MODEL": "bench/tokenize", "MAX_LENGTH": "2048",
                                     "EVAL_FRACTION": "0.01"})
        result = {"rows": opts.rows, "cores": len(os.sched_getaffinity(0))}
        for mode, threshold in (("one_process", 10**12), ("workers", data.PARALLEL_FROM_ROWS)):
            data.PARALLEL_FROM_ROWS = threshold
            started = time.perf_counter()
            prepared = data.prepare(s, tokenizer, "llama")
            seconds = time.perf_counter() - started
            result[mode] = {"seconds": round(seconds, 1), "rows_per_second": round(opts.rows / seconds),
                            "tokens_median": prepared.stats["tokens_median"]}
        result["speedup"] = round(result["one_process"]["seconds"] / result["workers"]["seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
