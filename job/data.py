"""From a dataset (hub id, local files or the bundled set) to tokenized rows with loss masks.

Steps, for each source of DATASET: read rows (each with a file:line location for error messages) ->
turn each into a conversation according to DATA_FORMAT -> render it with the prompt format's chat
template into prompt/answer segments -> tokenize, labelling only answer tokens (the end-of-turn token
included, so the model learns to stop) -> split off evaluation rows. Then mix the sources by their
weights -> cache on OUTPUT_DIR for every rank.
We tokenize here rather than in SFTTrainer so bad rows fail before a GPU hour is spent, with the
row named, and so the loss mask and EOS handling are ours to check.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from job.checkpoint import is_complete, read_json, seal, write_json
from job.config import BUILTIN_DATASET, Settings, Source, name_pairs, sources
from job.errors import ConfigError, DataError, unreachable_or

log = logging.getLogger("job.data")

BUNDLED_DATASET = Path(__file__).parent / "assets" / "tasks.jsonl"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Column names accepted per format, first match wins (alpaca, dolly, databricks-dolly-15k-ko).
INSTRUCTION_COLUMNS = ("instruction",)
INPUT_COLUMNS = ("input", "context")
OUTPUT_COLUMNS = ("output", "response")
# Role names in conversations, as the job's roles: OpenAI's, ShareGPT's (human, gpt) and LLaMA-Factory's
# function-calling ShareGPT (function_call: an assistant turn whose value is the call as JSON; observation: its
# result). ROLE_MAP adds more.
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "function_call": "assistant", "tool": "tool", "observation": "tool"}
# What may follow each turn: the order strict chat templates (Mistral's, Llama-2's) enforce, with tool results only
# after an assistant turn that calls tools ("calls") and before the assistant's next turn.
NEXT_ROLES = {"start": ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user",),
              "calls": ("tool",), "tool": ("tool", "assistant")}

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
class Chat:
    """A conversation to train on: its turns ({role, content}, plus tool_calls on assistant turns and tool_call_id or
    name on tool turns), the tools offered (passed to the chat template as `tools=`), and how many leading turns are
    prompt only (a conversational prompt/completion row trains on its completion alone)."""
    messages: list[dict]
    tools: list[dict] | None = None
    prompt_turns: int = 0

    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m["role"] == "tool" or "tool_calls" in m for m in self.messages)


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
        return [row for f in local_files(s, split) for row in _read_local(f)]
    if s.dataset.startswith((".", "/")) or Path(s.dataset).suffix in LOCAL_SUFFIXES:
        raise DataError(f"DATASET={s.dataset}: no such file or directory")
    return _read_hub(s, split)


def local_files(s: Settings, split: str) -> list[Path]:
    """The files of one split of a local DATASET. A directory whose files (or subdirectories) are named by split,
    as `datasets` names them (train.jsonl, test-00000-of-00001.parquet, validation/part1.csv), holds each split in
    its own; any other file or directory is one split, the training one, and evaluation is cut from it."""
    path = Path(s.dataset)
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"DATASET={s.dataset}: no {', '.join(LOCAL_SUFFIXES)} files in it")
    by_split = {f: split_of(f.relative_to(path)) for f in files} if path.is_dir() else {}
    if not any(by_split.values()):
        if split == s.dataset_split:
            return files
        raise DataError(f"EVAL_SPLIT={split}: DATASET={s.dataset} holds one split (no files or directories named "
                        f"by split, such as train.jsonl and {split}.jsonl); unset EVAL_SPLIT to cut EVAL_FRACTION "
                        "of the rows off for evaluation")
    chosen = [f for f, name in by_split.items() if name == split]
    if not chosen:
        names = sorted({name for name in by_split.values() if name})
        setting = "DATASET_SPLIT" if split == s.dataset_split else "EVAL_SPLIT"
        raise DataError(f"{setting}={split}: DATASET={s.dataset} has no files for it; its splits: {', '.join(names)}")
    return chosen


SPLIT_NAME = re.compile(r"(?P<split>train|test|validation|valid|eval|dev)(?:[-._ 0-9].*)?")


def split_of(relative: Path) -> str | None:
    """The split a file belongs to by its name or its first directory's, as `datasets` reads a folder; else None."""
    for part in (relative.parts[0], relative.stem) if len(relative.parts) > 1 else (relative.stem,):
        match = SPLIT_NAME.fullmatch(part)
        if match:
            return match["split"]
    return None


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
        where = csv_problem(path) if kind == "csv" else None
        raise DataError(where or f"{path}: cannot be read as {kind}: {error}") from None
    offset = 2 if kind == "csv" else 1  # a CSV's first data row is line 2
    return [Row(f"{path}:{i + offset}", dict(r)) for i, r in enumerate(table)]


