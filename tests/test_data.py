"""Rows to conversations to tokens: formats, loss masks, end-of-turn, bad rows named by file:line."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job import config, data
from job.data import workers
from job.errors import ConfigError, DataError


def make(tmp_path, rows, name="d.jsonl", **environ):
    path = tmp_path / name
    if rows is not None:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return config.load({}, environ={"DATASET": str(path), "BASE_MODEL": "x/y", "SAMPLE_PROMPTS": "1", **environ})


DOLLY_KO = {"instruction": "다음 글을 요약해주세요.", "context": "오늘 서울의 날씨는 맑습니다.", "response": "서울: 맑습니다."}


def answers(prepared, tokenizer, split="train"):
    table = getattr(prepared, split)
    return [tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
            for ids, labels in zip(table["input_ids"], table["labels"])]


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    (DOLLY_KO, "instruction"),
    ({"instruction": "a", "input": "", "output": "b"}, "instruction"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "a"}, "text"),
])
def test_format_detected_from_columns(record, expected):
    assert data.detect_format(set(record)) == expected


def test_unknown_columns_name_the_setting():
    with pytest.raises(DataError, match="DATA_FORMAT=auto cannot tell.*'document', 'summary'"):
        data.detect_format({"document", "summary"})


def test_korean_dolly_answers_are_the_only_trained_tokens(tmp_path, tiny_tokenizer):
    s = make(tmp_path, [DOLLY_KO] * 10, EVAL_FRACTION="0.2")
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    assert prepared.stats["format"] == "instruction"
    assert answers(prepared, tiny_tokenizer) == ["서울: 맑습니다.<|im_end|>\n"] * 8
    full = tiny_tokenizer.decode(prepared.train[0]["input_ids"])
    assert "다음 글을 요약해주세요.\n\n오늘 서울의 날씨는 맑습니다." in full  # UTF-8 round trip
    assert prepared.eval is not None and len(prepared.eval) == 2
    assert tiny_tokenizer.convert_ids_to_tokens(prepared.end_of_turn_id) == "<|im_end|>"
    assert 0 < prepared.stats["labelled_token_share"] < 1


def test_tokenizing_logs_the_share_of_trained_tokens(tmp_path, tiny_tokenizer, caplog):
    """A loss mask that trains on all or nothing is visible in the job's log, not only in summary.json."""
    from accelerate import PartialState

    s = make(tmp_path, [DOLLY_KO] * 10)
    with caplog.at_level("INFO", logger="job.data"):
        prepared = data.load(s, tiny_tokenizer, "llama", tmp_path / "cache", PartialState(cpu=True))
    assert f"{100 * prepared.stats['labelled_token_share']:.1f}% of the tokens are trained on" in caplog.text


def test_multi_turn_trains_every_assistant_turn(tmp_path, tiny_tokenizer):
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "again"},
                         {"role": "assistant", "content": "A2"}]}
    prepared = data.prepare(make(tmp_path, [chat] * 3, EVAL_FRACTION="0"), tiny_tokenizer, "llama")
    assert answers(prepared, tiny_tokenizer)[0] == "A1<|im_end|>\nA2<|im_end|>\n"


@pytest.mark.parametrize("loss_on, trained", [
    ("answers", "A1<|im_end|>\nA2<|im_end|>\n"),
    ("last_answer", "A2<|im_end|>\n"),
    ("everything", None),  # every token: the whole rendered conversation
])
def test_loss_on_picks_the_tokens_the_loss_covers(tmp_path, tiny_tokenizer, loss_on, trained):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]}
    prepared = data.prepare(make(tmp_path, [chat] * 3, EVAL_FRACTION="0", LOSS_ON=loss_on), tiny_tokenizer, "llama")
    whole = tiny_tokenizer.decode(prepared.train[0]["input_ids"])
    assert answers(prepared, tiny_tokenizer)[0] == (trained or whole)
    assert (prepared.stats["labelled_token_share"] == 1.0) == (loss_on == "everything")


