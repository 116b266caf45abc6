"""Causal attention of one long sequence on the GPU: PyTorch's varlen flash op vs sdpa's backends, forward and
backward, Llama-3-8B's heads (32 query, 8 key/value, dim 128), bf16. A lab script behind the long-context
mode's choice of kernel (docs/long-context.md); prints one JSON line per (length, kernel)."""

import inspect
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.varlen import varlen_attn


def timed(fn, repeat=3):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main(lengths):
    print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "device": torch.cuda.get_device_name()}), flush=True)
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
                 "_scaled_dot_product_flash_attention_backward"):
        op = getattr(torch.ops.aten, name, None)
        print(name, op.default._schema if op is not None else None, flush=True)
    for length in lengths:
        q = torch.randn(length, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(length, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(length, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(q)
        cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
        flops = 4 * length * length / 2 * 32 * 128  # causal forward

        def varlen():
            kk, vv = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
            causal = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
                      else {"window_size": (-1, 0)})
            out = varlen_attn(q, kk, vv, cu, cu, length, length, **causal)
            out.backward(grad)

        def sdpa(backend):
            def run():
                qq, kk, vv = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                if backend is not None and backend != SDPBackend.FLASH_ATTENTION:
                    kk, vv = kk.repeat_interleave(4, dim=1), vv.repeat_interleave(4, dim=1)
                    gqa = {}
                else:
                    gqa = {"enable_gqa": True}
                ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
                with ctx:
                    out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, **gqa)
                out.backward(grad.transpose(0, 1).unsqueeze(0))
            return run

        kernels = {"varlen": varlen, "sdpa default": sdpa(None), "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
                   "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                   "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
        for name, fn in kernels.items():
            try:
                seconds = timed(fn)
                row = {"length": length, "kernel": name, "fwd_bwd_s": round(seconds, 4),
                       "tflops": round(flops * 3.5 / seconds / 1e12, 1)}
            except Exception as error:  # noqa: BLE001
                row = {"length": length, "kernel": name, "error": str(error).splitlines()[0][:200]}
            q.grad = k.grad = v.grad = None
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [8192, 65536])
