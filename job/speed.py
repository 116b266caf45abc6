"""The speed levers: which ones to pull, chosen from the card, its free memory and the model, and pulling them.

None of them changes what is trained (the settings are identity=False): the same loss on the same tokens, up to
floating-point order. `choose` is a pure function of the settings, the model's shape and a `Device`, so CPU tests
can ask what an H100 with 8 GiB free would get; `job preflight` prints its answer with the reasons.

    attention        varlen: PyTorch's built-in flash kernel over the packed row (cu_seqlens), registered with
                     transformers under the name "varlen"; else flex_attention; sdpa on CPU.
    liger            Liger's RMSNorm, SwiGLU and RoPE kernels (the LM head is TRL's chunked fused head already).
    lora_kernel      one autograd function per adapted linear layer: dequantize, matmul, adapter added in the
                     matmul epilogue (addmm), backward without PEFT's clone, scale and add passes; the adapter's
                     dropout mask drawn inside Triton kernels from a seed, never stored.
    nf4_kernel       each 4-bit weight dequantized in one Triton launch (bitsandbytes makes three, each through
                     Python, torch.ops and ctypes: host time that a recomputed layer's forward waits for).
    dequant_cache    a 16-bit copy of the frozen 4-bit weights kept on the GPU, where it fits beside the plan.
    checkpointing    none, some layers (as few as the memory allows), every layer, or every layer with the
                     checkpoints in pinned CPU memory.
    micro batch      the configured MICRO_BATCH_SIZE x GRAD_ACCUM rows per optimizer step, split into smaller
                     micro-batches only when that is the faster plan that fits (same math: the loss is
                     normalized over the step).
    embeddings       the frozen input embedding and output layer in CPU memory (the output layer streamed in
                     chunks), when that buys a faster plan or any plan at all.

Measurements behind the choices: docs/performance.md.

Packed rows also get a guard (`install_packing_guard`): transformers keeps packed samples apart only when no
attention_mask is passed and no KV cache is built; the guard makes that hold for any caller of the model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from job.config import SHARDED, Settings
from job.errors import ConfigError

log = logging.getLogger("job.speed")
GiB = 2**30
VARLEN = "varlen"

# Dense bf16 peak (TFLOP/s, no sparsity) by card name, for MFU. Longest match wins.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H20": 148.0, "GH200": 989.0,
    "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0, "A10": 125.0, "A10G": 70.0, "L40S": 362.0,
    "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0, "V100": 125.0,
    "T4": 65.0,
}

# Bytes per parameter of the frozen linear weights, quantization constants included (NF4: 4 bits, an 8-bit
# absmax per 64 weights, a float per 256 absmax).
WEIGHT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / 4096, "none": 2.0}
OVERHEAD_GIB = 0.15      # cuBLAS workspaces, the optimizer's scratch, allocator rounding
# The step-time model behind the plan, in token-equivalents of GPU time (~65 us a token for Llama-3-8B on an
# H100), a micro-step costing max(host, GPU); fitted to runs 25-28 (2026-12-07, H100s, docs/performance.md). The
# host side (Python and the dispatch of ~10^4 operations) is taken as ~0.31 s a micro-step whatever the tokens: 0.22
# s on run 25's host (1 row x 4 micro-steps: 0.876 s a step against 0.516 for 4 rows x 1), more on slower hosts and
# with checkpointed layers (run 27: 2 x 2 plans recomputing or offloading 7-20 layers ran at 0.52-0.67 s a
# micro-step, far slower than 4 x 1), while at 8 GiB 2 x 2 with both tables on the GPU beat 4 x 1 with the input
# table in CPU memory on both hosts that timed it (runs 26, 28: +7%, +4-9%). The old fit (6000, 0.47 s a
# micro-step, before the host-side levers of runs 16-24) never split a step.
CPU_TOKENS = 4800
# Every layer recomputed: 0.714 s against 0.532 (22 and 28 of 32 layers: 0.347 and 0.342 of that a layer's share);
# checkpoints to pinned CPU memory and back on top (2 rows x 2, all recomputed: 0.798 s).
RECOMPUTE_GPU = 0.34      # recomputing every layer: extra GPU time, relative to the step without recomputation
RECOMPUTE_CPU = 0.33      # ... and extra host time (its forward is dispatched again)
OFFLOAD_COST = 0.16       # checkpoints to pinned CPU memory and back, per token
HEAD_STREAM_TOKENS = 1000  # the output layer over PCIe twice a micro-step (2 x 1 GiB at ~25 GB/s)
INPUT_GATHER_TOKENS = 850  # the input rows gathered and pinned on the CPU before the GPU starts (4 x 1 rows: +55 ms)
OFFLOAD_HOST_SHARE = 0.5  # of the CPU memory left to this process, what offloaded layers may pin (the rest: data,
                          # checkpoint writes, the merge's 16-bit model, later)


# --------------------------------------------------------------------------------------------- the device

@dataclass(frozen=True)
class Device:
    type: str                         # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] = (0, 0)
    total_gib: float = 0.0
    budget_gib: float = 0.0           # what the job may use: the free memory, or GPU_MEMORY_GIB when lower
    capped: bool = False
    peak_tflops: float = 0.0
    host_gib: float = math.inf        # CPU memory this process may still take (pinned buffers come out of it)

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"


def peak_tflops(name: str) -> float:
    hits = [key for key in PEAK_BF16_TFLOPS if key.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else 0.0


def probe(limit_gib: float = 0.0) -> Device:
    """The device this process trains on; the budget is its free memory, capped at limit_gib when set."""
    if not torch.cuda.is_available():
        return Device("cpu", platform.processor() or platform.machine() or "cpu")
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    budget = free / GiB
    capped = bool(limit_gib) and limit_gib < budget
    return Device("cuda", props.name, (props.major, props.minor), round(total / GiB, 2),
                  round(min(budget, limit_gib) if capped else budget, 2), capped, peak_tflops(props.name),
                  round(host_budget_gib(), 1))


# cgroup v2, then v1: (limit, usage) files of the container this process runs in
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def host_budget_gib() -> float:
    """CPU memory this process may still take: what the machine has available, or what is left under the
    container's limit when lower (psutil reads /proc/meminfo, which shows a Kubernetes pod the whole node), shared
    by the training processes of this node (LOCAL_WORLD_SIZE)."""
    import psutil

    available = psutil.virtual_memory().available
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # v2 writes "max" when there is no limit
            available = min(available, int(limit) - usage)
        break
    return max(0, available) / GiB / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def apply_memory_cap(device: Device) -> None:
    """Make the caching allocator stop at the budget, as a smaller card would (CUDA context excluded)."""
    if device.cuda and device.capped:
        torch.cuda.set_per_process_memory_fraction(min(1.0, device.budget_gib / device.total_gib))


# ------------------------------------------------------------------------------------- the model's shape

@dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    plain_head: bool = True       # no logit soft-capping or scaling: the streamed output layer can stand in
    attention_softcap: float = 0.0  # Gemma-2's tanh cap on attention scores
    sliding_window: int = 0         # the shortest attention window of any layer, 0 when every layer sees it all

    @classmethod
    def of(cls, config) -> Shape:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        plain = not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale",
                                                                   "output_multiplier", "lm_head_multiplier",
                                                                   "logits_scaling"))
        layer_types = getattr(config, "layer_types", None)
        windowed = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", True)
        return cls(config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   heads, getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)), plain,
                   float(getattr(config, "attn_logit_softcapping", None) or 0.0),
                   int(getattr(config, "sliding_window", None) or 0) if windowed else 0)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Parameters of the adapted linear layers of all decoder layers (what NF4 quantizes)."""
        h = self.hidden
        return self.layers * (h * self.q * 2 + h * self.kv * 2 + 3 * h * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params * (1 if self.tied else 2)

    def lora_params(self, r: int) -> int:
        h, i = self.hidden, self.intermediate
        per_layer = (h + self.q) + 2 * (h + self.kv) + (self.q + h) + 2 * (h + i) + (i + h)
        return self.layers * r * per_layer


# ---------------------------------------------------------------------------------------------- levers

@dataclass
class Levers:
    attn_implementation: str = "sdpa"
    liger: bool = False
    lora_kernel: bool = False
    dropout_in_kernel: bool = False   # the adapter's dropout mask drawn inside Triton kernels, never stored
    nf4_kernel: bool = False          # 4-bit weights dequantized by one Triton kernel, not bitsandbytes' three
    dequant_cache: bool = False
    checkpointing: str = "none"       # none | partial | full | offload
    checkpoint_layers: int = 0        # decoder layers recomputed in backward
    offloaded_layers: int = 0         # decoder layers (the first ones) whose activations go to CPU memory instead
    micro_batch_size: int = 1
    grad_accum: int = 1
    offload_embeddings: bool = False  # the input embedding table in CPU memory
    offload_head: bool = False        # ... and the output layer too, streamed in chunks
    long_context: bool = False        # the long-context mode plans and installs its own memory levers
    tokens: int = 0                   # tokens in one micro-batch, as planned
    dataloader_workers: int = 0
    estimated_peak_gib: float = 0.0
    budget_gib: float = 0.0
    device: str = "cpu"
    reasons: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What preflight prints: each lever with the reason it was chosen."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "reasons"}
        out["why"] = dict(self.reasons)
        return out


# Families whose decoder layer ends in `residual + mlp(post_attention_layernorm(h))`, the MLP in
# `down(act(gate(x)) * up(x))`: nothing after the down projection saves anything for backward.
SKIP_MLP_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "granite"}


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward called now is a recompute (a checkpoint's, or that of
    job.longctx's chunked MLP)."""
    return torch._C._current_graph_task_id() != -1


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def varlen_available() -> bool:
    """PyTorch's own variable-length flash attention (torch.nn.attention.varlen), on a CUDA GPU that runs it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def liger_supports(model_type: str) -> bool:
    if not (_available("liger_kernel") and _available("triton")):
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # liger imports triton kernels; any failure there means no liger  # noqa: BLE001
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def capabilities() -> dict:
    """What this process can run; `choose` takes it as an argument so tests can pretend."""
    return {"varlen": varlen_available(), "flex": flex_available(), "flash_attn": _available("flash_attn"),
            "liger": _available("liger_kernel") and _available("triton"), "triton": HAVE_TRITON}


# ---------------------------------------------------------------------------------------- memory model

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
    """How many of a partial plan's recomputed layers auto offloads instead (job.longctx.LayerOffload): no more
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


def step_cost(tokens: int, recomputed: int, layers: int, offload: bool = False, streamed_head: bool = False,
              cpu_input: bool = False) -> float:
    """Relative time per token of a micro-step (lower is faster): max(host, GPU) over the tokens."""
    share = recomputed / max(1, layers)
    gpu = tokens * (1 + RECOMPUTE_GPU * share + (OFFLOAD_COST if offload else 0.0))
    gpu += (HEAD_STREAM_TOKENS if streamed_head else 0) + (INPUT_GATHER_TOKENS if cpu_input else 0)
    host = CPU_TOKENS * (1 + RECOMPUTE_CPU * share)
    return max(gpu, host) / tokens


# ---------------------------------------------------------------------------------------------- choose

def _flag(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "true"


def choose(s: Settings, shape: Shape, device: Device, caps: dict | None = None) -> Levers:
    """Pick every lever from the settings (a forced value wins), the model's shape and the device."""
    caps = capabilities() if caps is None else caps
    why: dict[str, str] = {}
    lv = Levers(device=device.name if device.cuda else "cpu", budget_gib=device.budget_gib)

    # attention
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

    # liger
    liger_ok = device.cuda and caps.get("liger", False) and liger_supports(shape.model_type)
    lv.liger = _flag(s.liger, liger_ok)
    if s.liger == "true" and not liger_ok:
        raise ConfigError("LIGER=true needs a CUDA GPU, liger-kernel (requirements-gpu.txt) and a model type it "
                          f"supports ({shape.model_type}); use auto")
    why["liger"] = ("forced by LIGER" if s.liger != "auto" else
                    "fused RMSNorm, SwiGLU and RoPE kernels" if liger_ok else
                    "needs a CUDA GPU and liger-kernel (Triton)" if not device.cuda or not caps.get("liger") else
                    f"liger has no kernels for {shape.model_type}")

    # fused LoRA kernel
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

    lv.dataloader_workers = s.dataloader_workers if s.dataloader_workers >= 0 else (2 if device.cuda else 0)
    why["dataloader_workers"] = ("set by DATALOADER_WORKERS" if s.dataloader_workers >= 0 else
                                 "2 workers with pinned memory collate the next batch while the GPU trains"
                                 if device.cuda else "CPU: collate in the main process")

    _plan_memory(s, shape, device, lv, why)
    lv.reasons = why
    return lv


def _plan_memory(s: Settings, shape: Shape, device: Device, lv: Levers, why: dict) -> None:
    """Micro batch, recomputation, weight cache and embedding offload: the fastest plan that fits the budget."""
    rows = s.micro_batch_size * s.grad_accum
    layers = shape.layers

    def fits(plan: Levers, tokens: int) -> bool:
        return estimate_gib(shape, s, plan, tokens) <= usable_gib(device.budget_gib)

    if not device.cuda:
        lv.micro_batch_size, lv.grad_accum = s.micro_batch_size, s.grad_accum
        mode = {"auto": "none", "true": "full", "false": "none", "offload": "full"}[s.gradient_checkpointing]
        lv.checkpointing, lv.checkpoint_layers = mode, layers if mode != "none" else 0
        lv.dequant_cache = s.dequant_cache == "true"
        lv.offload_embeddings = lv.offload_head = s.offload_embeddings == "true"
        why["checkpointing"] = ("forced by GRADIENT_CHECKPOINTING" if s.gradient_checkpointing != "auto" else
                                "CPU: memory is not the limit, so nothing is recomputed")
        why["micro_batch_size"] = "as configured"
        why["dequant_cache"] = "forced by DEQUANT_CACHE" if lv.dequant_cache else "off (a GPU lever)"
        why["offload_embeddings"] = "forced by OFFLOAD_EMBEDDINGS" if lv.offload_embeddings else "off (a GPU lever)"
        return

    from job import longctx  # imported here: longctx uses this module

    if longctx.decide(s, s.micro_batch_size * s.max_length, device.cuda)[0]:  # the mode plans its own memory
        _plan_long_context(s, shape, device, lv, why)
        return

    micro_options = [m for m in range(min(rows, s.micro_batch_size), 0, -1) if rows % m == 0]
    forced = s.gradient_checkpointing
    if s.offload_embeddings == "true" and not shape.plain_head:
        raise ConfigError("OFFLOAD_EMBEDDINGS=true: this model scales or caps its logits, which the streamed "
                          "output layer does not do; use auto")
    # (input embedding, output layer) in CPU memory: the input alone costs a row gather a step; the output layer
    # streams 2 x its size over PCIe a micro-step, and a tied one goes with the input
    both, input_only = (True, True), (True, shape.tied)
    embed_options = {"auto": ((False, False),) if s.strategy in SHARDED else  # sharded: untested, not moved
                     ((False, False), input_only, both) if shape.plain_head else
                     ((False, False),) if shape.tied else ((False, False), input_only),
                     "true": (both,), "false": ((False, False),)}[s.offload_embeddings]
    best = None
    for offload_embeddings, offload_head in dict.fromkeys(embed_options):
        for m in micro_options:
            tokens = m * s.max_length
            if forced == "false":
                modes = [("none", 0)]
            elif forced == "true":
                modes = [("full", layers)]
            elif forced == "offload":
                modes = [("offload", layers)]
            else:
                modes = [("none", 0)] + [("partial", k) for k in range(1, layers)] + [("full", layers),
                                                                                      ("offload", layers)]
            for mode, k in modes:
                plan = dataclasses.replace(lv, checkpointing=mode, checkpoint_layers=k, micro_batch_size=m,
                                           grad_accum=rows // m, offload_embeddings=offload_embeddings,
                                           offload_head=offload_head, dequant_cache=False)
                if fits(plan, tokens):
                    cost = step_cost(tokens, k, layers, mode == "offload", offload_head, offload_embeddings)
                    if best is None or cost < best[0] - 1e-9:
                        best = (cost, plan, tokens)
                    break  # fewer recomputed layers at this micro batch did not fit; more only cost time
    if best is None:  # nothing fits: the leanest plan, and say so
        plan = dataclasses.replace(lv, checkpointing="offload" if forced in ("auto", "offload") else
                                   {"true": "full", "false": "none"}[forced],
                                   checkpoint_layers=0 if forced == "false" else layers, micro_batch_size=1,
                                   grad_accum=rows, offload_embeddings=s.offload_embeddings != "false",
                                   offload_head=s.offload_embeddings != "false" and shape.plain_head)
        best = (math.inf, plan, s.max_length)
        why["memory"] = (f"no plan fits {device.budget_gib:.1f} GiB by the estimate; trying the leanest one "
                         "(expect an out-of-memory error on a card this small)")
    _, plan, tokens = best
    lv.tokens = tokens
    for name in ("checkpointing", "checkpoint_layers", "micro_batch_size", "grad_accum", "offload_embeddings",
                 "offload_head"):
        setattr(lv, name, getattr(plan, name))

    # the first recomputed layers' activations to pinned CPU memory instead: their copies out and back overlap the
    # recomputed layers' forward and backward, within the GPU memory the kept layers use at other times
    lv.offloaded_layers = 0
    if lv.checkpointing == "partial" and s.offload_layers != 0:
        wanted = (s.offload_layers if s.offload_layers > 0 else
                  0 if s.strategy in SHARDED else  # gathered shards would look like activations: untested
                  offloadable_layers(lv.checkpoint_layers, layers, pinned_layer_bytes(shape, tokens), device.host_gib))
        lv.offloaded_layers = min(wanted, lv.checkpoint_layers)
        lv.checkpoint_layers -= lv.offloaded_layers
        if lv.checkpoint_layers == 0:
            lv.checkpointing = "none"

    # the 16-bit weight cache: two dequantizations per layer and step fewer, on the host and on the GPU (+6% on an
    # H100, docs/performance.md run 9), for a copy of every adapted weight (13 GiB for 8B): auto takes it only
    # where nothing is recomputed and the copy still fits, since memory given to activations pays more
    cache_ok = s.quantization == "nf4" and lv.lora_kernel
    if s.dequant_cache == "true" and not cache_ok:
        raise ConfigError("DEQUANT_CACHE=true needs QUANTIZATION=nf4 and the fused LoRA kernel (LORA_KERNEL)")
    cached = dataclasses.replace(lv, dequant_cache=True)
    lv.dequant_cache = cache_ok and (s.dequant_cache == "true" or s.dequant_cache == "auto" and (
        lv.checkpointing == "none" and fits(cached, tokens)))
    lv.estimated_peak_gib = round(estimate_gib(shape, s, lv, tokens), 1)

    where = f"{device.budget_gib:.1f} GiB {'cap' if device.capped else 'free'}"
    why["offloaded_layers"] = (
        f"the first {lv.offloaded_layers} layers' activations go to pinned CPU memory in the forward and come back "
        f"in the backward instead of being recomputed (~{lv.offloaded_layers * pinned_layer_bytes(shape, tokens) / GiB:.0f}"
        " GiB of CPU memory)" if lv.offloaded_layers else
        "forced off by OFFLOAD_LAYERS=0" if s.offload_layers == 0 else
        "none: only where a plan recomputes some layers and keeps others" if lv.checkpointing != "partial" else
        f"none: STRATEGY={s.strategy} gathers weight shards inside each layer (untested)" if s.strategy in SHARDED
        else "none: min(recomputed, kept, layers / 4, what half the free CPU memory holds) is 0")
    not_kept = lv.checkpoint_layers + lv.offloaded_layers
    if forced != "auto":
        why["checkpointing"] = "forced by GRADIENT_CHECKPOINTING"
    elif not_kept == 0:
        why["checkpointing"] = f"everything fits in {where}: nothing is recomputed"
    elif lv.checkpointing in ("partial", "none"):
        why["checkpointing"] = (f"{lv.checkpoint_layers} of {layers} layers recomputed"
                                + (f" and {lv.offloaded_layers} offloaded" if lv.offloaded_layers else "")
                                + f": the fewest not kept that fit {lv.micro_batch_size} x {s.max_length} tokens "
                                f"in {where}")
    elif lv.checkpointing == "full":
        why["checkpointing"] = f"every layer recomputed to fit {where}"
    else:
        why["checkpointing"] = f"every layer recomputed, checkpoints in pinned CPU memory, to fit {where}"
    split = " (split: the fastest plan that fits)" if lv.micro_batch_size < s.micro_batch_size else ""
    why["micro_batch_size"] = (f"{lv.micro_batch_size} rows x {lv.grad_accum} accumulation steps = the configured "
                               f"{rows} rows per optimizer step{split}")
    copy = f"{shape.linear_params * 2 / GiB:.1f} GiB"
    why["dequant_cache"] = ("forced by DEQUANT_CACHE" if s.dequant_cache != "auto" else
                            f"a 16-bit copy of the 4-bit weights ({copy}) fits beside the plan: no dequantizing "
                            "per pass" if lv.dequant_cache else
                            "off: needs the fused LoRA kernel and 4-bit weights" if not cache_ok else
                            f"off: the 16-bit copy ({copy}) would not fit without recomputing layers")
    table = shape.embedding_params * 2 / GiB
    why["offload_embeddings"] = ("forced by OFFLOAD_EMBEDDINGS" if s.offload_embeddings != "auto" else
                                 f"the input embedding and the output layer ({2 * table:.1f} GiB) move to CPU memory "
                                 "(the output layer streamed in chunks): nothing fits with them on the GPU"
                                 if lv.offload_head and not shape.tied else
                                 f"the input embedding ({table:.1f} GiB) moves to CPU memory (a row gather a step): "
                                 "it buys a faster plan" if lv.offload_embeddings else "kept on the GPU")
    why["estimate"] = f"estimated peak {lv.estimated_peak_gib} GiB of {where}"


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


# ------------------------------------------------------------------------------------- applying levers

def register_attention() -> None:
    """Make "varlen" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)


# Attention implementations that find the samples of a packed row themselves (from cu_seq_lens or the position
# ids) and need no mask; job.longctx adds its own.
MASK_FREE_ATTENTION = {VARLEN}
# What the packing guard passes as the mask of a padding-free packed batch to those implementations: transformers
# returns a 4D mask as it is, where building one would first read the position ids back from the GPU
# (masking_utils.find_packed_sequence_indices), a stall at every forward. The attention treats it as no mask.
NO_MASK = torch.empty((0, 0, 0, 0), dtype=torch.bool)


def real_mask(attention_mask):
    return None if attention_mask is NO_MASK else attention_mask


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask at all when the attention can take the sample boundaries from the position ids; else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    plain = q_length == kv_length and not _nonzero(q_offset) and not _nonzero(kv_offset)
    if plain and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _nonzero(value) -> bool:
    return bool(value.item() != 0) if isinstance(value, torch.Tensor) else bool(value)


_BOUNDS: list = [None, None, None]  # position_ids tensor, cu_seqlens, max length: one forward's worth


def sequence_bounds(position_ids: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest sample, from position ids that restart at each sample.

    A new sample starts where the position does not follow the previous one, and at every row start. Computed
    once per forward (every layer passes the same position_ids tensor)."""
    if _BOUNDS[0] is position_ids:
        return _BOUNDS[1], _BOUNDS[2]
    pos = position_ids.expand(batch, length).reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    starts[::length] = True
    first = starts.nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([pos.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    _BOUNDS[:] = [position_ids, cu, longest]
    return cu, longest


_VARLEN_ARGS: dict = {}


def _varlen(q, k, v, cu, longest, scale):
    from torch.nn.attention.varlen import varlen_attn

    if cu.numel() == 2:  # one sample in the row: cuDNN's kernel is 1.6-1.7x flash's on an H100 (docs/long-context.md)
        return _one_sample(q, k, v, scale)

    if not _VARLEN_ARGS:
        params = inspect.signature(varlen_attn).parameters
        _VARLEN_ARGS.update(causal=("is_causal" in params), window=("window_size" in params),
                            gqa=("enable_gqa" in params))
    kwargs = {"scale": scale}
    if _VARLEN_ARGS["causal"]:
        kwargs["is_causal"] = True
    elif _VARLEN_ARGS["window"]:
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if _VARLEN_ARGS["gqa"]:
            kwargs["enable_gqa"] = True
        else:
            k, v = expand_kv(k, v, q.shape[1])
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def expand_kv(k, v, heads: int):
    """Token-major (T, Hkv, D) keys and values repeated to `heads` heads, for kernels without GQA."""
    repeat = heads // k.shape[1]
    if repeat == 1:
        return k, v
    return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)


def as_bhtd(t):
    """A token-major (T, H, D) tensor as the (1, H, T, D) view sdpa's kernels take (no copy)."""
    return t.unsqueeze(0).transpose(1, 2)


def _one_sample(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (as_bhtd(t) for t in (q, *expand_kv(k, v, q.shape[1])))
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).squeeze(0)


def _varlen_reference(q, k, v, cu, scale):
    """The same attention, one sample at a time through sdpa: the CPU path and the GPU self-check."""
    out = torch.empty_like(q)
    repeat = q.shape[1] // k.shape[1]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if repeat > 1:
            ks, vs = ks.repeat_interleave(repeat, dim=0), vs.repeat_interleave(repeat, dim=0)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def flatten_for_varlen(query, key, value, scaling, kwargs):
    """(batch, heads, length, dim) tensors as one token-major sequence, with the samples' boundaries."""
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and kwargs.get("max_length_q") and batch == 1:
        cu, longest = cu.to(device=query.device, dtype=torch.int32), int(kwargs["max_length_q"])
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=query.device)[None]
        cu, longest = sequence_bounds(position_ids, batch, length)
    scale = scaling if scaling is not None else dim**-0.5
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    return q, k, v, cu, longest, scale


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention interface: query (B, Hq, T, D), key/value (B, Hkv, S, D) -> (B, T, Hq, D).

    Without a mask and with queries and keys of one length (training, evaluation, a prefill), every sample of a
    packed row attends to itself only: boundaries come from cu_seq_lens (TRL's padding-free collator computes
    them) or from where the position ids restart. Anything else (padding masks, decoding with a cache) is sdpa's.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    attention_mask = real_mask(attention_mask)
    if attention_mask is not None or key.shape[2] != length or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q, k, v, cu, longest, scale = flatten_for_varlen(query, key, value, scaling, kwargs)
    out = _varlen(q, k, v, cu, longest, scale) if query.is_cuda else _varlen_reference(q, k, v, cu, scale)
    return out.reshape(batch, length, heads, dim), None


# -------------------------------------------------------------------------------------- packing guard

def backbone(model):
    """The decoder stack (LlamaModel...) under a CausalLM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix, base)


def install_packing_guard(model) -> None:
    """Keep packed samples apart whatever the caller passes.

    transformers derives a per-sample mask from position ids that restart only when no attention_mask is passed
    and no KV cache exists (masking_utils._preprocess_mask_arguments). A mask of ones (a collator or a user
    calling the model by hand) or use_cache on (eval mode, where the config's use_cache=True applies) silently
    lets every sample attend to the ones before it. This pre-hook on the decoder stack sees packed inputs (a
    restart in position_ids, no cache passed in: so never generation) and drops an all-ones mask and turns
    use_cache off; a padding mask with zeros becomes a 4D per-sample mask. Hand-written because no library
    option covers every caller: TRL's collator avoids the problem only for its own batches.
    """
    stack = backbone(model)
    if getattr(stack, "_job_packing_guard", None) is not None:
        return
    stack._job_packing_guard = stack.register_forward_pre_hook(_packing_guard, with_kwargs=True)


def _packing_guard(module, args, kwargs):
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    mask = kwargs.get("attention_mask")
    if mask is None and kwargs.get("use_cache") is False:  # TRL's padding-free batches: no check, no GPU sync
        if module.config._attn_implementation in MASK_FREE_ATTENTION:
            kwargs["attention_mask"] = NO_MASK
            return args, kwargs
        return None  # already what transformers needs
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        return None  # a prepared 4D mask or BlockMask is the caller's own
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None and args:
        reference = args[0]
    batch = reference.shape[0] if reference is not None else position_ids.shape[0]
    samples = find_packed_sequence_indices(position_ids.expand(batch, -1))
    if samples is None:
        return None
    kwargs["use_cache"] = False
    if mask is None or bool(mask.all()):
        kwargs["attention_mask"] = None
        return args, kwargs
    kwargs["attention_mask"] = _packed_padding_mask(module, mask, position_ids.expand(batch, -1), samples)
    return args, kwargs


def _packed_padding_mask(stack, mask, position_ids, samples):
    """Causal, within one sample, and not onto padding: as a 4D mask (or BlockMask) for the configured kernel."""
    from transformers.masking_utils import (
        create_causal_mask,
        packed_sequence_mask_function,
    )

    embed = stack.get_input_embeddings().weight
    dtype = embed.dtype if embed.dtype.is_floating_point else torch.float32
    shape_only = torch.empty((mask.shape[0], mask.shape[1], 0), dtype=dtype, device=mask.device)
    return create_causal_mask(config=stack.config, inputs_embeds=shape_only, attention_mask=mask, cache=None,
                              position_ids=position_ids, and_mask_function=packed_sequence_mask_function(samples),
                              allow_is_causal_skip=False)


# ------------------------------------------------------------------------------------ fused LoRA layer

try:  # Triton kernels for the adapter's dropout; absent on CPU-only installs, where torch ops do the same
    import triton
    import triton.language as tl

    @triton.jit
    def _keep(seed, rows, k0, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dropout decisions of rows x [k0, k0 + BLOCK_K): one Philox draw (4 x 32 bits) gives eight 16-bit
        uniforms for eight neighbouring columns; kept where >= p * 2^16. A function of (seed, row, column) only,
        so every kernel and every tiling draws the same mask."""
        groups = (k0 // 8) + tl.arange(0, BLOCK_K // 8)
        offsets = rows[:, None] * (K // 8) + groups[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, offsets)
        low = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        high = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        return tl.reshape(tl.join(low, high), (BLOCK_M, BLOCK_K)) >= threshold

    @triton.jit(do_not_specialize=["M", "seed"])
    def _lora_down_fwd(X, A, H, M, K, R, stride_xm, stride_am, stride_hm, seed, threshold, inv_keep,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """H = dropout(X) @ A^T, the dropout mask drawn from (seed, element index) and never stored."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
            keep = _keep(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(X.dtype.element_ty)
            a = tl.load(A + rr[:, None] * stride_am + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K),
                        other=0.0)
            acc += tl.dot(x, tl.trans(a))
        tl.store(H + rows[:, None] * stride_hm + rr[None, :], acc.to(H.dtype.element_ty),
                 mask=(rows[:, None] < M) & (rr[None, :] < R))

    @triton.jit(do_not_specialize=["M", "seed", "rows_per_split"])
    def _lora_down_bwd_a(GH, X, GA, M, K, R, stride_gm, stride_xm, seed, threshold, inv_keep, rows_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """GA += GH^T @ dropout(X) over one slice of the rows (fp32 atomics), the mask drawn again."""
        k0 = tl.program_id(0) * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        start = tl.program_id(1) * rows_per_split
        end = tl.minimum(start + rows_per_split, M)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            gh = tl.load(GH + rows[:, None] * stride_gm + rr[None, :], mask=(rows[:, None] < end) & (rr[None, :] < R),
                         other=0.0)
            inside = (rows[:, None] < end) & (cols[None, :] < K)
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
            keep = _keep(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(X.dtype.element_ty)
            acc += tl.dot(tl.trans(gh.to(X.dtype.element_ty)), x)
        tl.atomic_add(GA + rr[:, None] * K + cols[None, :], acc, mask=(rr[:, None] < R) & (cols[None, :] < K))

    @triton.jit(do_not_specialize=["M", "seed"])
    def _lora_up_bwd_x(GX, GH, A, M, K, R, stride_gxm, stride_gm, stride_am, seed, threshold, inv_keep,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """GX += dropout_backward(GH @ A): the adapter's share of the input gradient, added in place."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1) * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        rr = tl.arange(0, BLOCK_R)
        gh = tl.load(GH + rows[:, None] * stride_gm + rr[None, :], mask=(rows[:, None] < M) & (rr[None, :] < R),
                     other=0.0)
        a = tl.load(A + rr[:, None] * stride_am + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        acc = tl.dot(gh.to(A.dtype.element_ty), a)
        keep = _keep(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        pointers = GX + rows[:, None] * stride_gxm + cols[None, :]
        gx = tl.load(pointers, mask=inside, other=0.0).to(tl.float32)
        gx += tl.where(keep, acc * inv_keep, 0.0)
        tl.store(pointers, gx.to(GX.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["M", "seed"])
    def _keep_mask(OUT, M, K, seed, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """The mask the three kernels above draw, as int8: for the checks only."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1) * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        keep = _keep(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K)
        tl.store(OUT + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < M) & (cols[None, :] < K))

    @triton.jit(do_not_specialize=["N"])
    def _nf4_dequant(W, ABSMAX, CODE2, ABSMAX2, OFFSET, NF4, OUT, N, BLOCKSIZE: tl.constexpr,
                     BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
        """OUT = the NF4 weight W as bitsandbytes dequantizes it: two values a byte, high nibble first, each
        NF4[nibble] * its block's scale; a double-quantized scale is CODE2[q] * ABSMAX2[block // BLOCKSIZE2] +
        OFFSET, computed here rather than in two launches of its own. The (byte, nibble) tile is stored as it is:
        flattened first it took 61 us for a 14336 x 4096 weight on an H100 against 57 (docs/performance.md, run
        23)."""
        byte = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = byte < (N + 1) // 2
        packed = tl.load(W + byte, mask=inside, other=0).to(tl.int32)
        block = byte // (BLOCKSIZE // 2)
        if NESTED:
            q = tl.load(ABSMAX + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=inside, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=inside, other=0.0)
        values = tl.join(tl.load(NF4 + (packed >> 4)) * scale, tl.load(NF4 + (packed & 15)) * scale)
        index = byte[:, None] * 2 + tl.arange(0, 2)[None, :]
        tl.store(OUT + index, values.to(OUT.dtype.element_ty), mask=index < N)

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


def _threshold(p: float) -> int:
    return round(p * 65536)


_TRITON_INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))


def _use_triton(x: torch.Tensor, p: float) -> bool:
    return (HAVE_TRITON and p > 0 and (x.is_cuda or _TRITON_INTERPRET) and x.numel() < 2**31
            and x.shape[-1] % 8 == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def _block_r(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def dropout_down(x2, a, seed, p):
    """dropout(x2) @ a^T with the mask drawn in the kernel from `seed` (Triton)."""
    m, k = x2.shape
    h = torch.empty((m, a.shape[0]), dtype=x2.dtype, device=x2.device)
    _lora_down_fwd[(triton.cdiv(m, 32),)](x2, a, h, m, k, a.shape[0], x2.stride(0), a.stride(0), h.stride(0),
                                          seed, _threshold(p), 1.0 / (1.0 - p), BLOCK_M=32, BLOCK_K=128,
                                          BLOCK_R=_block_r(a.shape[0]))
    return h


def dropout_down_grad(gh, x2, seed, p):
    """gh^T @ dropout(x2) (fp32), the same mask drawn again."""
    m, k = x2.shape
    r = gh.shape[1]
    out = torch.zeros((r, k), dtype=torch.float32, device=x2.device)
    columns = triton.cdiv(k, 128)
    splits = max(1, min(triton.cdiv(m, 64), triton.cdiv(4 * 132, columns)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), 64) * 64
    _lora_down_bwd_a[(columns, triton.cdiv(m, rows_per_split))](
        gh, x2, out, m, k, r, gh.stride(0), x2.stride(0), seed, _threshold(p), 1.0 / (1.0 - p), rows_per_split,
        BLOCK_M=64, BLOCK_K=128, BLOCK_R=_block_r(r))
    return out


def dropout_up_grad_(grad_x, gh, a, seed, p):
    """grad_x += dropout_backward(gh @ a), in place."""
    m, k = grad_x.shape
    _lora_up_bwd_x[(triton.cdiv(m, 64), triton.cdiv(k, 128))](
        grad_x, gh, a, m, k, a.shape[0], grad_x.stride(0), gh.stride(0), a.stride(0), seed, _threshold(p),
        1.0 / (1.0 - p),
        BLOCK_M=64, BLOCK_K=128, BLOCK_R=_block_r(a.shape[0]))
    return grad_x


def keep_mask(m: int, k: int, seed: int, p: float, device) -> torch.Tensor:
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    _keep_mask[(triton.cdiv(m, 64), triton.cdiv(k, 128))](out, m, k, seed, _threshold(p), BLOCK_M=64, BLOCK_K=128)
    return out.bool()


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + s * dropout(x) A^T B^T for a frozen (4-bit or 16-bit) W, in one function.

    Forward: one matmul for the base, one thin matmul for dropout(x) A^T, and B's contribution added by the
    matmul epilogue (addmm_) into y: no separate scale, add or clone passes (PEFT makes four over y). Backward: the
    input gradient gets A's contribution the same way; W is dequantized again rather than kept. Inputs are saved
    by reference, so q, k and v share one saved copy of their common input. With dropout on a GPU, Triton kernels
    draw the mask from a seed inside the thin matmuls and draw it again in backward: no mask is stored and no
    dropped copy of the input is made. On CPU, torch's dropout and a stored mask do the same.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scale, p, output_unused=False):
        seed = mask = None
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
            if output_unused:  # a recompute needs only what this saves: no dequantization, no matmul
                y = x2.new_empty(x2.shape[0], base.out_features)
            else:
                y = torch.mm(x2, frozen_weight(base, x.dtype).t())
                if base.bias is not None:
                    y += base.bias.to(y.dtype)
            if _use_triton(x2, p):
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # CPU generator: no GPU sync
                h = dropout_down(x2, a, seed, p)
            elif p > 0:
                dropped, mask = torch.native_dropout(x2, p, True)
                h = torch.mm(dropped, a.t())
            else:
                h = torch.mm(x2, a.t())
            if not output_unused:
                y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, mask, h, lora_a, lora_b)
        ctx.base, ctx.scale, ctx.p, ctx.seed, ctx.shape = base, scale, p, seed, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, mask, h, lora_a, lora_b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        p, seed = ctx.p, ctx.seed
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            a, b = lora_a.to(g.dtype), lora_b.to(g.dtype)
            grad_b = torch.mm(g.t(), h).mul_(ctx.scale).to(lora_b.dtype) if need_b else None
            gh = torch.mm(g, b).mul_(ctx.scale)                      # d loss / d (dropout(x) A^T)
            grad_a = grad_x = None
            if need_a:
                if seed is not None:
                    grad_a = dropout_down_grad(gh, x2, seed, p).to(lora_a.dtype)
                else:
                    dropped = x2 if mask is None else x2 * mask * (1.0 / (1.0 - p))
                    grad_a = torch.mm(gh.t(), dropped).to(lora_a.dtype)
            if need_x:
                grad_x = torch.mm(g, frozen_weight(ctx.base, g.dtype))
                if seed is not None:
                    dropout_up_grad_(grad_x, gh, a.contiguous(), seed, p)
                elif mask is None:
                    grad_x.addmm_(gh, a)
                else:
                    grad_x.add_(torch.mm(gh, a).mul_(mask), alpha=1.0 / (1.0 - p))
                grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_a, grad_b, None, None, None, None


def frozen_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a (out, in) matrix of `dtype`: the cached copy, or dequantized now."""
    cached = getattr(base, "_job_weight_cache", None)
    if cached is not None:
        return cached if cached.dtype == dtype else cached.to(dtype)
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if base.__dict__.get("_job_nf4_kernel"):
        weight = nf4_dequantize(weight.data, quant_state)
    elif quant_state is not None:
        import bitsandbytes.functional as bnbf

        if getattr(quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its bf16 CPU inference kernel in eval mode; undo that
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
            quant_state = weight.quant_state
        weight = bnbf.dequantize_4bit(weight.data, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def nf4_kernel_supports(weight, quant_state) -> bool:
    """Whether `nf4_dequantize` handles this 4-bit weight exactly as bitsandbytes would."""
    if not (HAVE_TRITON and quant_state is not None and weight.is_cuda and weight.is_contiguous()
            and quant_state.quant_type == "nf4" and quant_state.blocksize in (32, 64, 128, 256, 512, 1024)
            and quant_state.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not getattr(quant_state, "packing_format_for_cpu", False)
            and quant_state.shape is not None and quant_state.shape.numel() < 2**31
            and quant_state.code.numel() == 16 and quant_state.code.dtype == torch.float32
            and quant_state.code.device == weight.device and quant_state.absmax.device == weight.device):
        return False
    if not quant_state.nested:
        return quant_state.absmax.dtype == torch.float32
    inner = quant_state.state2
    return (quant_state.absmax.dtype == torch.uint8 and inner.code.numel() == 256
            and inner.code.dtype == inner.absmax.dtype == quant_state.offset.dtype == torch.float32
            and inner.code.device == inner.absmax.device == quant_state.offset.device == weight.device)


NF4_BLOCK = 1024  # bytes (2048 values) per Triton program, 4 warps: the fastest of 8 tile shapes on an H100


def nf4_dequantize(data: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` for NF4 in one Triton launch, where it makes three (the double-quantized
    scales, their offset, the weight) through Python, torch.ops dispatch and ctypes: host time that a recomputed
    layer's forward waits for (docs/performance.md, runs 8 and 23)."""
    n = quant_state.shape.numel()
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=data.device)
    if data.dtype != torch.uint8:  # a storage type other than bytes (bnb_4bit_quant_storage): the same bytes
        data = data.view(torch.uint8)
    absmax = quant_state.absmax
    if quant_state.nested:
        inner = quant_state.state2
        code2, absmax2, offset, blocksize2 = inner.code, inner.absmax, quant_state.offset, inner.blocksize
    else:
        code2 = absmax2 = offset = absmax
        blocksize2 = 1
    _nf4_dequant[(triton.cdiv(n, 2 * NF4_BLOCK),)](
        data, absmax, code2, absmax2, offset, quant_state.code, out, n, BLOCKSIZE=quant_state.blocksize,
        BLOCKSIZE2=blocksize2, NESTED=quant_state.nested, BLOCK=NF4_BLOCK, num_warps=4)
    return out


def _fused_lora_forward(self, x, *args, **kwargs):
    """Replacement forward of a PEFT LoRA linear layer; anything unusual goes to PEFT's own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A
            or name in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(name)
            or not x.dtype.is_floating_point):
        return self._job_peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    output_unused = self.__dict__.get("_job_output_unused_in_recompute", False) and in_backward()
    return _LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                             self.scaling[name], p, output_unused)


def lora_layers(model):
    """PEFT LoRA linear layers whose base is a 4-bit bitsandbytes or a plain 16-bit nn.Linear."""
    from peft.tuners.lora import LoraLayer

    try:
        import bitsandbytes as bnb
        four_bit = (bnb.nn.Linear4bit,)
    except ImportError:
        four_bit = ()
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            base = module.get_base_layer()
            if isinstance(base, four_bit) or type(base) is torch.nn.Linear:
                yield module


def install_lora_kernel(model) -> int:
    """Route every eligible LoRA layer through `_LoraLinear`; returns how many.

    In the families where nothing after the MLP saves anything, a recomputed layer's down projection only has to
    save its input: its output is marked unused in a recompute, which then skips its dequantization and matmul
    (27% of a Llama-3-8B layer's forward FLOPs; measured +0.7% to +4% tokens/s under 8-24 GiB caps)."""
    last = getattr(getattr(model, "config", None), "model_type", None) in SKIP_MLP_FAMILIES
    eligible = set(lora_layers(model))
    count = 0
    for name, layer in model.named_modules():
        if layer not in eligible:
            continue
        if "_job_peft_forward" not in layer.__dict__:
            layer._job_peft_forward = layer.forward
            layer.forward = _fused_lora_forward.__get__(layer)
        layer._job_output_unused_in_recompute = last and name.endswith("mlp.down_proj")
        count += 1
    return count


def install_nf4_kernel(model) -> int:
    """Dequantize the adapted layers' 4-bit weights with `nf4_dequantize` wherever it matches bitsandbytes; returns
    how many weights it covers."""
    count = 0
    for layer in lora_layers(model):
        base = layer.get_base_layer()
        quant_state = getattr(base.weight, "quant_state", None)
        if quant_state is not None and base.weight.is_cuda:  # the kernel reads the small tables in place, where
            quant_state.to(base.weight.device)                # bitsandbytes copies its code table at each call
        if nf4_kernel_supports(base.weight, quant_state):
            base._job_nf4_kernel = True
            count += 1
    return count


def remove_lora_kernel(model) -> None:
    for layer in lora_layers(model):
        if "_job_peft_forward" in layer.__dict__:
            layer.forward = layer.__dict__.pop("_job_peft_forward")


def install_dequant_cache(model) -> float:
    """Keep each 4-bit base weight's 16-bit copy on the GPU; returns the GiB it takes."""
    total = 0
    for layer in lora_layers(model):
        base = layer.get_base_layer()
        if getattr(base.weight, "quant_state", None) is not None and getattr(base, "_job_weight_cache", None) is None:
            with torch.no_grad():
                base._job_weight_cache = frozen_weight(base, base.weight.quant_state.dtype).contiguous()
            total += base._job_weight_cache.numel() * base._job_weight_cache.element_size()
    return total / GiB


# ------------------------------------------------------------------------------- embeddings in CPU memory

def device_map(levers: Levers, config, default, trust_remote_code: bool = False):
    """Where from_pretrained puts each module: `default` ({"": gpu}), except the frozen 16-bit input and output
    embeddings when OFFLOAD_EMBEDDINGS is on, which load straight into CPU memory (so they never take GPU
    memory, not even while loading)."""
    if not levers.offload_embeddings or not isinstance(default, dict) or set(default) != {""}:
        return default
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    offloaded = {id(skeleton.get_input_embeddings())}
    if levers.offload_head:
        offloaded.add(id(skeleton.get_output_embeddings()))
    gpu = default[""]
    mapping: dict = {}

    def place(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if id(child) in offloaded:
                mapping[full] = "cpu"
            elif any(id(m) in offloaded for m in child.modules()):
                place(child, full + ".")
            else:
                mapping[full] = gpu
        for name, _ in module.named_parameters(recurse=False):
            mapping[f"{prefix}{name}"] = gpu

    place(skeleton, "")
    return mapping


class CpuEmbedding(torch.nn.Module):
    """A frozen embedding table kept in CPU memory: lookups there, only the looked-up rows go to the GPU."""

    def __init__(self, weight: torch.Tensor, padding_idx, device: torch.device):
        super().__init__()
        cpu = weight.detach().to("cpu")
        self.weight = torch.nn.Parameter(cpu.pin_memory() if device.type == "cuda" else cpu, requires_grad=False)
        self.padding_idx = padding_idx
        self.target = device

    def forward(self, input_ids):
        rows = torch.nn.functional.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        if self.target.type != "cuda":
            return rows
        return rows.pin_memory().to(self.target, non_blocking=True)


class StreamedHead(torch.nn.Module):
    """A frozen output layer kept in (pinned) CPU memory and streamed to the GPU in vocabulary chunks.

    Training never builds the logits: `_StreamedLogProb` gives the per-token log-probabilities TRL's fused head
    gives, streaming the weight once in forward and once in backward (2 x its size over PCIe a step). The plain
    forward (evaluation, generation) returns logits, chunk by chunk."""

    chunk = 8192  # rows of the weight per transfer (64 MiB for Llama-3); the logits tile is tokens x chunk fp32

    def __init__(self, weight: torch.Tensor, device: torch.device):
        super().__init__()
        cpu = weight.detach().to("cpu")
        self.weight = torch.nn.Parameter(cpu.pin_memory() if device.type == "cuda" else cpu, requires_grad=False)
        self.bias = None
        self.target = device
        self.in_features, self.out_features = cpu.shape[1], cpu.shape[0]

    def forward(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        parts = [torch.mm(flat, _chunk_to(self.weight, start, self.chunk, hidden).t())
                 for start in range(0, self.out_features, self.chunk)]
        return torch.cat(parts, dim=-1).view(*hidden.shape[:-1], self.out_features)


def _chunk_to(weight, start, size, like):
    return weight[start:start + size].to(like.device, dtype=like.dtype, non_blocking=True)


class _StreamedLogProb(torch.autograd.Function):
    """log p(target), the entropy and whether the target is the top token, from hidden @ W^T with W in CPU memory,
    by an online log-sum-exp over vocabulary chunks; backward streams W again. Gradient for the hidden states
    only (the head is frozen); the entropy and top-1 outputs are metrics, without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        n = hidden.shape[0]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        running_max = torch.full((n,), float("-inf"), **f32)
        sum_exp, x_sum_exp, target_logit = torch.zeros(n, **f32), torch.zeros(n, **f32), torch.zeros(n, **f32)
        rows = torch.arange(n, device=hidden.device)
        for start in range(0, weight.shape[0], chunk):
            logits = torch.mm(hidden, _chunk_to(weight, start, chunk, hidden).t()).float()
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            rescale = torch.exp(running_max - new_max)
            e = torch.exp(logits - new_max[:, None])
            sum_exp = sum_exp * rescale + e.sum(dim=1)
            x_sum_exp = x_sum_exp * rescale + (e * logits).sum(dim=1)
            running_max = new_max
            inside = (targets >= start) & (targets < start + logits.shape[1])
            local = (targets - start).clamp(0, logits.shape[1] - 1)
            target_logit = torch.where(inside, logits[rows, local], target_logit)
        log_z = running_max + torch.log(sum_exp)
        entropy = log_z - x_sum_exp / sum_exp
        is_top1 = target_logit >= running_max
        ctx.save_for_backward(hidden, targets, log_z)
        ctx.weight, ctx.chunk = weight, chunk
        ctx.mark_non_differentiable(entropy, is_top1)
        return target_logit - log_z, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, targets, log_z = ctx.saved_tensors
        weight, chunk = ctx.weight, ctx.chunk
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        g = grad_logp.float()
        for start in range(0, weight.shape[0], chunk):
            w = _chunk_to(weight, start, chunk, hidden)
            logits = torch.mm(hidden, w.t()).float()
            grad_logits = torch.exp(logits - log_z[:, None]).mul_(-g[:, None])     # d/dlogits of log p = onehot - p
            inside = (targets >= start) & (targets < start + logits.shape[1])
            local = (targets - start).clamp(0, logits.shape[1] - 1)
            grad_logits[rows, local] += torch.where(inside, g, torch.zeros_like(g))
            grad_hidden += torch.mm(grad_logits.to(hidden.dtype), w).float()
        return grad_hidden.to(hidden.dtype), None, None, None


def offload_embeddings(model, head: bool = True) -> None:
    """Move the input embedding and (with `head`) the output layer to CPU memory (a no-op for ones already
    there)."""
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)  # the device map's own hooks; ours move the data
    gpu = next(p.device for p in model.parameters() if p.device.type != "cpu") if torch.cuda.is_available() \
        else torch.device("cpu")
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, CpuEmbedding):
        model.set_input_embeddings(CpuEmbedding(embedding.weight, embedding.padding_idx, gpu))
    output = model.get_output_embeddings()
    if head and output is not None and not isinstance(output, StreamedHead):
        model.set_output_embeddings(StreamedHead(output.weight, gpu))
    if getattr(model, "hf_device_map", None):
        # the CPU parts move their own data now; to accelerate the model is on one device again
        model.hf_device_map = {"": gpu.index if gpu.type == "cuda" else "cpu"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def install_streamed_head(model) -> None:
    """Replace TRL's fused LM head (installed by SFTTrainer on the base model) with the streamed one."""
    from trl.trainer.utils import FusedCausalLMOutput

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_job_streamed_head", False):
        return
    previous = base.forward
    stack = backbone(base)

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, fused_lm_head=False, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = stack(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        mask = targets != -100
        head = base.get_output_embeddings()
        logp, entropy, top1 = _StreamedLogProb.apply(hidden[mask], head.weight, targets[mask], head.chunk)
        logp, entropy, top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logp, entropy, top1))
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / denominator, log_probs=logp, entropy=entropy,
                                   is_top1=top1, label_mask=mask)

    base.forward = forward
    base._job_streamed_head = True


# --------------------------------------------------------------------------------------- the whole set

def prepare_base(model, levers: Levers) -> None:
    """Levers that act on the loaded base model, before the adapter wraps it."""
    install_packing_guard(model)
    if levers.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    if levers.offload_embeddings:
        offload_embeddings(model, head=levers.offload_head)
    if levers.checkpointing == "partial":
        _select_checkpointed_layers(model, levers.checkpoint_layers, levers.offloaded_layers)


def _select_checkpointed_layers(model, count: int, offloaded: int = 0) -> None:
    """After the Trainer turns checkpointing on for every layer, leave it on for `count` layers: spread evenly, or,
    with layers offloaded, right after them (the offloaded layers first, the kept ones last, see
    job.longctx.LayerOffload)."""
    original = model.activation_checkpointing_enable

    def enable(*args, **kwargs):
        original(*args, **kwargs)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = (offloaded <= index < offloaded + count if offloaded else
                                            (index + 1) * count // len(layers) > index * count // len(layers))

    model.activation_checkpointing_enable = enable


def prepare_adapted(model, levers: Levers) -> dict:
    """Levers that act on the PEFT-wrapped model (after SFTTrainer has added the adapter)."""
    done = {}
    if levers.offload_head:
        install_streamed_head(model)
    if levers.offload_embeddings:
        done["embeddings"] = ("input and output embeddings" if levers.offload_head else "input embedding") + \
            " in CPU memory"
    if levers.lora_kernel:
        done["fused_lora_layers"] = install_lora_kernel(model)
    if levers.nf4_kernel:
        done["nf4_kernel_weights"] = install_nf4_kernel(model)
    if levers.checkpointing == "offload" and not levers.long_context:
        from job import longctx

        done["checkpoints_offloaded"] = longctx.offload_checkpoints(model, levers.tokens).store.device.type
    if levers.offloaded_layers:
        from job import longctx

        longctx.offload_layers(model, levers.offloaded_layers, levers.checkpoint_layers, levers.tokens)
        done["offloaded_layers"] = levers.offloaded_layers
    if levers.dequant_cache:
        done["dequant_cache_gib"] = round(install_dequant_cache(model), 2)
    return done


def count_flops_once(trainer) -> None:
    """transformers' Trainer counts FLOPs for its logs after every micro-step by walking every module and parameter
    (`num_parameters`: ~50,000 generator frames on an 8B model, tens of ms under the profiler, while the GPU idles
    after the loss read that precedes it); the count cannot change during training, so it is taken once."""
    model = trainer.model
    if not hasattr(model, "num_parameters"):
        return  # transformers counts 0 for such a model too
    main_input = getattr(model, "main_input_name", "input_ids")
    per_token = 6 * model.num_parameters(exclude_embeddings=True)
    trainer.floating_point_ops = lambda inputs: per_token * inputs[main_input].numel() if main_input in inputs else 0


def plan(s: Settings, config, device: Device | None = None) -> Levers:
    """The levers for these settings and this model config on this machine."""
    device = device or probe(s.gpu_memory_gib)
    return choose(s, Shape.of(config), device)


def setup(s: Settings, config) -> Levers:
    """For a training process: probe the device, cap its memory if asked, choose and log the levers."""
    device = probe(s.gpu_memory_gib)
    apply_memory_cap(device)
    levers = choose(s, Shape.of(config), device)
    log.info("speed levers: %s", ", ".join(f"{k}={v}" for k, v in levers.summary().items() if k != "why"))
    for name, reason in levers.reasons.items():
        log.info("  %s: %s", name, reason)
    return levers
