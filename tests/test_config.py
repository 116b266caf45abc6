"""Settings: precedence, validation messages, presets, --help and the README table."""

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from job import config
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


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("LORA_RANK: 4\n")
    with pytest.raises(ConfigError, match="unknown settings LORA_RANK"):
        config.load({}, environ={"CONFIG_FILE": str(path)})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.load({}, environ={}).lora_r = 3


def test_help_shows_every_variable_and_default():
    text = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    for f in config.FIELDS.values():
        assert config.env_name(f) in text, config.env_name(f)
    assert "default nf4" in text


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
