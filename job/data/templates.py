"""Conversations to text and tokens: the prompt format and chat template that render the data, the rendering cut into
prompt and answer segments (by growing prefixes, else by a marked copy of the template), what the loss covers
(LOSS_ON), tokenizing with labels, and the end-of-turn token every answer must end in."""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

from job.config import Settings
from job.data.formats import Chat, tool_name
from job.data.reading import Row
from job.errors import ConfigError, DataError

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
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

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
    missing = [f"the tool {tool_name(tool)!r}" for tool in chat.tools or [] if tool_name(tool) not in first_prompt]
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


def end_of_turn_id(segments: list[tuple[str, bool]], tokenizer, s: Settings) -> int:
    """The token that closes an answer; it must be a special token and it must be trained."""
    answer = [text for text, trained in segments if trained][-1].rstrip()
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if not ids or ids[-1] not in special:
        raise ConfigError(f"{template_setting(s)}: answers end in {answer[-20:]!r}, not a special end-of-turn "
                          "token, so the model would never learn to stop. End each answer with a special token "
                          f"in the chat template (this tokenizer's EOS is {tokenizer.eos_token!r}), or, for a base "
                          "model without a template, choose a named PROMPT_FORMAT (mistral, llama-3, chatml).")
    return ids[-1]
