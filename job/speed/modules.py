"""Where things are in a transformers model, PEFT-wrapped or not: the model itself, its decoder stack and layers;
and whether a forward running now is a recompute."""

from __future__ import annotations

import torch


def decoder_layers(hf_model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]


def hf_model(model):
    """The transformers model under PEFT's wrapper and a distributed wrapper's `.module`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "module", base)


def backbone(model):
    """The decoder stack (LlamaModel...) under a CausalLM, PEFT-wrapped or not."""
    lm = hf_model(model)
    return getattr(lm, lm.base_model_prefix, lm)


# Families whose decoder layer ends in `residual + mlp(post_attention_layernorm(h))`, the MLP in
# `down(act(gate(x)) * up(x))`: nothing after the down projection saves anything for backward.
SKIP_MLP_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "granite"}


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward called now is a recompute (a checkpoint's, or that of
    the long-context mode's chunked MLP)."""
    return torch._C._current_graph_task_id() != -1