def test_template_format_maps_columns(tmp_path, tiny_tokenizer):
    rows = [{"document": "긴 기사 본문", "summary": "요약"}] * 4
    s = make(tmp_path, rows, DATA_FORMAT="template", PROMPT_TEMPLATE="다음 글을 요약해주세요: {document}",
             RESPONSE_COLUMN="summary", EVAL_FRACTION="0")
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    assert "다음 글을 요약해주세요: 긴 기사 본문" in tiny_tokenizer.decode(prepared.train[0]["input_ids"])
    assert answers(prepared, tiny_tokenizer)[0] == "요약<|im_end|>\n"


@pytest.mark.parametrize("name, eot", [("mistral", "</s>"), ("chatml", "<|im_end|>"), ("llama-3", "</s>")])
def test_named_formats_end_answers_with_a_trained_special_token(tmp_path, tiny_tokenizer, name, eot):
    s = make(tmp_path, [DOLLY_KO] * 3, PROMPT_FORMAT=name, EVAL_FRACTION="0")
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    assert tiny_tokenizer.convert_ids_to_tokens(prepared.end_of_turn_id) == eot
    row = prepared.train[0]
    assert prepared.end_of_turn_id in [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]


def test_mistral_format_renders_inst_tags(tiny_tokenizer):
    template = data.chat_template_for(config.load({}, environ={"PROMPT_FORMAT": "mistral"}), tiny_tokenizer, "llama")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    segments = data.render(messages, tiny_tokenizer, template)
    assert segments == [("<s>[INST] Q [/INST]", False), (" A</s>", True)]


def test_text_format_trains_everything_and_appends_eos(tmp_path, tiny_tokenizer):
    prepared = data.prepare(make(tmp_path, [{"text": "hello"}] * 2, EVAL_FRACTION="0"), tiny_tokenizer, "llama")
    assert answers(prepared, tiny_tokenizer)[0] == "hello</s>"


def test_formats_from_csv_parquet_and_json(tmp_path, tiny_tokenizer):
    import pandas

    frame = pandas.DataFrame([{"prompt": "p", "completion": "c"}] * 3)
    for name in ("d.csv", "d.parquet", "d.json"):
        path = tmp_path / name
        {"d.csv": lambda: frame.to_csv(path, index=False), "d.parquet": lambda: frame.to_parquet(path),
         "d.json": lambda: frame.to_json(path, orient="records")}[name]()
        prepared = data.prepare(make(tmp_path, None, name=name, EVAL_FRACTION="0"), tiny_tokenizer, "llama")
        assert answers(prepared, tiny_tokenizer) == ["c<|im_end|>\n"] * 3, name


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"d.jsonl:2: malformed JSON"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe"}\n', r"d.jsonl:2: not valid UTF-8"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"d.jsonl:2: column 'completion' is missing"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n', r"d.jsonl:2: column 'completion' is empty"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": "b"}\n', r"d.jsonl:2: column 'prompt' must be text, got int"),
    (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', r"d.jsonl:2: expected an object"),
    (b'', r"has no rows"),
])
def test_bad_rows_are_named(tmp_path, tiny_tokenizer, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    s = make(tmp_path, None)
    with pytest.raises(DataError, match=message):
        data.prepare(s, tiny_tokenizer, "llama")


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n' * 3)
    prepared = data.prepare(make(tmp_path, None, SKIP_BAD_ROWS="true", EVAL_FRACTION="0"), tiny_tokenizer, "llama")
    assert prepared.stats["skipped_bad_rows"] == 3 and len(prepared.train) == 3


def test_rows_longer_than_max_length_are_truncated_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "short", "completion": "answer " * 40}, {"prompt": "a", "completion": "b"}]
    prepared = data.prepare(make(tmp_path, rows, MAX_LENGTH="32", EVAL_FRACTION="0"), tiny_tokenizer, "llama")
    assert prepared.stats["truncated_rows"] == 1
    assert max(len(ids) for ids in prepared.train["input_ids"]) == 32


def test_every_row_too_long_names_max_length(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "word " * 60, "completion": "b"}] * 3
    with pytest.raises(DataError, match="MAX_LENGTH=16: every training row is longer"):
        data.prepare(make(tmp_path, rows, MAX_LENGTH="16", EVAL_FRACTION="0"), tiny_tokenizer, "llama")


