"""The data made ready for training: prepare (every source read, tokenized and mixed, rows cut to MAX_LENGTH, the
loss mask checked, the stats counted), its fingerprint (the hash that keys its cache and resumes), and load (prepare
once, on the main process, into a cache on OUTPUT_DIR that every rank reads)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from job.checkpoint import is_complete, read_json, seal, write_json
from job.config import BUILTIN_DATASET, Settings, Source, sources
from job.data.formats import Chat
from job.data.mixing import Part, mix, prepare_source, source_stats
from job.data.reading import BUNDLED_DATASET, LOCAL_SUFFIXES, local_files
from job.data.templates import chat_template_for, prompt_format_name
from job.errors import DataError

log = logging.getLogger("job.data")  # the package's name: the log lines of every data step are its


@dataclass
class Prepared:
    train: object  # datasets.Dataset with input_ids, labels
    eval: object | None
    chat_template: str
    end_of_turn_id: int
    samples: list[dict]  # {"messages": prompt turns, "reference": answer} for the prompt test
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""


def prepare(s: Settings, tokenizer, model_type: str) -> Prepared:
    """Read, check, render and tokenize the data, mixing the sources of DATASET by their weights; raises DataError
    naming the row on bad input.

    The training rows number as many as the sources hold together (their held-out rows excepted); each source
    gives its weight's share of them, drawn with SEED. That happens once, on the main process, and is cached under
    the data fingerprint, which covers the weights and SEED: every rank and every resume trains on the same rows."""
    template = chat_template_for(s, tokenizer, model_type)
    format_name = prompt_format_name(s, tokenizer, model_type)
    parts = [prepare_source(source, s, tokenizer, template, format_name) for source in sources(s)]
    train_drawn, eval_kept = mix(parts, s)
    tally = Tally()
    train_encoded = [encode(rows, s.max_length, tally) for rows in train_drawn]
    eval_encoded = [encode(rows, s.max_length, tally) for rows in eval_kept]
    train = joined(train_encoded)
    evaluation = joined(eval_encoded) if any(eval_kept) else None
    check_mask(train, tally, parts, s)
    stats = {**data_stats(parts, tally, train, evaluation),
             "sources": [source_stats(part, s, encoded, evaluated, len(train))
                         for part, encoded, evaluated in zip(parts, train_encoded, eval_encoded)]}
    # answers end in the chat template's end-of-turn token, text rows in EOS: generation stops at the former
    eot = next((part.end_of_turn_id for part in parts if part.data_format != "text"), parts[0].end_of_turn_id)
    return Prepared(train, evaluation, template, eot, prompt_samples(eval_kept, s.sample_prompts), stats)


@dataclass
class Tally:
    """What cutting rows to MAX_LENGTH met, training and evaluation rows together: each row's length before the cut,
    rows cut, rows the cut left no answer in, and the labelled and all tokens kept."""
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    labelled: int = 0
    tokens: int = 0

    def label_share(self) -> float:
        return self.labelled / max(1, self.tokens)


def encode(done: list[tuple], max_length: int, tally: Tally) -> dict:
    """The input ids and labels columns of tokenized rows, each cut to max_length; a row left with no answer is
    dropped."""
    columns = {"input_ids": [], "labels": []}
    for _, ids, labels in done:
        tally.lengths.append(len(ids))
        if len(ids) > max_length:
            tally.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == -100 for label in labels):
            tally.dropped += 1
            continue
        tally.labelled += sum(label != -100 for label in labels)
        tally.tokens += len(ids)
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
    return columns


def joined(encoded: list[dict]):
    """The columns of every source as one datasets.Dataset."""
    import datasets

    return datasets.Dataset.from_dict({name: [row for columns in encoded for row in columns[name]]
                                       for name in ("input_ids", "labels")})


def check_mask(train, tally: Tally, parts: list[Part], s: Settings) -> None:
    """Refuse data that would train on nothing (every row too long before its answer) or on every token."""
    if len(train) == 0:
        raise DataError(f"MAX_LENGTH={s.max_length}: every training row is longer than that before its answer "
                        f"starts (longest row {max(tally.lengths)} tokens); raise MAX_LENGTH")
    if (s.loss_on != "everything" and any(part.data_format != "text" for part in parts)
            and tally.label_share() >= 1.0):
        raise DataError("loss mask: every token is labelled, so prompts would be trained on; "
                        "check PROMPT_FORMAT and DATA_FORMAT")


def data_stats(parts: list[Part], tally: Tally, train, evaluation) -> dict:
    """The stats of all sources together (`job preflight` output, summary.json's data); prepare adds each source's
    own."""
    skipped = [text for part in parts for text in part.skipped]
    lengths_sorted = sorted(tally.lengths)
    return {
        "format": ", ".join(dict.fromkeys(part.data_format for part in parts)),
        "train_rows": len(train),
        "eval_rows": 0 if evaluation is None else len(evaluation),
        "skipped_bad_rows": len(skipped),
        "skipped_examples": skipped[:5],
        "truncated_rows": tally.truncated,
        "truncated_fraction": round(tally.truncated / len(tally.lengths), 4),
        "dropped_rows": tally.dropped,
        "labelled_token_share": round(tally.label_share(), 4),
        "tokens_min": lengths_sorted[0],
        "tokens_median": int(statistics.median(lengths_sorted)),
        "tokens_p95": lengths_sorted[int(0.95 * (len(lengths_sorted) - 1))],
        "tokens_max": lengths_sorted[-1],
        "train_tokens": sum(len(x) for x in train["input_ids"]),
    }


def prompt_samples(eval_kept: list[list], count: int) -> list[dict]:
    """Up to `count` evaluation conversations as {"messages": prompt turns, "reference": answer}. The prompt test
    (evaluate, merge) renders prompts without tools=, so it takes plain conversations only."""
    plain = [chat for rows in eval_kept for chat, _, _ in rows if isinstance(chat, Chat) and not chat.uses_tools()]
    return [{"messages": chat.messages[:-1], "reference": chat.messages[-1]["content"]} for chat in plain[:count]]


def fingerprint(s: Settings, tokenizer) -> str:
    """Hash of the data and everything that shapes its tokens: equal hashes mean equal training data."""
    h = hashlib.sha256()
    listed = sources(s)
    plain = listed == [Source(s.dataset)]  # a lone DATASET hashes as it did before mixes, so its runs still resume
    for source in listed:
        if not plain:
            h.update(f"source={source!r};".encode())  # its weight, split, configuration and revision
        _hash_dataset(h, source.alone(s))
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    h.update(hashlib.sha256(vocab.encode()).digest())
    for name in ("dataset_split", "eval_split", "data_format", "prompt_template", "response_column",
                 "system_prompt", "prompt_format", "skip_bad_rows", "max_length", "eval_fraction",
                 "max_eval_samples", "seed"):
        h.update(f"{name}={getattr(s, name)!r};".encode())
    for name in ("column_map", "role_map"):  # only when set: runs made before these settings existed still resume
        if getattr(s, name):
            h.update(f"{name}={getattr(s, name)!r};".encode())
    if s.loss_on != "answers":
        h.update(f"loss_on={s.loss_on!r};".encode())
    if s.chat_template_file:
        h.update(f"chat_template={chat_template_for(s, tokenizer, '')};".encode())
    return h.hexdigest()[:16]


def _hash_dataset(h, s: Settings) -> None:
    """Add one dataset (DATASET naming a single one) to the hash: a local one by its files' contents, a Hub one by
    its name, configuration and revision."""
    path = BUNDLED_DATASET if s.dataset == BUILTIN_DATASET else Path(s.dataset)
    if path.exists():
        for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        training = local_files(s, s.dataset_split)
        if path.is_dir() and len(training) < sum(1 for f in path.rglob("*") if f.suffix in LOCAL_SUFFIXES):
            # a folder of several splits was read whole before its splits were told apart
            h.update(f"split files={[str(f.relative_to(path)) for f in training]};".encode())
    else:
        h.update(f"{s.dataset}|{s.dataset_config}".encode())
        if s.dataset_revision:  # only when set: runs made before it existed still resume
            h.update(f"revision={s.dataset_revision};".encode())


def load(s: Settings, tokenizer, model_type: str, cache_root: Path, state) -> Prepared:
    """Tokenize once, on the main process, into a cache on OUTPUT_DIR keyed by the data fingerprint;
    the other ranks (and reruns) load it."""
    import datasets

    key = fingerprint(s, tokenizer)
    cached = cache_root / f"data-{key}"
    with state.main_process_first():
        if not is_complete(cached):
            if not state.is_main_process:
                raise DataError(f"the main process did not write the tokenized data to {cached}; is OUTPUT_DIR "
                                "shared storage on every node?")
            prepared = prepare(s, tokenizer, model_type)
            staging = cached.with_name(cached.name + ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            prepared.train.save_to_disk(str(staging / "train"))
            if prepared.eval is not None:
                prepared.eval.save_to_disk(str(staging / "eval"))
            write_json(staging / "meta.json", {
                "chat_template": prepared.chat_template, "end_of_turn_id": prepared.end_of_turn_id,
                "samples": prepared.samples, "stats": prepared.stats})
            seal(staging, cached)
            stats = prepared.stats  # once, where the data is tokenized: a mask that trains on all or nothing shows
            log.info("data: %d training rows (%d truncated, %d skipped), %d evaluation rows; %.1f%% of the tokens "
                     "are trained on (the answers); %s tokens a row at the median, %s at most", stats["train_rows"],
                     stats["truncated_rows"], stats["skipped_bad_rows"], stats["eval_rows"],
                     100 * stats["labelled_token_share"], stats["tokens_median"], stats["tokens_max"])
            if len(stats["sources"]) > 1:  # what the weights made of each source
                for source in stats["sources"]:
                    log.info("data: %s: %d training rows (%.1f%% of them) from its %d (weight %s), %d evaluation "
                             "rows", source["dataset"], source["train_rows"], 100 * source["train_share"],
                             source["rows_available"], source["weight"] or "none", source["eval_rows"])
    meta = read_json(cached / "meta.json")
    evaluation = datasets.load_from_disk(str(cached / "eval")) if (cached / "eval").is_dir() else None
    return Prepared(datasets.load_from_disk(str(cached / "train")), evaluation, meta["chat_template"],
                    meta["end_of_turn_id"], meta["samples"], meta["stats"], key)