def csv_problem(path: Path) -> str | None:
    """Where a CSV that the CSV builder refused goes wrong, as file:line (it names no line for bad UTF-8 or an
    unclosed quote): read again with the csv module, which counts lines."""
    import csv
    import io

    raw = path.read_bytes()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{path}:{number}: not valid UTF-8 (byte {error.start} of the line); save the file as UTF-8"
    reader = csv.reader(io.StringIO(raw.decode("utf-8"), newline=""), strict=True)
    width, start = None, 1
    try:
        for row in reader:
            if width is None:
                width = len(row)
            elif row and len(row) != width:
                return f"{path}:{start}: {len(row)} fields where the header has {width}"
            start = reader.line_num + 1
    except csv.Error as error:
        return f"{path}:{start}: the row starting here cannot be parsed ({error}); an unclosed quote?"
    return None


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
        table = datasets.load_dataset(s.dataset, s.dataset_config, split=split, revision=s.dataset_revision,
                                      trust_remote_code=s.trust_remote_code or None)
    except ValueError as error:
        if split != s.dataset_split and "split" in str(error).lower():
            return []
        raise DataError(f"DATASET={s.dataset} split {split!r}: {error}") from None
    except Exception as error:
        raise unreachable_or(error, f"DATASET={s.dataset}",
                             DataError(f"DATASET={s.dataset}: cannot load it from the hub or disk: {error}")) from None
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
                    "Set DATA_FORMAT (template with PROMPT_TEMPLATE and RESPONSE_COLUMN maps any columns), "
                    "or rename columns with COLUMN_MAP.")


def map_columns(rows: list[Row], s: Settings) -> list[Row]:
    """Rows with their columns renamed as COLUMN_MAP says, so the formats below see the names they know."""
    if not s.column_map:
        return rows
    renames = name_pairs(s.column_map)
    return [Row(row.where, {renames.get(k, k): v for k, v in row.record.items()})
            if isinstance(row.record, dict) else row for row in rows]


