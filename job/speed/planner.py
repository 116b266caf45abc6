"""The planner: every lever chosen from the settings (a forced value wins), the model's shape and a `Device`, with
the reason for each. A pure function of its arguments, so CPU tests can ask what an H100 with 8 GiB free would get;
`job preflight` prints its answer."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from job.config import SHARDED, Settings
from job.errors import ConfigError
from job.speed.device import Device, GiB, apply_memory_cap, probe
from job.speed.levers import VARLEN, Levers, capabilities, liger_supports
from job.speed.longcontext import decide
from job.speed.memory import (
    estimate_gib,
    offloadable_layers,
    pinned_layer_bytes,
    usable_gib,
)
from job.speed.shape import Shape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepModel:
    """The step-time model behind the plan, in token-equivalents of GPU time (~65 us a token for Llama-3-8B on an
    H100): a micro-step costs max(host, GPU). Fitted to `job bench` runs on H100s (docs/performance-history.md);
    `job bench --variant 'NAME:step.cpu_tokens=6000'` plans with other values, to time the plan they would pick."""

    # the host side (Python and the dispatch of ~10^4 operations), about 0.31 s a micro-step whatever the tokens:
    # why 1 row x 4 micro-steps is slower than 4 rows x 1, and why the plan rarely splits a step
    cpu_tokens: float = 4800
    # every layer recomputed: extra GPU time and extra host time (its forward is dispatched again), relative to
    # the step without recomputation
    recompute_gpu: float = 0.34
    recompute_cpu: float = 0.33
    offload_cost: float = 0.16          # checkpoints to pinned CPU memory and back, per token
    head_stream_tokens: float = 1000    # the output layer over PCIe twice a micro-step (2 x 1 GiB at ~25 GB/s)
    input_gather_tokens: float = 850    # the input rows gathered and pinned on the CPU before the GPU starts

    def cost(self, tokens: int, recomputed: int, layers: int, offload: bool = False, streamed_head: bool = False,
             cpu_input: bool = False) -> float:
        """Relative time per token of a micro-step (lower is faster): max(host, GPU) over the tokens."""
        share = recomputed / max(1, layers)
        gpu = tokens * (1 + self.recompute_gpu * share + (self.offload_cost if offload else 0.0))
        gpu += (self.head_stream_tokens if streamed_head else 0) + (self.input_gather_tokens if cpu_input else 0)
        host = self.cpu_tokens * (1 + self.recompute_cpu * share)
        return max(gpu, host) / tokens


def _flag(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "true"


def choose(s: Settings, shape: Shape, device: Device, caps: dict | None = None,
           step: StepModel = StepModel()) -> Levers:
    """Pick every lever from the settings (a forced value wins), the model's shape and the device."""
    caps = capabilities() if caps is None else caps
    why: dict[str, str] = {}
    lv = Levers(device=device.name if device.cuda else "cpu", budget_gib=device.budget_gib)

    _choose_attention(s, shape, device, caps, lv, why)
    _choose_liger(s, shape, device, caps, lv, why)
    _choose_lora_kernels(s, device, caps, lv, why)
    lv.dataloader_workers = s.dataloader_workers if s.dataloader_workers >= 0 else (2 if device.cuda else 0)
    why["dataloader_workers"] = ("set by DATALOADER_WORKERS" if s.dataloader_workers >= 0 else
                                 "2 workers with pinned memory collate the next batch while the GPU trains"
                                 if device.cuda else "CPU: collate in the main process")

    _plan_memory(s, shape, device, lv, why, step)
    lv.reasons = why
    return lv


