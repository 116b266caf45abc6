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
`python -m job.longctx trial|search` runs one training step of one sequence / finds the longest that trains
(`job bench --max-length max` calls the search).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass

import torch

from job import speed
from job.config import SHARDED
from job.errors import ConfigError

log = logging.getLogger("job.longctx")
GiB = 2**30
AUTO_TOKENS = 65536          # auto turns the mode on from this many tokens in one micro-batch
MLP_CHUNK = 8192             # tokens per MLP chunk at a 14,336-wide intermediate (scaled for others)
NORM_CHUNK = 32768           # tokens per RMSNorm chunk (fp32 temporaries)
HOST_SHARE = 0.85            # of the host's available memory, what the pinned buffers may take
CACHE_HOST_SHARE = 0.40      # the attention-output cache only when everything pinned stays under this share
GPU_OVERHEAD_GIB = 0.6       # cuBLAS workspaces, the fused head's tiles, allocator slack
HOST_BASE_GIB = 5.0          # the training process itself (Python, torch, CUDA context, tokenizer, data)


# ------------------------------------------------------------------------------------------------ deciding

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
    host = speed.host_budget_gib() if host_gib is None else host_gib
    cuda = getattr(device, "cuda", False)
    on, why = decide(s, tokens, cuda)
    if on is None and levers is not None and levers.estimated_peak_gib > speed.usable_gib(device.budget_gib):
        on, why = True, (f"auto: the plain path needs ~{levers.estimated_peak_gib:.0f} GiB of "
                         f"{device.budget_gib:.0f} GiB")
    elif on is None:
        on, why = False, f"auto: {tokens:,} tokens per micro-batch fit the plain path"
    liger = bool(getattr(levers, "liger", False))
    lora_kernel = bool(getattr(levers, "lora_kernel", False))
    p = Plan(on=on, why=why, tokens=tokens, gpu_budget_gib=round(getattr(device, "budget_gib", 0.0), 1),
             host_budget_gib=round(host, 1))
    p.attention_cache = on and cuda and _pinned_gib(shape, tokens, True) + HOST_BASE_GIB <= host * CACHE_HOST_SHARE
    gpu = estimate_gpu_gib(shape, s, tokens, liger=liger, lora_kernel=lora_kernel, cache=p.attention_cache)
    p.pinned_gib = round(_pinned_gib(shape, tokens, p.attention_cache), 1)
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


# ------------------------------------------------------------------------------------------ memory model

def _pow2(nbytes: float) -> float:
    return float(2 ** math.ceil(math.log2(max(1.0, nbytes))))


def _pinned_gib(shape, tokens: int, cache: bool) -> float:
    """Pinned CPU memory: one checkpoint (tokens x hidden, bf16) per layer, and with the attention cache its
    output and log-sum-exp. Buffers are sized exactly when cudaHostRegister works (else rounded to 2^k)."""
    per_layer = _pinned_round(tokens * shape.hidden * 2)
    if cache:
        per_layer += _pinned_round(tokens * shape.q * 2) + _pinned_round(tokens * shape.heads * 4)
    return shape.layers * per_layer / GiB


def _pinned_round(nbytes: float) -> float:
    return nbytes if PINNED_EXACT else _pow2(nbytes)


PINNED_EXACT = os.environ.get("JOB_LONGCTX_PIN", "register") == "register"


