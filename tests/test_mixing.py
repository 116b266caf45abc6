"""Several datasets mixed with weights (issue 31): each source's share of the training rows, drawn the same way every
time, its format detected on its own, its evaluation rows from its own split, and what it gave in summary.json."""

import collections
import json

import pytest

from job import config, data
from job.errors import DataError
from tests.jobtools import read_summary, run_job


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# TRL's conversational data and axolotl's alpaca and ShareGPT data, each answer naming its source and row
def trl(n):
    return [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"trl {i}"}]}
            for i in range(n)]


def alpaca(n):
    return [{"instruction": f"instruction {i}", "input": "", "output": f"alpaca {i}"} for i in range(n)]


def sharegpt(n):
    return [{"conversations": [{"from": "human", "value": f"hello {i}"}, {"from": "gpt", "value": f"sharegpt {i}"}]}
            for i in range(n)]


def load(**environ):
    return config.load({}, environ={"BASE_MODEL": "x/y", "SAMPLE_PROMPTS": "1", **environ})


def trained(prepared, tokenizer, split="train"):
    """The answer of every row, in order (the end-of-turn token left out)."""
    table = getattr(prepared, split)
    return [tokenizer.decode([t for t, label in zip(ids, labels) if label != -100]).removesuffix("<|im_end|>\n")
            for ids, labels in zip(table["input_ids"], table["labels"])]


def by_source(answers):
    return collections.Counter(answer.split()[0] for answer in answers)


def test_weights_set_each_sources_share_and_summary_counts_them(tmp_path, tiny_tokenizer):
    """30 TRL rows and 10 alpaca rows weighted 1:3 give 40 rows: 10 TRL rows, none twice, and every alpaca row three
    times; the same rows every time, other rows under another SEED."""
    a, b = write(tmp_path / "trl.jsonl", trl(30)), write(tmp_path / "alpaca.jsonl", alpaca(10))
    s = load(DATASET=f"{a}:1,{b}:3", EVAL_FRACTION="0")
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    answers = trained(prepared, tiny_tokenizer)
    assert by_source(answers) == {"trl": 10, "alpaca": 30}
    counts = collections.Counter(answers)
    assert all(counts[f"alpaca {i}"] == 3 for i in range(10))
    assert all(n == 1 for answer, n in counts.items() if answer.startswith("trl"))
    assert prepared.stats["format"] == "messages, instruction"
    assert prepared.stats["sources"] == [
        {"dataset": str(a), "split": "train", "weight": 1.0, "format": "messages", "rows_read": 30,
         "skipped_bad_rows": 0, "eval_rows": 0, "eval_from": None, "rows_available": 30, "train_rows": 10,
         "train_share": 0.25, "train_tokens": sum(map(len, prepared.train["input_ids"][:10]))},
        {"dataset": str(b), "split": "train", "weight": 3.0, "format": "instruction", "rows_read": 10,
         "skipped_bad_rows": 0, "eval_rows": 0, "eval_from": None, "rows_available": 10, "train_rows": 30,
         "train_share": 0.75, "train_tokens": sum(map(len, prepared.train["input_ids"][10:]))}]

    assert data.prepare(s, tiny_tokenizer, "llama").train["input_ids"] == prepared.train["input_ids"]
    reseeded = data.prepare(load(DATASET=s.dataset, EVAL_FRACTION="0", SEED="7"), tiny_tokenizer, "llama")
    assert set(trained(reseeded, tiny_tokenizer)[:10]) != set(answers[:10])


def test_without_weights_every_row_of_every_source_is_trained_once(tmp_path, tiny_tokenizer):
    a, b = write(tmp_path / "trl.jsonl", trl(7)), write(tmp_path / "sharegpt.jsonl", sharegpt(5))
    prepared = data.prepare(load(DATASET=f"{a}, {b}", EVAL_FRACTION="0"), tiny_tokenizer, "llama")
    assert trained(prepared, tiny_tokenizer) == [f"trl {i}" for i in range(7)] + [f"sharegpt {i}" for i in range(5)]
    assert [source["weight"] for source in prepared.stats["sources"]] == [None, None]


def test_evaluation_rows_are_held_out_per_source_before_the_mix_and_share_the_cap(tmp_path, tiny_tokenizer):
    """A held-out row is never trained on, however often its source is repeated; MAX_EVAL_SAMPLES follows the
    weights."""
    a, b = write(tmp_path / "trl.jsonl", trl(30)), write(tmp_path / "alpaca.jsonl", alpaca(10))
    s = load(DATASET=f"{a}:1,{b}:3", EVAL_FRACTION="0.2", MAX_EVAL_SAMPLES="4")
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    evaluated, answers = trained(prepared, tiny_tokenizer, "eval"), trained(prepared, tiny_tokenizer)
    assert by_source(evaluated) == {"trl": 1, "alpaca": 2}  # shares 1 and 3 of 4; alpaca holds out only 2
    assert not set(evaluated) & set(answers)
    assert by_source(answers) == {"trl": 8, "alpaca": 24}  # 24 + 8 rows left after holding out 6 and 2
    assert [(src["eval_rows"], src["eval_from"], src["rows_available"]) for src in prepared.stats["sources"]] == [
        (1, "EVAL_FRACTION", 24), (2, "EVAL_FRACTION", 8)]


