"""The chosen levers installed: on the loaded base model, on the PEFT-wrapped model, and on the trainer."""

from __future__ import annotations

from job.speed.checkpointing import offload_checkpoints, select_checkpointed_layers
from job.speed.embeddings import install_streamed_head, offload_embeddings
from job.speed.kernels import (
    install_dequant_cache,
    install_lora_kernel,
    install_nf4_kernel,
)
from job.speed.levers import Levers
from job.speed.offload import offload_layers
from job.speed.packing import install_packing_guard


def prepare_base(model, levers: Levers) -> None:
    """Levers that act on the loaded base model, before the adapter wraps it."""
    install_packing_guard(model)
    if levers.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    if levers.offload_embeddings:
        offload_embeddings(model, head=levers.offload_head)
    if levers.checkpointing == "partial":
        select_checkpointed_layers(model, levers.checkpoint_layers, levers.offloaded_layers)


def prepare_adapted(model, levers: Levers) -> dict:
    """Levers that act on the PEFT-wrapped model (after SFTTrainer has added the adapter)."""
    done = {}
    if levers.offload_head:
        install_streamed_head(model)
    if levers.offload_embeddings:
        done["embeddings"] = ("input and output embeddings" if levers.offload_head else "input embedding") + \
            " in CPU memory"
    if levers.lora_kernel:
        done["fused_lora_layers"] = install_lora_kernel(model)
    if levers.nf4_kernel:
        done["nf4_kernel_weights"] = install_nf4_kernel(model)
    if levers.checkpointing == "offload" and not levers.long_context:

        done["checkpoints_offloaded"] = offload_checkpoints(model, levers.tokens).store.device.type
    if levers.offloaded_layers:

        offload_layers(model, levers.offloaded_layers, levers.checkpoint_layers, levers.tokens)
        done["offloaded_layers"] = levers.offloaded_layers
    if levers.dequant_cache:
        done["dequant_cache_gib"] = round(install_dequant_cache(model), 2)
    return done


def count_flops_once(trainer) -> None:
    """transformers' Trainer counts FLOPs for its logs after every micro-step by walking every module and parameter
    (`num_parameters`: ~50,000 generator frames on an 8B model, tens of ms under the profiler, while the GPU idles
    after the loss read that precedes it); the count cannot change during training, so it is taken once."""
    model = trainer.model
    if not hasattr(model, "num_parameters"):
        return  # transformers counts 0 for such a model too
    main_input = getattr(model, "main_input_name", "input_ids")
    per_token = 6 * model.num_parameters(exclude_embeddings=True)
    trainer.floating_point_ops = lambda inputs: per_token * inputs[main_input].numel() if main_input in inputs else 0
