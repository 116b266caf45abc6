"""Pushing to the Hub: the real huggingface_hub client against the local server in tests/hubserver.py,
with injected failures; the token never leaves the client's Authorization header."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest
import yaml

from job import checkpoint, cli, config
from job.checkpoint import Layout
from job.errors import (
    EXIT_BAD_INPUT,
    EXIT_HUB_UNREACHABLE,
    EXIT_OK,
    ConfigError,
    PushFailed,
)
from job.publish import push
from tests.hubserver import patch_hf_client, running_hub
from tests.jobtools import (
    SHARD,
    TRAINED,
    copy_output,
    read_summary,
    run_job,
    settings_for,
)

# The client itself uploads with httpx2's deprecated `data=<file>`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_publish_SECRET_token_0123456789abcdef"
REPO = "test-user/tiny-merged"
FAST = {"PUSH_BACKOFF": "0.01", "PUSH_RETRIES": "2"}


@pytest.fixture
def hub(tmp_path, monkeypatch, hf_home):
    for f in config.FIELDS.values():
        monkeypatch.delenv(config.env_name(f), raising=False)
    monkeypatch.delenv("HF_TOKEN_FILE", raising=False)
    with running_hub(tmp_path / "hub", TOKEN) as server:
        patch_hf_client(monkeypatch, server, hf_home)
        yield server


@pytest.fixture
def output(merged_output, tmp_path) -> Path:
    """A private copy of an OUTPUT_DIR with a verified merged model (merged once per session)."""
    return copy_output(merged_output, tmp_path / "out")


def assert_no_token(*texts: str, root: Path | None = None) -> None:
    for text in texts:
        assert TOKEN not in text
    if root is not None:
        for path in root.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_push_creates_private_repo_with_model_card_and_records_the_commit(hub, output, monkeypatch, tmp_path,
                                                                         caplog, capsys):
    secret = tmp_path / "secret" / "token"  # a mounted secret instead of HF_TOKEN
    secret.parent.mkdir()
    secret.write_text(TOKEN + "\n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(secret))
    caplog.set_level(logging.DEBUG)
    s = settings_for(output, HUB_MODEL_ID=REPO, **FAST)
    result = push(s)

    layout = Layout(output)
    assert hub.repo(REPO).private and result["private"] is True
    head = hub.commits(REPO)[0]
    assert result["commit"] == head.oid and len(hub.commits(REPO)) == 2  # "initial commit" + ours
    assert result["url"] == f"{hub.url}/{REPO}" and result["commit_url"].endswith(head.oid)
    assert result["pushed"] == ["merged"]
    assert json.loads((layout.metrics / "push.json").read_text()) == result
    stored = hub.files(REPO)
    stored.pop(".gitattributes")
    local = {p.name: p.read_bytes() for p in layout.merged.iterdir() if p.name != "COMPLETE"}
    assert stored == local and sorted(result["files"]) == sorted(local)
    shards = [name for name in stored if name.endswith(".safetensors")]
    assert len(shards) == 2 and all(hub.repo(REPO).head.files[name].lfs for name in shards)
    assert "model.safetensors.index.json" in stored and "generation_config.json" in stored

    card = stored["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert front["license"] == "unknown" and "qlora" in front["tags"]
    assert "base_model" not in front  # the built-in model has no hub id; a hub base is named (see below)
    for needle in ("# tiny-merged", "built-in tiny Llama", "bundled task set", "## Prompt format",
                   "<|im_start|>user\nWhat is the capital of Norway?<|im_end|>\n<|im_start|>assistant\n",
                   "`<|im_end|>` (id 4)", "## How to load", f'model_id = "{REPO}"', "AutoModelForCausalLM",
                   "apply_chat_template(messages, add_generation_prompt=True", "## Training", "`LORA_R` | `16`",
                   "`LEARNING_RATE` | `0.002`", "| optimizer steps | 12 |", "| rows per optimizer step | 8 |",
                   "## Results",
                   "merge check: max logit gap", "nf4 training-time model"):
        assert needle in card, needle

    # A rerun with nothing changed: no request at all.
    seen = len(hub.requests)
    assert push(s) == result and len(hub.requests) == seen
    captured = capsys.readouterr()
    assert_no_token(caplog.text, captured.out, captured.err, root=output)


def test_card_names_a_hub_base_model_and_dataset(tiny_tokenizer, tmp_path):
    from job.data import PROMPT_FORMATS
    from job.publish import model_card

    layout = Layout(tmp_path / "out")
    tiny_tokenizer.chat_template = PROMPT_FORMATS["llama-3"]["template"].replace("{eot}", "</s>")
    tiny_tokenizer.save_pretrained(layout.adapter)
    s = config.load(environ={"OUTPUT_DIR": str(layout.root), "BASE_MODEL": "mistralai/Mistral-7B-v0.3",
                             "DATASET": "nlpai-lab/databricks-dolly-15k-ko", "HUB_MODEL_ID": REPO})
    card = model_card(s, layout, "adapter")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "mistralai/Mistral-7B-v0.3" and front["library_name"] == "peft"
    assert front["datasets"] == ["nlpai-lab/databricks-dolly-15k-ko"]
    assert "<|start_header_id|>user<|end_header_id|>" in card and "AutoPeftModelForCausalLM" in card

    mixed = config.load(environ={"OUTPUT_DIR": str(layout.root), "BASE_MODEL": "mistralai/Mistral-7B-v0.3",
                                 "DATASET": "nlpai-lab/databricks-dolly-15k-ko:3,/data/mine.jsonl:1"})
    card = model_card(mixed, layout, "adapter")
    assert yaml.safe_load(card.split("---")[1])["datasets"] == ["nlpai-lab/databricks-dolly-15k-ko"]
    assert "| dataset | `nlpai-lab/databricks-dolly-15k-ko` (75%) and `/data/mine.jsonl` (25%) |" in card


@pytest.mark.slow
def test_transient_failures_are_retried_and_uploads_are_not_repeated(hub, output, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.INFO)
    hub.fail_next(1, 503, path_regex=r"^POST /api/repos/create")
    hub.fail_next(1, 429, path_regex=r"/preupload/")
    hub.fail_next(2, 500, path_regex=r"^POST /api/models/.*/commit/")
    result = push(settings_for(output, HUB_MODEL_ID=REPO, PUSH_RETRIES="3", PUSH_BACKOFF="0.01"))

    assert hub.counts["create_repo"] == 2 and hub.counts["commit"] == 3
    assert hub.counts["lfs_upload"] == 2  # the shards went up once; later attempts found them on the Hub
    assert result["commit"] == hub.commits(REPO)[0].oid and len(hub.commits(REPO)) == 2
    assert "model.safetensors.index.json" in hub.files(REPO)
    assert "retry 1 of 3" in caplog.text and "retry 2 of 3" in caplog.text and "HTTP 500" in caplog.text
    assert_no_token(caplog.text)


@pytest.mark.slow
def test_a_timed_out_commit_is_retried_without_a_duplicate_commit(hub, output, monkeypatch, caplog):
    """The Hub applied the commit but the answer never came: the retry must not commit twice."""
    from job import publish

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(publish, "HUB_TIMEOUT", {"connect": 5.0, "read": 0.5, "write": 5.0, "pool": 5.0})
    caplog.set_level(logging.INFO)
    hub.fail_next(1, status=None, delay=1.5, path_regex=r"^POST /api/models/.*/commit/")  # served late
    result = push(settings_for(output, HUB_MODEL_ID=REPO, PUSH_RETRIES="5", PUSH_BACKOFF="0.2"))
    time.sleep(2)  # the stalled request completes (or is refused) on the server
    assert "Timeout" in caplog.text and "retry 1 of 5" in caplog.text
    commits = hub.commits(REPO)
    assert len(commits) == 2 and result["commit"] == commits[0].oid
    assert set(hub.files(REPO)) == {".gitattributes", *result["files"]}


@pytest.mark.slow
def test_persistent_failures_raise_push_failed_and_keep_the_merged_model(hub, output, monkeypatch, caplog):
    layout = Layout(output)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.INFO)
    s = settings_for(output, HUB_MODEL_ID=REPO, **FAST)
    hub.fail_next(3, 500, path_regex=r"^POST /api/models/.*/commit/")
    with pytest.raises(PushFailed) as failed:
        push(s)
    assert failed.value.exit_code == EXIT_HUB_UNREACHABLE == 5
    assert "after 3 attempts" in str(failed.value) and "rerun to push" in str(failed.value)
    assert hub.counts["commit"] == 3 and len(hub.commits(REPO)) == 1
    assert checkpoint.is_complete(layout.merged) and not (layout.metrics / "push.json").exists()

    # Not transient: a rejected token is bad settings (exit 2, not 5 "retry"), and not retried.
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    before = hub.counts["create_repo"]
    with pytest.raises(ConfigError, match=r"refused the token from HF_TOKEN \(HTTP 401"):
        push(s)
    assert hub.counts["create_repo"] == before + 1
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    # No server at all: connection errors are retried, then PushFailed.
    with running_hub(output.parent / "gone", TOKEN) as gone:
        dead = gone.url
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(PushFailed, match="ConnectError"):
        push(s)
    assert_no_token(caplog.text, str(failed.value), root=output)


@pytest.mark.slow
def test_push_both_then_adapter_only(hub, output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    both = push(settings_for(output, HUB_MODEL_ID=REPO, PUSH_WHAT="both", **FAST))
    files = hub.files(REPO)
    assert both["pushed"] == ["merged", "adapter"]
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/README.md",
            "adapter/chat_template.jinja", "model.safetensors.index.json", "README.md"} <= set(files)
    assert not any(name.endswith(("COMPLETE", "job.json", "training_args.bin")) for name in files)
    assert "LoRA adapter under `adapter/`" in files["README.md"].decode()
    adapter_card = files["adapter/README.md"].decode()
    assert "library_name: peft" in adapter_card and 'subfolder="adapter"' in adapter_card
    assert files["adapter/adapter_model.safetensors"] == (output / "adapter" / "adapter_model.safetensors").read_bytes()

    only = push(settings_for(output, HUB_MODEL_ID=REPO, PUSH_WHAT="adapter", **FAST))
    files = hub.files(REPO)
    assert only["pushed"] == ["adapter"] and only["commit"] != both["commit"]
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not [n for n in files if n.startswith("model") and ".safetensors" in n]  # stale merged weights removed
    assert "library_name: peft" in files["README.md"].decode()
    assert "adapter/adapter_model.safetensors" in files  # another folder: left alone


def test_push_asked_without_token_fails_fast_with_exit_2(tmp_path, monkeypatch, capsys, caplog, hf_home):
    for f in config.FIELDS.values():
        monkeypatch.delenv(config.env_name(f), raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "missing-secret"))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("HUB_MODEL_ID", REPO)
    import job.launch

    monkeypatch.setattr(job.launch, "run_training", lambda *a: pytest.fail("trained without a token"))
    for command in ("run", "push"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command])
        assert exit_info.value.code == EXIT_BAD_INPUT == 2
        captured = capsys.readouterr()
        assert f"HF_TOKEN_FILE={tmp_path / 'missing-secret'} cannot be read (No such file or directory)" in \
            caplog.text + captured.err  # before: only "no token was found"
        caplog.clear()
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_token_the_hub_refuses_stops_job_run_before_training_with_exit_2(tmp_path, hf_home):
    output = tmp_path / "out"
    with running_hub(tmp_path / "hub", TOKEN) as hub:
        result = run_job(hf_home, "run", OUTPUT_DIR=output, HUB_MODEL_ID=REPO, HF_TOKEN="hf_wrong",
                         HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", **TRAINED)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert "the Hub refused the token from HF_TOKEN (HTTP 401 while checking the token)" in result.stderr
    assert not Layout(output).checkpoints.exists()  # before: found only after training and merging, exit 5
    assert "hf_wrong" not in result.stderr


def test_a_401_while_pushing_exits_2_naming_the_token_file_and_is_not_retried(hub, output, monkeypatch, caplog,
                                                                              tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hf_expired\n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(secret))
    seen = len(hub.requests)
    with pytest.raises(ConfigError, match=f"refused the token from HF_TOKEN_FILE={secret} \\(HTTP 401") as error:
        push(settings_for(output, HUB_MODEL_ID=REPO, **FAST))
    assert error.value.exit_code == EXIT_BAD_INPUT
    kinds = [record.kind for record in hub.requests[seen:]]
    assert len(kinds) == len(set(kinds)) and "retry" not in caplog.text  # before: retried, then exit 5


@pytest.mark.slow
def test_job_run_push_fails_then_rerun_pushes_without_retraining_then_does_nothing(trained_output, tmp_path,
                                                                                    hf_home):
    """`job run` end to end in subprocesses, against the local Hub: exit 5 with the merged model on disk,
    a rerun that only pushes, and a rerun after success that does nothing."""
    output = copy_output(trained_output, tmp_path / "out")
    layout = Layout(output)
    outputs = []
    with running_hub(tmp_path / "hub", TOKEN) as hub:
        def run():
            result = run_job(hf_home, "run", OUTPUT_DIR=output, HUB_MODEL_ID=REPO, HF_TOKEN=TOKEN,
                             HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
                             MERGE_MAX_SHARD_SIZE=SHARD, **FAST, **TRAINED)
            outputs.extend([result.stdout, result.stderr])
            return result

        hub.fail_next(3, 500, path_regex=r"^POST /api/models/.*/commit/")  # PUSH_RETRIES=2: every attempt fails
        first = run()
        assert first.returncode == EXIT_HUB_UNREACHABLE, first.stderr[-3000:]
        assert checkpoint.is_complete(layout.merged) and "merging on cpu in bfloat16" in first.stderr
        summary = read_summary(output)
        assert summary["status"] == "failed" and summary["exit_code"] == 5 and summary["push"] is None
        assert summary["merge"]["passed"] and summary["merged_dir"]
        assert len(hub.commits(REPO)) == 1  # the repo exists; nothing committed
        merged_at = (layout.merged / "COMPLETE").stat().st_mtime_ns
        adapter_at = (layout.adapter / "COMPLETE").stat().st_mtime_ns

        second = run()
        assert second.returncode == EXIT_OK, second.stderr[-3000:]
        assert "starting training" not in second.stderr and "merging on" not in second.stderr
        assert "merge already done" in second.stderr
        assert (layout.merged / "COMPLETE").stat().st_mtime_ns == merged_at
        assert (layout.adapter / "COMPLETE").stat().st_mtime_ns == adapter_at
        summary = read_summary(output)
        assert summary["status"] == "done" and summary["exit_code"] == 0
        assert summary["push"]["commit"] == hub.commits(REPO)[0].oid and summary["push"]["repo"] == REPO
        assert summary["push"]["private"] is True and hub.repo(REPO).private
        card = hub.files(REPO)["README.md"].decode()
        assert "eval loss after" in card and (layout.merged / "README.md").read_text() == card

        seen = len(hub.requests)
        third = run()
        assert third.returncode == EXIT_OK, third.stderr[-3000:]
        assert "already pushed" in third.stderr and len(hub.requests) == seen
        assert len(hub.commits(REPO)) == 2
        for record in hub.requests:  # the token only ever travels in Authorization headers
            assert TOKEN not in record.path
    assert_no_token(*outputs, root=output)


@pytest.mark.slow  # datasets retries the connection for ~25 s before it gives up
def test_a_hub_outage_while_downloading_the_data_exits_5_not_2(tmp_path, hf_home):
    """A dataset the Hub cannot serve right now is not bad settings: exit 5 (rerun), where it was 2 (never retry)."""
    from tests.jobtools import run_job

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once the socket is closed
    result = run_job(hf_home, "preflight", OUTPUT_DIR=tmp_path / "out", DATASET="org/some-dataset",
                     HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result.returncode == EXIT_HUB_UNREACHABLE, result.stderr[-3000:]
    assert "DATASET=org/some-dataset: the Hub could not be reached" in result.stderr


@pytest.mark.parametrize("status, transient", [(503, True), (429, True), (404, False), (401, False)])
def test_hub_errors_wrapped_by_a_library_are_classified_by_their_cause(status, transient):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from job.errors import transient_hub_error

    response = httpx2.Response(status, request=httpx2.Request("GET", "http://hub/x"))
    try:
        try:
            raise HfHubHTTPError(f"{status}", response=response)
        except HfHubHTTPError as cause:
            raise OSError("could not load the config") from cause  # as transformers wraps it
    except OSError as wrapped:
        assert transient_hub_error(wrapped)[0] is transient
