"""Machine 0's stage, told to the machines that wait for it (job.stagefile)."""

import json

from job import stagefile as stage
from job.data.workers import CHUNK_ROWS


def test_a_waiting_machine_logs_each_new_stage_and_repeats_an_unchanged_one(tmp_path, monkeypatch):
    path = tmp_path / "stage.json"
    monkeypatch.setenv(stage.FILE_VARIABLE, str(path))
    follower = stage.Follower(path)
    assert follower.poll(now=1000.0) is None  # machine 0 has not started: nothing to say
    stage.announce("checking settings, model and data")
    first = follower.poll()
    assert first.startswith("waiting for machine 0 (") and "checking settings, model and data (for 0m0" in first
    assert follower.poll() is None  # unchanged: not again at once...
    assert "checking settings" in follower.poll(now=json.loads(path.read_text())["since"] + 61)  # ...but a minute on
    stage.announce("tokenizing data/train.jsonl", 340_000, 1_000_000)
    assert "tokenizing data/train.jsonl, 340,000 of 1,000,000 rows" in follower.poll()
    stage.announce("training")
    assert follower.poll().endswith(tuple(f"training (for 0m0{n}s)" for n in range(10)))
    assert follower.poll(now=10**10) is None  # the rendezvous is met: training is not repeated


def test_progress_keeps_the_stage_start_and_is_written_sparingly(tmp_path, monkeypatch):
    path = tmp_path / "stage.json"
    monkeypatch.setenv(stage.FILE_VARIABLE, str(path))
    monkeypatch.setattr(stage, "_last_progress", 0.0)
    stage.announce("tokenizing x")
    since = json.loads(path.read_text())["since"]
    stage.progress("tokenizing x", 256, 1000)
    stage.progress("tokenizing x", 512, 1000)  # within PROGRESS_EVERY_S of the last: not written
    record = json.loads(path.read_text())
    assert (record["done"], record["since"]) == (256, since)
    stage.progress("tokenizing x", 1000, 1000)  # the end is always written
    assert json.loads(path.read_text())["done"] == 1000
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_is_written_where_no_stage_file_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(stage.FILE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    stage.announce("training")
    assert not list(tmp_path.iterdir())


def test_tokenizing_reports_its_progress_to_the_stage_file(tmp_path, monkeypatch, tiny_tokenizer):
    from job import config
    from job.data.reading import Row
    from job.data.workers import Work, render_and_tokenize

    path = tmp_path / "stage.json"
    monkeypatch.setenv(stage.FILE_VARIABLE, str(path))
    monkeypatch.setattr(stage, "_last_progress", 0.0)
    s = config.load({"data_format": "text"}, environ={})
    rows = [Row(f"data.jsonl:{i + 1}", {"text": f"row {i}"}) for i in range(CHUNK_ROWS + 10)]
    done, _, _ = render_and_tokenize(Work(s, tiny_tokenizer, "", "text", "text"), rows, "tokenizing data.jsonl")
    assert len(done) == len(rows)
    record = json.loads(path.read_text())
    assert (record["stage"], record["done"], record["total"]) == ("tokenizing data.jsonl", len(rows), len(rows))
