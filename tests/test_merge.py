"""The merge stage on the real 4-bit-trained tiny model: parity, the saved artifact, each kind of broken merge
caught by name (exit 4) and each correct one passed: LoRA and DoRA, float16, bfloat16 and float32."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from job import checkpoint, cli, config, verify
from job import merge as merge_module
from job.checkpoint import Layout
from job.errors import EXIT_VERIFY_FAILED, VerifyFailed
from tests.jobtools import SHARD, TRAINED, copy_output, settings_for

pytestmark = pytest.mark.slow


def test_merge_parity_with_base_plus_adapter_and_gap_to_4bit(merged_output):
    layout = Layout(merged_output)
    metrics = json.loads((layout.metrics / "merge.json").read_text())
    assert checkpoint.is_complete(layout.merged)
    assert metrics["passed"] and all(metrics["checks"].values()) and not metrics["problems"]
    assert metrics["device"] == "cpu" and metrics["dtype"] == "bfloat16"  # the tiny checkpoint's own dtype
    assert metrics["peak_memory_gib"] > 0 and metrics["peak_cpu_rss_gib"] > 0
    # every tensor of the saved model compared with base + adapter read from their own files
    assert metrics["weights_checked"] and metrics["adapted_tensors"] == 28 and metrics["tensors_compared"] == 39
    assert 0 < metrics["max_rounding_steps"] <= verify.WEIGHT_STEPS and metrics["weight_error_of_bound"] <= 1
    # logits: the reloaded model is the merged one; its gap to the unmerged model is within the rounding bound
    assert metrics["reload_gap"] <= metrics["reload_bound"]
    assert 0 < metrics["max_abs_logit_gap"] <= metrics["logit_bound"] == verify.TWIN_MARGIN * metrics["rounding_twin_gap"]
    assert metrics["relative_gap"] < 0.03 and metrics["top1_agreement"] > 0.9
    # The 4-bit training-time model is reported, and it is further off than the merge.
    assert metrics["training_quantization"] == "nf4"
    assert metrics["gap_4bit"] > metrics["max_abs_logit_gap"]
    assert metrics["rows_compared"] == merge_module.VERIFY_ROWS and metrics["tokens_compared"] > 20

    # Independently of merge.py: merged folder vs 16-bit base + adapter on a new input.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((layout.adapter / "job.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(layout.merged)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word three times.\n\nlamp"},
                                         {"role": "assistant", "content": "lamp lamp lamp"}], return_tensors="pt",
                                        return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(meta["resolved_base"], dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, str(layout.adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(layout.merged).eval()
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
        with reference.disable_adapter():
            plain = reference(input_ids=ids).logits.float()
    gap = (got - want).abs().max().item()
    assert gap <= metrics["logit_bound"]
    assert (plain - want).abs().max().item() > 5 * gap  # the adapter matters: parity is not trivially true


def test_merged_folder_is_complete_and_loads_with_auto_classes(merged_output):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LogitsProcessor,
    )

    layout = Layout(merged_output)
    merged = layout.merged
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) >= 2 and (merged / "model.safetensors.index.json").is_file()
    assert not list(merged.glob("*.bin")) and not list(merged.glob("adapter_*"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "COMPLETE"} <= \
        {p.name for p in merged.iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(merged)
    adapter_tokenizer = AutoTokenizer.from_pretrained(layout.adapter)
    assert tokenizer.chat_template and tokenizer.chat_template == adapter_tokenizer.chat_template
    end_of_turn = json.loads((layout.adapter / "job.json").read_text())["end_of_turn_id"]
    assert tokenizer.convert_ids_to_tokens(end_of_turn) == "<|im_end|>"
    generation = GenerationConfig.from_pretrained(merged)
    assert generation.eos_token_id == [tokenizer.eos_token_id, end_of_turn]
    assert generation.pad_token_id == tokenizer.pad_token_id not in generation.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    assert not hasattr(model, "peft_config") and "quantization_config" not in model.config.to_dict()

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Norway?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    n = prompt["input_ids"].shape[1]

    class EmitAfter(LogitsProcessor):
        """Make the model emit `token` as its `step`-th new token, as a trained model does when it is done."""

        def __init__(self, token, step):
            self.token, self.step = token, step

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - n == self.step - 1:
                scores[:, :] = -float("inf")
                scores[:, self.token] = 0
            return scores

    for stop in (end_of_turn, tokenizer.eos_token_id):  # generation_config alone makes either one stop it
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False, logits_processor=[EmitAfter(stop, 3)])
        assert out.shape[1] - n == 3 and out[0, -1].item() == stop
    free = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, n:].tolist()
    assert len(free) == 12 or free[-1] in generation.eos_token_id  # ran to the limit, or stopped at a stop token

    metrics = json.loads((layout.metrics / "merge.json").read_text())
    assert metrics["generation"]["prompt"].endswith("<|im_start|>assistant\n")
    assert metrics["eos_token_id"] == [tokenizer.eos_token_id, end_of_turn]


def test_model_card_code_runs_against_the_merged_folder(merged_output):
    card = (Layout(merged_output).merged / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    assert "<|im_start|>user\nWhat is the capital of Norway?<|im_end|>" in card
    assert "merge check: max logit gap" in card and "bound from rounding" in card and "`LORA_R` | `16`" in card
    assert "merge check: merged weights vs base + adapter" in card and "Weights are bfloat16 safetensors" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('"path/to/merged"', repr(str(Layout(merged_output).merged)))
    code = code.replace('device_map="auto"', "device_map=None").replace("max_new_tokens=128", "max_new_tokens=4")
    exec(compile(code, "model card", "exec"), {})


def test_merge_rerun_returns_recorded_metrics_without_loading_models(merged_output, tmp_path, monkeypatch):
    output = copy_output(merged_output, tmp_path / "out")
    sealed = (output / "merged" / "COMPLETE").stat().st_mtime_ns
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished merge loaded a model again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    result = merge_module.merge(settings_for(output))
    assert result == json.loads((output / "metrics" / "merge.json").read_text()) and result["passed"]
    assert (output / "merged" / "COMPLETE").stat().st_mtime_ns == sealed


def nf4_roundtrip(tuned):
    """The field failure: weights merged, then squeezed through 4-bit (as when merging into the QLoRA base)."""
    import bitsandbytes.functional as bnbf

    merged = tuned.merge_and_unload()
    with torch.no_grad():
        for name, module in merged.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                packed, state = bnbf.quantize_4bit(module.weight.data, quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(packed, state).to(module.weight.dtype)
    return merged


def test_broken_merge_fails_verification_exit_4_and_nothing_is_pushed(trained_output, tmp_path, monkeypatch, capsys,
                                                                     hf_home):
    from tests.hubserver import patch_hf_client, running_hub

    output = copy_output(trained_output, tmp_path / "out")
    monkeypatch.setattr(merge_module, "merge_weights", nf4_roundtrip)
    import job.evaluate

    monkeypatch.setattr(job.evaluate, "evaluate", lambda s: {})  # not under test here; saves time
    for f in config.FIELDS.values():
        monkeypatch.delenv(config.env_name(f), raising=False)
    with running_hub(tmp_path / "hub", "hf_merge_test_token") as hub:
        patch_hf_client(monkeypatch, hub, hf_home)
        for key, value in {"OUTPUT_DIR": str(output), "HUB_MODEL_ID": "test-user/broken", "HF_TOKEN":
                           "hf_merge_test_token", "MERGE_MAX_SHARD_SIZE": SHARD, **TRAINED}.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["run"])
        assert exit_info.value.code == EXIT_VERIFY_FAILED == 4
        assert hub.counts["create_repo"] == 0 and hub.counts["commit"] == 0
    layout = Layout(output)
    assert not layout.merged.exists() and not (output / ".merged.staging").exists()
    metrics = json.loads((layout.metrics / "merge.json").read_text())
    assert metrics["passed"] is False and not metrics["checks"]["weights_match"]
    assert "dequantized 4-bit" in metrics["problems"][0]
    summary = json.loads(layout.summary.read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 4 and summary["push"] is None
    assert summary["merge"]["passed"] is False and "does not match" in summary["error"]
    assert not (layout.metrics / "push.json").exists()
    assert checkpoint.is_complete(layout.adapter)  # the adapter is intact for a fixed rerun

    # Direct call: the same error type, and nothing sealed.
    with pytest.raises(VerifyFailed):
        merge_module.merge(settings_for(output))
    assert not layout.merged.exists()


# ------------------------------------------------------------------ faults, each caught and named; correct merges pass

def lora_layers(tuned):
    from peft.tuners.lora import LoraLayer

    return [m for m in tuned.modules() if isinstance(m, LoraLayer)]


def doubled_scale(tuned):
    for layer in lora_layers(tuned):
        layer.scaling = {name: 2 * value for name, value in layer.scaling.items()}
    return tuned.merge_and_unload()


def one_left_unmerged(tuned):
    lora_layers(tuned)[0].lora_B["default"].weight.data.zero_()
    return tuned.merge_and_unload()


def dora_as_plain_lora(tuned):
    for layer in lora_layers(tuned):
        layer.use_dora["default"] = False
        layer.lora_variant.pop("default", None)
    return tuned.merge_and_unload()


def saved_then(damage):
    """save_merged, then `damage` the staging folder."""
    original = merge_module.save_merged

    def save(merged, tokenizer, staging, max_shard_size):
        original(merged, tokenizer, staging, max_shard_size)
        damage(staging)
    return save


def drop_second_shard(staging):
    sorted(staging.glob("model-*.safetensors"))[1].unlink()


def drop_chat_template(staging):
    (staging / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((staging / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (staging / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dora_output(trained_output, tmp_path_factory):
    """`trained_output` with its adapter replaced by a DoRA adapter whose B and magnitudes are far from their
    initial values (a trained DoRA adapter after a few CPU steps barely moves the magnitudes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    output = copy_output(trained_output, tmp_path_factory.mktemp("dora") / "out")
    adapter = Layout(output).adapter
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter / "job.json").read_text())["resolved_base"],
                                                dtype=torch.bfloat16)
    tuned = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.7, 1.3))
    for old in adapter.glob("adapter_*"):
        old.unlink()
    tuned.save_pretrained(adapter)
    return output


