"""From a dataset (hub id, local files or the bundled set) to tokenized rows with loss masks.

Steps: read rows (each with a file:line location for error messages) -> turn each into a
conversation according to DATA_FORMAT -> render it with the prompt format's chat template into
prompt/answer segments -> tokenize, labelling only answer tokens (the end-of-turn token included,
so the model learns to stop) -> split off evaluation rows -> cache on OUTPUT_DIR for every rank.
We tokenize here rather than in SFTTrainer so bad rows fail before a GPU hour is spent, with the
row named, and so the loss mask and EOS handling are ours to check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from job.checkpoint import is_complete, read_json, seal, write_json
from job.config import BUILTIN_DATASET, Settings
from job.errors import ConfigError, DataError

log = logging.getLogger("job.data")

BUNDLED_DATASET = Path(__file__).parent / "assets" / "tasks.jsonl"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Column names accepted per format, first match wins (alpaca, dolly, databricks-dolly-15k-ko).
INSTRUCTION_COLUMNS = ("instruction",)
INPUT_COLUMNS = ("input", "context")
OUTPUT_COLUMNS = ("output", "response")
ROLES = {"system", "user", "assistant"}

# Named prompt formats for base models without a chat template. `{eot}` becomes the format's
# end-of-turn token where the tokenizer has it, else its EOS, so every answer ends in one token.
PROMPT_FORMATS = {
    "mistral": {
        "eot": None,
        "template": (
            "{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'user' %}[INST] {% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
            "{{ messages[0]['content'] }}\n\n{% endif %}{{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ '{eot}' }}{% endif %}{% endfor %}"
        ),
    },
    "llama-3": {
        "eot": "<|eot_id|>",
        "template": (
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}{{ '{eot}' }}{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    },
    "chatml": {
        "eot": "<|im_end|>",
        "template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ '{eot}' }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
}


@dataclass
class Row:
    where: str  # "file.jsonl:12" or "dataset[split]:12", for error messages
    record: dict


@dataclass
class Prepared:
    train: object  # datasets.Dataset with input_ids, labels
    eval: object | None
    chat_template: str
    end_of_turn_id: int
    samples: list[dict]  # {"messages": prompt turns, "reference": answer} for the prompt test
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""


# ---------------------------------------------------------------------------------------- reading

def read_rows(s: Settings, split: str) -> list[Row]:
    """Rows of one split, each with where it came from."""
    if s.dataset == BUILTIN_DATASET:
        return _read_jsonl(BUNDLED_DATASET) if split == s.dataset_split else []
    path = Path(s.dataset)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise DataError(f"DATASET={s.dataset}: no {', '.join(LOCAL_SUFFIXES)} files in it")
        if split != s.dataset_split:  # local files hold one split; evaluation is cut from it
            return []
        return [row for f in files for row in _read_local(f)]
    if s.dataset.startswith((".", "/")) or Path(s.dataset).suffix in LOCAL_SUFFIXES:
        raise DataError(f"DATASET={s.dataset}: no such file or directory")
    return _read_hub(s, split)


def _read_local(path: Path) -> list[Row]:
    kind = LOCAL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise DataError(f"DATASET={path}: unsupported file type {path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # the builders raise many types; all mean the file cannot be parsed
        raise DataError(f"{path}: cannot be read as {kind}: {error}") from None
    offset = 2 if kind == "csv" else 1  # a CSV's first data row is line 2
    return [Row(f"{path}:{i + offset}", dict(r)) for i, r in enumerate(table)]


def _read_jsonl(path: Path) -> list[Row]:
    """JSON Lines read by hand so a bad line is reported as file:line with the reason."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte {error.start}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
            rows.append(Row(f"{path}:{number}", record))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or use .jsonl)")
    return [Row(f"{path}[{i}]", r) for i, r in enumerate(data)]


def _read_hub(s: Settings, split: str) -> list[Row]:
    import datasets

    try:
        table = datasets.load_dataset(s.dataset, s.dataset_config, split=split,
                                      trust_remote_code=s.trust_remote_code or None)
    except ValueError as error:
        if split != s.dataset_split and "split" in str(error).lower():
            return []
        raise DataError(f"DATASET={s.dataset} split {split!r}: {error}") from None
    except Exception as error:
        raise DataError(f"DATASET={s.dataset}: cannot load it from the hub or disk: {error}") from None
    return [Row(f"{s.dataset}[{split}]:{i}", dict(r)) for i, r in enumerate(table)]


# ------------------------------------------------------------------------- rows to conversations

def detect_format(columns: set[str]) -> str:
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if columns & set(INSTRUCTION_COLUMNS) and columns & set(OUTPUT_COLUMNS):
        return "instruction"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise DataError(f"DATA_FORMAT=auto cannot tell the format from the columns {sorted(columns)}: expected "
                    "messages; instruction + output/response; prompt + completion; or text. "
                    "Set DATA_FORMAT (template with PROMPT_TEMPLATE and RESPONSE_COLUMN maps any columns).")


