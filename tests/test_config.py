"""Settings: precedence, validation messages, presets, --help and the README table."""

import dataclasses
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import job
from job import config, names
from job.cli import cli
from job.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_use_builtin_model_and_tiny_preset():
    s = config.load({}, environ={})
    assert s.base_model == config.BUILTIN_MODEL and s.dataset == config.BUILTIN_DATASET
    assert s.preset == "tiny-cpu" and s.max_length == 256
    assert s.quantization == "nf4" and s.lora_target_modules == "all-linear"


def test_precedence_defaults_yaml_env_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("LORA_R: 4\nlora_alpha: 8\nseed: 1\n")
    s = config.load({"seed": "3"}, environ={"CONFIG_FILE": str(path), "LORA_ALPHA": "12", "SEED": "2"})
    assert (s.lora_r, s.lora_alpha, s.seed) == (4, 12, 3)


def test_preset_sits_under_explicit_settings():
    s = config.load({}, environ={"PRESET": "mistral-7b-qlora", "MAX_LENGTH": "1024"})
    assert s.base_model == "mistralai/Mistral-7B-v0.3" and s.max_length == 1024
    assert config.load({}, environ={"BASE_MODEL": "org/model"}).preset == "none"


@pytest.mark.parametrize("name", config.PRESET_NAMES)
def test_every_preset_parses(name):
    assert config.load({}, environ={"PRESET": name}).preset == name


@pytest.mark.parametrize("environ, message", [
    ({"LORA_R": "0"}, "LORA_R=0: must be a positive integer"),
    ({"LORA_R": "abc"}, "LORA_R (environment): expected an integer, got 'abc'"),
    ({"LEARNING_RATE": "fast"}, "LEARNING_RATE (environment): expected a number"),
    ({"QUANTIZATION": "nf3"}, "QUANTIZATION='nf3' is not one of: nf4, int8, none"),
    ({"DATA_FORMAT": "sharegpt"}, "DATA_FORMAT='sharegpt' is not one of"),
    ({"PACKING": "maybe"}, "PACKING (environment): expected true or false"),
    ({"DATA_FORMAT": "template"}, "PROMPT_TEMPLATE=None: DATA_FORMAT=template needs PROMPT_TEMPLATE"),
    ({"HUB_MODEL_ID": "no-slash"}, "HUB_MODEL_ID='no-slash': must look like user/name"),
])
def test_bad_values_name_the_variable(environ, message):
    with pytest.raises(ConfigError, match=None) as error:
        config.load({}, environ=environ)
    assert message in str(error.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as error:
        config.load({}, environ={"LORA_R": "0", "EPOCHS": "-1", "QUANTIZATION": "x"})
    assert all(name in str(error.value) for name in ("LORA_R", "EPOCHS", "QUANTIZATION"))


def test_unknown_yaml_keys_are_an_error_each_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lerning_rate: 1e-4\nbatch_size: 8\nweight_decay: 0.01\nflux_capacitor: 1\n")
    with pytest.raises(ConfigError) as error:
        config.load({}, environ={"CONFIG_FILE": str(path)})
    text = str(error.value)
    assert "lerning_rate: did you mean LEARNING_RATE?" in text
    assert "batch_size: use MICRO_BATCH_SIZE" in text and "GLOBAL_BATCH_SIZE" in text
    assert "weight_decay: a trainer argument: put it in TRAINER_ARGS" in text
    assert "flux_capacitor: not a setting" in text


def test_trl_and_axolotl_names_are_aliases_in_yaml_and_the_environment(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: org/model\nnum_train_epochs: 2\nper_device_train_batch_size: 2\n"
                    "gradient_accumulation_steps: 4\nmax_seq_length: 1024\nlr_scheduler_type: linear\n"
                    "lora_target_modules: [q_proj, v_proj]\nreport_to: [none]\n")
    s = config.load({}, environ={"CONFIG_FILE": str(path), "SEQUENCE_LEN": "512", "LORA_RANK": "8"})
    assert (s.base_model, s.epochs, s.micro_batch_size, s.grad_accum, s.lr_scheduler) == ("org/model", 2.0, 2, 4,
                                                                                           "linear")
    assert s.max_length == 512 and s.lora_r == 8  # the environment over the file, as for the job's own names
    assert s.lora_target_modules == "q_proj,v_proj" and s.report_to == "none"
    assert s.preset == "none"  # BASE_MODEL given through its alias: not the built-in model's preset


def test_a_setting_given_twice_under_two_names_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="EPOCHS"):
        config.load({}, environ={"EPOCHS": "1", "NUM_TRAIN_EPOCHS": "2"})
    path = tmp_path / "c.yaml"
    path.write_text("max_length: 512\nsequence_len: 1024\n")
    with pytest.raises(ConfigError, match="max_length and sequence_len both set MAX_LENGTH"):
        config.load({}, environ={"CONFIG_FILE": str(path)})