def mlp_chunk(shape) -> int:
    return max(1024, MLP_CHUNK * 14336 // max(1, shape.intermediate) // 1024 * 1024)


def estimate_gpu_gib(shape, s, tokens: int, *, liger: bool, lora_kernel: bool, cache: bool) -> float:
    """Peak GPU memory of one step in long-context mode (the CUDA context excluded).

    Static: frozen weights, the adapter with its Adam state, dequantized weights in flight. Then the largest of
    three phases, per token: the attention backward of one recomputed layer (its input, normed input, q k v,
    attention output, dropout masks; the gradients, flash's fp32 dq accumulator and GQA's expanded dk/dv; the
    next layer's prefetched checkpoint and attention output), the MLP backward of that layer (the same kept
    tensors, the residual and its norm, one chunk's working set) and the LM head (TRL's fused head: the hidden
    states, a copy of the scored ones, an fp32 gradient of them; one logits tile).
    """
    h, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    static = shape.linear_params * speed.WEIGHT_BYTES[s.quantization]
    static += shape.embedding_params * 2 * (1 if shape.tied else 2)
    static += shape.lora_params(s.lora_r) * 16
    static += 2 * 2 * h * i                                        # dequantized weights in flight
    kept = 2 * (2 * h + 2 * q + 2 * kv) + 4 * shape.heads          # x, normed x, q, k, v, out; lse
    if s.lora_dropout > 0:
        kept += (3 * h + q) * (1 if lora_kernel else 3)            # bool masks (+ PEFT's dropped copies)
    prefetch = 2 * h + (2 * q + 4 * shape.heads if cache else 0)
    gqa = 4 * q if kv != q else 0
    attention = kept + prefetch + 2 * h + 2 * q * 2 + 4 * kv + 4 * q + gqa   # dh, dout, dq, dk dv, fp32 dq, GQA
    chunk = min(tokens, mlp_chunk(shape))
    mlp_work = chunk * (2 * 3 * i + i + 2 * 3 * i + 2 * 2 * h)     # gate, up, product, masks, their grads
    mlp = tokens * (kept + prefetch + 3 * 2 * h) + mlp_work        # + residual, normed residual, dh
    norm_work = 0 if liger else min(tokens, NORM_CHUNK) * h * 4 * 3
    head = tokens * (2 * h * 4 + 4 * h) + 4096 * 32768 * 2
    peak = max(tokens * attention, mlp + norm_work, head) * 1.10
    return (static + peak) / GiB + GPU_OVERHEAD_GIB


def longest_fitting(shape, s, gpu_budget_gib: float, host_gib: float, *, liger: bool, lora_kernel: bool,
                    granularity: int = 1024) -> int:
    """The longest micro-batch (tokens) whose estimates fit both the GPU budget and the host."""
    def fits(tokens: int) -> bool:
        cache = _pinned_gib(shape, tokens, True) + HOST_BASE_GIB <= host_gib * CACHE_HOST_SHARE
        gpu = estimate_gpu_gib(shape, s, tokens, liger=liger, lora_kernel=lora_kernel, cache=cache)
        host = _pinned_gib(shape, tokens, cache) + HOST_BASE_GIB
        return gpu <= gpu_budget_gib * 0.95 and host <= host_gib * HOST_SHARE

    lo, hi = 0, granularity
    while fits(hi) and hi < 2**26:
        lo, hi = hi, hi * 2
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


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


# --------------------------------------------------------------------------------------- offloading

@dataclass
class _Entry:
    tag: int
    shape: torch.Size
    dtype: torch.dtype
    host: torch.Tensor | None = None     # pinned copy (or, simulated on CPU, a clone)
    gpu: torch.Tensor | None = None      # brought back (prefetched) copy
    h2d: object = None


class _Handle:
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key


class Offloader:
    """Tensors to pinned CPU memory on a side stream, back one layer ahead of need.

    `put(key, tag, t)` starts the device-to-host copy after the work already queued that produces `t`, and lets
    the caching allocator reuse `t`'s memory once the copy is done (record_stream). `take(key)` returns the tensor
    on the GPU (waiting for its copy back, usually already done) and starts bringing back every entry of tag - 1:
    backward runs the layers in reverse, so while layer t computes, layer t - 1's tensors come back. Pinned
    buffers are kept per slot (kind, layer) and reused every step. On CPU (the tests) the copies are clones.
    """

    def __init__(self, device: torch.device, *, simulate: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.simulate = simulate or not self.cuda
        self.entries: dict = {}
        self.slabs: dict = {}
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pinned_bytes = 0
        self.pin_seconds = 0.0
        self.pin_method = "clone" if self.simulate else None
        self.counters = {"put": 0, "take": 0, "prefetched": 0, "waited": 0}
        self.min_bytes = 0 if self.simulate else 2**20  # only checkpoints travel: a layer's input, not a mask

    # pinned buffers, one per slot, reused across steps
    def slab(self, slot, nbytes: int) -> torch.Tensor:
        buf = self.slabs.get(slot)
        if buf is None or buf.numel() < nbytes:
            started = time.time()
            buf = self._pinned(nbytes)
            self.slabs[slot] = buf
            self.pin_seconds += time.time() - started
            self.pinned_bytes = sum(b.numel() for b in self.slabs.values())
        return buf

    def _pinned(self, nbytes: int) -> torch.Tensor:
        if PINNED_EXACT:
            try:
                return _register(nbytes)
            except Exception as error:  # noqa: BLE001 - any failure: the caching host allocator instead
                log.warning("cudaHostRegister failed (%s); using torch's pinned allocator (sizes rounded to 2^k)",
                            error)
        self.pin_method = "cudaHostAlloc"
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def reserve(self, slot, nbytes: int) -> None:
        if not self.simulate:
            self.slab(slot, nbytes)

    def put(self, key, tag: int, t: torch.Tensor, slot=None, host: torch.Tensor | None = None) -> None:
        """`host`: where in pinned memory the copy goes (the caller's), else the slot's own buffer."""
        entry = _Entry(tag, t.shape, t.dtype)
        self.counters["put"] += 1
        if self.simulate:
            entry.host = t.detach().clone()
        else:
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            nbytes = t.numel() * t.element_size()
            if host is None:
                host = self.slab(slot if slot is not None else key, nbytes)[:nbytes]
            host = host.view(t.dtype).view(t.shape)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            entry.host = host
            self.pin_method = self.pin_method or "cudaHostRegister"
        self.entries[key] = entry

    def _bring_back(self, entry: _Entry) -> None:
        if entry.gpu is not None or self.simulate:
            return
        gpu = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)  # on the compute stream's pool
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            gpu.copy_(entry.host, non_blocking=True)
            entry.h2d = self.stream.record_event()
        entry.gpu = gpu

    def take(self, key) -> torch.Tensor:
        entry = self.entries.pop(key)
        self.counters["take"] += 1
        if self.simulate:
            out = entry.host
        else:
            if entry.gpu is None:
                self.counters["waited"] += 1
                self._bring_back(entry)
            else:
                self.counters["prefetched"] += 1
            torch.cuda.current_stream(self.device).wait_event(entry.h2d)
            out = entry.gpu
        for other in self.entries.values():
            if other.tag == entry.tag - 1:
                self._bring_back(other)
        return out

    def has(self, key) -> bool:
        return key in self.entries

    def clear(self) -> None:
        self.entries.clear()


def _register(nbytes: int) -> torch.Tensor:
    """nbytes of page-locked CPU memory, exactly (torch's pinned allocator rounds every block up to 2^k)."""
    page = 4096
    raw = torch.empty(nbytes + 2 * page, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % page
    buf = raw[offset:offset + nbytes]
    size = (nbytes + page - 1) // page * page
    _dont_fork(buf.data_ptr(), size)
    raw.zero_()  # touch the pages with torch's threads before the driver locks them
    code = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
    if code != 0:
        raise RuntimeError(f"cudaError {code}")
    _REGISTERED.append(raw)  # keep the storage alive with the process; the driver unregisters it at exit
    return buf


_REGISTERED: list = []


def _dont_fork(address: int, length: int) -> None:
    """MADV_DONTFORK: a forked process (a data loader worker) does not get these pages. Linux copies pages that
    are pinned for DMA into the child at fork time, so without it every worker would copy all the buffers
    (tens of GiB each). cudaHostAlloc does the same for torch's own pinned memory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), 10) != 0:  # 10: MADV_DONTFORK (Linux)
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTFORK) failed")


# -------------------------------------------------------------------------------------- token chunks

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
        if run.skip_in_recompute and speed.in_backward():
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


# ------------------------------------------------------------------------------- attention with a cache

LONGCTX_ATTENTION = "longctx"


class _CachedAttention(torch.autograd.Function):
    """Causal attention within each sample (cuDNN for one sample, flash varlen for packed ones) whose output and
    log-sum-exp, with a `store`, are offloaded in the forward and brought back for the recompute, so a
    checkpointed layer's recompute does not run the attention forward again.

    q (T, Hq, D), k/v (T, Hkv, D), cu (N+1,) int32. Backward is the kernel's own backward from the saved q, k,
    v (recomputed), out and lse (brought back). On CPU (tests) the output is per-sample sdpa and the backward
    recomputes it under autograd.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, longest: int, scale: float, store: Offloader | None, layer: int):
        ctx.longest, ctx.scale, ctx.cuda = longest, scale, q.is_cuda
        key = ("attn", layer)
        if store is not None and speed.in_backward() and store.has(key + ("out",)):
            out = store.take(key + ("out",))
            lse = store.take(key + ("lse",)) if q.is_cuda else out.new_empty(0)
        elif q.is_cuda:
            out, lse = attention_forward(q, k, v, cu, longest, scale)
            if store is not None and not speed.in_backward():
                store.put(key + ("out",), layer, out, slot=("attn_out", layer))
                store.put(key + ("lse",), layer, lse, slot=("attn_lse", layer))
        else:
            out, lse = speed._varlen_reference(q, k, v, cu, scale), q.new_empty(0)
            if store is not None and not speed.in_backward():
                store.put(key + ("out",), layer, out)
        ctx.save_for_backward(q, k, v, cu, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu, out, lse = ctx.saved_tensors
        if ctx.cuda:
            dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, cu, ctx.longest, ctx.scale)
        else:
            with torch.enable_grad():
                qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
                dq, dk, dv = torch.autograd.grad(speed._varlen_reference(qd, kd, vd, cu, ctx.scale), (qd, kd, vd),
                                                 grad_out)
        return dq, dk, dv, None, None, None, None, None


def _op_arguments(op, **values) -> dict:
    """The keyword arguments this torch's version of a varlen op takes (its schema changed across releases)."""
    names = {argument.name for argument in op.default._schema.arguments}
    return {k: v for k, v in values.items() if k in names}


def _gqa_native() -> bool:
    from torch.nn.attention import varlen  # noqa: F401  (registers the ops)

    return "enable_gqa" in {a.name for a in torch.ops.torch_attn._varlen_attn.default._schema.arguments}


CUDNN_ATTENTION = {"usable": True}  # turned off by the self-check when cuDNN's kernel disagrees on this machine


def _one_sequence(q, cu) -> bool:
    """A row that is one sample (the long-document case): cuDNN's attention kernel takes it, 1.7x the flash
    kernel's speed forward + backward on an H100 at 8,192-131,072 tokens (scripts/gpu/attention_bench.py)."""
    return (q.is_cuda and cu.numel() == 2 and q.shape[-1] <= 128  # head sizes the self-check and bench cover
            and CUDNN_ATTENTION["usable"] and torch.backends.cudnn.is_available())


def attention_forward(q, k, v, cu, longest: int, scale: float):
    """out (T, Hq, D) and the log-sum-exp of causal attention within each sample: cuDNN for one sample,
    PyTorch's flash varlen kernel for packed samples (torch.ops, with the forward's saved state for
    `attention_backward`)."""
    if not _one_sequence(q, cu):
        return _varlen_forward(q, k, v, cu, longest, scale)
    if k.shape[1] != q.shape[1]:
        k, v = speed.expand_kv(k, v, q.shape[1])
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *(speed.as_bhtd(t) for t in (q, k, v)), None, True, 0.0, True, False, scale=scale)[:2]
    return out.transpose(1, 2).squeeze(0), lse