def to_messages(row: Row, data_format: str, s: Settings) -> list[dict] | str:
    """A row as a chat (list of role/content turns), or as plain text for DATA_FORMAT=text."""
    r = row.record
    if not isinstance(r, dict):
        raise DataError(f"{row.where}: expected an object with columns, got {type(r).__name__}")

    def text(column: str, required: bool = True) -> str:
        value = r.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                state = "missing" if column not in r else "empty"
                raise DataError(f"{row.where}: column {column!r} is {state}")
            return ""
        if not isinstance(value, str):
            raise DataError(f"{row.where}: column {column!r} must be text, got {type(value).__name__} {value!r}")
        return value

    def first(columns: tuple[str, ...]) -> str | None:
        return next((c for c in columns if c in r), None)

    if data_format == "text":
        return text("text")
    if data_format == "messages":
        turns = r.get("messages", r.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{row.where}: column 'messages' must be a non-empty list of role/content turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise DataError(f"{row.where}: messages[{i}] must be {{'role': system|user|assistant, "
                                f"'content': text}}, got {turn!r}")
            messages.append({"role": turn["role"], "content": turn["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise DataError(f"{row.where}: messages has no non-empty assistant turn to learn from")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{row.where}: messages must end with an assistant turn")
    elif data_format == "instruction":
        instruction = text(first(INSTRUCTION_COLUMNS) or "instruction")
        extra = text(first(INPUT_COLUMNS), required=False) if first(INPUT_COLUMNS) else ""
        answer = text(first(OUTPUT_COLUMNS) or "output")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": answer}]
    elif data_format == "prompt_completion":
        messages = [{"role": "user", "content": text("prompt")}, {"role": "assistant", "content": text("completion")}]
    elif data_format == "template":
        try:
            prompt = s.prompt_template.format_map({k: v for k, v in r.items()})
        except KeyError as error:
            raise DataError(f"{row.where}: PROMPT_TEMPLATE names column {error.args[0]!r}, which the row lacks "
                            f"(columns: {sorted(r)})") from None
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(s.response_column)}]
    else:
        raise ConfigError(f"DATA_FORMAT={data_format!r} is not a known format")
    if s.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": s.system_prompt})
    return messages


# ----------------------------------------------------------------------------- prompt rendering

def chat_template_for(s: Settings, tokenizer, model_type: str) -> str:
    """The Jinja chat template used to render training data; it is saved with the adapter and model."""
    name = s.prompt_format
    if name in ("auto", "tokenizer") and tokenizer.chat_template:
        return tokenizer.chat_template
    if name == "tokenizer":
        raise ConfigError("PROMPT_FORMAT=tokenizer but the tokenizer has no chat template; "
                          f"choose one of: {', '.join(PROMPT_FORMATS)}")
    if name == "auto":
        vocab = tokenizer.get_vocab()
        name = ("mistral" if model_type == "mistral" else
                "llama-3" if "<|eot_id|>" in vocab else "chatml")
    fmt = PROMPT_FORMATS[name]
    eot = fmt["eot"] if fmt["eot"] in tokenizer.get_vocab() else tokenizer.eos_token
    return fmt["template"].replace("{eot}", eot)


def render(messages: list[dict] | str, tokenizer, template: str) -> list[tuple[str, bool]]:
    """Text segments with whether each is trained on: assistant turns are, everything else is not.

    Each assistant turn is the difference between the conversation rendered through it and the
    prompt rendered up to it, so any chat template works, not only the named ones.
    """
    if isinstance(messages, str):
        return [(tokenizer.bos_token or "", False), (messages + tokenizer.eos_token, True)]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], chat_template=template, tokenize=False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise ConfigError("PROMPT_FORMAT: the chat template does not render conversations as growing "
                              "prefixes, so answers cannot be located; choose a named format")
        segments += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    return segments


