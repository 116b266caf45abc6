"""Data as TRL, axolotl and LLaMA-Factory users bring it (issue 31): ShareGPT turns, content blocks, tools and tool
turns, conversational prompt/completion, column and role maps; multi-turn conversations under the chat templates of the
models users fine-tune; and rows a chat template refuses, which are bad rows named by file:line like any other
(issue 29), under every prompt format alike."""

import importlib.resources
import itertools
import json
import re
import shutil
from typing import NamedTuple

import pytest

from job import config, data
from job.errors import ConfigError, DataError
from tests.jobtools import run_job


def make(tmp_path, rows, **environ):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return config.load({}, environ={"DATASET": str(path), "BASE_MODEL": "x/y", "EVAL_FRACTION": "0", **environ})


def answers(prepared, tokenizer):
    return [tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
            for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"])]


def with_template(tokenizer, template):
    """A copy of the tiny tokenizer (which has no chat template of its own) carrying `template`."""
    copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    copy.chat_template = template
    return copy


# Strict like Mistral's and Llama-2's (roles must alternate) and Gemma's (no system role): they raise_exception.
STRICT = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Renders tools like Qwen2.5's: definitions in the system turn, calls as <tool_call> JSON, results as a tool turn.
TOOLS = (
    "{% if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

OPENAI = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "A1"}, {"role": "user", "content": "again"},
                       {"role": "assistant", "content": "A2"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "A1"}, {"from": "human", "value": "again"},
                              {"from": "gpt", "value": "A2"}]}
SHAREGPT_OPENAI_ROLES = {"conversations": [{"from": m["role"], "value": m["content"]} for m in OPENAI["messages"]]}
CONTENT_BLOCKS = {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                               for m in OPENAI["messages"]]}
SPLIT_BLOCKS = {"messages": OPENAI["messages"][:-1] + [
    {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "2"}]}]}
CONVERSATIONAL_PROMPT_COMPLETION = {"prompt": OPENAI["messages"][:-1], "completion": OPENAI["messages"][-1:]}

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Seoul?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Seoul\"}"}}]},  # OpenAI: arguments as JSON
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"sky\": \"clear\"}"},
    {"role": "assistant", "content": "Clear skies in Seoul."}]}
LLAMA_FACTORY_TOOL_ROW = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Seoul?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Seoul"}})},
    {"from": "observation", "value": "{\"sky\": \"clear\"}"},
    {"from": "gpt", "value": "Clear skies in Seoul."}]}
TOOL_ANSWERS = ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Seoul\"}}</tool_call><|im_end|>\n"
                "Clear skies in Seoul.<|im_end|>\n")

NOT_ALTERNATING = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi again"},
                                {"role": "assistant", "content": "A"}]}
PLAIN = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]}


@pytest.mark.parametrize("row", [SHAREGPT, SHAREGPT_OPENAI_ROLES, CONTENT_BLOCKS, SPLIT_BLOCKS],
                         ids=["sharegpt", "sharegpt-user-assistant", "content-blocks", "split-blocks"])
def test_sharegpt_and_content_blocks_train_like_openai_messages(tmp_path, tiny_tokenizer, row):
    expected = data.prepare(make(tmp_path, [OPENAI] * 2), tiny_tokenizer, "llama").train
    prepared = data.prepare(make(tmp_path, [row] * 2), tiny_tokenizer, "llama")
    assert prepared.stats["format"] == "messages"
    assert prepared.train["input_ids"] == expected["input_ids"] and prepared.train["labels"] == expected["labels"]
    assert answers(prepared, tiny_tokenizer)[0] == "A1<|im_end|>\nA2<|im_end|>\n"


def test_conversational_prompt_completion_trains_on_the_completion_only(tmp_path, tiny_tokenizer):
    """As TRL does: the assistant turn inside the prompt is context, not a target."""
    whole = data.prepare(make(tmp_path, [OPENAI] * 2), tiny_tokenizer, "llama").train
    prepared = data.prepare(make(tmp_path, [CONVERSATIONAL_PROMPT_COMPLETION] * 2), tiny_tokenizer, "llama")
    assert prepared.stats["format"] == "prompt_completion"
    assert prepared.train["input_ids"] == whole["input_ids"]
    assert answers(prepared, tiny_tokenizer)[0] == "A2<|im_end|>\n"