def attention_backward(grad_out, q, k, v, out, lse, cu, longest: int, scale: float):
    if not _one_sequence(q, cu):
        return _varlen_backward(grad_out, q, k, v, out, lse, cu, longest, scale)
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k, v = speed.expand_kv(k, v, heads)
    unused = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout's seed and offset (no dropout)
    # no bias, and None as the sequence offsets, as the forward returns them for a dense batch (a tensor there,
    # even empty, selects the nested-tensor path)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *(speed.as_bhtd(t) for t in (grad_out.contiguous(), q, k, v, out.contiguous())), lse, unused, unused,
        None, None, None, q.shape[0], q.shape[0], 0.0, True, scale=scale)
    dq, dk, dv = (t.transpose(1, 2).squeeze(0) for t in (dq, dk, dv))
    if kv_heads != heads:
        dk = dk.reshape(dk.shape[0], kv_heads, -1, dk.shape[-1]).sum(2)
        dv = dv.reshape(dv.shape[0], kv_heads, -1, dv.shape[-1]).sum(2)
    return dq, dk, dv


def _varlen_forward(q, k, v, cu, longest: int, scale: float):
    """out (T, Hq, D) and lse (Hq, T) of causal flash varlen attention (torch.ops.torch_attn)."""
    from torch.nn.attention import varlen  # noqa: F401

    gqa = k.shape[1] != q.shape[1]
    if gqa and not _gqa_native():
        k, v = speed.expand_kv(k, v, q.shape[1])
    op = torch.ops.torch_attn._varlen_attn
    out, lse, _ = op(**_op_arguments(op, query=q, key=k, value=v, cu_seq_q=cu, cu_seq_k=cu, max_q=longest,
                                     max_k=longest, is_causal=True, scale=scale, window_size=[-1, 0],
                                     enable_gqa=gqa))
    return out, lse