def to_messages(row: Row, data_format: str, s: Settings) -> Chat | str:
    """A row as a conversation, or as plain text for DATA_FORMAT=text."""
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

    def side(column: str, role: str) -> list[dict]:
        """A prompt or completion: a list of turns (conversational), or text as one turn of `role`."""
        if isinstance(r.get(column), list):
            return _turns(r[column], column, row.where, roles)
        return [{"role": role, "content": text(column)}]

    roles = {**ROLE_NAMES, **(name_pairs(s.role_map) if s.role_map else {})}
    tools, prompt_turns = None, 0
    if data_format == "text":
        return text("text")
    if data_format == "messages":
        column = "messages" if "messages" in r else "conversations"
        messages = _turns(r.get(column), column, row.where, roles)
        labels = [f"{column}[{i}]" for i in range(len(messages))]
        tools = _tools(r.get("tools"), row.where)
    elif data_format == "prompt_completion":
        prompt, completion = side("prompt", "user"), side("completion", "assistant")
        messages, prompt_turns = prompt + completion, len(prompt)
        labels = [f"prompt[{i}]" for i in range(len(prompt))] + [f"completion[{i}]" for i in range(len(completion))]
        tools = _tools(r.get("tools"), row.where)
    else:
        if data_format == "instruction":
            instruction = text(first(INSTRUCTION_COLUMNS) or "instruction")
            extra = text(first(INPUT_COLUMNS), required=False) if first(INPUT_COLUMNS) else ""
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            answer = text(first(OUTPUT_COLUMNS) or "output")
        elif data_format == "template":
            try:
                prompt = s.prompt_template.format_map({k: v for k, v in r.items()})
            except KeyError as error:
                raise DataError(f"{row.where}: PROMPT_TEMPLATE names column {error.args[0]!r}, which the row lacks "
                                f"(columns: {sorted(r)})") from None
            answer = text(s.response_column)
        else:
            raise ConfigError(f"DATA_FORMAT={data_format!r} is not a known format")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        labels = ["prompt", "answer"]
    check_roles(messages, labels, row.where)
    if not any(m["role"] == "assistant" and (m["content"].strip() or "tool_calls" in m)
               for m in messages[prompt_turns:]):
        raise DataError(f"{row.where}: no non-empty assistant turn to learn from"
                        + (" in the completion" if prompt_turns else ""))
    if s.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": s.system_prompt})
        prompt_turns += 1
    return Chat(messages, tools, prompt_turns)


def _turns(value, column: str, where: str, roles: dict[str, str]) -> list[dict]:
    """A list of turns in any of the shapes other tools train on: OpenAI's {role, content} (content as text or as a
    list of {type: text, text} blocks; tool_calls; tool turns) and ShareGPT's {from, value}."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r} must be a non-empty list of turns ({{role, content}} or "
                        "{from, value})")
    messages = []
    for i, turn in enumerate(value):
        label = f"{column}[{i}]"
        if not isinstance(turn, dict) or not ({"role", "from"} & turn.keys()):
            raise DataError(f"{where}: {label} must be {{'role': ..., 'content': ...}} or {{'from': ..., 'value': "
                            f"...}}, got {turn!r}")
        name, content = (turn["role"], turn.get("content")) if "role" in turn else (turn["from"], turn.get("value"))
        role = roles.get(name)
        if role is None:
            raise DataError(f"{where}: {label} has role {name!r}; known: {', '.join(sorted(roles))} (ROLE_MAP adds "
                            f"names, e.g. ROLE_MAP={name}=assistant)")
        if name == "function_call":  # LLaMA-Factory: the value is the call, {"name", "arguments"} or a list of them
            calls = _json(content, f"{label} (function_call)", where)
            calls = calls if isinstance(calls, list) else [calls]
            message = {"role": "assistant", "content": "", "tool_calls": [_tool_call(c, label, where) for c in calls]}
        else:
            message = {"role": role, "content": _content(content, label, where, turn.get("tool_calls"))}
        if turn.get("tool_calls"):
            if role != "assistant":
                raise DataError(f"{where}: {label} is a {role} turn with tool_calls; only assistant turns call tools")
            if not isinstance(turn["tool_calls"], list):
                raise DataError(f"{where}: {label}: tool_calls must be a list, got {turn['tool_calls']!r}")
            message["tool_calls"] = [_tool_call(c, label, where) for c in turn["tool_calls"]]
        if role == "tool":
            message.update({k: turn[k] for k in ("tool_call_id", "name") if turn.get(k) is not None})
        messages.append(message)
    return messages


def _content(content, label: str, where: str, tool_calls) -> str:
    """A turn's content as text. Blocks are joined as the chat templates of multimodal models render them (one after
    the other); an assistant turn that only calls tools may have none."""
    if isinstance(content, str):
        return content
    if content is None and tool_calls:
        return ""
    if isinstance(content, list) and content:
        for block in content:
            if not (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)):
                raise DataError(f"{where}: {label}: content blocks must be {{'type': 'text', 'text': ...}} (the job "
                                f"trains on text only), got {block!r}")
        return "".join(block["text"] for block in content)
    raise DataError(f"{where}: {label}: content must be text or a list of {{'type': 'text', 'text': ...}} blocks, "
                    f"got {content!r}")


def _json(value, label: str, where: str):
    """A value that may come as JSON text (LLaMA-Factory's tools and calls; OpenAI's call arguments)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: {label} is not valid JSON ({error.msg}): {value[:80]!r}") from None


