"""Long-context mode: one sequence of a few hundred thousand tokens on one GPU.

At 262,144 tokens of a Llama-3-8B shape, what stock QLoRA keeps on the GPU is far more than 80 GB: each
decoder layer's recompute checkpoint alone is 2 GiB (32 layers: 64 GiB), the MLP's 14,336-wide
intermediates are 7 GiB each, and full logits would be 64 GiB in bf16. This mode keeps none of them there:

    checkpoints   each layer's checkpoint (its input) goes to pinned CPU memory on a side CUDA stream while the
                  forward goes on, and comes back one layer ahead of the backward that needs it (prefetch), so
                  the GPU does not wait on PCIe. Hand-written: TRL's OffloadActivations and transformers'
                  save_on_cpu copy back only when autograd asks, on the compute stream.
    MLP, norms    run in token chunks by `_TokenChunks`: the forward keeps only the input, the backward
                  recomputes one chunk at a time (exact: both are per token). Inside a recomputed layer the MLP's
                  forward is skipped altogether (its output is not needed to rebuild what backward reads), so
                  chunking costs no extra FLOPs there.
    loss          TRL 1.16's fused LM head (SFTTrainer's default) already scores 4,096 tokens x 32,768 vocab
                  tiles without the full logits: used as is.
    attention     cuDNN's kernel for a row that is one sample (1.7x flash on an H100), flash varlen over
                  cu_seqlens for packed samples (kept apart without a mask); memory linear in the length. With
                  host memory to spare, the attention output and its log-sum-exp are offloaded too, so the
                  recompute does not run the attention forward a second time.
    RoPE          a length past the model's trained context is warned about (`rope_note`); positions are what
                  the model's RoPE settings give.

`decide` picks the mode (LONG_CONTEXT=auto|on|off), `plan` estimates peak GPU and CPU memory and refuses a
length that cannot fit (naming the longest that would), `apply` installs the mode on a built SFTTrainer.
`python -m job.bench.longest trial|search` runs one training step of one sequence / finds the longest that trains
(`job bench --max-length max` calls the search).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from job.config import SHARDED
from job.errors import ConfigError
from job.speed.attention import (
    LONGCTX_ATTENTION,
    attention_self_check,
    register_attention,
)
from job.speed.checkpointing import CheckpointOffload, checkpoint_through
from job.speed.device import GiB, host_budget_gib, probe
from job.speed.levers import VARLEN, varlen_available
from job.speed.memory import (
    CACHE_HOST_SHARE,
    HOST_BASE_GIB,
    HOST_SHARE,
    NORM_CHUNK,
    estimate_gpu_gib,
    longest_fitting,
    mlp_chunk,
    pinned_gib,
    usable_gib,
)
from job.speed.modules import SKIP_MLP_FAMILIES, hf_model, in_backward
from job.speed.shape import Shape

log = logging.getLogger(__name__)


AUTO_TOKENS = 65536          # auto turns the mode on from this many tokens in one micro-batch


@dataclass
class Plan:
    on: bool
    why: str
    tokens: int                      # tokens in one micro-batch (one sequence at batch 1)
    gpu_gib: float = 0.0             # estimated peak GPU memory of a step (allocator, CUDA context excluded)
    host_gib: float = 0.0            # estimated peak CPU memory of the training process
    pinned_gib: float = 0.0          # of which pinned buffers for offloaded activations
    attention_cache: bool = False    # attention outputs offloaded too (no attention forward in the recompute)
    longest: int = 0                 # the longest sequence that fits this GPU and host, in this mode
    gpu_budget_gib: float = 0.0
    host_budget_gib: float = 0.0
    rope: str | None = None          # warning when the length is past the trained context

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def micro_batch_tokens(s, stats: dict | None, micro_batch_size: int | None = None) -> int:
    """Tokens in the largest micro-batch: packed rows fill MAX_LENGTH; unpacked ones are as long as the data."""
    rows = micro_batch_size or s.micro_batch_size
    longest = s.max_length
    if stats:
        if s.packing and stats.get("train_tokens"):
            longest = min(s.max_length, int(stats["train_tokens"]))
        elif not s.packing and stats.get("tokens_max"):
            longest = min(s.max_length, int(stats["tokens_max"]))
    return rows * longest


def decide(s, tokens: int, cuda: bool) -> tuple[bool | None, str]:
    """On or off from the settings and the micro-batch's tokens alone; None when only the plain path's memory
    estimate can tell (job.speed asks this before it plans, `plan` after)."""
    if s.long_context == "off":
        return False, "LONG_CONTEXT=off"
    if s.long_context == "on":
        return True, "LONG_CONTEXT=on"
    if not cuda:
        return False, "auto: CPU training; GPU memory is not the limit"
    if s.strategy in SHARDED:
        return False, f"auto: STRATEGY={s.strategy} shards the layers this mode keeps whole (untested)"
    if tokens >= AUTO_TOKENS:
        return True, f"auto: {tokens:,} tokens in one micro-batch (>= {AUTO_TOKENS:,})"
    return None, ""


def plan(s, shape, device, stats: dict | None = None, *, levers=None, host_gib: float | None = None,
         config=None) -> Plan:
    """Whether the mode is on, and what a step needs in it: GPU and CPU memory, the longest that fits."""
    tokens = micro_batch_tokens(s, stats, getattr(levers, "micro_batch_size", None))
    host = host_budget_gib() if host_gib is None else host_gib
    cuda = getattr(device, "cuda", False)
    on, why = decide(s, tokens, cuda)
    if on is None and levers is not None and levers.estimated_peak_gib > usable_gib(device.budget_gib):
        on, why = True, (f"auto: the plain path needs ~{levers.estimated_peak_gib:.0f} GiB of "
                         f"{device.budget_gib:.0f} GiB")
    elif on is None:
        on, why = False, f"auto: {tokens:,} tokens per micro-batch fit the plain path"
    liger = bool(getattr(levers, "liger", False))
    lora_kernel = bool(getattr(levers, "lora_kernel", False))
    p = Plan(on=on, why=why, tokens=tokens, gpu_budget_gib=round(getattr(device, "budget_gib", 0.0), 1),
             host_budget_gib=round(host, 1))
    p.attention_cache = on and cuda and pinned_gib(shape, tokens, True) + HOST_BASE_GIB <= host * CACHE_HOST_SHARE
    gpu = estimate_gpu_gib(shape, s, tokens, liger=liger, lora_kernel=lora_kernel, cache=p.attention_cache)
    p.pinned_gib = round(pinned_gib(shape, tokens, p.attention_cache), 1)
    p.gpu_gib, p.host_gib = round(gpu, 1), round(p.pinned_gib + HOST_BASE_GIB, 1)
    if on:
        p.longest = longest_fitting(shape, s, device.budget_gib if cuda else math.inf, host,
                                    liger=liger, lora_kernel=lora_kernel)
    if config is not None:
        p.rope = rope_note(config, tokens)
    return p


def check_fits(p: Plan, s) -> None:
    """Refuse, before any weight is loaded, a length the long-context mode cannot fit."""
    if not p.on or not p.gpu_budget_gib:
        return
    gpu_short = p.gpu_gib > p.gpu_budget_gib * 0.95
    host_short = p.host_gib > p.host_budget_gib * HOST_SHARE
    if gpu_short or host_short:
        what = []
        if gpu_short:
            what.append(f"~{p.gpu_gib:.0f} GiB of GPU memory ({p.gpu_budget_gib:.0f} GiB free)")
        if host_short:
            what.append(f"~{p.host_gib:.0f} GiB of CPU memory ({p.host_budget_gib:.0f} GiB available)")
        longest = (f"the longest that fits here is MAX_LENGTH={p.longest // max(1, s.micro_batch_size)} "
                   f"at MICRO_BATCH_SIZE={s.micro_batch_size}" if p.longest >= 1024 else
                   "nothing of useful length fits here")
        raise ConfigError(f"MAX_LENGTH={s.max_length} x MICRO_BATCH_SIZE={s.micro_batch_size} "
                          f"({p.tokens:,} tokens per micro-batch) in long-context mode needs {' and '.join(what)}; "
                          f"{longest}")


def rope_note(config, tokens: int) -> str | None:
    """A warning when the sequence is longer than the context the model was trained on."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    trained = getattr(config, "max_position_embeddings", None)
    if not trained or tokens <= trained:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        rope = dict(getattr(rope, "__dict__", {}))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    how = {"dynamic": "dynamic NTK scaling stretches the positions past it",
           "yarn": "YaRN scaling as configured; positions past its extended range are extrapolated",
           "longrope": "LongRoPE as configured; positions past its range are extrapolated",
           "llama3": "Llama-3 RoPE scaling as configured; positions past it are extrapolated"}.get(
        kind, "positions past it are extrapolated with the same RoPE frequencies (no scaling configured)")
    return (f"sequences of {tokens:,} tokens are {tokens / trained:.1f}x the {trained:,} positions this model was "
            f"trained on (RoPE {kind}, theta {theta}): {how}; expect the model to need the training to learn them, "
            f"or set rope scaling (e.g. yarn, factor {math.ceil(tokens / trained)}) in the model's config.json")