def _varlen_backward(grad_out, q, k, v, out, lse, cu, longest: int, scale: float):
    heads, kv_heads = q.shape[1], k.shape[1]
    expanded = kv_heads != heads and not _gqa_native()
    if expanded:
        k, v = speed.expand_kv(k, v, heads)
    op = torch.ops.torch_attn._varlen_attn_backward
    rng = torch.zeros((2,), dtype=torch.uint64, device=q.device)
    dq, dk, dv = op(**_op_arguments(op, grad_out=grad_out.contiguous(), query=q, key=k, value=v, out=out, lse=lse,
                                    cu_seq_q=cu, cu_seq_k=cu, max_q=longest, max_k=longest, is_causal=True,
                                    rng_state=rng, scale=scale, window_size=[-1, 0]))
    if expanded:  # each kv head served heads // kv_heads query heads: sum their gradients
        dk = dk.view(dk.shape[0], kv_heads, -1, dk.shape[-1]).sum(2)
        dv = dv.view(dv.shape[0], kv_heads, -1, dv.shape[-1]).sum(2)
    return dq, dk, dv


def attention_self_check(device: torch.device) -> str | None:
    """On the GPU: this module's attention kernels, forward and backward, against sdpa run one sample at a time
    under autograd (bf16, GQA): two packed samples (flash varlen), then one sample (cuDNN). A cuDNN failure
    turns cuDNN off (packed and single rows then both take flash varlen); None when the kernels are usable, else
    why (the mode then keeps job.speed's attention, recomputed)."""
    def check(lengths) -> str | None:
        generator = torch.Generator(device=device).manual_seed(0)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(sum(lengths), h, 64, device=device, dtype=torch.bfloat16, generator=generator)
                   for h in (8, 2, 2))
        grad = torch.randn_like(q)
        out, lse = attention_forward(q, k, v, cu, max(lengths), 0.125)
        dq, dk, dv = attention_backward(grad, q, k, v, out, lse, cu, max(lengths), 0.125)
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ref = speed._varlen_reference(qr, kr, vr, cu, 0.125)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad)
        for name, got, want in (("out", out, ref), ("dq", dq, ref_grads[0]), ("dk", dk, ref_grads[1]),
                                ("dv", dv, ref_grads[2])):
            error = ((got.float() - want.float()).norm() / want.float().norm()).item()
            if not error < 2e-2:
                return f"{name} differs from sdpa one sample at a time (relative error {error:.3g})"
        return None

    def failure(lengths) -> str | None:
        try:
            return check(lengths)
        except Exception as error:  # noqa: BLE001 - any failure is the kernel's: it is not used
            return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"

    problem = failure([300, 211])
    if problem:
        return f"flash varlen: {problem}"
    problem = failure([1000]) if torch.backends.cudnn.is_available() else "cuDNN not available"
    if problem:
        CUDNN_ATTENTION["usable"] = False
        log.warning("long-context: cuDNN attention off (its self-check failed: %s)", problem)
    return None