def _tool_call(call, label: str, where: str) -> dict:
    """A call as chat templates read it: {type: function, function: {name, arguments as an object}}. OpenAI data
    holds the arguments as JSON text, which templates that print them with `tojson` would quote a second time."""
    function = call.get("function", call) if isinstance(call, dict) else None
    function = function if isinstance(function, dict) else {}
    arguments = _json(function.get("arguments") or {}, f"{label} arguments", where)
    if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
        raise DataError(f"{where}: {label}: a tool call must be {{'function': {{'name': ..., 'arguments': {{...}}}}}} "
                        f"or {{'name': ..., 'arguments': {{...}}}}, got {call!r}")
    result = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        result["id"] = call["id"]
    return result


def _tools(value, where: str) -> list[dict] | None:
    """The tools column: function definitions ({type: function, function: {name, ...}} or {name, ...}), as a list
    or as JSON text of one (LLaMA-Factory); passed to the chat template as they are."""
    tools = _json(value, "column 'tools'", where) if value not in (None, "") else None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(_tool_name(t) for t in tools):
        raise DataError(f"{where}: column 'tools' must be a list of function definitions, each with a name "
                        f"({{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}), got {value!r}")
    return tools


def _tool_name(tool) -> str | None:
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


def check_roles(messages: list[dict], labels: list[str], where: str) -> None:
    """Refuse turns in an order that strict chat templates raise on (NEXT_ROLES), whatever PROMPT_FORMAT is: the
    same row is then a bad row, named and skippable, under every format, never trained by one and fatal to another."""
    state = "start"
    for i, message in enumerate(messages):
        if message["role"] not in NEXT_ROLES[state]:
            before = "assistant, calling tools" if state == "calls" else state
            after = "at the start" if state == "start" else f"after {labels[i - 1]} ({before})"
            raise DataError(f"{where}: {labels[i]} ({message['role']}) comes {after}: turns must be an optional "
                            "system turn, then user and assistant taking turns, tool results only right after the "
                            "assistant turn that calls the tools")
        state = "calls" if "tool_calls" in message else message["role"]
    if state not in ("assistant", "calls"):
        raise DataError(f"{where}: the conversation must end with an assistant turn (the last is {state})")


# ----------------------------------------------------------------------------- prompt rendering

def prompt_format_name(s: Settings, tokenizer, model_type: str) -> str:
    """The prompt format that renders the data: "file" (CHAT_TEMPLATE_FILE), "tokenizer" (its own chat template) or
    a named one."""
    if s.chat_template_file:
        return "file"
    if s.prompt_format in ("auto", "tokenizer") and tokenizer.chat_template:
        return "tokenizer"
    if s.prompt_format == "tokenizer":
        raise ConfigError("PROMPT_FORMAT=tokenizer but the tokenizer has no chat template; "
                          f"choose one of: {', '.join(PROMPT_FORMATS)}")
    if s.prompt_format == "auto":
        return ("mistral" if model_type == "mistral" else
                "llama-3" if "<|eot_id|>" in tokenizer.get_vocab() else "chatml")
    return s.prompt_format


