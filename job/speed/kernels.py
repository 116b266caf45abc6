"""Kernels for the adapted layers: one autograd function per adapted linear layer (dequantize, matmul, the adapter
added in the matmul's epilogue, the dropout mask drawn inside Triton kernels from a seed), each 4-bit weight
dequantized in one Triton launch, and a 16-bit cache of the frozen weights where it fits."""

from __future__ import annotations

import os

import torch

from job.speed.device import GiB
from job.speed.modules import SKIP_MLP_FAMILIES, in_backward

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