def test_missing_dataset_path_is_named(tmp_path, tiny_tokenizer):
    s = config.load({}, environ={"DATASET": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        data.prepare(s, tiny_tokenizer, "llama")


def test_tokenizer_template_without_special_end_is_refused(tmp_path, tiny_tokenizer):
    tiny_tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="never learn to stop") as refused:
        data.prepare(make(tmp_path, [DOLLY_KO] * 2, EVAL_FRACTION="0"), tiny_tokenizer, "llama")
    # the setting that chose the template, and a fix that fits a model with a template of its own
    assert str(refused.value).startswith("PROMPT_FORMAT=auto: ") and "End each answer with a special token" in str(
        refused.value) and repr(tiny_tokenizer.eos_token) in str(refused.value)


def test_a_template_that_trains_on_every_token_is_refused(tmp_path, tiny_tokenizer):
    """A chat template that renders no prompt at all (only the answers) would train on 100% of the tokens: refused
    (a DataError: exit 2) naming the settings, before any GPU time."""
    tiny_tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                                    "{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="every token is labelled.*PROMPT_FORMAT"):
        data.prepare(make(tmp_path, [DOLLY_KO] * 2, EVAL_FRACTION="0"), tiny_tokenizer, "llama")


_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>\x00"),
                 min_size=1, max_size=40).filter(str.strip)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_texts, answer=_texts)
def test_rendering_round_trips_any_text_and_masks_only_the_answer(tiny_tokenizer, prompt, answer):
    s = config.load({}, environ={})
    template = data.chat_template_for(s, tiny_tokenizer, "llama")
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    segments = data.render(chat, tiny_tokenizer, template)
    ids, labels = data.tokenize(segments, tiny_tokenizer)
    assert tiny_tokenizer.decode(ids) == "".join(text for text, _ in segments)
    trained = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained == answer + "<|im_end|>\n"


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_a_local_directory_of_splits_trains_on_one_and_evaluates_on_another(tmp_path, tiny_tokenizer):
    """EVAL_SPLIT on a local dataset was silently ignored, and a folder's test file was trained on."""
    folder = tmp_path / "data"
    _write(folder / "train.jsonl", [{"prompt": f"q{i}", "completion": f"train answer {i}"} for i in range(8)])
    _write(folder / "test-00000-of-00001.jsonl", [{"prompt": "q", "completion": "held-out answer"}])
    s = config.load({}, environ={"DATASET": str(folder), "BASE_MODEL": "x/y", "EVAL_SPLIT": "test",
                                 "SAMPLE_PROMPTS": "1"})
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    assert all("train answer" in a for a in answers(prepared, tiny_tokenizer))
    assert len(prepared.train) == 8 and "held-out answer" in answers(prepared, tiny_tokenizer, "eval")[0]
    with pytest.raises(DataError, match="EVAL_SPLIT=validation: .* has no files for it; its splits: test, train"):
        data.prepare(config.load({}, environ={"DATASET": str(folder), "BASE_MODEL": "x/y",
                                              "EVAL_SPLIT": "validation"}), tiny_tokenizer, "llama")


def test_eval_split_on_a_single_file_is_refused_not_ignored(tmp_path, tiny_tokenizer):
    s = make(tmp_path, [{"prompt": "q", "completion": "a"}] * 4, EVAL_SPLIT="test")
    with pytest.raises(DataError, match="EVAL_SPLIT=test: .* holds one split .* unset EVAL_SPLIT"):
        data.prepare(s, tiny_tokenizer, "llama")


def test_a_folder_without_split_names_is_one_split_and_one_with_them_leaves_other_files_out(tmp_path):
    plain = tmp_path / "plain"
    _write(plain / "a.jsonl", [{"prompt": "q", "completion": "a"}])
    _write(plain / "more" / "b.jsonl", [{"prompt": "q", "completion": "b"}])
    s = config.load({}, environ={"DATASET": str(plain), "BASE_MODEL": "x/y"})
    assert [f.name for f in data.local_files(s, "train")] == ["a.jsonl", "b.jsonl"]
    _write(plain / "train" / "c.jsonl", [{"prompt": "q", "completion": "c"}])
    assert [f.name for f in data.local_files(s, "train")] == ["c.jsonl"]


