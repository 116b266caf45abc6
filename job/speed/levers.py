"""The levers a plan sets (`Levers`) and what this process can run (`capabilities`): the attention kernels, liger,
Triton."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch

from job.speed.kernels import HAVE_TRITON


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


VARLEN = "varlen"