def test_a_non_text_content_block_is_named(tmp_path, tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                        {"role": "assistant", "content": "A"}]}
    with pytest.raises(DataError, match=r"d.jsonl:2: messages\[0\]: content blocks must be .*'image_url'"):
        data.prepare(make(tmp_path, [PLAIN, row]), tiny_tokenizer, "llama")


@pytest.mark.parametrize("row", [TOOL_ROW, LLAMA_FACTORY_TOOL_ROW], ids=["openai", "llama-factory"])
def test_tools_are_rendered_by_the_tokenizers_template(tmp_path, tiny_tokenizer, row):
    """tools= reaches the template, the call is trained (its JSON arguments not quoted twice), the result is not."""
    tokenizer = with_template(tiny_tokenizer, TOOLS)
    prepared = data.prepare(make(tmp_path, [row] * 2), tokenizer, "llama")
    assert answers(prepared, tokenizer)[0] == TOOL_ANSWERS
    text = tokenizer.decode(prepared.train[0]["input_ids"])
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the definition, in the system turn
    assert "<|im_start|>tool\n{\"sky\": \"clear\"}<|im_end|>" in text
    assert prepared.samples == []  # the prompt test renders without tools=, so it takes no tool rows


def test_tools_under_a_named_format_are_bad_rows_naming_the_setting(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"d.jsonl:2: the row has tools.*PROMPT_FORMAT=auto \(here chatml\) cannot "
                                        r"render.*SKIP_BAD_ROWS"):
        data.prepare(make(tmp_path, [PLAIN, TOOL_ROW]), tiny_tokenizer, "llama")
    with pytest.raises(DataError, match=r"d.jsonl:1: .*PROMPT_FORMAT=mistral cannot render"):
        data.prepare(make(tmp_path, [LLAMA_FACTORY_TOOL_ROW], PROMPT_FORMAT="mistral"), tiny_tokenizer, "mistral")
    prepared = data.prepare(make(tmp_path, [PLAIN, TOOL_ROW] * 2, SKIP_BAD_ROWS="true"), tiny_tokenizer, "llama")
    assert prepared.stats["skipped_bad_rows"] == 2 and len(prepared.train) == 2


def test_a_template_that_ignores_tools_is_caught(tmp_path, tiny_tokenizer):
    """It renders without error, but the model would learn the answers without the calls."""
    tokenizer = with_template(tiny_tokenizer, data.PROMPT_FORMATS["chatml"]["template"].replace("{eot}", "<|im_end|>"))
    with pytest.raises(DataError, match=r"d.jsonl:1: the tokenizer's chat template .* leaves out the tool "
                                        r"'get_weather': it does not render tools"):
        data.prepare(make(tmp_path, [TOOL_ROW]), tokenizer, "llama")


@pytest.mark.parametrize("prompt_format", ["chatml", "mistral", "llama-3", "strict tokenizer template"])
def test_roles_that_do_not_alternate_are_the_same_bad_row_under_every_format(tmp_path, tiny_tokenizer, prompt_format):
    """Before: a strict template raised outside the per-row handling (exit 1, no file:line, SKIP_BAD_ROWS no help)
    while the named formats trained the same row silently."""
    tokenizer = with_template(tiny_tokenizer, STRICT) if prompt_format.startswith("strict") else tiny_tokenizer
    environ = {} if prompt_format.startswith("strict") else {"PROMPT_FORMAT": prompt_format}
    rows = [PLAIN, PLAIN, NOT_ALTERNATING, PLAIN]
    with pytest.raises(DataError, match=r"d.jsonl:3: messages\[1\] \(user\) comes after messages\[0\] \(user\).*"
                                        "SKIP_BAD_ROWS=true"):
        data.prepare(make(tmp_path, rows, **environ), tokenizer, "llama")
    prepared = data.prepare(make(tmp_path, rows, SKIP_BAD_ROWS="true", **environ), tokenizer, "llama")
    assert prepared.stats["skipped_bad_rows"] == 1 and len(prepared.train) == 3
    assert prepared.stats["skipped_examples"][0].startswith(f"{tmp_path / 'd.jsonl'}:3: messages[1]")