class _Chunked:
    """What `_TokenChunks` runs: a per-token function, its chunk size and whether a recompute may skip it."""

    def __init__(self, fn, chunk: int, skip_in_recompute: bool):
        self.fn, self.chunk, self.skip_in_recompute = fn, chunk, skip_in_recompute
        self.skipped = 0  # forwards skipped inside a recompute (for the tests)


def _autocast_state(device_type: str) -> dict:
    if not torch.amp.is_autocast_available(device_type):
        return {"enabled": False}
    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class _TokenChunks(torch.autograd.Function):
    """y = fn(x) for a per-token fn, computed in token chunks; only x is kept for backward.

    Backward replays each chunk under autograd with the forward's RNG and autocast state (the same dropout masks)
    and returns the input gradient and the summed gradients of fn's trainable parameters (passed as inputs, so
    the engine accumulates them once: DDP-safe). Inside a checkpointed layer's recompute, with skip_in_recompute,
    the forward only saves x: nothing after the MLP in the layer saves anything, and early stopping ends the
    recompute right there.
    """

    @staticmethod
    def forward(ctx, run: _Chunked, x: torch.Tensor, *params):
        from torch.utils.checkpoint import get_device_states

        ctx.run, ctx.params = run, params
        ctx.device_type = x.device.type
        ctx.cpu_rng = torch.get_rng_state()
        ctx.devices, ctx.device_rng = get_device_states(x)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        if run.skip_in_recompute and in_backward():
            run.skipped += 1
            return torch.empty_like(x)
        return _run_chunks(run, x)

    @staticmethod
    def backward(ctx, grad):
        from torch.utils.checkpoint import set_device_states

        (x,) = ctx.saved_tensors
        run, params = ctx.run, ctx.params
        flat = x.detach().reshape(-1, x.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
        need_x = ctx.needs_input_grad[1]
        grad_x = torch.empty_like(flat) if need_x else None
        grad_params = [None] * len(params)
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2:]) if need]
        autocast = (torch.autocast(ctx.device_type, **{k: v for k, v in ctx.autocast.items() if k != "enabled"})
                    if ctx.autocast["enabled"] else torch.autocast(ctx.device_type, enabled=False))
        with torch.random.fork_rng(devices=ctx.devices, device_type=ctx.device_type), \
                torch.autograd.graph.saved_tensors_hooks(_identity, _identity), torch.enable_grad(), autocast:
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.devices:
                set_device_states(ctx.devices, ctx.device_rng, device_type=ctx.device_type)
            for start in range(0, flat.shape[0], run.chunk):
                piece = flat[start:start + run.chunk].unsqueeze(0).requires_grad_(need_x)
                out = run.fn(piece)
                inputs = ([piece] if need_x else []) + wanted
                grads = torch.autograd.grad(out, inputs, grad[start:start + run.chunk].view_as(out),
                                            allow_unused=True)
                if need_x:
                    grad_x[start:start + run.chunk] = grads[0].squeeze(0)
                    grads = grads[1:]
                for p, g in zip(wanted, grads):
                    if g is not None:
                        slot = _index(params, p)
                        grad_params[slot] = g if grad_params[slot] is None else grad_params[slot].add_(g)
        return (None, grad_x.view(x.shape) if need_x else None, *grad_params)