def test_yaml_lists_and_mappings_for_the_comma_separated_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("report_to: [tensorboard]\nrole_map: {bot: assistant, human_2: user}\n"
                    "column_map: {dialog: messages}\ntrainer_args: {weight_decay: 0.01, optim: adamw_torch}\n")
    s = config.load({}, environ={"CONFIG_FILE": str(path)})
    assert s.role_map == "bot=assistant,human_2=user" and s.column_map == "dialog=messages"
    assert config.trainer_args(s) == {"weight_decay": 0.01, "optim": "adamw_torch"}


def test_several_datasets_with_weights_in_the_environment_and_the_yaml_file(tmp_path):
    Source = config.Source
    s = config.load({}, environ={"DATASET": "org/chat:0.7, data/b.jsonl:0.3", "BASE_MODEL": "x/y"})
    assert config.sources(s) == [Source("org/chat", 0.7), Source("data/b.jsonl", 0.3)]
    assert config.sources(config.load({}, environ={})) == [Source("builtin:tasks")]  # a name, not a weight
    assert config.sources(config.load({}, environ={"DATASET": "builtin:tasks:1,org/x:3"})) == [
        Source("builtin:tasks", 1.0), Source("org/x", 3.0)]
    path = tmp_path / "c.yaml"  # TRL's and axolotl's name for the list, each source with its own keys
    path.write_text("datasets:\n  - {path: org/chat, weight: 2, split: train_sft, config: ko, revision: v1}\n"
                    "  - data/b.jsonl:1\n  - {path: 'data/데이터.jsonl', weight: 1}\n")
    s = config.load({}, environ={"CONFIG_FILE": str(path), "BASE_MODEL": "x/y"})
    mix = [Source("org/chat", 2.0, "train_sft", "ko", "v1"), Source("data/b.jsonl", 1.0),
           Source("data/데이터.jsonl", 1.0)]
    assert config.sources(s) == mix and "데이터" in s.dataset
    assert config.sources(config.load({}, environ={"DATASET": s.dataset, "BASE_MODEL": "x/y"})) == mix  # as JSON
    alone = mix[0].alone(s)
    assert (alone.dataset, alone.dataset_split, alone.dataset_config, alone.dataset_revision) == (
        "org/chat", "train_sft", "ko", "v1")


@pytest.mark.parametrize("dataset, messages", [
    ("a.jsonl:0.7,b.jsonl:heavy", ["DATASET source 2 ('b.jsonl:heavy'): the weight 'heavy' is not a number"]),
    ("a.jsonl:-1,b.jsonl:0", ["DATASET source 1 ('a.jsonl:-1'): the weight '-1' must be a positive number",
                              "DATASET source 2 ('b.jsonl:0'): the weight '0' must be a positive number"]),
    ("a.jsonl:1,b.jsonl", ["DATASET: give every source a weight, or none"]),
    ("a.jsonl:0.5", ["DATASET='a.jsonl:0.5': a weight is a source's share of a mix of several"]),
    ("a.jsonl,,b.jsonl", ["DATASET source 2 (''): no path"]),
    ('[{"path": "org/a", "fraction": 0.5}]', ["'fraction' is not a key of a source; use weight: TRL's fraction"]),
    ('[{"path": "org/a", "type": "alpaca"}]', ["'type' is not a key of a source; use nothing: DATA_FORMAT=auto"]),
    ('[{"path": "org/a", "weight": true}, "b:1"]', ["DATASET source 1 ({'path': 'org/a', 'weight': True}): the "
                                                    "weight True is not a number"]),
    ("[{path: a", ["not a YAML or JSON list of sources"]),
])
def test_bad_mixes_are_reported_with_every_other_problem(dataset, messages):
    with pytest.raises(ConfigError) as error:
        config.load({}, environ={"DATASET": dataset, "BASE_MODEL": "x/y", "LORA_R": "0"})
    for message in [*messages, "LORA_R=0"]:
        assert message in str(error.value), str(error.value)


