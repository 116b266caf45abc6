"""The merge stage: final adapter + base -> OUTPUT_DIR/merged, verified before anything is pushed.

Runs in one process after training has finished on every rank (`job run` trains in child processes
and merges in the parent; `job merge` alone does the same). Steps:

1. Logits of the training-time model (base quantized as QUANTIZATION says, plus the adapter) on a few
   evaluation rows: the gap to them is reported, not gated (quantization error is expected).
2. The base in MERGE_DTYPE (by default the checkpoint's own dtype), never the 4-bit one: merging into a
   dequantized 4-bit base bakes the quantization error into every weight. Adapter applied unmerged
   -> reference logits. Then `merge_and_unload`, and the merged model's own logits.
3. Saved to a staging folder as sharded safetensors with the tokenizer, the training chat template,
   a generation config whose eos_token_id holds EOS and the end-of-turn token, and a model card.
4. Verified (job.verify): the saved weights against base + adapter read from their own files, within the
   rounding of MERGE_DTYPE; the saved folder loaded back with plain AutoModelForCausalLM /
   AutoTokenizer gives the merged logits, and stays within the rounding bound of the unmerged reference; a
   chat-templated prompt is generated from it. Only then is the folder sealed into OUTPUT_DIR/merged. A
   failed check raises VerifyFailed (exit 4) naming the fault: nothing is pushed.

Where: MERGE_DEVICE=auto uses the GPU only when the memory it may use (its free memory, or GPU_MEMORY_GIB)
holds the model in MERGE_DTYPE with room to spare, and falls back to CPU on a CUDA out-of-memory error, so a
long training run is never lost to the merge. The log and merge.json say which device was used and the peak.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from job import checkpoint, data, model, speed, verify
from job.checkpoint import Layout
from job.config import Settings
from job.errors import ConfigError, VerifyFailed
from job.evaluate import generate

log = logging.getLogger("job.merge")

VERIFY_ROWS = 4  # evaluation rows compared
VERIFY_TOKENS = 128  # tokens per row: logits of every position over the whole vocabulary are compared
CHECK_NEW_TOKENS = 16  # generated from the saved model: it loads, templates and stops as configured
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


@dataclass
class Inputs:
    """What the merge reads, once: a CPU retry after running out of GPU memory reuses it."""
    path: str  # the base model, resolved (model.resolve)
    config: object  # the base model's config
    adapter: str  # OUTPUT_DIR/adapter
    tokenizer: object  # the adapter's; the merged model's once its pad token and chat template are set
    chat_template: str  # the one training rendered the data with
    end_of_turn: int
    rows: list[torch.Tensor]  # verification rows (verification_rows)
    messages: list[dict]  # a conversation whose answer the saved model generates


def merge(s: Settings) -> dict:
    layout = Layout(s.output)
    metrics_path = layout.metrics / "merge.json"
    if checkpoint.is_complete(layout.merged):
        log.info("merge already done: %s", layout.merged)
        return checkpoint.read_json(metrics_path) or {"merged_dir": str(layout.merged), "passed": True}
    if not checkpoint.is_complete(layout.adapter):
        raise ConfigError(f"OUTPUT_DIR={layout.root}: no finished adapter in {layout.adapter}; run training first "
                          "(job run, or job train)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        log.info("rank %s: started by a distributed launcher; the merge runs on rank 0 only", os.environ["RANK"])
        return {}

    started = time.time()
    inputs = _read_inputs(s, layout)
    _free()  # what evaluation left in this process's GPU cache
    cap = speed.probe(s.gpu_memory_gib)
    speed.apply_memory_cap(cap)  # every stage stays inside GPU_MEMORY_GIB, as on a smaller card
    device = choose_device(s, inputs.config, inputs.path, cap.budget_gib)
    _reset_peak()
    quantized = _training_time_logits(s, inputs.path, inputs.adapter, inputs.rows)
    staging = layout.root / ".merged.staging"
    result = _merge_falling_back_to_cpu(s, inputs, device, staging)
    _add_measures(result, s, quantized, started)
    if not result["passed"]:
        shutil.rmtree(staging, ignore_errors=True)
        checkpoint.write_json(metrics_path, result)
        raise VerifyFailed("the merged model does not match base + adapter: " + "; ".join(result["problems"])
                           + ". Nothing was pushed; the adapter is intact in " + inputs.adapter)
    from job.publish import model_card

    (staging / "README.md").write_text(model_card(s, layout, "merged", merge_metrics=result), encoding="utf-8")
    result["merged_dir"] = str(layout.merged)
    checkpoint.write_json(metrics_path, result)  # first: a merged/ that is complete always has its metrics
    checkpoint.seal(staging, layout.merged)
    log.info("merged model saved: %s", layout.merged)
    return result


def _read_inputs(s: Settings, layout: Layout) -> Inputs:
    """The base, the adapter with its tokenizer and end-of-turn token, and the data's rows and chat template."""
    from accelerate import PartialState
    from transformers import AutoConfig, AutoTokenizer

    path = model.resolve(s.base_model)
    meta = checkpoint.read_json(layout.adapter / "job.json") or {}
    tokenizer = AutoTokenizer.from_pretrained(str(layout.adapter), trust_remote_code=s.trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    prepared = data.load(s, tokenizer, config.model_type, layout.cache, PartialState())
    messages = prepared.samples[0]["messages"] if prepared.samples else [{"role": "user", "content": "Hello!"}]
    return Inputs(path, config, str(layout.adapter), tokenizer, prepared.chat_template,
                  meta.get("end_of_turn_id", prepared.end_of_turn_id), verification_rows(prepared), messages)


def _merge_falling_back_to_cpu(s: Settings, inputs: Inputs, device: str, staging: Path) -> dict:
    """The merge and its check on `device`; under MERGE_DEVICE=auto, on the CPU after running out of GPU memory."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        return _merge_and_check(s, inputs, device, staging)
    except torch.cuda.OutOfMemoryError:
        if s.merge_device != "auto":
            raise
        log.warning("out of GPU memory while merging; merging on CPU instead")
        shutil.rmtree(staging, ignore_errors=True)
        _free()
        return _merge_and_check(s, inputs, "cpu", staging)


def _add_measures(result: dict, s: Settings, quantized: list[torch.Tensor] | None, started: float) -> None:
    """Add the gap to the training-time model, the time and the peak memory to the merge result, and log it."""
    device = result["device"]
    reference = result.pop("_reference")
    gap = _gap(quantized, reference) if quantized is not None else None
    result.update(gap_4bit=gap and gap[0], relative_gap_4bit=gap and gap[1], top1_agreement_4bit=gap and gap[2])
    result.update(training_quantization=s.quantization, seconds=round(time.time() - started, 1), **_peak(device))
    result["peak_memory_gib"] = result["peak_gpu_gib"] if device == "cuda" else result["peak_cpu_rss_gib"]
    log.info("merge check: %s", describe(result, s.quantization))
    log.info("merged on %s in %s; peak memory %.2f GiB (process RSS %.2f GiB%s)", device, result["dtype"],
             result["peak_memory_gib"], result["peak_cpu_rss_gib"],
             f", GPU {result['peak_gpu_gib']:.2f} GiB" if result["peak_gpu_gib"] is not None else "")


def describe(result: dict, quantization: str) -> str:
    """One line for the log: the weight check, the logit check against its bound, and what failed."""
    weights = (f"weights off base + adapter by at most {result['max_rounding_steps']:.3g} {result['dtype']} "
               f"rounding steps, {result['weight_error_of_bound']:.3g} of the bound "
               f"({result['adapted_tensors']} adapted tensors, {result['tensors_compared']} compared)"
               if result.get("weights_checked") and result.get("tensors_compared") is not None
               else "weights not checked (the base has no safetensors files)" if not result.get("weights_checked")
               else "weights not compared")
    line = weights
    if result.get("max_abs_logit_gap") is not None:
        line += (f"; logits: max gap to the unmerged base + adapter {result['max_abs_logit_gap']:.4g} "
                 f"({100 * result['relative_gap']:.3g}% of the largest logit {result['logit_scale']:.3g}), bound "
                 f"{result['logit_bound']:.4g} ({verify.TWIN_MARGIN:g}x what one rounding step on every adapted "
                 f"weight moves them); top-1 agreement {100 * result['top1_agreement']:.1f}%")
    if result.get("gap_4bit") is not None:
        line += f"; gap to the {quantization} training-time model {result['gap_4bit']:.4g}"
    return line + ("" if result["passed"] else " -- FAILED: " + "; ".join(result["problems"]))


def merge_weights(tuned):
    """Fold the adapter into the base weights (a seam for tests to break the merge on purpose)."""
    return tuned.merge_and_unload(safe_merge=True)


def save_merged(merged, tokenizer, staging: Path, max_shard_size: str) -> None:
    """Write the merged model and its tokenizer (a seam for tests to damage the saved folder)."""
    staging.mkdir(parents=True)
    merged.save_pretrained(staging, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staging)


@dataclass
class Merged:
    """What merging showed, for the checks of the saved folder (the models themselves are freed)."""
    tied: set[str]  # weights tied to another, which the saved model need not hold (verify.check_weights)
    reference: list[torch.Tensor]  # logits of base + adapter, unmerged
    logits: list[torch.Tensor]  # logits of the merged model
    twin: list[torch.Tensor]  # logits with every adapted weight one rounding step off (rounding_twin_logits)


@dataclass
class Reloaded:
    """What the saved folder shows, loaded back as users load it."""
    dtype: torch.dtype
    forward: dict  # verify.compare_logits against the merged model and the unmerged reference
    eos_ids: list[int]
    chat_template: str | None
    pad_token_id: int | None
    sample: dict | None  # a chat-templated prompt and what it generated; None without the training template


def _merge_and_check(s: Settings, inputs: Inputs, device: str, staging: Path) -> dict:
    """Merge on `device` into `staging`, then check the saved folder: merge.json's result (passed, checks,
    problems, measures), with the unmerged reference logits under "_reference"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = merge_dtype(s, inputs.path, device)
    log.info("merging on %s in %s (MERGE_DEVICE=%s, MERGE_DTYPE=%s)", device, verify._name(dtype), s.merge_device,
             s.merge_dtype)
    merged = _merge_into(staging, s, inputs, device, dtype)
    _free()
    weights = verify.check_weights(staging, inputs.path, Path(inputs.adapter), dtype, device, merged.tied)
    try:
        # The artifact as users will load it: plain Auto classes, no dtype argument (the saved one is used).
        loaded = AutoModelForCausalLM.from_pretrained(staging, device_map=_device_map(device),
                                                      trust_remote_code=s.trust_remote_code)
        loaded_tokenizer = AutoTokenizer.from_pretrained(staging, trust_remote_code=s.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as error:
        problems = [*weights["problems"],
                    f"the saved model does not load with AutoModelForCausalLM: {str(error).splitlines()[0]}"]
        return _failed_load(device, dtype, weights, problems, merged.reference)
    reloaded = _run_reloaded(loaded, loaded_tokenizer, s, inputs, merged, dtype)
    del loaded
    _free()
    checks = {
        "weights_match": not weights["problems"],
        "finite": reloaded.forward["finite"],
        "loads_as_merged": reloaded.forward["loads_as_merged"],
        "logits_within_rounding": reloaded.forward["logits_within_rounding"],
        "saved_dtype": reloaded.dtype == dtype,
        "chat_template_saved": reloaded.chat_template == inputs.chat_template,
        "eos_in_generation_config": (inputs.tokenizer.eos_token_id in reloaded.eos_ids
                                     and inputs.end_of_turn in reloaded.eos_ids),
    }
    return {
        "device": device,
        "dtype": verify._name(dtype),
        **{k: v for k, v in weights.items() if k != "problems"},
        **{k: v for k, v in reloaded.forward.items() if k not in checks},
        "rows_compared": len(inputs.rows),
        "tokens_compared": sum(r.shape[1] for r in inputs.rows),
        "passed": all(checks.values()),
        "checks": checks,
        "problems": weights["problems"] + _check_problems(checks, reloaded, inputs, dtype),
        "eos_token_id": reloaded.eos_ids,
        "end_of_turn_id": inputs.end_of_turn,
        "pad_token_id": reloaded.pad_token_id,
        "files": sorted(p.name for p in staging.iterdir()),
        "generation": reloaded.sample,
        "_reference": merged.reference,
    }


def _merge_into(staging: Path, s: Settings, inputs: Inputs, device: str, dtype: torch.dtype) -> Merged:
    """The base in `dtype` with the adapter folded in, saved to `staging` with the tokenizer, the training chat
    template and a generation config that stops at EOS and the end-of-turn token; the logits the checks need."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(inputs.path, dtype=dtype, device_map=_device_map(device),
                                                trust_remote_code=s.trust_remote_code)
    tied = set(base._tied_weights_keys or {}) if base.config.get_text_config().tie_word_embeddings else set()
    # peft would read the adapter onto the GPU by default, even for a CPU merge on a full GPU
    tuned = PeftModel.from_pretrained(base, inputs.adapter, torch_device="cuda:0" if device == "cuda" else "cpu")
    tuned.eval()
    adapted = [name.removeprefix(verify.ADAPTER_PREFIX) for name, module in tuned.named_modules()
               if isinstance(module, LoraLayer)]
    reference = logits(tuned, inputs.rows)
    merged = merge_weights(tuned)
    merged_logits = logits(merged, inputs.rows)
    tokenizer = inputs.tokenizer
    merged.generation_config = generation_config(inputs.path, merged, tokenizer, inputs.end_of_turn)
    set_distinct_pad(tokenizer, _as_list(merged.generation_config.eos_token_id))
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.chat_template = inputs.chat_template
    save_merged(merged, tokenizer, staging, s.merge_max_shard_size)
    return Merged(tied, reference, merged_logits, rounding_twin_logits(merged, adapted, inputs.rows))


def _run_reloaded(loaded, loaded_tokenizer, s: Settings, inputs: Inputs, merged: Merged,
                 dtype: torch.dtype) -> Reloaded:
    """The saved model, loaded back: its logits against the merged model's, and a chat-templated prompt generated."""
    loaded.eval()
    forward = verify.compare_logits(logits(loaded, inputs.rows), merged.logits, merged.twin, merged.reference, dtype)
    eos_ids = _as_list(loaded.generation_config.eos_token_id)
    sample = None
    if loaded_tokenizer.chat_template == inputs.chat_template:
        prompt = loaded_tokenizer.apply_chat_template(inputs.messages, add_generation_prompt=True, tokenize=False)
        # no eos_ids: the saved generation config must stop it; a few tokens prove it generates (the prompt test
        # in evaluation already generated MAX_NEW_TOKENS from the trained model)
        text, new = generate(loaded, loaded_tokenizer, prompt, min(s.max_new_tokens, CHECK_NEW_TOKENS))
        sample = {"prompt": prompt, "output": text, "new_tokens": len(new),
                  "stopped_at_eos": bool(new) and new[-1] in eos_ids}
    return Reloaded(loaded.dtype, forward, eos_ids, loaded_tokenizer.chat_template, loaded_tokenizer.pad_token_id,
                    sample)


def _check_problems(checks: dict, reloaded: Reloaded, inputs: Inputs, dtype: torch.dtype) -> list[str]:
    """What each failed check of the saved folder means (the weight check names its own problems)."""
    forward, problems = reloaded.forward, []
    if not checks["finite"]:
        problems.append("the logits are not finite" + (
            f" (MERGE_DTYPE={verify._name(dtype)} overflows: use MERGE_DTYPE=bfloat16)"
            if dtype == torch.float16 else ""))
    if checks["finite"] and not checks["loads_as_merged"]:
        problems.append(f"loaded back, the saved model's logits differ from the merged model's by "
                        f"{forward['reload_gap']:.4g} (bound {forward['reload_bound']:.4g}): its config or weights "
                        "were not saved as merged")
    if checks["finite"] and not checks["logits_within_rounding"]:
        problems.append(f"max |logit gap| to the unmerged base + adapter {forward['max_abs_logit_gap']:.4g} exceeds "
                        f"{verify.TWIN_MARGIN:g}x the gap of one rounding step on every adapted weight "
                        f"({forward['rounding_twin_gap']:.4g})")
    if not checks["saved_dtype"]:
        problems.append(f"the saved model loads as {verify._name(reloaded.dtype)}, not MERGE_DTYPE="
                        f"{verify._name(dtype)}")
    if not checks["chat_template_saved"]:
        problems.append("the saved tokenizer lacks the chat template used in training")
    if not checks["eos_in_generation_config"]:
        problems.append(f"generation_config.eos_token_id={reloaded.eos_ids} lacks EOS {inputs.tokenizer.eos_token_id} "
                        f"or the end-of-turn token {inputs.end_of_turn}")
    return problems


def _failed_load(device: str, dtype: torch.dtype, weights: dict, problems: list[str], reference) -> dict:
    return {"device": device, "dtype": verify._name(dtype), **{k: v for k, v in weights.items() if k != "problems"},
            "max_abs_logit_gap": None, "passed": False,
            "checks": {"weights_match": not weights["problems"], "loads": False}, "problems": problems,
            "_reference": reference}


def rounding_twin_logits(merged, adapted: list[str], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits after moving every adapted weight one rounding step up or down at random, in place (the merged
    model is saved already): how far rounding alone moves this model's logits (job.verify)."""
    generator = torch.Generator().manual_seed(0)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name in adapted:
            verify.nudge(modules[name].weight.data, generator)
    return logits(merged, rows)


def _training_time_logits(s: Settings, path: str, adapter: str, rows: list[torch.Tensor]):
    """Logits of the model as trained (QUANTIZATION base + adapter), or None where it cannot be loaded."""
    from peft import PeftModel

    try:
        device_map = {"": 0} if torch.cuda.is_available() else None
        base = model.load_model(s, path, quantized=True, device_map=device_map)
        tuned = PeftModel.from_pretrained(base, adapter)
        tuned.eval()
        result = logits(tuned, rows)
    except (RuntimeError, ImportError, ValueError, OSError, ConfigError) as error:
        log.warning("could not load the %s training-time model to report its gap (%s); the merge check itself "
                    "does not need it", s.quantization, str(error).splitlines()[0][:200])
        result = None
    base = tuned = None
    _free()
    return result


# -------------------------------------------------------------------------------------- pieces

def merge_dtype(s: Settings, path: str, device: str) -> torch.dtype:
    """MERGE_DTYPE, or by default the base checkpoint's own dtype (bfloat16 where it does not say); a bfloat16
    merge on a GPU without bfloat16 becomes float16 there."""
    if s.merge_dtype != "auto":
        return getattr(torch, s.merge_dtype)
    dtype = checkpoint_dtype(path, s.trust_remote_code) or torch.bfloat16
    if dtype == torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


def checkpoint_dtype(path: str, trust_remote_code: bool = False) -> torch.dtype | None:
    """The floating dtype a checkpoint is stored in: its config's dtype, else its first weight's."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stated, str):
        stated = getattr(torch, stated, None)
    if isinstance(stated, torch.dtype) and stated.is_floating_point:
        return stated
    folder = verify.checkpoint_folder(path)
    if folder is not None:
        with verify.SafetensorsFolder(folder) as tensors:
            for name in sorted(tensors.names()):
                tensor = tensors.get(name)
                if tensor.is_floating_point():
                    return tensor.dtype
    return None


def choose_device(s: Settings, config, path: str, budget_gib: float = 0.0) -> str:
    """cpu or cuda for the merge: the GPU when the memory it may use (free, or GPU_MEMORY_GIB) holds the model."""
    if s.merge_device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("MERGE_DEVICE=cuda but no CUDA GPU is visible; use auto or cpu")
        return "cuda"
    if s.merge_device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    width = merge_dtype(s, path, "cuda").itemsize
    need = _parameter_count(config, s) * width * 1.2 + 2 * 2**30  # weights, loading slack, activations
    free = torch.cuda.mem_get_info()[0]
    room = min(free, budget_gib * 2**30) if budget_gib else free
    if room < need:
        log.info("GPU memory is short for the merge (%.1f GiB %s, ~%.1f GiB needed): merging on CPU", room / 2**30,
                 "under GPU_MEMORY_GIB" if s.gpu_memory_gib else "free", need / 2**30)
        return "cpu"
    return "cuda"


def _parameter_count(config, s: Settings) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=s.trust_remote_code)
    return sum(p.numel() for p in skeleton.parameters())


def _device_map(device: str):
    return {"": 0} if device == "cuda" else None


def verification_rows(prepared) -> list[torch.Tensor]:
    """The first evaluation rows (training rows when there is no evaluation split), as [1, n] id tensors."""
    source = prepared.eval if prepared.eval is not None and len(prepared.eval) else prepared.train
    count = min(VERIFY_ROWS, len(source))
    return [torch.tensor([source[i]["input_ids"][:VERIFY_TOKENS]]) for i in range(count)]


@torch.no_grad()
def logits(lm, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(lm.parameters()).device
    return [lm(input_ids=row.to(device)).logits.float().cpu() for row in rows]


def _gap(candidate: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float, float]:
    """Max |logit gap|, that as a share of the largest reference logit, and top-1 agreement."""
    gap = max((c - r).abs().max().item() for c, r in zip(candidate, reference))
    scale = max(r.abs().max().item() for r in reference)
    agree = torch.cat([(c.argmax(-1) == r.argmax(-1)).flatten() for c, r in zip(candidate, reference)])
    return gap, gap / max(scale, 1e-6), agree.float().mean().item()


def generation_config(path: str, merged, tokenizer, end_of_turn: int | None):
    """The base's generation config (sampling defaults kept) with EOS and the end-of-turn token as stops."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:
        config = GenerationConfig.from_model_config(merged.config)
    ids = [tokenizer.eos_token_id, end_of_turn, *_as_list(config.eos_token_id)]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def set_distinct_pad(tokenizer, eos_ids: list[int]) -> None:
    """Padding must not be a stop token where the vocabulary offers another (batched generation and
    collators that mask pad would otherwise hide EOS); no token is added, so embeddings keep their size."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *PAD_CANDIDATES):
        if candidate and candidate in vocab and vocab[candidate] not in eos_ids:
            tokenizer.pad_token = candidate
            return
    log.warning("the pad token is a stop token (%s) and the vocabulary has no other to use", tokenizer.pad_token)


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the process's peak RSS (VmHWM), so the peak is the merge's own
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak(device: str) -> dict:
    rss_kib = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss_kib = int(line.split()[1])
    except OSError:
        pass
    if rss_kib is None:
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"peak_cpu_rss_gib": round(rss_kib / 2**20, 3), "peak_gpu_gib": None if gpu is None else round(gpu, 3)}