def chat_template_for(s: Settings, tokenizer, model_type: str) -> str:
    """The Jinja chat template used to render training data; it is saved with the adapter and model."""
    name = prompt_format_name(s, tokenizer, model_type)
    if name == "tokenizer":
        return tokenizer.chat_template
    if name == "file":
        try:
            return Path(s.chat_template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"CHAT_TEMPLATE_FILE={s.chat_template_file}: cannot be read ({error})") from None
    fmt = PROMPT_FORMATS[name]
    eot = fmt["eot"] if fmt["eot"] in tokenizer.get_vocab() else tokenizer.eos_token
    return fmt["template"].replace("{eot}", eot)


def render(messages: list[dict] | str, tokenizer, template: str, tools: list[dict] | None = None,
           prompt_turns: int = 0) -> list[tuple[str, bool]]:
    """Text segments with whether each is trained on: assistant turns are (those among the first prompt_turns
    excepted), everything else is not. Joined, they are the template's rendering of the whole conversation: what the
    model sees at inference when the conversation reaches its last turn.

    Most templates render a conversation as growing prefixes, which locates the answers of any template, not only
    the named ones; the answers of the others are located by markers (marked_answers).
    """
    if isinstance(messages, str):
        return [(tokenizer.bos_token or "", False), (messages + tokenizer.eos_token, True)]
    segments = growing_prefixes(messages, tokenizer, template, tools, prompt_turns)
    return segments if segments is not None else marked_answers(messages, tokenizer, template, tools, prompt_turns)


def growing_prefixes(messages: list[dict], tokenizer, template: str, tools: list[dict] | None,
                     prompt_turns: int) -> list[tuple[str, bool]] | None:
    """Each assistant turn as the difference between the conversation rendered through it and the prompt rendered
    up to it; None where the template renders a turn differently once more turns follow it."""
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], chat_template=template, tools=tools, tokenize=False,
                                               add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], chat_template=template, tools=tools,
                                                tokenize=False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            return None
        segments += [(prompt[len(done):], False), (through[len(prompt):], i >= prompt_turns)]
        done = through
    return segments


# How a user makes any template's answers locatable; the markers render nothing, so the template still serves inference.
MARK_ANSWERS = ("mark each answer in a copy of the template with {% generation %} ... {% endgeneration %}, as TRL's "
                "training templates do, and set CHAT_TEMPLATE_FILE to that file")


def marked_answers(messages: list[dict], tokenizer, template: str, tools: list[dict] | None,
                   prompt_turns: int) -> list[tuple[str, bool]]:
    """Segments for a template that does not render growing prefixes (Qwen3's and gpt-oss's drop the reasoning of
    earlier answers, Phi-3's ends only the last answer with EOS, gpt-oss's ends it with <|return|> where earlier ones
    end with <|end|>, DeepSeek-R1's generation prompt opens a <think> block that its answers lack): the whole
    conversation as the template renders it, cut where a marked copy of the template puts the answers. Each answer
    starts where the model's prompt for that turn ends, as under growing prefixes: TRL's copies also mark what the
    prompt already holds (gpt-oss's `<|start|>assistant`, DeepSeek-R1's `<｜Assistant｜>`), which the model never
    writes."""
    marked = marked_template(template, tokenizer)
    if marked is None:
        raise ConfigError("the chat template renders a turn differently once more turns follow it, so its answers "
                          "cannot be told from its prompts, and TRL ships no copy of it with the answers marked: "
                          + MARK_ANSWERS)
    whole = tokenizer.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False)
    spans = answer_spans(whole, *render_marked(messages, tokenizer, marked, tools))
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if len(spans) != len(turns):
        raise ConfigError(f"the chat template's marked copy (its own markers, or TRL's training copy of it) marks "
                          f"{len(spans)} answers in a conversation of {len(turns)} assistant turns: " + MARK_ANSWERS)
    segments, done = [], 0
    for i, (start, end) in zip(turns, spans):
        prompt = tokenizer.apply_chat_template(messages[:i], chat_template=template, tools=tools, tokenize=False,
                                               add_generation_prompt=True)
        start = max(start, min(end, len(os.path.commonprefix([whole, prompt]))))  # the prompt's part is not trained
        segments += [(whole[done:start], False), (whole[start:end], i >= prompt_turns)]
        done = end
    return segments + [(whole[done:], False)]