def test_misspelt_variables_are_found_and_the_rest_of_the_environment_is_not():
    environ = {"BASE_MODLE": "x", "BATCH_SIZE": "8", "NUM_EPOCH": "1", "LEARNINGRATE": "1e-4", "PATH": "/bin",
               "HOME": "/root", "HOSTNAME": "n1", "TERM": "xterm", "SHELL": "/bin/bash", "USER": "me", "LANG": "C",
               "PWD": "/", "TMPDIR": "/tmp", "SLURM_JOB_ID": "7", "NCCL_DEBUG": "INFO", "JOB_RUNTIME": "venv",
               "HF_HOME": "/h", "CUDA_VISIBLE_DEVICES": "0", "EPOCHS": "1", "NUM_TRAIN_EPOCHS_": "1"}
    found = names.misspelt_variables(environ, config.known_names())
    assert found.keys() == {"BASE_MODLE", "BATCH_SIZE", "NUM_EPOCH", "LEARNINGRATE", "NUM_TRAIN_EPOCHS_"}, found
    assert found["BASE_MODLE"] == "did you mean BASE_MODEL?" and found["NUM_EPOCH"] == "did you mean EPOCHS?"


def test_a_base_model_typo_with_a_dataset_stops_instead_of_training_the_tiny_model():
    with pytest.raises(ConfigError) as error:
        config.load({}, environ={"BASE_MODLE": "mistralai/Mistral-7B-v0.3", "DATASET": "org/data"})
    assert "BASE_MODLE='mistralai/Mistral-7B-v0.3' is not a setting (did you mean BASE_MODEL?)" in str(error.value)
    assert "built-in tiny model would be trained on DATASET='org/data'" in str(error.value)
    # the same typo beside the built-in data is a smoke test of the setup: warned about (by the CLI), not refused
    assert config.load({}, environ={"BASE_MODLE": "x"}).base_model == config.BUILTIN_MODEL


def test_the_cli_warns_about_a_misspelt_variable(tmp_path, hf_home):
    from tests.jobtools import run_job

    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")  # preflight stops at once, after the settings were read
    result = run_job(hf_home, "preflight", OUTPUT_DIR=not_a_directory, NUM_EPOCH="3")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "NUM_EPOCH is not a setting and is ignored: did you mean EPOCHS?" in result.stderr


def test_trainer_args_the_job_sets_itself_are_refused_naming_the_setting():
    with pytest.raises(ConfigError) as error:
        config.load({}, environ={"TRAINER_ARGS": '{"learning_rate": 0.1, "num_train_epochs": 3, "weight_decay": 0}'})
    assert "TRAINER_ARGS: learning_rate is set by the job; use LEARNING_RATE" in str(error.value)
    assert "TRAINER_ARGS: num_train_epochs is set by the job; use EPOCHS" in str(error.value)
    with pytest.raises(ConfigError, match="must be a mapping"):
        config.load({}, environ={"TRAINER_ARGS": "[1, 2]"})


@pytest.mark.parametrize("value, message", [
    ('{"weight_decy": 0.1}', "not arguments of TRL's SFTConfig: weight_decy (did you mean weight_decay?)"),
    ('{"optim": "adam_but_faster"}', "SFTConfig refuses"),
])
def test_trainer_args_are_checked_against_sftconfig_in_preflight(value, message):
    from job.preflight import check_trainer_args

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trainer_args(config.load({}, environ={"TRAINER_ARGS": value}))
    check_trainer_args(config.load({}, environ={"TRAINER_ARGS": "weight_decay: 0.01"}))


def test_preflight_names_the_package_a_tracker_or_strategy_needs(monkeypatch):
    import importlib.util

    from job.preflight import check_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in {"wandb", "deepspeed"}
                        else real(name, *a))  # as in an environment without them (this one may have deepspeed)
    with pytest.raises(ConfigError) as error:
        check_packages(config.load({}, environ={"REPORT_TO": "tensorboard,wandb", "STRATEGY": "zero3"}))
    assert "REPORT_TO=wandb needs the Python package wandb" in str(error.value)
    assert "STRATEGY=zero3 needs the Python package deepspeed" in str(error.value)
    check_packages(config.load({}, environ={"REPORT_TO": "tensorboard"}))


