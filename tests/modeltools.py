"""Models for tests: a full-size model's shape and a pretend H100 for the planners, the tiny model with a LoRA
adapter that is not the identity, and the job's own trainer on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from job import model, speed
from tests.jobtools import settings

# Llama-3-8B, for what is only planned (job.speed, the long-context mode): its shape, and a BASE_MODEL that names
# it (nothing is loaded; any name but the built-in tiny model's keeps the tiny-cpu preset out).
LLAMA_8B = speed.Shape(model_type="llama", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                       head_dim=128, vocab=128256, tied=False)
LLAMA_8B_MODEL = "/models/llama-3-8b"


def h100(budget_gib: float = 79.0, capped: bool | None = None) -> speed.Device:
    """A pretend H100 80GB with `budget_gib` to use: capped (GPU_MEMORY_GIB below the card) unless the whole card is
    left, or as `capped` says."""
    return speed.Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 79.2, budget_gib,
                        budget_gib < 79 if capped is None else capped, 989.0)


def lora(s, base, seed: int = 0):
    """`base` with the job's LoRA adapter (job.model.lora_config), drawn after torch.manual_seed(seed)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, model.lora_config(s, base))


def nonzero_b(adapted, std: float = 0.05):
    """Draw every LoRA B from N(0, std): PEFT starts B at zero, so a fresh adapter changes no output (and A gets
    no gradient), and a comparison would not see the adapter's path at all."""
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return adapted


def adapted(s, path: str | Path, seed: int = 0, **load):
    """The model at `path` (job.model.load_model, `load` its arguments) with the job's LoRA adapter, B non-zero."""
    return nonzero_b(lora(s, model.load_model(s, str(path), **load), seed))


def tiny_trainer(tiny_model: Path, tokenizer, dataset, output_dir: Path, overrides=(), *, device_map=None,
                 trainer_class=None, callbacks=(), **fields):
    """The job's trainer on the tiny model, assembled by the one builder (job.trainer.build_trainer, as `job train`
    assembles it): MAX_LENGTH=256 and `overrides` as its settings, levers planned for this machine, nothing saved or
    reported; `fields` are the caller's SFTConfig fields."""
    from transformers import AutoConfig

    from job.trainer import build_trainer

    s = settings(base_model=str(tiny_model), output_dir=str(output_dir), max_length=256, **dict(overrides))
    config = AutoConfig.from_pretrained(tiny_model)
    trainer, _ = build_trainer(s, str(tiny_model), config, speed.plan(s, config), tokenizer, dataset,
                               device_map=device_map, trainer_class=trainer_class, callbacks=callbacks,
                               **{"output_dir": str(output_dir), "report_to": "none", "save_strategy": "no",
                                  "disable_tqdm": True, **fields})
    return trainer