def longctx_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              is_causal=None, **kwargs):
    """transformers attention interface: this module's kernels (with the cache when asked) while training."""
    # set by `install` on the layer's modules (not thread-local: CUDA backward runs on autograd's own thread)
    mode, layer = getattr(module, "_longctx_mode", None), getattr(module, "_longctx_layer", None)
    batch, heads, length, dim = query.shape
    attention_mask = speed.real_mask(attention_mask)
    if (mode is None or not mode.own_kernels or not torch.is_grad_enabled() or attention_mask is not None
            or key.shape[2] != length or dropout):
        return speed.varlen_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
    q, k, v, cu, longest, scale = speed.flatten_for_varlen(query, key, value, scaling, kwargs)
    out = _CachedAttention.apply(q, k, v, cu, longest, scale, mode.store if mode.cache else None, layer)
    return out.view(batch, length, heads, dim), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(LONGCTX_ATTENTION, longctx_attention_forward)
    speed.MASK_FREE_ATTENTION.add(LONGCTX_ATTENTION)
    ALL_MASK_ATTENTION_FUNCTIONS.register(LONGCTX_ATTENTION, speed.varlen_mask)


# ------------------------------------------------------------------------------------------- installing

class LongContext:
    """The installed mode on one model: the offloader, the checkpoint function, the chunked modules."""

    def __init__(self, hf_model, cache: bool, *, simulate: bool = False):
        self.hf, self.cache = hf_model, cache
        self.own_kernels = True  # this module's attention kernels (off: job.speed's, and no cache)
        self.layers = _decoder_layers(hf_model)
        # on the layers' device: the embedding table may live in CPU memory (job.speed)
        self.store = Offloader(next(self.layers[0].parameters()).device, simulate=simulate)

    def checkpoint(self, index: int, function, *args, **kwargs):
        """Each layer's checkpoint: torch's non-reentrant checkpoint, its saved input offloaded."""
        from torch.utils.checkpoint import checkpoint

        if index == 0 and not speed.in_backward():
            self.store.clear()  # a new forward: anything left from one without backward is stale
        counter = [0]

        def pack(t):
            if (speed.in_backward() or isinstance(t, torch.nn.Parameter)
                    or t.numel() * t.element_size() < self.store.min_bytes
                    or t.device != self.store.device and not self.store.simulate):
                return t
            counter[0] += 1
            key = ("ckpt", index, counter[0])
            self.store.put(key, index, t, slot=("ckpt", index, counter[0]))
            return _Handle(key)

        def unpack(h):
            return self.store.take(h.key) if isinstance(h, _Handle) else h

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    def install_checkpointing(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = functools.partial(self.checkpoint, index)


def _decoder_layers(hf_model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]


def hf_model(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "module", base)


def _is_liger(module) -> bool:
    forward = module.__dict__.get("forward", type(module).forward)
    return "liger" in getattr(forward, "__qualname__", "").lower() or "liger" in type(module).__name__.lower()


def install(model, tokens: int, *, cache: bool, mlp_tokens: int | None = None, norm_tokens: int | None = None,
            simulate: bool = False) -> LongContext:
    """Long-context mode on a (PEFT-wrapped) model: chunked MLPs and norms, offloaded checkpoints on every
    decoder layer, the cached attention when `cache`. Idempotent per model."""
    hf = hf_model(model)
    if getattr(hf, "_longctx", None) is not None:
        return hf._longctx
    mode = LongContext(hf, cache, simulate=simulate)
    device = mode.store.device
    shape = speed.Shape.of(hf.config)
    skip = hf.config.model_type in speed.SKIP_MLP_FAMILIES
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
    if implementation in ("sdpa", speed.VARLEN, LONGCTX_ATTENTION) and (speed.varlen_available() or
                                                                         device.type == "cpu"):
        speed.register_attention()
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

    _checkpoint_through(mode, tokens, shape, simulate)
    return mode


def offload_checkpoints(model, tokens: int, *, simulate: bool = False) -> LongContext:
    """Only this mode's checkpointing on every decoder layer: inputs to pinned CPU memory asynchronously, back one
    layer ahead of the backward (job.speed's `offload` plan under a small memory cap uses it)."""
    mode = LongContext(hf_model(model), cache=False, simulate=simulate)
    mode.own_kernels = False  # job.speed's attention stays
    _checkpoint_through(mode, tokens, speed.Shape.of(mode.hf.config), simulate)
    return mode


class LayerOffload:
    """Whole decoder layers' saved tensors in pinned CPU memory instead of recomputed (`OFFLOAD_LAYERS`, where
    job.speed's plan recomputes some layers and keeps others): the first layers' activations go out on a side
    stream during the forward and come back during the backward of the layers after them, so PCIe time replaces
    recompute time (+2-8% at 16 and 24 GiB caps on an H100, docs/performance.md runs 20 and 22).

    The copies in flight and the copies brought back share one GPU pool with the kept (last, neither recomputed
    nor offloaded) layers, whose activations exist only between their forward and their backward: `pool` bytes
    (what the kept layers take). Before each layer's forward the host waits for copies out until those in flight
    fit what the kept layers leave of the pool; each layer's backward start (a hook on its output's gradient)
    brings back offloaded layers, highest first, while they fit. Hand-written: transformers' save_on_cpu and
    TRL's OffloadActivations copy back only when autograd asks, on the compute stream, with no bound on memory.
    """

    def __init__(self, layers: list, offloaded: list[int], kept: list[int], store: Offloader, pool_bytes: float,
                 layer_capacity: int = 0):
        self.layers, self.offloaded, self.kept, self.store = layers, sorted(offloaded), set(kept), store
        self.pool = pool_bytes
        self.capacity = layer_capacity             # pinned bytes per offloaded layer, reserved now
        self.used: dict[int, int] = {}             # per layer, pinned bytes taken in this forward
        self.wanted = 0                            # the most pinned bytes a layer needed, when over capacity
        if not store.simulate:
            for index in self.offloaded:
                store.reserve(("act", index), layer_capacity)
        self.out_flight: list = []                 # (event, nbytes) of copies out not known to be done
        self.layer_bytes: dict[int, int] = {}      # bytes offloaded per layer in this forward
        self.handles: dict[int, list] = {}         # per layer, its saved tensors' handles
        self.back: dict[int, int] = {}             # layer -> bytes brought back and not yet freed
        self.kept_resident = 0
        self.counters = {"tensors": 0, "bytes": 0, "waits_out": 0, "late": 0, "over_capacity": 0,
                         "stayed_bytes": 0}
        for index in self.offloaded:
            self._wrap(index)
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self._before_forward, index))
            layer.register_forward_hook(functools.partial(self._after_forward, index))

    # forward
    def _wrap(self, index: int) -> None:
        layer = self.layers[index]
        forward = layer.forward

        def offloaded_forward(*args, **kwargs):
            if not torch.is_grad_enabled() or speed.in_backward():
                return forward(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, index), self._unpack):
                return forward(*args, **kwargs)

        layer.forward = offloaded_forward

    def _before_forward(self, index: int, module, args) -> None:
        if not torch.is_grad_enabled() or speed.in_backward():
            return
        if index == 0:  # a new forward: nothing of the last one is resident (its backward ran, or none will)
            self.handles.clear(), self.back.clear(), self.layer_bytes.clear(), self.used.clear()
            self.kept_resident = 0
            if self.wanted > self.capacity and not self.store.simulate:
                self._grow(self.wanted)
        if self.store.simulate:
            return
        layer = max(self.layer_bytes.values(), default=0)
        allowed = self.pool - (self.kept_resident + (index in self.kept)) * layer
        self.out_flight = [(event, n) for event, n in self.out_flight if not event.query()]
        while self.out_flight and sum(n for _, n in self.out_flight) > allowed:
            event, _ = self.out_flight.pop(0)
            event.synchronize()
            self.counters["waits_out"] += 1

    def _after_forward(self, index: int, module, args, output) -> None:
        if not torch.is_grad_enabled() or speed.in_backward():
            return
        self.kept_resident += index in self.kept
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(functools.partial(self._backward_starts, index))

    def _pack(self, index: int, t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)  # weights stay
                or t.numel() * t.element_size() < self.store.min_bytes
                or t.device != self.store.device and not self.store.simulate):
            return t
        handles = self.handles.setdefault(index, [])
        for handle in handles:  # one tensor saved by several functions (q, k and v read one input) goes once;
            if handle.saved() is t:  # by identity: a freed tensor's memory is soon another tensor's
                return handle
        saved, order = t, None
        if not t.is_contiguous():  # a transposed view (attention's heads): its memory is a permuted dense tensor
            order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
            t = t.permute(order)
            if not t.is_contiguous():
                self.counters["stayed_bytes"] += saved.numel() * saved.element_size()
                return saved
        nbytes = t.numel() * t.element_size()
        host = None
        if not self.store.simulate:
            start = self.used.get(index, 0)
            if start + nbytes > self.capacity:  # more than planned for: stays on the GPU this step, fits the next
                self.counters["over_capacity"] += 1
                self.wanted = max(self.wanted, start + nbytes)
                return saved
            self.used[index] = start + (nbytes + 511) // 512 * 512
            host = self.store.slabs[("act", index)][start:start + nbytes]
        handle = _LayerHandle(("act", index, len(handles)), weakref.ref(saved), order)
        self.store.put(handle.key, index, t, host=host)
        handles.append(handle)
        self.layer_bytes[index] = self.layer_bytes.get(index, 0) + nbytes
        self.counters["tensors"] += 1
        self.counters["bytes"] += nbytes
        if not self.store.simulate:
            self.out_flight.append((self.store.stream.record_event(), nbytes))
        return handle

    def _grow(self, wanted: int) -> None:
        """Pin larger buffers once, between steps, when a layer saved more than the estimate planned for."""
        self.capacity = int(wanted * 1.05)
        for index in self.offloaded:
            self.store.reserve(("act", index), self.capacity)
        log.info("layer offload: %.2f GiB of pinned memory per layer (a layer saved more than planned)",
                 self.capacity / GiB)

    # backward
    def _unpack(self, handle):
        if not isinstance(handle, _LayerHandle):
            return handle
        if handle.value is None:
            entry = self.store.entries.pop(handle.key)
            if self.store.simulate:
                handle.value = entry.host
            else:
                if entry.gpu is None:
                    self.counters["late"] += 1
                    self.store._bring_back(entry)
                torch.cuda.current_stream(self.store.device).wait_event(entry.h2d)
                handle.value = entry.gpu
            if handle.order is not None:
                handle.value = handle.value.permute([handle.order.index(d) for d in range(len(handle.order))])
        return handle.value

    def _backward_starts(self, index: int, grad) -> None:
        """Layer `index`'s backward begins: the layers above it are done (their memory is free again)."""
        for done in [i for i in self.back if i > index]:
            self._release(done)
        if index == 0:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._release(0))
        self.kept_resident = sum(1 for i in self.kept if i <= index)
        layer = max(self.layer_bytes.values(), default=0)
        for candidate in reversed(self.offloaded):
            if candidate > index or candidate in self.back:
                continue
            used = self.kept_resident * layer + sum(self.back.values())
            if candidate != index and used + self.layer_bytes.get(candidate, 0) > self.pool:
                break
            for handle in self.handles.get(candidate, ()):
                entry = self.store.entries.get(handle.key)
                if entry is not None:
                    self.store._bring_back(entry)
            self.back[candidate] = self.layer_bytes.get(candidate, 0)

    def _release(self, index: int) -> None:
        self.back.pop(index, None)
        for handle in self.handles.pop(index, ()):
            handle.value = None


