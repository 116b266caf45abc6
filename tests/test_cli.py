"""Bad input: exit 2 before any training, a message naming the setting or file:line, nothing lost."""

import json
import os
import subprocess
import sys

import pytest

from job import cli


def run_cli(monkeypatch, capsys, args, **environ):
    for key in list(os.environ):
        if key in {"LORA_R", "DATASET", "BASE_MODEL", "OUTPUT_DIR", "HUB_MODEL_ID", "HF_TOKEN"}:
            monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, str(value))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.fixture
def output(tmp_path):
    """An OUTPUT_DIR that already holds work, which no failure may touch."""
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-7" / "COMPLETE").write_text("ok")
    (out / "precious.txt").write_text("keep me")
    return out


def jsonl(tmp_path, text: bytes):
    path = tmp_path / "d.jsonl"
    path.write_bytes(text)
    return path


GOOD = b'{"instruction": "i", "response": "r"}\n'
SETTINGS_ERRORS = {"unknown format", "unknown enum", "r=0", "non-numeric", "bad weight"}


@pytest.mark.parametrize("case, environ, message", [
    ("missing column", {"DATA": GOOD + b'{"instruction": "i"}\n'}, "d.jsonl:2: column 'output' is missing"),
    ("empty field", {"DATA": GOOD + b'{"instruction": "", "response": "r"}\n'}, "d.jsonl:2: column 'instruction' is empty"),
    ("wrong type", {"DATA": GOOD + b'{"instruction": ["i"], "response": "r"}\n'}, "column 'instruction' must be text"),
    ("malformed line", {"DATA": GOOD + b'{"instruction": \n'}, "d.jsonl:2: malformed JSON"),
    ("non-UTF-8", {"DATA": GOOD + b'{"instruction": "\xc3\x28", "response": "r"}\n'}, "d.jsonl:2: not valid UTF-8"),
    ("empty dataset", {"DATA": b""}, "has no rows"),
    ("all rows too long", {"DATA": b'{"instruction": "' + b"word " * 400 + b'", "response": "r"}\n', "MAX_LENGTH": 64},
     "MAX_LENGTH=64: every training row is longer"),
    ("unknown format", {"DATA_FORMAT": "alpaca2"}, "DATA_FORMAT='alpaca2' is not one of"),
    ("unknown enum", {"QUANTIZATION": "fp4"}, "QUANTIZATION='fp4' is not one of: nf4, int8, none"),
    ("r=0", {"LORA_R": 0}, "LORA_R=0: must be a positive integer"),
    ("non-numeric", {"LEARNING_RATE": "2e-4x"}, "LEARNING_RATE (environment): expected a number, got '2e-4x'"),
    ("bad weight", {"DATASET": "org/a:0.7,org/b:-0.3"}, "DATASET source 2 ('org/b:-0.3'): the weight '-0.3' must be "
     "a positive number"),
    ("missing model path", {"BASE_MODEL": "/nonexistent/model"}, "BASE_MODEL=/nonexistent/model: no such directory"),
    ("missing dataset path", {"DATASET": "/nonexistent/data.jsonl"}, "DATASET=/nonexistent/data.jsonl: no such file"),
    ("absent target modules", {"LORA_TARGET_MODULES": "q_proj,query_key_value"},
     "LORA_TARGET_MODULES: query_key_value not in the model; its linear layers are: down_proj, gate_proj"),
    ("push without token", {"HUB_MODEL_ID": "me/model"}, "HUB_MODEL_ID=me/model asks for a push but no token"),
])
def test_bad_input_exits_2_naming_it_and_loses_nothing(monkeypatch, capsys, tmp_path, output, hf_home,
                                                       case, environ, message):
    environ = dict(environ)
    if "DATA" in environ:
        environ["DATASET"] = jsonl(tmp_path, environ.pop("DATA"))
    code, text = run_cli(monkeypatch, capsys, ["run"], OUTPUT_DIR=output, **environ)
    assert code == 2, text[-2000:]
    assert message in text, text[-2000:]
    assert (output / "precious.txt").read_text() == "keep me"
    assert (output / "checkpoints" / "checkpoint-7" / "COMPLETE").exists()
    assert not (output / "adapter").exists()
    if case not in SETTINGS_ERRORS:  # once settings resolve, OUTPUT_DIR is known and records the failure
        summary = json.loads((output / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["exit_code"] == 2 and message in summary["error"]


def test_unwritable_output_dir_is_named(monkeypatch, capsys, tmp_path, hf_home):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "file").write_text("x")
    target = locked / "file" / "out"  # a path under a regular file can never be created, even by root
    code, text = run_cli(monkeypatch, capsys, ["preflight"], OUTPUT_DIR=target)
    assert code == 2 and f"OUTPUT_DIR={target}: not writable" in text


def test_different_run_in_output_dir_is_refused(monkeypatch, capsys, tmp_path, hf_home):
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-3" / "COMPLETE").write_text("ok")
    (out / "run.json").write_text(json.dumps({"lora_r": 64}))
    code, text = run_cli(monkeypatch, capsys, ["preflight"], OUTPUT_DIR=out)
    assert code == 2 and "holds checkpoints of a different run" in text and "LORA_R: 64 -> 16" in text


def test_preflight_prints_the_plan_and_the_loss_mask(monkeypatch, capsys, tmp_path, hf_home):
    code, text = run_cli(monkeypatch, capsys, ["preflight"], OUTPUT_DIR=tmp_path / "o")
    assert code == 0, text[-2000:]
    plan = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert plan["end_of_turn_token"] == "<|im_end|>"
    assert plan["sample_rendered"].rstrip().endswith("<|im_end|>\n]") or "<|im_end|>" in plan["sample_rendered"]
    assert plan["data"]["train_rows"] > 2000 and plan["planned_steps"] > 0
    assert not (tmp_path / "o" / "checkpoints").exists()



def test_a_global_batch_size_the_layout_cannot_make_is_refused_before_anything_loads(monkeypatch, capsys, output,
                                                                                      hf_home):
    code, text = run_cli(monkeypatch, capsys, ["preflight"], OUTPUT_DIR=output, NUM_PROCESSES=2,
                         MICRO_BATCH_SIZE=4, GLOBAL_BATCH_SIZE=12)
    assert code == 2 and ("GLOBAL_BATCH_SIZE=12 does not divide into MICRO_BATCH_SIZE=4 x 2 process(es) = 8 rows a "
                          "micro-step: run on 1, 3 process(es) in all") in text
    # logs/ appears only where this process has not set up logging before (an earlier in-process test may have)
    assert {p.name for p in output.iterdir()} - {"logs"} == {"checkpoints", "precious.txt"}


@pytest.mark.parametrize("code", [0, 2, 75])
def test_a_stop_signal_after_the_exit_code_is_decided_does_not_change_it(code):
    """On two Slurm nodes, the node that exits first makes srun SIGTERM the other while it is already exiting 75:
    it died by the signal (143), and the requeue rule read a failure."""
    probe = ("import atexit, os, signal\nfrom job import cli\n"  # the signal comes while the interpreter shuts down
             f"cli.run_command = lambda argv: {code}\n"
             "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\ncli.main([])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