@functools.lru_cache(maxsize=8)
def marked_template(template: str, tokenizer) -> str | None:
    """The chat template with its answers marked by {% generation %}: the template itself where it has the markers,
    else the training copy TRL ships of it (of Qwen3's, DeepSeek-R1's, Phi-3's, gpt-oss's and more, known by their
    text), else None. It only locates answers: the template that renders the data and is saved stays the model's."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(template):
        return template
    carrier = copy.copy(tokenizer)  # TRL's lookup reads the template off a tokenizer
    carrier.chat_template = template
    try:
        return get_training_chat_template(carrier)
    except ValueError:  # TRL ships no copy of this template
        return None


def render_marked(messages: list[dict], tokenizer, marked: str,
                  tools: list[dict] | None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with a marked template, and where its marked blocks are in the text (blocks that
    touch, such as Phi-3's last answer and the EOS after it, as one)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    # apply_chat_template tells the marked blocks as a mask of tokens only; the renderer under it tells characters
    texts, blocks = render_jinja_template([messages], tools=tools, chat_template=marked,
                                          return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    spans = []
    for start, end in blocks[0]:
        if spans and spans[-1][1] == start:
            start = spans.pop()[0]
        spans.append((start, end))
    return texts[0], spans


def answer_spans(whole: str, marked: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the marked rendering's answers lie in the template's own rendering. A marked copy may render answers
    differently (TRL's copy of Qwen3's keeps the reasoning that Qwen3's drops from earlier answers) but not what lies
    between them, so the own rendering is matched to those pieces, in order, with an answer between each two."""
    ends, starts = [0] + [end for _, end in spans], [start for start, _ in spans] + [len(marked)]
    pieces = [marked[end:start] for end, start in zip(ends, starts)]
    match = re.fullmatch("(.*?)".join(map(re.escape, pieces)), whole, flags=re.DOTALL)
    if match is None:
        raise ConfigError("the chat template's marked copy (its own markers, or TRL's training copy of it) renders "
                          "the prompts differently from the template: " + MARK_ANSWERS)
    return [match.span(group) for group in range(1, len(pieces))]