def tokenize(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    input_ids, labels = [], []
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids += ids
        labels += ids if trained else [-100] * len(ids)
    return input_ids, labels


def end_of_turn_id(segments: list[tuple[str, bool]], tokenizer) -> int:
    """The token that closes an answer; it must be a special token and it must be trained."""
    answer = [text for text, trained in segments if trained][-1].rstrip()
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if not ids or ids[-1] not in special:
        raise ConfigError(f"PROMPT_FORMAT: answers end in {answer[-20:]!r}, not a special end-of-turn token; the "
                          "model would never learn to stop. Choose a named format (mistral, llama-3, chatml).")
    return ids[-1]


# ------------------------------------------------------------------------------------- pipeline

def fingerprint(s: Settings, tokenizer) -> str:
    """Hash of the data and everything that shapes its tokens: equal hashes mean equal training data."""
    h = hashlib.sha256()
    path = BUNDLED_DATASET if s.dataset == BUILTIN_DATASET else Path(s.dataset)
    if path.exists():
        for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    else:
        h.update(f"{s.dataset}|{s.dataset_config}".encode())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    h.update(hashlib.sha256(vocab.encode()).digest())
    for name in ("dataset_split", "eval_split", "data_format", "prompt_template", "response_column",
                 "system_prompt", "prompt_format", "skip_bad_rows", "max_length", "eval_fraction",
                 "max_eval_samples", "seed"):
        h.update(f"{name}={getattr(s, name)!r};".encode())
    return h.hexdigest()[:16]


def prepare(s: Settings, tokenizer, model_type: str) -> Prepared:
    """Read, check, render and tokenize the data; raises DataError naming the row on bad input."""
    import datasets

    template = chat_template_for(s, tokenizer, model_type)
    train_rows = read_rows(s, s.dataset_split)
    eval_rows = read_rows(s, s.eval_split) if s.eval_split else []
    if not train_rows:
        raise DataError(f"DATASET={s.dataset}: split {s.dataset_split!r} has no rows")
    data_format = s.data_format if s.data_format != "auto" else detect_format(set(train_rows[0].record))

    skipped: list[str] = []

    def convert(rows):
        out = []
        for row in rows:
            try:
                out.append(to_messages(row, data_format, s))
            except DataError as error:
                if not s.skip_bad_rows:
                    raise DataError(f"{error} (set SKIP_BAD_ROWS=true to skip such rows)") from None
                skipped.append(str(error))
        return out

    train_chats, eval_chats = convert(train_rows), convert(eval_rows)
    if not eval_chats and s.eval_fraction > 0 and len(train_chats) > 1:
        order = list(range(len(train_chats)))
        random.Random(s.seed).shuffle(order)
        cut = max(1, round(len(order) * s.eval_fraction))
        eval_chats = [train_chats[i] for i in order[:cut]]
        train_chats = [train_chats[i] for i in sorted(order[cut:])]
    eval_chats = eval_chats[: s.max_eval_samples]

    counts = {"truncated": 0, "dropped_no_answer_left": 0, "labelled": 0, "tokens": 0}
    lengths: list[int] = []
    eot = None

    def encode(chats):
        nonlocal eot
        columns = {"input_ids": [], "labels": []}
        for chat in chats:
            segments = render(chat, tokenizer, template)
            if eot is None:
                eot = end_of_turn_id(segments, tokenizer)
            ids, labels = tokenize(segments, tokenizer)
            lengths.append(len(ids))
            if len(ids) > s.max_length:
                counts["truncated"] += 1
                ids, labels = ids[: s.max_length], labels[: s.max_length]
            if all(label == -100 for label in labels):
                counts["dropped_no_answer_left"] += 1
                continue
            counts["labelled"] += sum(label != -100 for label in labels)
            counts["tokens"] += len(ids)
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
        return datasets.Dataset.from_dict(columns)

    train, evaluation = encode(train_chats), encode(eval_chats) if eval_chats else None
    if len(train) == 0:
        raise DataError(f"MAX_LENGTH={s.max_length}: every training row is longer than that before its answer "
                        f"starts (longest row {max(lengths)} tokens); raise MAX_LENGTH")
    label_share = counts["labelled"] / max(1, counts["tokens"])
    if data_format != "text" and label_share >= 1.0:
        raise DataError("loss mask: every token is labelled, so prompts would be trained on; "
                        "check PROMPT_FORMAT and DATA_FORMAT")
    lengths_sorted = sorted(lengths)
    stats = {
        "format": data_format,
        "train_rows": len(train),
        "eval_rows": 0 if evaluation is None else len(evaluation),
        "skipped_bad_rows": len(skipped),
        "skipped_examples": skipped[:5],
        "truncated_rows": counts["truncated"],
        "truncated_fraction": round(counts["truncated"] / len(lengths), 4),
        "dropped_rows": counts["dropped_no_answer_left"],
        "labelled_token_share": round(label_share, 4),
        "tokens_min": lengths_sorted[0],
        "tokens_median": int(statistics.median(lengths_sorted)),
        "tokens_p95": lengths_sorted[int(0.95 * (len(lengths_sorted) - 1))],
        "tokens_max": lengths_sorted[-1],
        "train_tokens": sum(len(x) for x in train["input_ids"]),
    }
    samples = [{"messages": chat[:-1], "reference": chat[-1]["content"]}
               for chat in eval_chats[: s.sample_prompts] if not isinstance(chat, str)]
    return Prepared(train, evaluation, template, eot, samples, stats)


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
    meta = read_json(cached / "meta.json")
    evaluation = datasets.load_from_disk(str(cached / "eval")) if (cached / "eval").is_dir() else None
    return Prepared(datasets.load_from_disk(str(cached / "train")), evaluation, meta["chat_template"],
                    meta["end_of_turn_id"], meta["samples"], meta["stats"], key)
