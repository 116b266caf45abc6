"""Which decoder layers are recomputed in the backward, and where their checkpoints live: the sole owner of
activation_checkpointing_enable."""

from __future__ import annotations

import functools
import logging
import time

import torch

from job.speed.device import GiB
from job.speed.modules import decoder_layers, hf_model, in_backward
from job.speed.offload import Handle, Offloader
from job.speed.shape import Shape

log = logging.getLogger(__name__)


def select_checkpointed_layers(model, count: int, offloaded: int = 0) -> None:
    """After the Trainer turns checkpointing on for every layer, leave it on for `count` layers: spread evenly, or,
    with layers offloaded, right after them (the offloaded layers first, the kept ones last, see
    job.speed.offload.LayerOffload)."""
    original = model.activation_checkpointing_enable

    def enable(*args, **kwargs):
        original(*args, **kwargs)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = (offloaded <= index < offloaded + count if offloaded else
                                            (index + 1) * count // len(layers) > index * count // len(layers))

    model.activation_checkpointing_enable = enable


def offload_checkpoints(model, tokens: int, *, simulate: bool = False) -> CheckpointOffload:
    """Only this mode's checkpointing on every decoder layer: inputs to pinned CPU memory asynchronously, back one
    layer ahead of the backward (job.speed's `offload` plan under a small memory cap uses it)."""
    mode = CheckpointOffload(hf_model(model), cache=False, simulate=simulate)
    mode.own_kernels = False  # job.speed's attention stays
    checkpoint_through(mode, tokens, Shape.of(mode.hf.config), simulate)
    return mode


def checkpoint_through(mode: CheckpointOffload, tokens: int, shape, simulate: bool) -> None:
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


class CheckpointOffload:
    """The installed mode on one model: the offloader, the checkpoint function, the chunked modules."""

    def __init__(self, hf_model, cache: bool, *, simulate: bool = False):
        self.hf, self.cache = hf_model, cache
        self.own_kernels = True  # this module's attention kernels (off: job.speed's, and no cache)
        self.layers = decoder_layers(hf_model)
        # on the layers' device: the embedding table may live in CPU memory (job.speed)
        self.store = Offloader(next(self.layers[0].parameters()).device, simulate=simulate)

    def checkpoint(self, index: int, function, *args, **kwargs):
        """Each layer's checkpoint: torch's non-reentrant checkpoint, its saved input offloaded."""
        from torch.utils.checkpoint import checkpoint

        if index == 0 and not in_backward():
            self.store.clear()  # a new forward: anything left from one without backward is stale
        counter = [0]

        def pack(t):
            if (in_backward() or isinstance(t, torch.nn.Parameter)
                    or t.numel() * t.element_size() < self.store.min_bytes
                    or t.device != self.store.device and not self.store.simulate):
                return t
            counter[0] += 1
            key = ("ckpt", index, counter[0])
            self.store.put(key, index, t, slot=("ckpt", index, counter[0]))
            return Handle(key)

        def unpack(h):
            return self.store.take(h.key) if isinstance(h, Handle) else h

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    def install_checkpointing(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = functools.partial(self.checkpoint, index)