class _LayerHandle:
    __slots__ = ("key", "saved", "order", "value")

    def __init__(self, key, saved, order=None):
        self.key, self.saved, self.order, self.value = key, saved, order, None


def offload_layers(model, offloaded: int, recomputed: int, tokens: int, *, simulate: bool = False) -> LayerOffload:
    """LayerOffload on a (PEFT-wrapped) model's decoder layers, laid out offloaded, recomputed, kept; the pool is
    what the kept layers' activations take at `tokens` tokens a micro-batch (job.speed's estimate)."""
    hf = hf_model(model)
    layers = _decoder_layers(hf)
    kept = list(range(offloaded + recomputed, len(layers)))
    store = Offloader(next(layers[0].parameters()).device, simulate=simulate)
    shape = speed.Shape.of(hf.config)
    started = time.time()
    mode = LayerOffload(layers, list(range(offloaded)), kept, store, len(kept) * speed.layer_bytes(shape, tokens),
                        speed.pinned_layer_bytes(shape, tokens))
    log.info("layers offloaded: %d of %d, %.1f GiB of pinned CPU memory in %.1fs", offloaded, len(layers),
             store.pinned_bytes / GiB, time.time() - started)
    hf._layer_offload = mode
    return mode


def _checkpoint_through(mode: LongContext, tokens: int, shape, simulate: bool) -> None:
    """Every layer checkpointed through `mode.checkpoint`, also after the Trainer (re)enables checkpointing; the
    pinned buffers reserved now, not inside the first step."""
    hf, store = mode.hf, mode.store
    original = hf.activation_checkpointing_enable

    def enable(*args, **kwargs):
        kwargs.pop("offload", None)  # ours replaces transformers' synchronous save_on_cpu
        original(*args, **kwargs)
        mode.install_checkpointing()

    hf.activation_checkpointing_enable = enable
    if not any(getattr(layer, "gradient_checkpointing", False) for layer in mode.layers):
        original(activation_checkpointing_kwargs={"use_reentrant": False})
    mode.install_checkpointing()
    if store.cuda and not simulate:
        started = time.time()
        for index in range(len(mode.layers)):
            store.reserve(("ckpt", index, 1), tokens * shape.hidden * 2)
            if mode.cache:
                store.reserve(("attn_out", index), tokens * shape.q * 2)
                store.reserve(("attn_lse", index), tokens * shape.heads * 4)
        log.info("checkpoints offloaded: %.1f GiB of pinned CPU memory in %.1fs (%s)", store.pinned_bytes / GiB,
                 time.time() - started, store.pin_method or "cudaHostRegister")
    hf._longctx = mode


def apply(trainer, s, levers=None, stats: dict | None = None, *, host_gib: float | None = None) -> dict:
    """The hook train.py calls after building the trainer: decide, and install the mode when it is on."""
    hf = hf_model(trainer.model)
    device = speed.probe(getattr(s, "gpu_memory_gib", 0.0))
    if device.cuda and not device.capped:  # the weights are loaded by now, and the estimate counts them
        device = dataclasses.replace(device, budget_gib=device.budget_gib + torch.cuda.memory_allocated() / GiB)
    shape = speed.Shape.of(hf.config)
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