def test_hf_token_file_is_what_every_hub_request_reads(tmp_path):
    """Downloads too (a gated base model), not only the push: huggingface_hub's own token lookup finds it."""
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("hf_from_the_file\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_TOKEN_PATH")}
    probe = "from job import cli; cli.use_token_file_everywhere(); import huggingface_hub; print(huggingface_hub.get_token())"
    done = subprocess.run([sys.executable, "-c", probe], env={**env, "HF_TOKEN_FILE": str(token)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "hf_from_the_file", done.stderr


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"job, version {job.__version__}"


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.load({}, environ={}).lora_r = 3


def test_help_shows_every_variable_and_default():
    text = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    for f in config.FIELDS.values():
        assert config.env_name(f) in text, config.env_name(f)
    assert "default nf4" in text


def test_help_lists_the_settings_by_group_and_the_top_level_help_says_where():
    text = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    headings = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ")]
    assert {"Inputs", "Model", "Training", "Speed", "Monitoring", "Publish", "Launch"} <= set(headings), headings
    inputs = text[text.index("\nInputs:"):text.index("\nModel:")]
    assert "--dataset-revision" in inputs and "--lora-r" not in inputs
    assert "job run --help" in CliRunner().invoke(cli, ["--help"], terminal_width=200).output


def test_readme_table_matches_the_dataclass():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert config.markdown_table() in readme, "README drifted: run `make readme`"


_ints = st.integers(min_value=-10**6, max_value=10**6)


@given(value=_ints)
def test_integers_round_trip_through_the_environment(value):
    assert config.parse_value(config.FIELDS["seed"], str(value), "environment") == value


@given(text=st.text(min_size=1).filter(lambda t: t.strip().lstrip("+-").isdigit() is False))
def test_non_numeric_integers_are_rejected_with_the_name(text):
    try:
        int(text.strip())
    except ValueError:
        with pytest.raises(ConfigError, match="SEED"):
            config.parse_value(config.FIELDS["seed"], text, "environment")


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip(value):
    assert config.parse_value(config.FIELDS["learning_rate"], repr(value), "environment") == value


@given(flag=st.sampled_from(["1", "true", "YES", "on", "0", "false", "No", "OFF"]))
def test_booleans_accept_common_spellings(flag):
    assert config.parse_value(config.FIELDS["packing"], flag, "x") == (flag.lower() in {"1", "true", "yes", "on"})


@given(r=st.integers(min_value=-5, max_value=300), dropout=st.floats(min_value=-1, max_value=2))
def test_validation_accepts_exactly_the_documented_ranges(r, dropout):
    environ = {"LORA_R": str(r), "LORA_DROPOUT": repr(dropout)}
    ok = r >= 1 and 0 <= dropout < 1
    if ok:
        assert config.load({}, environ=environ).lora_r == r
    else:
        with pytest.raises(ConfigError):
            config.load({}, environ=environ)


def test_speed_levers_that_reach_into_the_weights_are_refused_with_sharded_strategies():
    """FSDP and ZeRO-3 split each weight across the ranks; the fused LoRA kernel, the NF4 kernel, the 16-bit weight
    cache, the embedding offload and the long-context mode assume whole weights on one GPU and were never run
    sharded."""
    flags = {"strategy": "zero3", "lora_kernel": "true", "nf4_kernel": "true", "dequant_cache": "true",
             "offload_embeddings": "true", "long_context": "on"}
    with pytest.raises(ConfigError) as error:
        config.load(flags, environ={})
    message = str(error.value)
    for variable in ("LORA_KERNEL='true'", "NF4_KERNEL='true'", "DEQUANT_CACHE='true'", "OFFLOAD_EMBEDDINGS='true'",
                     "LONG_CONTEXT='on'"):
        assert variable in message and "STRATEGY=zero3" in message, message
    config.load({**flags, "strategy": "ddp"}, environ={})  # whole weights per rank: allowed


def test_global_batch_size_derives_the_accumulation_for_the_layout():
    s = config.load({}, environ={"MICRO_BATCH_SIZE": "4", "GLOBAL_BATCH_SIZE": "16", "GRAD_ACCUM": "3"})
    assert config.batch_layout(s, 2) == {"global_batch_size": 16, "world_size": 2, "micro_batch_size": 4,
                                         "grad_accum": 2}  # GRAD_ACCUM is ignored
    assert config.batch_layout(s, 4)["grad_accum"] == 1
    unset = config.load({}, environ={"MICRO_BATCH_SIZE": "4", "GRAD_ACCUM": "3"})
    assert config.batch_layout(unset, 2)["global_batch_size"] == 24  # today's meaning
    assert "global_batch_size" not in s.identity()  # a run started without it may add it to resume elsewhere


def test_a_global_batch_size_that_does_not_divide_names_the_values_and_what_works():
    s = config.load({}, environ={"MICRO_BATCH_SIZE": "4", "GLOBAL_BATCH_SIZE": "12"})
    with pytest.raises(ConfigError) as error:
        config.batch_layout(s, 2)
    assert str(error.value) == ("GLOBAL_BATCH_SIZE=12 does not divide into MICRO_BATCH_SIZE=4 x 2 process(es) = 8 "
                                "rows a micro-step: run on 1, 3 process(es) in all, or use a multiple of 8 "
                                "(GLOBAL_BATCH_SIZE=8 or 16)")