def _run_chunks(run: _Chunked, x: torch.Tensor) -> torch.Tensor:
    """fn over x's tokens, `run.chunk` at a time, into one output (no autograd graph is built by the caller)."""
    flat = x.reshape(-1, x.shape[-1])
    out = None
    for start in range(0, flat.shape[0], run.chunk):
        piece = run.fn(flat[start:start + run.chunk].unsqueeze(0)).squeeze(0)
        if out is None:
            out = piece.new_empty((flat.shape[0], piece.shape[-1]))
        out[start:start + piece.shape[0]] = piece
    return out.view(*x.shape[:-1], out.shape[-1])


def _index(params, p) -> int:
    for i, q in enumerate(params):
        if q is p:
            return i
    raise KeyError("parameter")


def _identity(t):
    return t


def chunk_module(module: torch.nn.Module, chunk: int, skip_in_recompute: bool = False) -> None:
    """Route `module`'s forward (whatever it is now: liger's, PEFT's) through `_TokenChunks`."""
    if "_longctx_forward" in module.__dict__:
        return
    inner = module.forward
    run = _Chunked(inner, chunk, skip_in_recompute)
    params = tuple(p for p in module.parameters() if p.requires_grad)

    def forward(x, *args, **kwargs):
        if args or kwargs or not x.is_floating_point() or x.dim() < 2 or x.numel() == 0:
            return inner(x, *args, **kwargs)
        if not torch.is_grad_enabled():
            return _run_chunks(run, x)  # evaluation: chunked too, the 14,336-wide intermediate never whole
        return _TokenChunks.apply(run, x, *params)

    module._longctx_forward = inner
    module.forward = forward


