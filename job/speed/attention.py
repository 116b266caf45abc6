"""Attention kernels registered with transformers: "varlen" (PyTorch's flash kernel over the packed row's
cu_seqlens, no mask built) and "longctx" (the long-context mode's: cuDNN for one sample, flash varlen for packed
samples, the output and its log-sum-exp cached for the recompute when host memory allows)."""

from __future__ import annotations

import inspect
import itertools
import logging

import torch

from job.speed.levers import VARLEN
from job.speed.modules import in_backward
from job.speed.offload import Offloader

log = logging.getLogger(__name__)


# Attention implementations that find the samples of a packed row themselves (from cu_seq_lens or the position
# ids) and need no mask.
LONGCTX_ATTENTION = "longctx"
MASK_FREE_ATTENTION = {VARLEN, LONGCTX_ATTENTION}


def register_attention() -> None:
    """Make "varlen" and "longctx" transformers attention implementations (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(LONGCTX_ATTENTION, longctx_attention_forward)
    for name in (VARLEN, LONGCTX_ATTENTION):
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, varlen_mask)


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
        if store is not None and in_backward() and store.has(key + ("out",)):
            out = store.take(key + ("out",))
            lse = store.take(key + ("lse",)) if q.is_cuda else out.new_empty(0)
        elif q.is_cuda:
            out, lse = attention_forward(q, k, v, cu, longest, scale)
            if store is not None and not in_backward():
                store.put(key + ("out",), layer, out, slot=("attn_out", layer))
                store.put(key + ("lse",), layer, lse, slot=("attn_lse", layer))
        else:
            out, lse = _varlen_reference(q, k, v, cu, scale), q.new_empty(0)
            if store is not None and not in_backward():
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
                dq, dk, dv = torch.autograd.grad(_varlen_reference(qd, kd, vd, cu, ctx.scale), (qd, kd, vd),
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
        k, v = expand_kv(k, v, q.shape[1])
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *(as_bhtd(t) for t in (q, k, v)), None, True, 0.0, True, False, scale=scale)[:2]
    return out.transpose(1, 2).squeeze(0), lse


def attention_backward(grad_out, q, k, v, out, lse, cu, longest: int, scale: float):
    if not _one_sequence(q, cu):
        return _varlen_backward(grad_out, q, k, v, out, lse, cu, longest, scale)
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k, v = expand_kv(k, v, heads)
    unused = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout's seed and offset (no dropout)
    # no bias, and None as the sequence offsets, as the forward returns them for a dense batch (a tensor there,
    # even empty, selects the nested-tensor path)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *(as_bhtd(t) for t in (grad_out.contiguous(), q, k, v, out.contiguous())), lse, unused, unused,
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
        k, v = expand_kv(k, v, q.shape[1])
    op = torch.ops.torch_attn._varlen_attn
    out, lse, _ = op(**_op_arguments(op, query=q, key=k, value=v, cu_seq_q=cu, cu_seq_k=cu, max_q=longest,
                                     max_k=longest, is_causal=True, scale=scale, window_size=[-1, 0],
                                     enable_gqa=gqa))
    return out, lse


def _varlen_backward(grad_out, q, k, v, out, lse, cu, longest: int, scale: float):
    heads, kv_heads = q.shape[1], k.shape[1]
    expanded = kv_heads != heads and not _gqa_native()
    if expanded:
        k, v = expand_kv(k, v, heads)
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
        ref = _varlen_reference(qr, kr, vr, cu, 0.125)
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
    attention_mask = real_mask(attention_mask)
    if (mode is None or not mode.own_kernels or not torch.is_grad_enabled() or attention_mask is not None
            or key.shape[2] != length or dropout):
        return varlen_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
    q, k, v, cu, longest, scale = flatten_for_varlen(query, key, value, scaling, kwargs)
    out = _CachedAttention.apply(q, k, v, cu, longest, scale, mode.store if mode.cache else None, layer)
    return out.view(batch, length, heads, dim), None
