"""Saved activations in pinned CPU memory: `Offloader` copies tensors out on a side stream during the forward and
back one layer ahead of the backward; `LayerOffload` sends whole decoder layers' activations (the capped plans'
OFFLOAD_LAYERS)."""

from __future__ import annotations

import functools
import logging
import time
import weakref
from dataclasses import dataclass

import torch

from job.speed.device import GiB
from job.speed.memory import PINNED_EXACT, layer_bytes, pinned_layer_bytes
from job.speed.modules import decoder_layers, hf_model, in_backward
from job.speed.shape import Shape

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    tag: int
    shape: torch.Size
    dtype: torch.dtype
    host: torch.Tensor | None = None     # pinned copy (or, simulated on CPU, a clone)
    gpu: torch.Tensor | None = None      # brought back (prefetched) copy
    h2d: object = None


class Handle:
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
            if not torch.is_grad_enabled() or in_backward():
                return forward(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, index), self._unpack):
                return forward(*args, **kwargs)

        layer.forward = offloaded_forward

    def _before_forward(self, index: int, module, args) -> None:
        if not torch.is_grad_enabled() or in_backward():
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
        if not torch.is_grad_enabled() or in_backward():
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
    layers = decoder_layers(hf)
    kept = list(range(offloaded + recomputed, len(layers)))
    store = Offloader(next(layers[0].parameters()).device, simulate=simulate)
    shape = Shape.of(hf.config)
    started = time.time()
    mode = LayerOffload(layers, list(range(offloaded)), kept, store, len(kept) * layer_bytes(shape, tokens),
                        pinned_layer_bytes(shape, tokens))
    log.info("layers offloaded: %d of %d, %.1f GiB of pinned CPU memory in %.1fs", offloaded, len(layers),
             store.pinned_bytes / GiB, time.time() - started)
    hf._layer_offload = mode
    return mode
