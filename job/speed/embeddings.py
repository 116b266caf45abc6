"""The frozen input embedding and output layer in CPU memory (the output layer streamed to the GPU in chunks), when
that buys a faster plan or any plan at all."""

from __future__ import annotations

import torch

from job.speed.levers import Levers
from job.speed.modules import backbone


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