def render_row(row: Row, chat: Chat | str, tokenizer, template: str, format_name: str,
               s: Settings) -> list[tuple[str, bool]]:
    """render() for one row, with what goes wrong for this row alone (a template that refuses it, tools that the
    format cannot render) raised as a DataError naming the row, so SKIP_BAD_ROWS can skip it."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if isinstance(chat, str):
        return render(chat, tokenizer, template)
    if chat.uses_tools() and format_name not in ("tokenizer", "file"):
        chosen = format_name if s.prompt_format == format_name else f"{s.prompt_format} (here {format_name})"
        raise DataError(f"{row.where}: the row has tools, tool calls or tool results, which PROMPT_FORMAT={chosen} "
                        "cannot render: the named formats have no tool syntax. Tools need a tokenizer whose chat "
                        "template renders them (PROMPT_FORMAT=auto or tokenizer)")
    try:
        segments = render(chat.messages, tokenizer, template, chat.tools, chat.prompt_turns)
    except TemplateSyntaxError as error:  # the template itself is broken: every row would fail
        raise ConfigError(f"{template_setting(s)}: the chat template does not parse: {error}") from None
    except ConfigError as error:  # the template's answers cannot be located: its fault, not the row's
        raise ConfigError(f"{template_setting(s)}: {error}") from None
    except (TemplateError, TypeError) as error:  # raise_exception(...) in strict templates, or a failed operation
        raise DataError(f"{row.where}: the chat template ({template_setting(s)}) refuses this row: "
                        f"{error}") from None
    if chat.uses_tools():
        _check_tools_rendered(chat, segments, row.where, s)
    return segments


def template_setting(s: Settings) -> str:
    """The setting that chose the chat template, for messages."""
    return f"CHAT_TEMPLATE_FILE={s.chat_template_file}" if s.chat_template_file else f"PROMPT_FORMAT={s.prompt_format}"


def _check_tools_rendered(chat: Chat, segments: list[tuple[str, bool]], where: str, s: Settings) -> None:
    """A template that ignores `tools` or tool_calls renders without error, and the model would learn answers without
    their calls: each tool's name must be in the prompt before the first answer, each call's name in its answer."""
    first_prompt, answers = segments[0][0], [text for text, _ in segments[1::2]]
    missing = [f"the tool {_tool_name(tool)!r}" for tool in chat.tools or [] if _tool_name(tool) not in first_prompt]
    turns = [m for m in chat.messages if m["role"] == "assistant"]
    missing += [f"the call of {call['function']['name']!r}" for message, answer in zip(turns, answers)
                for call in message.get("tool_calls", []) if call["function"]["name"] not in answer]
    if missing:
        raise DataError(f"{where}: the tokenizer's chat template (PROMPT_FORMAT={s.prompt_format}) leaves out "
                        f"{missing[0]}: it does not render tools, so this row cannot be trained as it is")


def loss_targets(segments: list[tuple[str, bool]], loss_on: str) -> list[tuple[str, bool]]:
    """LOSS_ON: the rendered segments the loss covers: every answer as rendered, the last one only, or all."""
    if loss_on == "everything":
        return [(text, True) for text, _ in segments]
    if loss_on == "last_answer":
        last = max((i for i, (_, trained) in enumerate(segments) if trained), default=None)
        return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]
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
    mix = sources(s)
    plain = mix == [Source(s.dataset)]  # a lone DATASET hashes as it did before mixes, so its runs still resume
    for source in mix:
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


@dataclass(frozen=True)
class Work:
    """What turns a row into tokens; forked workers inherit it (tokenizers and templates do not pickle cheaply)."""

    settings: Settings
    tokenizer: object
    template: str
    format_name: str
    data_format: str


# Rows a worker takes at a time: enough that sending back the tokens costs little beside making them.
CHUNK_ROWS = 256
PARALLEL_FROM_ROWS = 2048  # below this, starting the workers costs more than it saves
_work: Work | None = None  # the forked workers' copy


def render_and_tokenize(work: Work, rows: list[Row]) -> tuple[list[tuple], list[str], int | None]:
    """(conversation, input ids, labels) of every good row in order, the bad rows skipped (when SKIP_BAD_ROWS), and
    the end-of-turn token. Runs on every CPU core this process may use, in forked workers: rendering a chat template
    and tokenizing is Python work per row, one core's worth in one process. A bad row stops it naming file:line
    (the first in file order), as in one process."""
    global _work
    chunks = [rows[i:i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    workers = min(len(os.sched_getaffinity(0)), len(chunks))
    if len(rows) < PARALLEL_FROM_ROWS or workers < 2:
        results = [_chunk(work, chunk) for chunk in chunks]
    else:
        _work = work
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = list(pool.imap(_chunk_in_worker, chunks))
        finally:
            _work = None
    done = [item for chunk_done, _, _ in results for item in chunk_done]
    skipped = [text for _, chunk_skipped, _ in results for text in chunk_skipped]
    eot = next((e for _, _, e in results if e is not None), None)
    return done, skipped, eot


def _chunk_in_worker(rows: list[Row]):
    return _chunk(_work, rows)


def _chunk(work: Work, rows: list[Row]) -> tuple[list[tuple], list[str], int | None]:
    s, tokenizer = work.settings, work.tokenizer
    done, skipped, eot = [], [], None
    for row in rows:
        try:
            chat = to_messages(row, work.data_format, s)
            segments = render_row(row, chat, tokenizer, work.template, work.format_name, s)
        except DataError as error:
            if not s.skip_bad_rows:
                raise DataError(f"{error} (set SKIP_BAD_ROWS=true to skip such rows)") from None
            skipped.append(str(error))
            continue
        if eot is None:
            eot = end_of_turn_id(segments, tokenizer)
        done.append((chat, *tokenize(loss_targets(segments, s.loss_on), tokenizer)))
    return done, skipped, eot


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
    train_done, train_skipped, eot = render_and_tokenize(work, train_rows)
    eval_done, eval_skipped, _ = render_and_tokenize(work, eval_rows)
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


def prepare(s: Settings, tokenizer, model_type: str) -> Prepared:
    """Read, check, render and tokenize the data, mixing the sources of DATASET by their weights; raises DataError
    naming the row on bad input.

    The training rows number as many as the sources hold together (their held-out rows excepted); each source
    gives its weight's share of them, drawn with SEED. That happens once, on the main process, and is cached under
    the data fingerprint, which covers the weights and SEED: every rank and every resume trains on the same rows."""
    import datasets

    template = chat_template_for(s, tokenizer, model_type)
    format_name = prompt_format_name(s, tokenizer, model_type)
    parts = [prepare_source(source, s, tokenizer, template, format_name) for source in sources(s)]
    weights = mix_weights(parts)
    rng = random.Random(s.seed)
    train_drawn = [draw(part.train, count, rng)
                   for part, count in zip(parts, shares(sum(len(part.train) for part in parts), weights))]
    # the evaluation rows follow the weights too, where MAX_EVAL_SAMPLES keeps fewer than the sources hold
    eval_kept = [part.eval[:count] for part, count in zip(parts, shares(s.max_eval_samples, weights))]

    counts = {"truncated": 0, "dropped_no_answer_left": 0, "labelled": 0, "tokens": 0}
    lengths: list[int] = []

    def encode(done) -> dict:
        columns = {"input_ids": [], "labels": []}
        for _, ids, labels in done:
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
        return columns

    def joined(encoded: list[dict]):
        return datasets.Dataset.from_dict({name: [row for columns in encoded for row in columns[name]]
                                           for name in ("input_ids", "labels")})

    train_encoded, eval_encoded = [encode(rows) for rows in train_drawn], [encode(rows) for rows in eval_kept]
    train = joined(train_encoded)
    evaluation = joined(eval_encoded) if any(eval_kept) else None
    if len(train) == 0:
        raise DataError(f"MAX_LENGTH={s.max_length}: every training row is longer than that before its answer "
                        f"starts (longest row {max(lengths)} tokens); raise MAX_LENGTH")
    label_share = counts["labelled"] / max(1, counts["tokens"])
    if s.loss_on != "everything" and any(part.data_format != "text" for part in parts) and label_share >= 1.0:
        raise DataError("loss mask: every token is labelled, so prompts would be trained on; "
                        "check PROMPT_FORMAT and DATA_FORMAT")
    skipped = [text for part in parts for text in part.skipped]
    lengths_sorted = sorted(lengths)
    stats = {
        "format": ", ".join(dict.fromkeys(part.data_format for part in parts)),
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
        "sources": [source_stats(part, s, encoded, evaluated, len(train))
                    for part, encoded, evaluated in zip(parts, train_encoded, eval_encoded)],
    }
    # the prompt test (evaluate, merge) renders prompts without tools=, so it takes plain conversations only
    plain = [chat for rows in eval_kept for chat, _, _ in rows if isinstance(chat, Chat) and not chat.uses_tools()]
    samples = [{"messages": chat.messages[:-1], "reference": chat.messages[-1]["content"]}
               for chat in plain[: s.sample_prompts]]
    # answers end in the chat template's end-of-turn token, text rows in EOS: generation stops at the former
    eot = next((part.end_of_turn_id for part in parts if part.data_format != "text"), parts[0].end_of_turn_id)
    return Prepared(train, evaluation, template, eot, samples, stats)


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