def test_a_row_the_template_refuses_is_a_bad_row_naming_file_and_line(tmp_path, tiny_tokenizer):
    """A template error the job's own checks do not foresee (here Gemma's: no system role) is caught per row."""
    tokenizer = with_template(tiny_tokenizer, STRICT)
    rows = [PLAIN, PLAIN, OPENAI, PLAIN]
    with pytest.raises(DataError, match=r"d.jsonl:3: the chat template \(PROMPT_FORMAT=auto\) refuses this row: "
                                        "System role not supported"):
        data.prepare(make(tmp_path, rows), tokenizer, "llama")
    prepared = data.prepare(make(tmp_path, rows, SKIP_BAD_ROWS="true"), tokenizer, "llama")
    assert prepared.stats["skipped_bad_rows"] == 1 and len(prepared.train) == 3


def test_a_template_that_does_not_parse_is_a_settings_error(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="the chat template does not parse"):
        data.prepare(make(tmp_path, [PLAIN]), with_template(tiny_tokenizer, "{% for m in messages %}"), "llama")


# The chat templates of the models users fine-tune, as the models ship them: TRL's copies (TRL knows a model's template
# by comparing it with these), and Mistral's, of which TRL ships none.
TRL_TEMPLATES = importlib.resources.files("trl") / "chat_templates"


def trl_template(name: str) -> str:
    return (TRL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


# From mistralai/Mistral-7B-Instruct-v0.2's tokenizer_config.json (chat_template).
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TWO_TURNS = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]}


class Model(NamedTuple):
    template: str
    special_tokens: dict  # those the template writes, for the tiny tokenizer to keep whole
    answers: list[str]  # TWO_TURNS's, as the model writes them after its generation prompt, to the end of its turn


