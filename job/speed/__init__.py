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

The package, one concern a module:

    device         the card, its free memory, the host memory left, the allocator cap (GPU_MEMORY_GIB)
    shape          the model's widths, layers, heads and vocabulary as the planner reads them
    levers         the levers a plan sets, and what this process can run
    memory         the memory model: what a plan keeps on the GPU and in pinned CPU memory
    planner        `choose`: every lever from the settings, the shape and the device, with its reason
    attention      the "varlen" and "longctx" attention kernels, registered with transformers
    packing        the guard that keeps packed samples apart for any caller of the model
    kernels        the fused LoRA layer, the NF4 dequantization kernel, the 16-bit weight cache
    embeddings     the input embedding and output layer in CPU memory
    offload        saved activations in pinned CPU memory (checkpoints, whole layers)
    checkpointing  which layers are recomputed, and where their checkpoints live
    longcontext    the long-context mode (docs/long-context.md)
    prepare        the chosen levers installed on the model and the trainer
    modules        where things are in a transformers model

Packed rows also get a guard (`install_packing_guard`): transformers keeps packed samples apart only when no
attention_mask is passed and no KV cache is built; the guard makes that hold for any caller of the model.
"""

from job.speed.attention import register_attention
from job.speed.device import Device, apply_memory_cap, peak_tflops, probe
from job.speed.embeddings import device_map
from job.speed.levers import Levers
from job.speed.planner import choose, plan, setup
from job.speed.prepare import count_flops_once, prepare_adapted, prepare_base
from job.speed.shape import Shape

__all__ = ["Device", "Levers", "Shape", "apply_memory_cap", "choose", "count_flops_once", "device_map", "peak_tflops",
           "plan", "prepare_adapted", "prepare_base", "probe", "register_attention", "setup"]