def _is_liger(module) -> bool:
    forward = module.__dict__.get("forward", type(module).forward)
    return "liger" in getattr(forward, "__qualname__", "").lower() or "liger" in type(module).__name__.lower()


def install(model, tokens: int, *, cache: bool, mlp_tokens: int | None = None, norm_tokens: int | None = None,
            simulate: bool = False) -> CheckpointOffload:
    """Long-context mode on a (PEFT-wrapped) model: chunked MLPs and norms, offloaded checkpoints on every
    decoder layer, the cached attention when `cache`. Idempotent per model."""
    hf = hf_model(model)
    if getattr(hf, "_longctx", None) is not None:
        return hf._longctx
    mode = CheckpointOffload(hf, cache, simulate=simulate)
    device = mode.store.device
    shape = Shape.of(hf.config)
    skip = hf.config.model_type in SKIP_MLP_FAMILIES
    mlp_tokens = mlp_tokens or mlp_chunk(shape)
    norm_tokens = norm_tokens or NORM_CHUNK
    for index, layer in enumerate(mode.layers):
        for module in layer.modules():
            module._longctx_layer, module._longctx_mode = index, mode
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        if mlp is not None:
            chunk_module(mlp, mlp_tokens, skip_in_recompute=skip)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if norm is not None and not _is_liger(norm):
                chunk_module(norm, norm_tokens)
    final_norm = getattr(getattr(hf, hf.base_model_prefix, hf), "norm", None)
    if final_norm is not None and not _is_liger(final_norm):
        chunk_module(final_norm, norm_tokens)

    # attention: per-sample kernels (packed samples apart, linear memory), the output cached when asked
    implementation = hf.config._attn_implementation
    if implementation in ("sdpa", VARLEN, LONGCTX_ATTENTION) and (varlen_available() or
                                                                         device.type == "cpu"):
        register_attention()
        try:
            hf.set_attn_implementation(LONGCTX_ATTENTION)
        except Exception as error:  # noqa: BLE001 - older or stricter checks: set the config directly
            log.debug("set_attn_implementation: %s; setting the config directly", error)
        if hf.config._attn_implementation != LONGCTX_ATTENTION:
            hf.config._attn_implementation = LONGCTX_ATTENTION
    else:
        mode.cache = mode.own_kernels = False
        log.warning("long-context mode keeps ATTN_IMPLEMENTATION=%s (no attention-output cache)", implementation)
    if mode.own_kernels and device.type == "cuda":
        problem = attention_self_check(device)
        if problem:
            mode.cache = mode.own_kernels = False
            log.warning("long-context: job.speed's attention, no attention-output cache (the self-check of this "
                        "mode's kernels failed: %s)", problem)

    checkpoint_through(mode, tokens, shape, simulate)
    return mode


def apply(trainer, s, levers=None, stats: dict | None = None, *, host_gib: float | None = None) -> dict:
    """The hook train.py calls after building the trainer: decide, and install the mode when it is on."""
    hf = hf_model(trainer.model)
    device = probe(getattr(s, "gpu_memory_gib", 0.0))
    if device.cuda and not device.capped:  # the weights are loaded by now, and the estimate counts them
        device = dataclasses.replace(device, budget_gib=device.budget_gib + torch.cuda.memory_allocated() / GiB)
    shape = Shape.of(hf.config)
    p = plan(s, shape, device, stats, levers=levers, host_gib=host_gib, config=hf.config)
    if p.rope:
        log.warning("long context: %s", p.rope)
    if not p.on:
        log.info("long-context mode off (%s)", p.why)
        return {"long_context": False, "why": p.why}
    if getattr(levers, "offload_embeddings", False):
        log.warning("long-context mode: job.speed moved the embeddings to CPU memory (its estimate does not know "
                    "this mode); set OFFLOAD_EMBEDDINGS=false: the mode's own estimate is %.1f GiB", p.gpu_gib)
    mode = install(trainer.model, p.tokens, cache=p.attention_cache)
    trainer.args.activation_checkpointing = True
    trainer.args.activation_checkpointing_kwargs = {"use_reentrant": False}
    # a step takes seconds to minutes: collate in this process rather than fork workers beside tens of GiB of
    # pinned buffers (they are MADV_DONTFORK, but torch's fallback allocator's are not ours to mark)
    trainer.args.dataloader_num_workers, trainer.args.dataloader_persistent_workers = 0, False
    log.info("long-context mode on (%s): offloaded checkpoints, chunked MLP, %s; estimated peak %.1f GiB GPU, "
             "%.1f GiB CPU; longest that fits ~%s tokens", p.why,
             "attention output cached on CPU" if mode.cache else "attention recomputed", p.gpu_gib, p.host_gib,
             f"{p.longest:,}")
    return {"long_context": True, **p.summary(), "attention_cache": mode.cache}