# Qwen3's last answer opens with the (empty) reasoning block it writes, gpt-oss's answers with their channel; Phi-3's
# last answer ends with EOS, gpt-oss's with <|return|>.
MODELS = {
    "llama-3": Model(trl_template("llama3"), {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                              "additional_special_tokens": ["<|start_header_id|>",
                                                                            "<|end_header_id|>"]},
                     ["A1<|eot_id|>", "A2<|eot_id|>"]),
    "mistral": Model(MISTRAL_INSTRUCT, {}, ["A1</s>", "A2</s>"]),
    "qwen2.5": Model(trl_template("qwen2_5"), {"eos_token": "<|im_end|>"}, ["A1<|im_end|>\n", "A2<|im_end|>\n"]),
    "qwen3": Model(trl_template("qwen3"), {"eos_token": "<|im_end|>",
                                           "additional_special_tokens": ["<think>", "</think>"]},
                   ["A1<|im_end|>\n", "<think>\n\n</think>\n\nA2<|im_end|>\n"]),
    "deepseek-r1-distill": Model(trl_template("deepseek_r1_distill"),
                                 {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                                  "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]},
                                 ["A1<｜end▁of▁sentence｜>", "A2<｜end▁of▁sentence｜>"]),
    "phi-3": Model(trl_template("phi3"), {"eos_token": "<|endoftext|>", "additional_special_tokens": [
                       "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
                   ["A1<|end|>\n", "A2<|end|>\n<|endoftext|>"]),
    "gemma-2": Model(trl_template("gemma"), {"bos_token": "<bos>", "eos_token": "<eos>",
                                             "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                     ["A1<end_of_turn>\n", "A2<end_of_turn>\n"]),
    "gpt-oss": Model(trl_template("gptoss"), {"eos_token": "<|return|>", "additional_special_tokens": [
                         "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|constrain|>"]},
                     ["<|channel|>final<|message|>A1<|end|>", "<|channel|>final<|message|>A2<|return|>"]),
}


def model_tokenizer(tokenizer, model, template=None):
    """A copy of the tiny tokenizer carrying the model's chat template (or `template`) and its special tokens."""
    copy = with_template(tokenizer, template or MODELS[model].template)
    copy.add_special_tokens(MODELS[model].special_tokens)
    return copy


def trained_runs(prepared, tokenizer) -> list[str]:
    """The first row's runs of trained tokens, decoded: one per answer."""
    row = prepared.train[0]
    return [tokenizer.decode([token for token, _ in run])
            for trained, run in itertools.groupby(zip(row["input_ids"], row["labels"]), lambda pair: pair[1] != -100)
            if trained]


@pytest.mark.parametrize("loss_on", ["answers", "last_answer", "everything"])
@pytest.mark.parametrize("model", list(MODELS))
def test_two_turns_train_on_the_answers_of_each_models_own_template(tmp_path, tiny_tokenizer, model, loss_on):
    """The tokens are the template's rendering of the whole conversation (what the model sees at inference in its last
    turn) and the loss covers what the model writes. Before: Qwen3's, DeepSeek-R1-distill's, Phi-3's and gpt-oss's
    templates render an earlier answer differently once another turn follows (without its reasoning, without EOS, with
    <|end|> for <|return|>) or prompt with a <think> their answers lack, and the job stopped (exit 2)."""
    tokenizer = model_tokenizer(tiny_tokenizer, model)
    prepared = data.prepare(make(tmp_path, [TWO_TURNS] * 2, LOSS_ON=loss_on), tokenizer, "llama")
    whole = tokenizer.apply_chat_template(TWO_TURNS["messages"], tokenize=False)
    assert prepared.train[0]["input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]
    answers = MODELS[model].answers
    assert trained_runs(prepared, tokenizer) == {"answers": answers, "last_answer": answers[-1:],
                                                 "everything": [whole]}[loss_on]
    assert prepared.chat_template == MODELS[model].template  # saved with the model: its own, not a marked copy


def test_a_completion_after_turns_is_trained_alone_under_a_template_that_does_not_grow(tmp_path, tiny_tokenizer):
    """The answer in the prompt is context, as under templates that grow."""
    tokenizer = model_tokenizer(tiny_tokenizer, "qwen3")
    row = {"prompt": TWO_TURNS["messages"][:-1], "completion": TWO_TURNS["messages"][-1:]}
    prepared = data.prepare(make(tmp_path, [row] * 2), tokenizer, "llama")
    assert trained_runs(prepared, tokenizer) == MODELS["qwen3"].answers[-1:]


def test_a_tool_call_and_the_answer_after_its_result_train_under_qwen3s_template(tmp_path, tiny_tokenizer):
    """Qwen3's template writes the reasoning block into the call's turn only while that turn is the last."""
    tokenizer = model_tokenizer(tiny_tokenizer, "qwen3")
    prepared = data.prepare(make(tmp_path, [TOOL_ROW] * 2), tokenizer, "llama")
    assert trained_runs(prepared, tokenizer) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call><|im_end|>\n',
        "<think>\n\n</think>\n\nClear skies in Seoul.<|im_end|>\n"]


def test_a_template_that_does_not_grow_and_that_trl_does_not_know_names_the_fix(tmp_path, tiny_tokenizer):
    """Before: "choose a named format", the wrong fix for a model with a template of its own. The fix it names: a copy
    of the template with the answers marked (here TRL's copy of Phi-3's) as CHAT_TEMPLATE_FILE."""
    edited = "{#- a user's edit: TRL no longer knows it -#}\n" + MODELS["phi-3"].template
    tokenizer = model_tokenizer(tiny_tokenizer, "phi-3", edited)
    with pytest.raises(ConfigError, match=r"PROMPT_FORMAT=auto: the chat template renders a turn differently once "
                                          r"more turns follow it.*\{% generation %\}.*CHAT_TEMPLATE_FILE") as error:
        data.prepare(make(tmp_path, [TWO_TURNS]), tokenizer, "llama")
    assert "named format" not in str(error.value)
    marked = tmp_path / "phi3-marked.jinja"
    marked.write_text(trl_template("phi3_training"), encoding="utf-8")
    prepared = data.prepare(make(tmp_path, [TWO_TURNS] * 2, CHAT_TEMPLATE_FILE=str(marked)), tokenizer, "llama")
    assert trained_runs(prepared, tokenizer) == MODELS["phi-3"].answers
    assert prepared.chat_template == marked.read_text(encoding="utf-8")


def test_every_row_bad_and_skipped_says_so(tmp_path, tiny_tokenizer):
    """Before: max() of an empty list (exit 1)."""
    with pytest.raises(DataError, match=r"every one of the 3 training rows is bad \(SKIP_BAD_ROWS=true skipped them "
                                        r"all\); the first: .*d.jsonl:1: messages\[1\] \(user\) comes"):
        data.prepare(make(tmp_path, [NOT_ALTERNATING] * 3, SKIP_BAD_ROWS="true"), tiny_tokenizer, "llama")


def turns(*roles):
    return [{"role": r, "content": "x"} if r != "calls" else
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]} for r in roles]


@pytest.mark.parametrize("roles, message", [
    (("assistant", "user", "assistant"), r"messages\[0\] \(assistant\) comes at the start"),
    (("system", "system", "user", "assistant"), r"messages\[1\] \(system\) comes after messages\[0\] \(system\)"),
    (("user", "assistant", "assistant"), r"messages\[2\] \(assistant\) comes after messages\[1\] \(assistant\)"),
    (("user", "tool", "assistant"), r"messages\[1\] \(tool\) comes after messages\[0\] \(user\)"),
    (("user", "calls", "user", "assistant"), r"messages\[2\] \(user\) comes after messages\[1\] \(assistant, calling tools\)"),
    (("user", "assistant", "user"), r"the conversation must end with an assistant turn \(the last is user\)"),
    (("user", "assistant", "system", "user", "assistant"), r"messages\[2\] \(system\) comes"),
])
def test_role_order(roles, message):
    row = data.Row("d.jsonl:7", {"messages": turns(*roles)})
    with pytest.raises(DataError, match="d.jsonl:7: " + message):
        data.to_messages(row, "messages", config.load({}, environ={}))


def test_tool_calls_then_results_then_the_answer_pass_the_role_order():
    row = data.Row("d.jsonl:1", {"messages": turns("system", "user", "calls", "tool", "tool", "assistant", "user",
                                                   "calls")})
    chat = data.to_messages(row, "messages", config.load({}, environ={}))
    assert chat.uses_tools() and chat.messages[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {}}


def test_role_map_and_column_map(tmp_path, tiny_tokenizer):
    row = {"dialog": [{"from": "questioner", "value": "hi"}, {"from": "bot", "value": "A"}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: messages\[0\] has role 'questioner'.*ROLE_MAP=questioner="):
        data.prepare(make(tmp_path, [row], COLUMN_MAP="dialog=messages"), tiny_tokenizer, "llama")
    prepared = data.prepare(make(tmp_path, [row], COLUMN_MAP="dialog=messages",
                                 ROLE_MAP="questioner=user, bot=assistant"), tiny_tokenizer, "llama")
    assert answers(prepared, tiny_tokenizer) == ["A<|im_end|>\n"]
    prepared = data.prepare(make(tmp_path, [{"question": "q", "answer": "a"}],
                                 COLUMN_MAP="question=prompt,answer=completion"), tiny_tokenizer, "llama")
    assert prepared.stats["format"] == "prompt_completion" and answers(prepared, tiny_tokenizer) == ["a<|im_end|>\n"]


@pytest.mark.parametrize("environ, message", [
    ({"ROLE_MAP": "bot=robot"}, "ROLE_MAP='bot=robot': each name must map to system, user, assistant or tool"),
    ({"ROLE_MAP": "bot"}, "ROLE_MAP='bot': must be comma-separated name=name pairs"),
    ({"COLUMN_MAP": "dialog=messages,"}, "COLUMN_MAP='dialog=messages,': must be comma-separated"),
])
def test_maps_that_do_not_parse_name_the_setting(environ, message):
    with pytest.raises(ConfigError, match=message):
        config.load({}, environ=environ)


@pytest.fixture
def strict_model(tiny_model, tiny_tokenizer, tmp_path):
    """The tiny model with the strict template as its tokenizer's own."""
    path = shutil.copytree(tiny_model, tmp_path / "strict-model")
    with_template(tiny_tokenizer, STRICT).save_pretrained(path)
    return path


@pytest.mark.parametrize("rows, skip, message", [
    ([PLAIN, PLAIN, OPENAI], "false", r"d.jsonl:3: the chat template \(PROMPT_FORMAT=auto\) refuses this row"),
    ([NOT_ALTERNATING, OPENAI], "true", "every one of the 2 training rows is bad"),
], ids=["template-refuses-a-row", "every-row-skipped"])
def test_job_preflight_exits_2_naming_the_row(tmp_path, hf_home, strict_model, rows, skip, message):
    """The user's view of issue 29 item 5: exit 2 with the row named, where it was exit 1 with a traceback."""
    s = make(tmp_path, rows)
    result = run_job(hf_home, "preflight", BASE_MODEL=strict_model, DATASET=s.dataset, SKIP_BAD_ROWS=skip,
                     OUTPUT_DIR=tmp_path / "out", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr + result.stdout), result.stderr[-3000:]