def _choose_attention(s: Settings, shape: Shape, device: Device, caps: dict, lv: Levers, why: dict) -> None:
    if s.attn_implementation != "auto":
        lv.attn_implementation = s.attn_implementation
        why["attn_implementation"] = "forced by ATTN_IMPLEMENTATION"
        if shape.attention_softcap and lv.attn_implementation in (VARLEN, "sdpa", "flash_attention_2"):
            raise ConfigError(f"ATTN_IMPLEMENTATION={lv.attn_implementation}: {shape.model_type} soft-caps attention "
                              f"scores ({shape.attention_softcap:g}), which this kernel cannot; use auto "
                              "(flex_attention on a GPU, eager on CPU)")
        need = {VARLEN: "varlen", "flex_attention": "flex", "flash_attention_2": "flash_attn"}.get(lv.attn_implementation)
        if need and not caps.get(need):
            raise ConfigError(f"ATTN_IMPLEMENTATION={lv.attn_implementation} is not available here "
                              f"({'needs a CUDA GPU of compute capability 8.0+ and torch.nn.attention.varlen' if need == 'varlen' else 'package or kernel missing'}); "
                              "use auto")
    elif shape.attention_softcap or 0 < shape.sliding_window < s.max_length:
        # neither the varlen kernel nor sdpa caps scores or limits the window; flex_attention and eager do both
        lv.attn_implementation = "flex_attention" if device.cuda and caps.get("flex") else "eager"
        why["attn_implementation"] = (
            (f"attention scores soft-capped at {shape.attention_softcap:g}" if shape.attention_softcap else
             f"a {shape.sliding_window}-token sliding window shorter than MAX_LENGTH={s.max_length}")
            + f": {lv.attn_implementation} applies it (varlen and sdpa cannot)")
    elif not device.cuda:
        lv.attn_implementation = "sdpa"
        why["attn_implementation"] = "CPU: sdpa; packed rows get a per-sample mask from the restarted position_ids"
    elif not s.packing:
        lv.attn_implementation = "sdpa"
        why["attn_implementation"] = "PACKING=false: padded batches carry an attention_mask, which sdpa handles"
    elif caps.get("varlen"):
        lv.attn_implementation = VARLEN
        why["attn_implementation"] = ("packed rows: PyTorch's built-in flash varlen kernel attends within each "
                                      "sample only, no mask built (flash-attn is not installed)")
    elif caps.get("flex"):
        lv.attn_implementation = "flex_attention"
        why["attn_implementation"] = "packed rows: flex_attention skips the blocks across samples"
    else:
        lv.attn_implementation = "sdpa"
        why["attn_implementation"] = "no varlen or flex kernel in this torch"


def _choose_liger(s: Settings, shape: Shape, device: Device, caps: dict, lv: Levers, why: dict) -> None:
    liger_ok = device.cuda and caps.get("liger", False) and liger_supports(shape.model_type)
    lv.liger = _flag(s.liger, liger_ok)
    if s.liger == "true" and not liger_ok:
        raise ConfigError("LIGER=true needs a CUDA GPU, liger-kernel (requirements-gpu.txt) and a model type it "
                          f"supports ({shape.model_type}); use auto")
    why["liger"] = ("forced by LIGER" if s.liger != "auto" else
                    "fused RMSNorm, SwiGLU and RoPE kernels" if liger_ok else
                    "needs a CUDA GPU and liger-kernel (Triton)" if not device.cuda or not caps.get("liger") else
                    f"liger has no kernels for {shape.model_type}")


def _choose_lora_kernels(s: Settings, device: Device, caps: dict, lv: Levers, why: dict) -> None:
    """The fused LoRA layer, and the NF4 kernel that needs it."""
    sharded = s.strategy in SHARDED
    kernel_ok = s.quantization in ("nf4", "none") and not s.use_dora
    lv.lora_kernel = _flag(s.lora_kernel, kernel_ok and device.cuda and not sharded)
    if lv.lora_kernel and not kernel_ok:
        raise ConfigError("LORA_KERNEL=true works with QUANTIZATION=nf4 or none and without DoRA; use auto")
    lv.dropout_in_kernel = lv.lora_kernel and device.cuda and s.lora_dropout > 0 and caps.get("triton", False)
    why["lora_kernel"] = ("forced by LORA_KERNEL" if s.lora_kernel != "auto" else
                          "one autograd function per adapted layer: fewer passes over the activations" if lv.lora_kernel
                          else f"PEFT's own layers: STRATEGY={s.strategy} shards the weights the kernel reads "
                          "(untested)" if sharded and device.cuda
                          else "CPU: PEFT's own layers" if kernel_ok else
                          "PEFT's own layers: the fused layer has no DoRA magnitude" if s.use_dora else
                          "PEFT's own layers: the fused layer reads 4-bit or 16-bit weights, not int8")

    nf4_ok = lv.lora_kernel and s.quantization == "nf4" and device.cuda and caps.get("triton", False)
    lv.nf4_kernel = _flag(s.nf4_kernel, nf4_ok)
    if lv.nf4_kernel and not nf4_ok:
        raise ConfigError("NF4_KERNEL=true needs QUANTIZATION=nf4, the fused LoRA layer (LORA_KERNEL) and Triton "
                          "on a CUDA GPU; use auto")
    why["nf4_kernel"] = ("forced by NF4_KERNEL" if s.nf4_kernel != "auto" else
                         "one Triton launch per 4-bit weight instead of bitsandbytes' three" if nf4_ok else
                         "off: needs 4-bit weights, the fused LoRA layer and Triton on a CUDA GPU")


