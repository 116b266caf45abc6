"""The names a setting goes by besides its own, and what a name that is no setting was probably meant to be.

Users bring other tools' names (TRL's SFTConfig, ModelConfig and `trl sft` flags; axolotl's YAML keys): some name a
setting of the job (ALIASES, accepted as the job's own name), some something the job spells differently or does not
have (FOREIGN), some an SFTConfig argument the job sets itself (OWNED_ARGUMENTS, refused in TRAINER_ARGS). Any other
unknown name is checked for a misspelling of a setting. This module knows no setting itself: `known` maps every name
a setting goes by to its variable (job.config.known_names), so it imports nothing of the job.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

# What users of TRL (SFTConfig, ModelConfig, `trl sft` flags) and axolotl call the same settings: accepted in the YAML
# file and the environment alike (lower or upper case), as if the job's own name had been written.
ALIASES = {
    "model_name_or_path": "base_model", "dataset_name": "dataset", "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "sequence_len": "max_length", "lr_scheduler_type": "lr_scheduler",
    "sample_packing": "packing", "lora_rank": "lora_r", "dataset_config_name": "dataset_config",
    "datasets": "dataset",  # TRL's and axolotl's list of datasets: each entry a source of the mix (job.sources)
}
# Names other tools use for something the job spells differently or does not have: what to write instead.
FOREIGN = {
    "batch_size": "MICRO_BATCH_SIZE (rows per device a step) or GLOBAL_BATCH_SIZE (rows per optimizer step)",
    "model": "BASE_MODEL", "model_name": "BASE_MODEL", "model_id": "BASE_MODEL", "base_model_id": "BASE_MODEL",
    "lr": "LEARNING_RATE", "epoch": "EPOCHS", "load_in_4bit": "QUANTIZATION=nf4 (the default)",
    "load_in_8bit": "QUANTIZATION=int8", "adapter": "nothing: LoRA is the job's adapter (USE_DORA=true for DoRA)",
    "lora_target_linear": "LORA_TARGET_MODULES=all-linear (the default)", "val_set_size": "EVAL_FRACTION",
    "chat_template": "PROMPT_FORMAT (a named template) or the tokenizer's own",
}
# SFTConfig arguments the job sets itself (job.trainer), refused in TRAINER_ARGS: what sets them instead.
OWNED_ARGUMENTS = {
    "output_dir": "OUTPUT_DIR", "learning_rate": "LEARNING_RATE", "lr_scheduler_type": "LR_SCHEDULER",
    "warmup_steps": "WARMUP_RATIO", "warmup_ratio": "WARMUP_RATIO", "num_train_epochs": "EPOCHS",
    "max_steps": "MAX_STEPS", "per_device_train_batch_size": "MICRO_BATCH_SIZE",
    "per_device_eval_batch_size": "MICRO_BATCH_SIZE", "gradient_accumulation_steps": "GRAD_ACCUM or GLOBAL_BATCH_SIZE",
    "max_length": "MAX_LENGTH", "packing": "PACKING", "padding_free": "PACKING", "seed": "SEED", "data_seed": "SEED",
    "eval_strategy": "EVAL_STEPS", "eval_steps": "EVAL_STEPS", "save_strategy": "SAVE_STEPS", "save_steps": "SAVE_STEPS",
    "save_total_limit": "SAVE_TOTAL_LIMIT", "logging_steps": "LOGGING_STEPS", "report_to": "REPORT_TO",
    "gradient_checkpointing": "GRADIENT_CHECKPOINTING", "activation_checkpointing": "GRADIENT_CHECKPOINTING",
    "activation_checkpointing_kwargs": "GRADIENT_CHECKPOINTING", "dataloader_num_workers": "DATALOADER_WORKERS",
    "bf16": "nothing: the compute dtype follows the GPU", "fp16": "nothing: the compute dtype follows the GPU",
    "use_cpu": "nothing: the device is found", "push_to_hub": "HUB_MODEL_ID (pushed once the merge is verified)",
    "hub_model_id": "HUB_MODEL_ID", "resume_from_checkpoint": "nothing: a rerun resumes by itself",
    "deepspeed": "STRATEGY", "fsdp": "STRATEGY", "fsdp_config": "STRATEGY", "ddp_timeout": "nothing (3 hours)",
    "dataset_num_proc": "nothing (tokenizing is the job's)", "disable_tqdm": "LOGGING_STEPS",
    "logging_nan_inf_filter": "nothing: the job checks every step for NaN",
}
# Variables of other tools that are never a misspelt setting (the did-you-mean check skips them).
OTHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "NCCL_", "CUDA_", "HF_", "HUGGINGFACE_", "TORCH", "PYTORCH_", "OMP_",
                  "KUBERNETES_", "PET_", "WANDB_", "MLFLOW_", "JOB_", "GLOO_", "TRANSFORMERS_", "TOKENIZERS_", "LC_",
                  "XDG_", "PYTHON", "PIP_", "CONTAINER_", "APPTAINER_", "SINGULARITY_", "ENROOT_", "PYXIS_")


def suggest(name: str, known: dict[str, str], trainer_arguments: bool = True) -> str | None:
    """What a name that is not a setting was probably meant to be ("did you mean ..."), or None."""
    key = name.lower()
    if key in FOREIGN:
        return f"use {FOREIGN[key]}"
    close = closest_setting(name, known)
    if close:
        return f"did you mean {close}?"
    if trainer_arguments and trainer_argument(key):
        return "a trainer argument: put it in TRAINER_ARGS"
    return None


def misspelt_variables(environ, known: dict[str, str]) -> dict[str, str]:
    """Environment variables that look like a misspelt or foreign setting name, with the suggestion for each."""
    candidates = [name for name in environ if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in known
                  and not name.startswith(OTHER_PREFIXES)]
    return {name: hint for name in candidates if (hint := suggest(name, known, trainer_arguments=False))}


def closest_setting(name: str, known: dict[str, str]) -> str | None:
    """The setting (its variable) whose name or alias is closest to `name`, if one is close."""
    variables = {key: variable for key, variable in known.items() if key.isupper()}
    close = difflib.get_close_matches(name.upper(), list(variables), n=1, cutoff=0.8)
    return variables[close[0]] if close else None


def trainer_argument(name: str) -> bool:
    """Whether `name` is an argument of TRL's SFTConfig (transformers' TrainingArguments and TRL's own)."""
    from trl import SFTConfig

    return name in {f.name for f in dataclasses.fields(SFTConfig)}
