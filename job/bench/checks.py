"""GPU self-checks run before anything is timed: each kernel of the job's path against a reference."""

from __future__ import annotations

import time

from job.speed.attention import _varlen, _varlen_reference
from job.speed.kernels import (
    HAVE_TRITON,
    _LoraLinear,
    keep_mask,
    nf4_dequantize,
    nf4_kernel_supports,
)
from job.speed.levers import varlen_available


def self_check() -> dict:
    """On the GPU: the varlen kernel against sdpa one sample at a time (bf16), before anything is timed."""
    import torch


    if not varlen_available():
        return {"varlen": "not available in this torch"}
    torch.manual_seed(0)
    errors = []
    for lengths in ([300, 17, 1024, 5, 700], [2048]):  # packed samples (flash varlen), one sample (cuDNN)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        q = torch.randn(sum(lengths), 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sum(lengths), 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fast = _varlen(q, k, v, cu, max(lengths), 128**-0.5)
        ref = _varlen_reference(q.float(), k.float(), v.float(), cu, 128**-0.5)
        errors.append(((fast.float() - ref).norm() / ref.norm()).item())
    error = max(errors)
    if not error < 2e-2:
        raise RuntimeError(f"varlen attention disagrees with per-sample sdpa: relative errors {errors}")
    out = {"varlen_vs_per_sample_sdpa_rel_error": round(error, 5)}
    out.update(lora_kernel_check())
    out.update(nf4_kernel_check())
    return out


def lora_kernel_check(m: int = 3000, k: int = 4096, n: int = 1024, r: int = 16, p: float = 0.05) -> dict:
    """The fused LoRA layer with its Triton dropout (bf16, GPU) against float32 torch with the same mask."""
    import torch


    if not HAVE_TRITON:
        return {"lora_kernel": "Triton not available"}

    class Base(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.bias = weight, None

    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    base = Base(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    a = (torch.randn(r, k, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(n, r, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(7)
    y = _LoraLinear.apply(x, a, b, base, 2.0, p)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    mask = keep_mask(m, k, seed, p, "cuda")
    xf, af, bf = (t.detach().float().requires_grad_() for t in (x, a, b))
    ref = xf @ base.weight.float().t() + 2.0 * ((xf * mask / (1 - p)) @ af.t()) @ bf.t()
    ref.backward(g.float())
    errors = {name: ((got.float() - want).norm() / want.norm()).item()
              for name, got, want in (("y", y, ref), ("grad_x", x.grad, xf.grad), ("grad_a", a.grad, af.grad),
                                      ("grad_b", b.grad, bf.grad))}
    if not all(e < 2e-2 for e in errors.values()):
        raise RuntimeError(f"fused LoRA layer disagrees with float32 torch: {errors}")
    return {f"lora_kernel_{k}_rel_error": round(v, 5) for k, v in errors.items()}


def nf4_kernel_check(calls: int = 300) -> dict:
    """The one-launch NF4 dequantization against bitsandbytes' (double-quantized scales, bf16) on a layer-sized
    weight, and the host time per call of each on a small one (launches queued back to back, the GPU idle)."""
    import bitsandbytes.functional as bnbf
    import torch


    if not HAVE_TRITON:
        return {"nf4_kernel": "Triton not available"}
    torch.manual_seed(0)
    out = {}
    for label, shape in (("layer", (14336, 4096)), ("small", (256, 256))):
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        data, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        if not nf4_kernel_supports(data, state):
            raise RuntimeError("the NF4 kernel does not take bitsandbytes' own double-quantized NF4 state")
        want, got = bnbf.dequantize_4bit(data, state), nf4_dequantize(data, state)
        differ = (want != got).float().mean().item()
        error = ((want.float() - got.float()).abs().max() / want.float().abs().max()).item()
        if not error < 2**-7:  # at most a rounding step of bf16 apart (the scale's multiply-add may fuse)
            raise RuntimeError(f"NF4 kernel disagrees with bitsandbytes on a {shape} weight: max error {error}")
        out[f"nf4_kernel_{label}_values_differing"] = round(differ, 6)
        for name, dequantize in (("bitsandbytes", bnbf.dequantize_4bit), ("triton", nf4_dequantize)):
            torch.cuda.synchronize()
            if label == "small":  # the GPU keeps up: the loop's time is the host's
                started = time.perf_counter()
                for _ in range(calls):
                    dequantize(data, state)
                out[f"nf4_host_us_{name}"] = round((time.perf_counter() - started) / calls * 1e6, 1)
            else:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(20):
                    dequantize(data, state)
                end.record()
                torch.cuda.synchronize()
                out[f"nf4_gpu_us_{name}"] = round(begin.elapsed_time(end) / 20 * 1e3, 1)
    return out
