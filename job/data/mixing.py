"""The sources of DATASET, each on its own, then together by their weights: one source read, tokenized and its
evaluation rows held out (a Part), each source's share of the training rows, the draw of those rows with SEED, and
what each source gave (summary.json's data.sources)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from job.config import Settings, Source
from job.data.formats import detect_format, map_columns
from job.data.reading import read_rows
from job.data.workers import Work, render_and_tokenize
from job.errors import DataError


@dataclass
class Part:
    """One source of the data, tokenized: its good rows, (conversation, input ids, labels) each, for training and for
    evaluation, and what became of the rest."""
    source: Source
    data_format: str
    rows_read: int  # of its training split
    train: list[tuple]
    eval: list[tuple]
    eval_from: str | None  # EVAL_SPLIT (its own), EVAL_FRACTION (held out of its training rows), or None
    skipped: list[str]
    end_of_turn_id: int


def prepare_source(source: Source, s: Settings, tokenizer, template: str, format_name: str) -> Part:
    """Read, check, render and tokenize one source and set its evaluation rows apart: its EVAL_SPLIT, else
    EVAL_FRACTION of its rows, held out before any mixing so that no evaluation row is trained on."""
    alone = source.alone(s)
    train_rows = map_columns(read_rows(alone, alone.dataset_split), s)
    eval_rows = map_columns(read_rows(alone, s.eval_split), s) if s.eval_split else []
    if not train_rows:
        raise DataError(f"DATASET={alone.dataset}: split {alone.dataset_split!r} has no rows")
    try:  # each source on its own: a mix may join ShareGPT conversations and alpaca instructions
        data_format = s.data_format if s.data_format != "auto" else detect_format(set(train_rows[0].record))
    except DataError as error:
        raise DataError(f"{train_rows[0].where}: {error}") from None

    work = Work(s, tokenizer, template, format_name, data_format)
    train_done, train_skipped, eot = render_and_tokenize(work, train_rows, f"tokenizing {alone.dataset}")
    eval_done, eval_skipped, _ = render_and_tokenize(work, eval_rows, f"tokenizing {alone.dataset} ({s.eval_split})")
    skipped = train_skipped + eval_skipped
    if not train_done:
        raise DataError(f"every one of the {len(train_rows)} training rows is bad (SKIP_BAD_ROWS=true skipped them "
                        f"all); the first: {skipped[0]}")
    eval_from = s.eval_split if eval_done else None
    if not eval_done and s.eval_fraction > 0 and len(train_done) > 1:
        order = list(range(len(train_done)))
        random.Random(s.seed).shuffle(order)
        cut = max(1, round(len(order) * s.eval_fraction))
        eval_done = [train_done[i] for i in order[:cut]]
        train_done = [train_done[i] for i in sorted(order[cut:])]
        eval_from = "EVAL_FRACTION"
    return Part(source, data_format, len(train_rows), train_done, eval_done, eval_from, skipped, eot)


def mix_weights(parts: list[Part]) -> list[float]:
    """Each source's weight; without weights, its number of training rows, so that every row is taken once."""
    if parts[0].source.weight is None:
        return [len(part.train) for part in parts]
    return [part.source.weight for part in parts]


def shares(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`, in whole numbers that add up to it (largest remainders first)."""
    whole = sum(weights)
    exact = [total * weight / whole for weight in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])  # ties: the earlier source
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: list, count: int, rng: random.Random) -> list:
    """`count` of `rows`: all of them as many whole times as fit, then a sample of the rest without repeats, in file
    order; `count` equal to their number gives them as they are."""
    times, rest = divmod(count, len(rows))
    return rows * times + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]


def mix(parts: list[Part], s: Settings) -> tuple[list[list], list[list]]:
    """Each source's training rows, as many as the sources hold together, drawn by its weight's share with SEED; and
    its evaluation rows, the first of them by its share of MAX_EVAL_SAMPLES."""
    weights = mix_weights(parts)
    rng = random.Random(s.seed)
    train_drawn = [draw(part.train, count, rng)
                   for part, count in zip(parts, shares(sum(len(part.train) for part in parts), weights))]
    # the evaluation rows follow the weights too, where MAX_EVAL_SAMPLES keeps fewer than the sources hold
    eval_kept = [part.eval[:count] for part, count in zip(parts, shares(s.max_eval_samples, weights))]
    return train_drawn, eval_kept


def source_stats(part: Part, s: Settings, encoded: dict, evaluated: dict, train_rows: int) -> dict:
    """What one source gave (summary.json's data.sources): rows read, bad, held out for evaluation, and trained on
    (drawn by its weight, less rows MAX_LENGTH left no answer in), with their share of all and their tokens."""
    return {
        "dataset": part.source.path,
        "split": part.source.alone(s).dataset_split,
        "weight": part.source.weight,
        "format": part.data_format,
        "rows_read": part.rows_read,
        "skipped_bad_rows": len(part.skipped),
        "eval_rows": len(evaluated["input_ids"]),
        "eval_from": part.eval_from,
        "rows_available": len(part.train),
        "train_rows": len(encoded["input_ids"]),
        "train_share": round(len(encoded["input_ids"]) / train_rows, 4),
        "train_tokens": sum(len(ids) for ids in encoded["input_ids"]),
    }