def _plan_memory(s: Settings, shape: Shape, device: Device, lv: Levers, why: dict, step: StepModel) -> None:
    """Micro batch, recomputation, weight cache and embedding offload: the fastest plan that fits the budget."""
    if not device.cuda:
        _plan_on_cpu(s, shape, lv, why)
        return
    if decide(s, s.micro_batch_size * s.max_length, device.cuda)[0]:  # the mode plans its own memory
        _plan_long_context(s, shape, device, lv, why)
        return
    if s.offload_embeddings == "true" and not shape.plain_head:
        raise ConfigError("OFFLOAD_EMBEDDINGS=true: this model scales or caps its logits, which the streamed "
                          "output layer does not do; use auto")

    def fits(plan: Levers, tokens: int) -> bool:
        return estimate_gib(shape, s, plan, tokens) <= usable_gib(device.budget_gib)

    plan, tokens = _fastest_fitting(s, shape, lv, step, fits)
    if plan is None:
        plan, tokens = _leanest(s, shape, lv), s.max_length
        why["memory"] = (f"no plan fits {device.budget_gib:.1f} GiB by the estimate; trying the leanest one "
                         "(expect an out-of-memory error on a card this small)")
    lv.tokens = tokens
    for name in ("checkpointing", "checkpoint_layers", "micro_batch_size", "grad_accum", "offload_embeddings",
                 "offload_head"):
        setattr(lv, name, getattr(plan, name))
    _plan_layer_offload(s, shape, device, lv)
    _plan_weight_cache(s, lv, fits)
    lv.estimated_peak_gib = round(estimate_gib(shape, s, lv, tokens), 1)
    _explain_memory(s, shape, device, lv, why)


def _plan_on_cpu(s: Settings, shape: Shape, lv: Levers, why: dict) -> None:
    """On CPU memory is not the limit: the settings as given, nothing recomputed unless forced."""
    lv.micro_batch_size, lv.grad_accum = s.micro_batch_size, s.grad_accum
    mode = {"auto": "none", "true": "full", "false": "none", "offload": "full"}[s.gradient_checkpointing]
    lv.checkpointing, lv.checkpoint_layers = mode, shape.layers if mode != "none" else 0
    lv.dequant_cache = s.dequant_cache == "true"
    lv.offload_embeddings = lv.offload_head = s.offload_embeddings == "true"
    why["checkpointing"] = ("forced by GRADIENT_CHECKPOINTING" if s.gradient_checkpointing != "auto" else
                            "CPU: memory is not the limit, so nothing is recomputed")
    why["micro_batch_size"] = "as configured"
    why["dequant_cache"] = "forced by DEQUANT_CACHE" if lv.dequant_cache else "off (a GPU lever)"
    why["offload_embeddings"] = "forced by OFFLOAD_EMBEDDINGS" if lv.offload_embeddings else "off (a GPU lever)"


def _checkpoint_modes(forced: str, layers: int) -> list[tuple[str, int]]:
    """(checkpointing, layers recomputed) to try, the fewest recomputed first."""
    if forced == "false":
        return [("none", 0)]
    if forced == "true":
        return [("full", layers)]
    if forced == "offload":
        return [("offload", layers)]
    return [("none", 0)] + [("partial", k) for k in range(1, layers)] + [("full", layers), ("offload", layers)]


def _embedding_options(s: Settings, shape: Shape) -> tuple:
    """(input embedding, output layer) in CPU memory, to try: the input alone costs a row gather a step; the output
    layer streams 2 x its size over PCIe a micro-step, and a tied one goes with the input."""
    both, input_only, neither = (True, True), (True, shape.tied), (False, False)
    if s.offload_embeddings != "auto":
        return (both,) if s.offload_embeddings == "true" else (neither,)
    if s.strategy in SHARDED:  # untested under sharding: not moved
        return (neither,)
    if shape.plain_head:
        return tuple(dict.fromkeys((neither, input_only, both)))
    return (neither,) if shape.tied else (neither, input_only)