FAULTS = {
    "scale x2": (doubled_scale, None, "the merged update is 2x scale·B·A"),
    "one module unmerged": (one_left_unmerged, None, "not merged (it equals the base weight"),
    "merged into 4-bit weights": (nf4_roundtrip, None, "dequantized 4-bit"),
    "a weight shard missing": (None, drop_second_shard, "is missing from the saved model (a weight shard missing)"),
    "tokenizer without chat template": (None, drop_chat_template, "lacks the chat template"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_broken_merge_fails_with_exit_4_naming_the_fault(fault, trained_output, tmp_path, monkeypatch):
    merge_with, damage, named = FAULTS[fault]
    output = copy_output(trained_output, tmp_path / "out")
    if merge_with:
        monkeypatch.setattr(merge_module, "merge_weights", merge_with)
    if damage:
        monkeypatch.setattr(merge_module, "save_merged", saved_then(damage))
    with pytest.raises(VerifyFailed) as failure:
        merge_module.merge(settings_for(output))
    assert failure.value.exit_code == EXIT_VERIFY_FAILED
    assert named in str(failure.value)
    assert not Layout(output).merged.exists() and not (output / ".merged.staging").exists()


def test_dora_merge_passes_and_ignoring_its_magnitude_is_caught(dora_output, tmp_path, monkeypatch):
    good = copy_output(dora_output, tmp_path / "good")
    metrics = merge_module.merge(settings_for(good))
    assert metrics["passed"] and metrics["adapted_tensors"] == 28
    assert metrics["max_rounding_steps"] <= verify.WEIGHT_STEPS

    broken = copy_output(dora_output, tmp_path / "broken")
    monkeypatch.setattr(merge_module, "merge_weights", dora_as_plain_lora)
    with pytest.raises(VerifyFailed, match="DoRA magnitude ignored"):
        merge_module.merge(settings_for(broken))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_merge_dtype_is_what_is_saved_and_verified(dtype, trained_output, tmp_path):
    from transformers import AutoModelForCausalLM

    output = copy_output(trained_output, tmp_path / "out")
    metrics = merge_module.merge(settings_for(output, MERGE_DTYPE=dtype))
    assert metrics["passed"] and metrics["dtype"] == dtype and metrics["weight_error_of_bound"] <= 1
    assert AutoModelForCausalLM.from_pretrained(Layout(output).merged).dtype == getattr(torch, dtype)


def test_a_float16_merge_that_overflows_is_refused_naming_bfloat16(trained_output, tmp_path):
    """A base whose output layer makes logits beyond float16's 65504 (as some models' activations do): bfloat16
    holds them, float16 turns them into inf."""
    from safetensors.torch import load_file, save_file

    output = copy_output(trained_output, tmp_path / "out")
    base = tmp_path / "loud-base"
    shutil.copytree(json.loads((Layout(output).adapter / "job.json").read_text())["resolved_base"], base)
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 20000
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerifyFailed, match="MERGE_DTYPE=bfloat16"):
        merge_module.merge(settings_for(output, BASE_MODEL=base, PRESET="tiny-cpu", MERGE_DTYPE="float16"))
    assert merge_module.merge(settings_for(copy_output(trained_output, tmp_path / "bf16"), BASE_MODEL=base, PRESET="tiny-cpu",
                                           MERGE_DTYPE="bfloat16"))["passed"]
