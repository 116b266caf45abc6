"""The memory model: what a plan keeps on the GPU (weights, activations, transient buffers) and in pinned CPU memory,
for the planner, preflight and the long-context mode alike."""

from __future__ import annotations

import math
import os

from job.config import Settings
from job.speed.device import GiB
from job.speed.embeddings import StreamedHead
from job.speed.levers import VARLEN, Levers
from job.speed.shape import Shape

# Bytes per parameter of the frozen linear weights, quantization constants included (NF4: 4 bits, an 8-bit
# absmax per 64 weights, a float per 256 absmax).
WEIGHT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / 4096, "none": 2.0}


OVERHEAD_GIB = 0.15      # cuBLAS workspaces, the optimizer's scratch, allocator rounding


OFFLOAD_HOST_SHARE = 0.5  # of the CPU memory left to this process, what offloaded layers may pin (the rest: data,


def activation_bytes(shape: Shape, levers: Levers, lora_dropout: float) -> float:
    """Bytes kept for backward per token per decoder layer when the layer is not recomputed.

    bf16 tensors: each norm's input and output (4h), attention's q, k, v and output (2q + 2kv), gate, up and their
    product (3i), plus the log-sum-exp. Calibrated against the stock figure (57.6 GiB at 8192 packed tokens,
    Llama-3-8B, PEFT with dropout 0.05, liger, no recomputation), which this reproduces within 6%."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q, shape.kv
    kept = 2 * (4 * h + 2 * q + 2 * kv + 3 * i) + 4 * shape.heads
    if levers.attn_implementation != VARLEN:
        kept += 2 * q                          # o_proj's input is a contiguous copy of the attention output
    if not levers.liger:
        kept += 4 * h + 2 * i                  # RMSNorm keeps fp32 inputs; SiLU's output kept for the product
    if lora_dropout > 0 and not levers.dropout_in_kernel:
        kept += 5 * h + q + i                  # a bool dropout mask per adapted layer's input
        if not levers.lora_kernel:
            kept += 2 * 3 * h                  # PEFT keeps a dropped copy per layer, q/k/v and gate/up apart
    return kept * 1.08


def transient_bytes(shape: Shape, tokens: int, streamed_head: bool = False) -> float:
    """Working memory of one layer's backward and of the LM head, on top of what is kept. Fitted to the job's own
    peaks with recomputation on one H100 (10.2 GiB at 8185 tokens, 6.2 GiB at 2048 with checkpoints offloaded,
    4.5 GiB with the embeddings offloaded too; Llama-3-8B), which it overestimates by 0.1-0.6 GiB."""
    h, i = shape.hidden, shape.intermediate
    per_token = 2 * (4 * h + 4 * i)          # gradients in flight, the layer's largest temporaries
    if streamed_head:                        # logits tile of the streamed output layer (fp32, ~half the tokens)
        head = tokens * StreamedHead.chunk * 4
    else:                                    # TRL's logits tile
        head = min(tokens, 4096) * 32768 * 2
    return tokens * per_token + head + 2 * h * i   # + one dequantized weight in flight


def estimate_gib(shape: Shape, s: Settings, levers: Levers, tokens: int) -> float:
    """Peak GPU memory of a training step of `tokens` tokens per micro-batch."""
    static = shape.linear_params * WEIGHT_BYTES[s.quantization]
    table = shape.embedding_params * 2
    static += (0 if levers.offload_embeddings else table) + (0 if shape.tied or levers.offload_head else table)
    lora_bytes = 8 if s.quantization != "none" else 16  # bf16 adapters (TRL casts them under QLoRA) + Adam
    static += shape.lora_params(s.lora_r) * lora_bytes
    if levers.dequant_cache:
        static += shape.linear_params * 2
    layers = shape.layers
    recomputed = levers.checkpoint_layers if levers.checkpointing != "none" else 0
    # offloaded layers take GPU memory only in flight, within what the kept layers use at other times
    per_token = (layers - recomputed - levers.offloaded_layers) * activation_bytes(shape, levers, s.lora_dropout)
    if levers.checkpointing != "offload":
        per_token += recomputed * 2 * shape.hidden   # each recomputed layer keeps its input
    if recomputed:
        per_token += activation_bytes(shape, levers, s.lora_dropout)  # the layer being recomputed
    total = static + tokens * per_token + transient_bytes(shape, tokens, levers.offload_head)
    return total / GiB + OVERHEAD_GIB


def usable_gib(budget: float) -> float:
    """What a plan may take of a budget: a margin for fragmentation and for the estimate's own error (the
    memory anchors in tests/test_speed.py: within -3% .. +10% of measured peaks)."""
    return budget - max(0.25, 0.07 * budget)


def offloadable_layers(recomputed: int, layers: int, pinned_per_layer: float, host_gib: float) -> int:
    """How many of a partial plan's recomputed layers auto offloads instead (job.speed.offload.LayerOffload): no more
    than the kept layers, whose memory the copies pass through (more would wait for copies back in the backward),
    nor than a quarter of all layers (a layer's copy over PCIe takes ~4x its forward on an H100: more would wait
    for copies out in the forward), nor than half the CPU memory left to this process holds."""
    by_host = int(host_gib * OFFLOAD_HOST_SHARE * GiB // pinned_per_layer) if math.isfinite(host_gib) else layers
    return max(0, min(recomputed, layers - recomputed, layers // 4, by_host))


def layer_bytes(shape: Shape, tokens: int) -> float:
    """What one decoder layer of the fused path saves for backward at `tokens` tokens, by the estimate."""
    return tokens * activation_bytes(shape, Levers(attn_implementation=VARLEN, liger=True), 0.0)


def pinned_layer_bytes(shape: Shape, tokens: int) -> int:
    """Pinned CPU memory reserved per offloaded layer: the estimate undercounts what the fused path saves (1.23x
    for Llama-3-8B on an H100, docs/performance.md run 20)."""
    return int(layer_bytes(shape, tokens) * 1.3)


HOST_SHARE = 0.85            # of the host's available memory, what the pinned buffers may take


CACHE_HOST_SHARE = 0.40      # the attention-output cache only when everything pinned stays under this share


GPU_OVERHEAD_GIB = 0.6       # cuBLAS workspaces, the fused head's tiles, allocator slack


HOST_BASE_GIB = 5.0          # the training process itself (Python, torch, CUDA context, tokenizer, data)


def _pow2(nbytes: float) -> float:
    return float(2 ** math.ceil(math.log2(max(1.0, nbytes))))


def pinned_gib(shape, tokens: int, cache: bool) -> float:
    """Pinned CPU memory: one checkpoint (tokens x hidden, bf16) per layer, and with the attention cache its
    output and log-sum-exp. Buffers are sized exactly when cudaHostRegister works (else rounded to 2^k)."""
    per_layer = _pinned_round(tokens * shape.hidden * 2)
    if cache:
        per_layer += _pinned_round(tokens * shape.q * 2) + _pinned_round(tokens * shape.heads * 4)
    return shape.layers * per_layer / GiB


def _pinned_round(nbytes: float) -> float:
    return nbytes if PINNED_EXACT else _pow2(nbytes)


PINNED_EXACT = os.environ.get("JOB_LONGCTX_PIN", "register") == "register"


MLP_CHUNK = 8192             # tokens per MLP chunk at a 14,336-wide intermediate (scaled for others)


NORM_CHUNK = 32768           # tokens per RMSNorm chunk (fp32 temporaries)


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
    static = shape.linear_params * WEIGHT_BYTES[s.quantization]
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
        cache = pinned_gib(shape, tokens, True) + HOST_BASE_GIB <= host_gib * CACHE_HOST_SHARE
        gpu = estimate_gpu_gib(shape, s, tokens, liger=liger, lora_kernel=lora_kernel, cache=cache)
        host = pinned_gib(shape, tokens, cache) + HOST_BASE_GIB
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
