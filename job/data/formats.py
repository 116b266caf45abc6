"""Rows to conversations as DATA_FORMAT reads them (messages, instruction, prompt_completion, template, text, or
auto-detected from the columns): column renames (COLUMN_MAP), role names (ROLE_MAP), content blocks, tools and tool
calls, and the order of turns that strict chat templates demand."""

from __future__ import annotations

import json
from dataclasses import dataclass

from job.config import Settings, name_pairs
from job.data.reading import Row
from job.errors import ConfigError, DataError

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
    roles = {**ROLE_NAMES, **(name_pairs(s.role_map) if s.role_map else {})}
    tools, prompt_turns = None, 0
    if data_format == "text":
        return column_text(row, "text")
    if data_format == "messages":
        column = "messages" if "messages" in r else "conversations"
        messages = _turns(r.get(column), column, row.where, roles)
        labels = [f"{column}[{i}]" for i in range(len(messages))]
        tools = _tools(r.get("tools"), row.where)
    elif data_format == "prompt_completion":
        prompt, completion = _side(row, "prompt", "user", roles), _side(row, "completion", "assistant", roles)
        messages, prompt_turns = prompt + completion, len(prompt)
        labels = [f"prompt[{i}]" for i in range(len(prompt))] + [f"completion[{i}]" for i in range(len(completion))]
        tools = _tools(r.get("tools"), row.where)
    else:
        prompt, answer = _exchange(row, data_format, s)
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


def column_text(row: Row, column: str, required: bool = True) -> str:
    """A column's text; "" for an optional one that is missing or blank."""
    value = row.record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            state = "missing" if column not in row.record else "empty"
            raise DataError(f"{row.where}: column {column!r} is {state}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column {column!r} must be text, got {type(value).__name__} {value!r}")
    return value


def _first(record: dict, columns: tuple[str, ...]) -> str | None:
    return next((c for c in columns if c in record), None)


def _side(row: Row, column: str, role: str, roles: dict[str, str]) -> list[dict]:
    """A prompt or completion: a list of turns (conversational), or text as one turn of `role`."""
    if isinstance(row.record.get(column), list):
        return _turns(row.record[column], column, row.where, roles)
    return [{"role": role, "content": column_text(row, column)}]


def _exchange(row: Row, data_format: str, s: Settings) -> tuple[str, str]:
    """The prompt and the answer of a row of one exchange: DATA_FORMAT=instruction or template."""
    r = row.record
    if data_format == "instruction":
        instruction = column_text(row, _first(r, INSTRUCTION_COLUMNS) or "instruction")
        extra = column_text(row, _first(r, INPUT_COLUMNS), required=False) if _first(r, INPUT_COLUMNS) else ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return prompt, column_text(row, _first(r, OUTPUT_COLUMNS) or "output")
    if data_format == "template":
        try:
            prompt = s.prompt_template.format_map({k: v for k, v in r.items()})
        except KeyError as error:
            raise DataError(f"{row.where}: PROMPT_TEMPLATE names column {error.args[0]!r}, which the row lacks "
                            f"(columns: {sorted(r)})") from None
        return prompt, column_text(row, s.response_column)
    raise ConfigError(f"DATA_FORMAT={data_format!r} is not a known format")


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
    if not isinstance(tools, list) or not all(tool_name(t) for t in tools):
        raise DataError(f"{where}: column 'tools' must be a list of function definitions, each with a name "
                        f"({{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}), got {value!r}")
    return tools


def tool_name(tool) -> str | None:
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