def test_dataset_revision_reaches_the_hub_loader_and_the_fingerprint(monkeypatch, tiny_tokenizer):
    import datasets

    asked = {}

    def load_dataset(name, config_name, split, revision=None, **kw):
        asked.update(name=name, split=split, revision=revision)
        return [{"prompt": "q", "completion": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)  # no network here: the call is what is checked
    pinned = config.load({}, environ={"DATASET": "org/data", "BASE_MODEL": "x/y", "DATASET_REVISION": "v1.2"})
    assert data.read_rows(pinned, "train")[0].record == {"prompt": "q", "completion": "a"}
    assert asked == {"name": "org/data", "split": "train", "revision": "v1.2"}
    unpinned = config.load({}, environ={"DATASET": "org/data", "BASE_MODEL": "x/y"})
    assert data.fingerprint(pinned, tiny_tokenizer) != data.fingerprint(unpinned, tiny_tokenizer)


@pytest.mark.parametrize("content, message", [
    (b'prompt,completion\nq1,a1\nq2,"a2 never closed\nq3,a3\n', ":3: the row starting here cannot be parsed"),
    (b"prompt,completion\nq1,a1\nq2,\xff\xfe broken\n", ":3: not valid UTF-8"),
    (b"prompt,completion\nq1,a1\nq2,a2,extra,more\n", ":3: 4 fields where the header has 2"),
])
def test_a_broken_csv_is_named_by_file_and_line(tmp_path, tiny_tokenizer, content, message):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    s = config.load({}, environ={"DATASET": str(path), "BASE_MODEL": "x/y"})
    with pytest.raises(DataError, match=f"d.csv{message}"):
        data.prepare(s, tiny_tokenizer, "llama")


def test_tokenizing_in_workers_gives_what_one_process_gives_and_names_the_first_bad_row(tmp_path, tiny_tokenizer,
                                                                                        monkeypatch):
    rows = [{"prompt": f"질문 {i}: " + "word " * (i % 40), "completion": f"answer {i}"} for i in range(3000)]
    s = make(tmp_path, rows, EVAL_FRACTION="0.1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # three workers even on a smaller machine
    parallel = data.prepare(s, tiny_tokenizer, "llama")
    monkeypatch.setattr(workers, "PARALLEL_FROM_ROWS", 10**9)
    serial = data.prepare(s, tiny_tokenizer, "llama")
    assert parallel.train["input_ids"] == serial.train["input_ids"] and parallel.stats == serial.stats
    assert parallel.eval["labels"] == serial.eval["labels"] and parallel.end_of_turn_id == serial.end_of_turn_id

    monkeypatch.setattr(workers, "PARALLEL_FROM_ROWS", 2048)
    rows[2900] = rows[2950] = {"prompt": "q", "completion": "  "}
    with pytest.raises(DataError, match=r"d.jsonl:2901: .*SKIP_BAD_ROWS"):
        data.prepare(make(tmp_path, rows), tiny_tokenizer, "llama")
    skipping = data.prepare(make(tmp_path, rows, SKIP_BAD_ROWS="true"), tiny_tokenizer, "llama")
    assert skipping.stats["skipped_bad_rows"] == 2 and "d.jsonl:2901" in skipping.stats["skipped_examples"][0]


def test_a_chat_template_file_renders_the_data_and_is_the_one_saved(tmp_path, tiny_tokenizer):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                        "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    s = make(tmp_path, [chat] * 3, EVAL_FRACTION="0", CHAT_TEMPLATE_FILE=str(template))
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    assert tiny_tokenizer.decode(prepared.train[0]["input_ids"]).startswith("Q: hi\nA: hello")
    answer = answers(prepared, tiny_tokenizer)[0]
    assert "hello" in answer and "hi" not in answer and prepared.chat_template == template.read_text()
    with pytest.raises(ConfigError, match="CHAT_TEMPLATE_FILE sets the template itself"):
        make(tmp_path, [chat], CHAT_TEMPLATE_FILE=str(template), PROMPT_FORMAT="chatml")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="CHAT_TEMPLATE_FILE=.*broken.jinja: the chat template does not parse"):
        data.prepare(make(tmp_path, [chat], CHAT_TEMPLATE_FILE=str(broken)), tiny_tokenizer, "llama")
