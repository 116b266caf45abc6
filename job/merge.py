"""The merge stage: final adapter + 16-bit base -> OUTPUT_DIR/merged, verified before anything is pushed.

Runs in one process after training has finished on every rank (`job run` trains in child processes
and merges in the parent; `job merge` alone does the same). Steps:

1. Logits of the training-time model (base quantized as QUANTIZATION says, plus the adapter) on a few
   evaluation rows: the gap to them is reported, not gated (quantization error is expected).
2. The base in 16-bit (bf16; fp16 on GPUs without bf16), never the 4-bit one: merging into a
   dequantized 4-bit base bakes the quantization error into every weight. Adapter applied unmerged
   -> reference logits. Then `merge_and_unload`.
3. Saved to a staging folder as sharded safetensors with the tokenizer, the training chat template,
   a generation config whose eos_token_id holds EOS and the end-of-turn token, and a model card.
4. Loaded back with plain AutoModelForCausalLM / AutoTokenizer; its logits must match the reference
   within MERGE_TOLERANCE; a chat-templated prompt is generated from it. Only then is the folder
   sealed into OUTPUT_DIR/merged. A failed check raises VerifyFailed (exit 4): nothing is pushed.

The tolerance is relative: max |merged - reference| over every vocabulary entry and position must
be at most MERGE_TOLERANCE x max |reference logit|. Both sides run in 16-bit, and differ only in
rounding: the merged weights are W + BA*scale rounded once to 16-bit, the reference keeps them apart.
bf16 has an 8-bit significand (a relative step of 0.4-0.8%), so a correct merge lands within one to a
few steps of the largest logit. The default 0.03 allows about four to eight such steps of
accumulated rounding through a deep model, and is still several times smaller than the gap a
broken merge produces: merging into the 4-bit weights, a missing or doubled adapter, a layer left
out. On the built-in tiny model we measured 0.0074 (one bf16 step) for the merge against 0.17 for
the 4-bit training-time model.

Merging on CPU: MERGE_DEVICE=auto uses the GPU only when its free memory holds the 16-bit model
with room to spare, and falls back to CPU on a CUDA out-of-memory error, so a long training run is
never lost to the merge. The log and merge.json say which device was used and the peak memory.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from job import checkpoint, data, model
from job.checkpoint import Layout
from job.config import Settings
from job.errors import ConfigError, VerifyFailed
from job.evaluate import generate

log = logging.getLogger("job.merge")

VERIFY_ROWS = 4  # evaluation rows compared
VERIFY_TOKENS = 128  # tokens per row: logits of every position over the whole vocabulary are compared
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


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
    from transformers import AutoConfig, AutoTokenizer

    path = model.resolve(s.base_model)
    adapter = str(layout.adapter)
    meta = checkpoint.read_json(layout.adapter / "job.json") or {}
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=s.trust_remote_code)
    base_config = AutoConfig.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    from accelerate import PartialState

    prepared = data.load(s, tokenizer, base_config.model_type, layout.cache, PartialState())
    end_of_turn = meta.get("end_of_turn_id", prepared.end_of_turn_id)
    rows = verification_rows(prepared)
    messages = prepared.samples[0]["messages"] if prepared.samples else [{"role": "user", "content": "Hello!"}]

    _free()  # what evaluation left in this process's GPU cache
    device = choose_device(s, base_config)
    _reset_peak()
    quantized = _training_time_logits(s, path, adapter, rows)
    staging = layout.root / ".merged.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result = _merge_and_check(s, path, adapter, tokenizer, prepared.chat_template, end_of_turn, rows,
                                  messages, device, staging)
    except torch.cuda.OutOfMemoryError:
        if s.merge_device != "auto":
            raise
        log.warning("out of GPU memory while merging; merging on CPU instead")
        shutil.rmtree(staging, ignore_errors=True)
        _free()
        device = "cpu"
        result = _merge_and_check(s, path, adapter, tokenizer, prepared.chat_template, end_of_turn, rows,
                                  messages, device, staging)
    reference = result.pop("_reference")
    if quantized is not None:
        gap = compare(quantized, reference)
        result.update(gap_4bit=gap["max_abs_gap"], relative_gap_4bit=gap["relative_gap"],
                      top1_agreement_4bit=gap["top1_agreement"])
    else:
        result.update(gap_4bit=None, relative_gap_4bit=None, top1_agreement_4bit=None)
    result.update(training_quantization=s.quantization, seconds=round(time.time() - started, 1),
                  **_peak(device))
    result["peak_memory_gib"] = result["peak_gpu_gib"] if device == "cuda" else result["peak_cpu_rss_gib"]

    log.info("merge check: max |logit gap| merged vs 16-bit base+adapter = %.4g (%.3g%% of the largest logit "
             "%.3g; tolerance %.3g%%)%s; gap to the %s training-time model: %s", result["max_abs_logit_gap"],
             100 * result["relative_gap"], result["logit_scale"], 100 * s.merge_tolerance,
             "" if result["passed"] else " FAILED", s.quantization,
             "n/a" if result["gap_4bit"] is None else
             f"{result['gap_4bit']:.4g} ({100 * result['relative_gap_4bit']:.3g}%)")
    log.info("merged on %s in %s; peak memory %.2f GiB (process RSS %.2f GiB%s)", device, result["dtype"],
             result["peak_memory_gib"], result["peak_cpu_rss_gib"],
             f", GPU {result['peak_gpu_gib']:.2f} GiB" if result["peak_gpu_gib"] is not None else "")
    if not result["passed"]:
        shutil.rmtree(staging, ignore_errors=True)
        checkpoint.write_json(metrics_path, result)
        raise VerifyFailed("the merged model does not match base + adapter: " + "; ".join(result["problems"])
                           + ". Nothing was pushed; the adapter is intact in " + adapter)
    from job.publish import model_card

    (staging / "README.md").write_text(model_card(s, layout, "merged", merge_metrics=result), encoding="utf-8")
    result["merged_dir"] = str(layout.merged)
    checkpoint.write_json(metrics_path, result)  # first: a merged/ that is complete always has its metrics
    checkpoint.seal(staging, layout.merged)
    log.info("merged model saved: %s", layout.merged)
    return result


def merge_weights(tuned):
    """Fold the adapter into the 16-bit weights (a seam for tests to break the merge on purpose)."""
    return tuned.merge_and_unload(safe_merge=True)


def _merge_and_check(s: Settings, path: str, adapter: str, tokenizer, chat_template: str, end_of_turn: int,
                     rows: list[torch.Tensor], messages: list[dict], device: str, staging: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = merge_dtype(device)
    log.info("merging on %s in %s (MERGE_DEVICE=%s)", device, str(dtype).removeprefix("torch."), s.merge_device)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=_device_map(device),
                                                trust_remote_code=s.trust_remote_code)
    # peft would read the adapter onto the GPU by default, even for a CPU merge on a full GPU
    tuned = PeftModel.from_pretrained(base, adapter, torch_device="cuda:0" if device == "cuda" else "cpu")
    tuned.eval()
    reference = logits(tuned, rows)
    merged = merge_weights(tuned)
    merged.generation_config = generation_config(path, merged, tokenizer, end_of_turn)
    set_distinct_pad(tokenizer, _as_list(merged.generation_config.eos_token_id))
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.chat_template = chat_template
    staging.mkdir(parents=True)
    merged.save_pretrained(staging, max_shard_size=s.merge_max_shard_size)
    tokenizer.save_pretrained(staging)
    del merged, tuned, base
    _free()

    # The artifact as users will load it: plain Auto classes, no dtype argument (the saved one is used).
    loaded = AutoModelForCausalLM.from_pretrained(staging, device_map=_device_map(device),
                                                  trust_remote_code=s.trust_remote_code)
    loaded_tokenizer = AutoTokenizer.from_pretrained(staging, trust_remote_code=s.trust_remote_code)
    loaded_dtype = loaded.dtype
    loaded.eval()
    gap = compare(logits(loaded, rows), reference)
    eos_ids = _as_list(loaded.generation_config.eos_token_id)
    prompt = loaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text, new = generate(loaded, loaded_tokenizer, prompt, s.max_new_tokens)  # no eos_ids: the saved ones stop it
    sample = {"prompt": prompt, "output": text, "new_tokens": len(new),
              "stopped_at_eos": bool(new) and new[-1] in eos_ids}
    del loaded
    _free()

    scale = gap["logit_scale"]
    checks = {
        "logits_within_tolerance": gap["finite"] and gap["max_abs_gap"] <= s.merge_tolerance * scale,
        "saved_16bit": loaded_dtype in (torch.bfloat16, torch.float16),
        "chat_template_saved": loaded_tokenizer.chat_template == chat_template,
        "eos_in_generation_config": tokenizer.eos_token_id in eos_ids and end_of_turn in eos_ids,
    }
    problems = []
    if not checks["logits_within_tolerance"]:
        problems.append(f"max |logit gap| {gap['max_abs_gap']:.4g} exceeds MERGE_TOLERANCE={s.merge_tolerance} x "
                        f"largest logit {scale:.4g} = {s.merge_tolerance * scale:.4g}")
    if not checks["saved_16bit"]:
        problems.append(f"the saved model loads as {loaded_dtype}, not 16-bit")
    if not checks["chat_template_saved"]:
        problems.append("the saved tokenizer lacks the chat template used in training")
    if not checks["eos_in_generation_config"]:
        problems.append(f"generation_config.eos_token_id={eos_ids} lacks EOS {tokenizer.eos_token_id} or the "
                        f"end-of-turn token {end_of_turn}")
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_logit_gap": gap["max_abs_gap"],
        "mean_abs_logit_gap": gap["mean_abs_gap"],
        "logit_scale": scale,
        "relative_gap": gap["relative_gap"],
        "tolerance": s.merge_tolerance,
        "tolerance_abs": s.merge_tolerance * scale,
        "top1_agreement": gap["top1_agreement"],
        "rows_compared": len(rows),
        "tokens_compared": sum(r.shape[1] for r in rows),
        "passed": all(checks.values()),
        "checks": checks,
        "problems": problems,
        "eos_token_id": eos_ids,
        "end_of_turn_id": end_of_turn,
        "pad_token_id": loaded_tokenizer.pad_token_id,
        "files": sorted(p.name for p in staging.iterdir()),
        "generation": sample,
        "_reference": reference,
    }


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

def merge_dtype(device: str) -> torch.dtype:
    """16-bit always: bf16, or fp16 on GPUs without bf16. bf16 on CPU is supported (slower, but merging is
    a handful of forward passes)."""
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def choose_device(s: Settings, config) -> str:
    if s.merge_device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("MERGE_DEVICE=cuda but no CUDA GPU is visible; use auto or cpu")
        return "cuda"
    if s.merge_device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    need = _parameter_count(config, s) * 2 * 1.2 + 2 * 2**30  # 16-bit weights, loading slack, activations
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        log.info("GPU memory is short for a 16-bit merge (%.1f GiB free, ~%.1f GiB needed): merging on CPU",
                 free / 2**30, need / 2**30)
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


def compare(candidate: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Max and mean absolute logit gap, the largest reference logit, and how often the top token agrees."""
    gaps = [(c - r).abs() for c, r in zip(candidate, reference)]
    finite = all(bool(torch.isfinite(c).all()) for c in candidate)
    max_gap = max(g.max().item() for g in gaps)
    scale = max(r.abs().max().item() for r in reference)
    agree = torch.cat([(c.argmax(-1) == r.argmax(-1)).flatten() for c, r in zip(candidate, reference)])
    return {
        "max_abs_gap": max_gap if finite else float("inf"),
        "mean_abs_gap": torch.cat([g.flatten() for g in gaps]).mean().item(),
        "logit_scale": scale,
        "relative_gap": (max_gap if finite else float("inf")) / max(scale, 1e-6),
        "top1_agreement": agree.float().mean().item(),
        "finite": finite,
    }


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