def test_each_source_has_its_own_split_config_revision_and_evaluation_split(tmp_path, tiny_tokenizer, monkeypatch):
    """The YAML list form: a Hub source with its own split, configuration and revision, which has no EVAL_SPLIT and
    so holds rows out, beside a local folder that evaluates on its test file."""
    import datasets

    asked = []

    def load_dataset(name, config_name, split, revision=None, **kw):
        asked.append((name, config_name, split, revision))
        if split != "train_sft":
            raise ValueError(f"Unknown split {split!r}")
        return alpaca(10)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)  # no network here: the calls are what is checked
    folder = tmp_path / "chats"
    write(folder / "train.jsonl", trl(6))
    write(folder / "test.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "trl held-out"}]}])
    path = tmp_path / "c.yaml"
    path.write_text(f"datasets:\n  - {{path: org/alpaca, split: train_sft, config: ko, revision: v1, weight: 1}}\n"
                    f"  - {{path: '{folder}', weight: 1}}\neval_split: test\n")
    s = load(CONFIG_FILE=str(path))
    prepared = data.prepare(s, tiny_tokenizer, "llama")
    assert asked == [("org/alpaca", "ko", "train_sft", "v1"), ("org/alpaca", "ko", "test", "v1")]
    assert [(src["split"], src["eval_from"]) for src in prepared.stats["sources"]] == [
        ("train_sft", "EVAL_FRACTION"), ("train", "test")]
    assert "trl held-out" in trained(prepared, tiny_tokenizer, "eval")
    # 9 rows left of 10 and the folder's 6 make 15, half each: the tie's extra row goes to the first source
    assert by_source(trained(prepared, tiny_tokenizer)) == {"alpaca": 8, "trl": 7}


def test_the_fingerprint_follows_the_mix(tmp_path, tiny_tokenizer):
    a, b = write(tmp_path / "trl.jsonl", trl(4)), write(tmp_path / "alpaca.jsonl", alpaca(4))

    def key(dataset):
        return data.fingerprint(load(DATASET=dataset), tiny_tokenizer)

    assert key(f"{a}:1,{b}:3") == key(f" {a}:1, {b}:3 ") == key(f"[{{path: '{a}', weight: 1}}, '{b}:3']")
    assert len({key(f"{a}:1,{b}:3"), key(f"{a}:3,{b}:1"), key(f"{a},{b}"), key(f"{b},{a}"), key(str(a))}) == 5


def test_a_source_whose_format_cannot_be_told_is_named(tmp_path, tiny_tokenizer):
    a, b = write(tmp_path / "trl.jsonl", trl(4)), write(tmp_path / "docs.jsonl", [{"document": "d", "summary": "s"}])
    with pytest.raises(DataError, match=r"docs.jsonl:1: DATA_FORMAT=auto cannot tell the format"):
        data.prepare(load(DATASET=f"{a}:1,{b}:1"), tiny_tokenizer, "llama")
    with pytest.raises(DataError, match=r"DATASET=.*missing.jsonl: no such file"):
        data.prepare(load(DATASET=f"{a}:1,{tmp_path / 'missing.jsonl'}:1"), tiny_tokenizer, "llama")


@pytest.mark.slow  # the whole job (train, evaluate, merge): 25-45 s on 2 cores
def test_a_trl_and_an_axolotl_file_mixed_train_in_the_tiny_job(tmp_path, hf_home):
    """TRL's conversational data and axolotl's alpaca data, weighted half and half, through `job run`: the small
    source is repeated to its share and summary.json says what each source gave."""
    a, b = write(tmp_path / "trl.jsonl", trl(24)), write(tmp_path / "alpaca.jsonl", alpaca(8))
    output = tmp_path / "out"
    result = run_job(hf_home, "run", OUTPUT_DIR=output, DATASET=f"{a}:0.5,{b}:0.5", MAX_STEPS="2",
                     MICRO_BATCH_SIZE="2", EVAL_FRACTION="0.1", SAMPLE_PROMPTS="1", MAX_NEW_TOKENS="4")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(output)
    assert summary["status"] == "done" and summary["settings"]["dataset"] == f"{a}:0.5,{b}:0.5"
    # 22 and 7 rows once 2 and 1 are held out; 29 rows half each, the odd one to the first source
    assert [(src["format"], src["rows_available"], src["train_rows"], src["eval_rows"])
            for src in summary["data"]["sources"]] == [("messages", 22, 15, 2), ("instruction", 7, 14, 1)]
    assert summary["data"]["train_rows"] == 29 and summary["data"]["eval_rows"] == 3
    assert f"data: {b}: 14 training rows (48.3% of them) from its 7 (weight 0.5), 1 evaluation rows" in result.stderr