def _fastest_fitting(s: Settings, shape: Shape, lv: Levers, step: StepModel, fits) -> tuple[Levers | None, int]:
    """The plan the step model says is fastest among those that fit, and its tokens a micro-batch."""
    rows, layers = s.micro_batch_size * s.grad_accum, shape.layers
    micro_options = [m for m in range(min(rows, s.micro_batch_size), 0, -1) if rows % m == 0]
    best = (math.inf, None, 0)
    for offload_embeddings, offload_head in _embedding_options(s, shape):
        for m in micro_options:
            tokens = m * s.max_length
            for mode, k in _checkpoint_modes(s.gradient_checkpointing, layers):
                plan = dataclasses.replace(lv, checkpointing=mode, checkpoint_layers=k, micro_batch_size=m,
                                           grad_accum=rows // m, offload_embeddings=offload_embeddings,
                                           offload_head=offload_head, dequant_cache=False)
                if fits(plan, tokens):
                    cost = step.cost(tokens, k, layers, mode == "offload", offload_head, offload_embeddings)
                    if best[1] is None or cost < best[0] - 1e-9:
                        best = (cost, plan, tokens)
                    break  # fewer recomputed layers at this micro batch did not fit; more only cost time
    return best[1], best[2]


def _leanest(s: Settings, shape: Shape, lv: Levers) -> Levers:
    """When nothing fits by the estimate: one row a micro-step, everything recomputed and moved that may be."""
    forced = s.gradient_checkpointing
    return dataclasses.replace(lv, checkpointing="offload" if forced in ("auto", "offload") else
                               {"true": "full", "false": "none"}[forced],
                               checkpoint_layers=0 if forced == "false" else shape.layers, micro_batch_size=1,
                               grad_accum=s.micro_batch_size * s.grad_accum,
                               offload_embeddings=s.offload_embeddings != "false",
                               offload_head=s.offload_embeddings != "false" and shape.plain_head)


def _plan_layer_offload(s: Settings, shape: Shape, device: Device, lv: Levers) -> None:
    """The first recomputed layers' activations to pinned CPU memory instead: their copies out and back overlap the
    recomputed layers' forward and backward, within the GPU memory the kept layers use at other times."""
    lv.offloaded_layers = 0
    if lv.checkpointing != "partial" or s.offload_layers == 0:
        return
    wanted = (s.offload_layers if s.offload_layers > 0 else
              0 if s.strategy in SHARDED else  # gathered shards would look like activations: untested
              offloadable_layers(lv.checkpoint_layers, shape.layers, pinned_layer_bytes(shape, lv.tokens),
                                 device.host_gib))
    lv.offloaded_layers = min(wanted, lv.checkpoint_layers)
    lv.checkpoint_layers -= lv.offloaded_layers
    if lv.checkpoint_layers == 0:
        lv.checkpointing = "none"


def _plan_weight_cache(s: Settings, lv: Levers, fits) -> None:
    """The 16-bit weight cache saves two dequantizations per layer and step, on the host and on the GPU (+6% on an
    H100, docs/performance.md), for a copy of every adapted weight (13 GiB for 8B): auto takes it only where
    nothing is recomputed and the copy still fits, since memory given to activations pays more."""
    cache_ok = s.quantization == "nf4" and lv.lora_kernel
    if s.dequant_cache == "true" and not cache_ok:
        raise ConfigError("DEQUANT_CACHE=true needs QUANTIZATION=nf4 and the fused LoRA kernel (LORA_KERNEL)")
    cached = dataclasses.replace(lv, dequant_cache=True)
    lv.dequant_cache = cache_ok and (s.dequant_cache == "true" or s.dequant_cache == "auto" and (
        lv.checkpointing == "none" and fits(cached, lv.tokens)))


