"""The packing guard: transformers keeps packed samples apart only when no attention_mask is passed and no KV cache
is built; the guard makes that hold for any caller of the model."""

from __future__ import annotations

import torch

from job.speed.attention import MASK_FREE_ATTENTION, NO_MASK
from job.speed.modules import backbone


def install_packing_guard(model) -> None:
    """Keep packed samples apart whatever the caller passes.

    transformers derives a per-sample mask from position ids that restart only when no attention_mask is passed
    and no KV cache exists (masking_utils._preprocess_mask_arguments). A mask of ones (a collator or a user
    calling the model by hand) or use_cache on (eval mode, where the config's use_cache=True applies) silently
    lets every sample attend to the ones before it. This pre-hook on the decoder stack sees packed inputs (a
    restart in position_ids, no cache passed in: so never generation) and drops an all-ones mask and turns
    use_cache off; a padding mask with zeros becomes a 4D per-sample mask. Hand-written because no library
    option covers every caller: TRL's collator avoids the problem only for its own batches.
    """
    stack = backbone(model)
    if getattr(stack, "_job_packing_guard", None) is not None:
        return
    stack._job_packing_guard = stack.register_forward_pre_hook(_packing_guard, with_kwargs=True)


def _packing_guard(module, args, kwargs):
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    mask = kwargs.get("attention_mask")
    if mask is None and kwargs.get("use_cache") is False:  # TRL's padding-free batches: no check, no GPU sync
        if module.config._attn_implementation in MASK_FREE_ATTENTION:
            kwargs["attention_mask"] = NO_MASK
            return args, kwargs
        return None  # already what transformers needs
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        return None  # a prepared 4D mask or BlockMask is the caller's own
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None and args:
        reference = args[0]
    batch = reference.shape[0] if reference is not None else position_ids.shape[0]
    samples = find_packed_sequence_indices(position_ids.expand(batch, -1))
    if samples is None:
        return None
    kwargs["use_cache"] = False
    if mask is None or bool(mask.all()):
        kwargs["attention_mask"] = None
        return args, kwargs
    kwargs["attention_mask"] = _packed_padding_mask(module, mask, position_ids.expand(batch, -1), samples)
    return args, kwargs


def _packed_padding_mask(stack, mask, position_ids, samples):
    """Causal, within one sample, and not onto padding: as a 4D mask (or BlockMask) for the configured kernel."""
    from transformers.masking_utils import (
        create_causal_mask,
        packed_sequence_mask_function,
    )

    embed = stack.get_input_embeddings().weight
    dtype = embed.dtype if embed.dtype.is_floating_point else torch.float32
    shape_only = torch.empty((mask.shape[0], mask.shape[1], 0), dtype=dtype, device=mask.device)
    return create_causal_mask(config=stack.config, inputs_embeds=shape_only, attention_mask=mask, cache=None,
                              position_ids=position_ids, and_mask_function=packed_sequence_mask_function(samples),
                              allow_is_causal_skip=False)