def _explain_memory(s: Settings, shape: Shape, device: Device, lv: Levers, why: dict) -> None:
    """The reasons `job preflight` prints for the memory levers of the plan."""
    where = f"{device.budget_gib:.1f} GiB {'cap' if device.capped else 'free'}"
    pinned = lv.offloaded_layers * pinned_layer_bytes(shape, lv.tokens) / GiB
    why["offloaded_layers"] = (
        f"the first {lv.offloaded_layers} layers' activations go to pinned CPU memory in the forward and come back "
        f"in the backward instead of being recomputed (~{pinned:.0f} GiB of CPU memory)" if lv.offloaded_layers else
        "forced off by OFFLOAD_LAYERS=0" if s.offload_layers == 0 else
        "none: only where a plan recomputes some layers and keeps others" if lv.checkpointing != "partial" else
        f"none: STRATEGY={s.strategy} gathers weight shards inside each layer (untested)" if s.strategy in SHARDED
        else "none: min(recomputed, kept, layers / 4, what half the free CPU memory holds) is 0")
    why["checkpointing"] = _checkpointing_reason(s, shape, lv, where)
    rows = s.micro_batch_size * s.grad_accum
    split = " (split: the fastest plan that fits)" if lv.micro_batch_size < s.micro_batch_size else ""
    why["micro_batch_size"] = (f"{lv.micro_batch_size} rows x {lv.grad_accum} accumulation steps = the configured "
                               f"{rows} rows per optimizer step{split}")
    copy = f"{shape.linear_params * 2 / GiB:.1f} GiB"
    why["dequant_cache"] = ("forced by DEQUANT_CACHE" if s.dequant_cache != "auto" else
                            f"a 16-bit copy of the 4-bit weights ({copy}) fits beside the plan: no dequantizing "
                            "per pass" if lv.dequant_cache else
                            "off: needs the fused LoRA kernel and 4-bit weights"
                            if not (s.quantization == "nf4" and lv.lora_kernel) else
                            f"off: the 16-bit copy ({copy}) would not fit without recomputing layers")
    table = shape.embedding_params * 2 / GiB
    why["offload_embeddings"] = ("forced by OFFLOAD_EMBEDDINGS" if s.offload_embeddings != "auto" else
                                 f"the input embedding and the output layer ({2 * table:.1f} GiB) move to CPU memory "
                                 "(the output layer streamed in chunks): nothing fits with them on the GPU"
                                 if lv.offload_head and not shape.tied else
                                 f"the input embedding ({table:.1f} GiB) moves to CPU memory (a row gather a step): "
                                 "it buys a faster plan" if lv.offload_embeddings else "kept on the GPU")
    why["estimate"] = f"estimated peak {lv.estimated_peak_gib} GiB of {where}"


def _checkpointing_reason(s: Settings, shape: Shape, lv: Levers, where: str) -> str:
    if s.gradient_checkpointing != "auto":
        return "forced by GRADIENT_CHECKPOINTING"
    if lv.checkpoint_layers + lv.offloaded_layers == 0:
        return f"everything fits in {where}: nothing is recomputed"
    if lv.checkpointing in ("partial", "none"):
        return (f"{lv.checkpoint_layers} of {shape.layers} layers recomputed"
                + (f" and {lv.offloaded_layers} offloaded" if lv.offloaded_layers else "")
                + f": the fewest not kept that fit {lv.micro_batch_size} x {s.max_length} tokens in {where}")
    if lv.checkpointing == "full":
        return f"every layer recomputed to fit {where}"
    return f"every layer recomputed, checkpoints in pinned CPU memory, to fit {where}"


def _plan_long_context(s: Settings, shape: Shape, device: Device, lv: Levers, why: dict) -> None:
    """Long-context mode recomputes every layer from checkpoints in pinned CPU memory and keeps the embeddings
    on the GPU (its chunked layers and the streamed output layer do not mix); its own plan estimates memory."""
    if s.offload_embeddings == "true":
        raise ConfigError("OFFLOAD_EMBEDDINGS=true does not combine with the long-context mode (LONG_CONTEXT="
                          f"{s.long_context}, MAX_LENGTH={s.max_length}): use auto or false")
    lv.checkpointing, lv.checkpoint_layers, lv.long_context = "offload", shape.layers, True
    lv.micro_batch_size, lv.grad_accum = s.micro_batch_size, s.grad_accum
    lv.offload_embeddings = lv.offload_head = lv.dequant_cache = False
    lv.estimated_peak_gib = 0.0
    mode = ("LONG_CONTEXT=on" if s.long_context == "on" else
            f"{s.micro_batch_size * s.max_length:,} tokens a micro-batch")
    for name in ("checkpointing", "micro_batch_size", "offload_embeddings", "dequant_cache"):
        why[name] = f"long-context mode ({mode}): see long_context"
    why["estimate"] = "long-context mode: see long_context for its GPU and CPU memory estimate"


def plan(s: Settings, config, device: Device | None = None, step: StepModel = StepModel()) -> Levers:
    """The levers for these settings and this model config on this machine."""
    device = device or probe(s.gpu_memory_gib)
    return choose(s, Shape.of(config), device, step=step)


def setup(s: Settings, config) -> Levers:
    """For a training process: probe the device, cap its memory if asked, choose and log the levers."""
    device = probe(s.gpu_memory_gib)
    apply_memory_cap(device)
    levers = choose(s, Shape.of(config), device)
    log.info("speed levers: %s", ", ".join(f"{k}={v}" for k, v in levers.summary().items() if k != "why"))
    for name, reason in levers.reasons.items():
        log.info("  %s: %s", name, reason)
    return levers
