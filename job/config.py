"""Every setting of the job, declared once.

`Settings` is the single source of truth: the click flags, the environment variables, `--help`,
the README table and the validation messages are all generated from its fields.
Resolution order: defaults < YAML file (CONFIG_FILE) < environment < command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from job.errors import ConfigError

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATASET = "builtin:tasks"
PRESETS = Path(__file__).parent / "presets"
PRESET_NAMES = tuple(sorted(p.stem for p in PRESETS.glob("*.yaml")))
SHARDED = ("fsdp", "zero3")  # strategies that split each weight across the ranks
HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")  # user/name on the Hub
NAME_PAIRS = re.compile(r"\s*[^=,\s][^=,]*=[^=,]*[^=,\s]\s*(,\s*[^=,\s][^=,]*=[^=,]*[^=,\s]\s*)*")  # a=b, c=d

# What users of TRL (SFTConfig, ModelConfig, `trl sft` flags) and axolotl call the same settings: accepted in the YAML
# file and the environment alike (lower or upper case), as if the job's own name had been written.
ALIASES = {
    "model_name_or_path": "base_model", "dataset_name": "dataset", "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "sequence_len": "max_length", "lr_scheduler_type": "lr_scheduler",
    "sample_packing": "packing", "lora_rank": "lora_r", "dataset_config_name": "dataset_config",
    "datasets": "dataset",  # TRL's and axolotl's list of datasets: each entry a source of the mix (SOURCE_KEYS)
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
# SFTConfig arguments the job sets itself (job.train), refused in TRAINER_ARGS: what sets them instead.
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


def setting(default, help: str, *, choices: tuple[str, ...] | None = None, group: str = "training",
            env: str | None = None, identity: bool = True):
    """A dataclass field with what the CLI, env and README need.

    identity=False marks settings that may change between a run and its resume (intervals,
    logging, publishing) without making it a different run.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "group": group,
                                             "env": env, "identity": identity})


@dataclass(frozen=True)
class Settings:
    # --- what to train on
    preset: str = setting("auto", "Named settings bundle (job/presets/*.yaml) applied under the YAML file, env "
                          "and flags; auto picks tiny-cpu for the built-in model, else none.",
                          choices=("auto", "none", *PRESET_NAMES), group="inputs", identity=False)
    base_model: str = setting(BUILTIN_MODEL, "Hub id or local directory of the base model; the default is a tiny "
                              "Llama the job builds itself (no download).", group="inputs")
    dataset: str = setting(BUILTIN_DATASET, "Hub dataset id, or a local .jsonl/.json/.csv/.parquet file or "
                           "directory of them; the default is a small bundled task set. Several are mixed: "
                           "comma-separated PATH:WEIGHT (org/a:0.7,data/b.jsonl:0.3), or a YAML/JSON list of "
                           "{path, weight, split, config, revision} (split, config and revision override "
                           "DATASET_SPLIT, DATASET_CONFIG and DATASET_REVISION for that source). A weight is the "
                           "source's share of the training rows, which number as many as all sources hold "
                           "together: a source is drawn without repeats (with SEED) up to its size and repeated "
                           "beyond it; no weights train on every row of every source. Each source's format is "
                           "detected on its own; COLUMN_MAP and ROLE_MAP apply to all; evaluation rows come from "
                           "each source's EVAL_SPLIT, else its EVAL_FRACTION.", group="inputs")
    dataset_config: str | None = setting(None, "Hub dataset configuration name.", group="inputs")
    dataset_revision: str | None = setting(None, "Branch, tag or commit of a Hub dataset, so a rerun reads the same "
                                           "rows.", group="inputs")
    dataset_split: str = setting("train", "Split to train on (a local directory's splits are its files or folders "
                                 "named by split: train.jsonl, test.jsonl).", group="inputs")
    eval_split: str | None = setting(None, "Split to evaluate on; unset cuts EVAL_FRACTION off the training split.",
                                     group="inputs")
    data_format: str = setting("auto", "How rows become conversations; auto detects it from the columns.",
                               choices=("auto", "messages", "instruction", "prompt_completion", "text", "template"),
                               group="inputs")
    prompt_template: str | None = setting(None, "With DATA_FORMAT=template: the user turn, naming columns in braces, "
                                          "e.g. '다음 글을 요약해주세요: {document}'.", group="inputs")
    response_column: str | None = setting(None, "With DATA_FORMAT=template: the column holding the answer.",
                                          group="inputs")
    system_prompt: str | None = setting(None, "System message put before every conversation.", group="inputs")
    column_map: str | None = setting(None, "Columns renamed before the format is read, comma-separated old=new, e.g. "
                                     "dialog=messages or question=prompt,answer=completion.", group="inputs")
    role_map: str | None = setting(None, "More role names in conversations, comma-separated name=role (role: "
                                   "system, user, assistant or tool), e.g. bot=assistant; ShareGPT's human, gpt, "
                                   "function_call and observation are known already.", group="inputs")
    prompt_format: str = setting("auto", "Chat rendering: the tokenizer's own template, or a named one for base "
                                 "models without one; auto picks the tokenizer's, else the model family's.",
                                 choices=("auto", "tokenizer", "mistral", "llama-3", "chatml"), group="inputs")
    chat_template_file: str | None = setting(None, "A Jinja chat template file that renders the data (and is saved "
                                             "with the adapter and the merged model), in place of PROMPT_FORMAT's.",
                                             group="inputs")
    loss_on: str = setting("answers", "Tokens the loss covers: every assistant answer, the last answer of each "
                           "conversation only, or every token (prompts too).",
                           choices=("answers", "last_answer", "everything"), group="inputs")
    skip_bad_rows: bool = setting(False, "Skip malformed rows (and report how many) instead of stopping.",
                                  group="inputs")
    output_dir: str = setting("output", "Where everything is written (mounted storage on a cluster).",
                              group="inputs", identity=False)
    trust_remote_code: bool = setting(False, "Run code shipped with a hub model or dataset.", group="inputs")

    # --- model and adapter
    quantization: str = setting("nf4", "Base weights while training: 4-bit NF4 with double quantization and "
                                "bf16 compute (QLoRA), 8-bit, or none (LoRA on a 16-bit base).",
                                choices=("nf4", "int8", "none"), group="model")
    lora_r: int = setting(16, "LoRA rank.", group="model")
    lora_alpha: int = setting(32, "LoRA scaling numerator (scale = alpha / r).", group="model")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input.", group="model")
    lora_target_modules: str = setting("all-linear", "Comma-separated module names to adapt, or all-linear.",
                                       group="model")
    use_dora: bool = setting(False, "Weight-decomposed LoRA (DoRA).", group="model")

    # --- optimisation
    learning_rate: float = setting(2e-4, "Peak learning rate.")
    lr_scheduler: str = setting("cosine", "Learning-rate schedule after warm-up.",
                                choices=("cosine", "linear", "constant", "constant_with_warmup"))
    warmup_ratio: float = setting(0.03, "Share of the steps spent warming up.")
    epochs: float = setting(1.0, "Passes over the training data (ignored when MAX_STEPS is set).")
    max_steps: int = setting(-1, "Optimizer steps to run; -1 means use EPOCHS.")
    micro_batch_size: int = setting(4, "Sequences (packed rows when PACKING) per device per step.")
    grad_accum: int = setting(1, "Micro-batches accumulated per optimizer step; ignored when GLOBAL_BATCH_SIZE is "
                              "set (derived from it for the layout at hand).")
    # Not part of the identity: run.json and every checkpoint record the global batch itself, and a resume is
    # checked against that record (job.checkpoint.resume_batch), so a run started without it can add it later.
    global_batch_size: int | None = setting(None, "Rows per optimizer step across all processes; GRAD_ACCUM is then "
                                            "derived as GLOBAL_BATCH_SIZE / (MICRO_BATCH_SIZE x processes), so a "
                                            "run resumes on another number of GPUs or machines with the same "
                                            "batch and data position. Unset: MICRO_BATCH_SIZE x processes x "
                                            "GRAD_ACCUM.", identity=False)
    allow_batch_change: bool = setting(False, "Resume checkpoints written with another global batch (rows per "
                                       "optimizer step) than this layout gives; the change is logged and recorded "
                                       "in summary.json. Off: such a resume exits 2 naming GLOBAL_BATCH_SIZE.",
                                       identity=False)
    max_length: int = setting(2048, "Longest sequence in tokens; longer rows are truncated and counted.")
    packing: bool = setting(True, "Pack rows into MAX_LENGTH sequences without padding; each row still "
                            "attends only to itself.")
    seed: int = setting(42, "Seed for data order, splits and initialisation.")
    trainer_args: str | None = setting(None, "Any other argument of TRL's SFTConfig (transformers' TrainingArguments "
                                       "included), as a JSON or YAML mapping, e.g. {\"weight_decay\": 0.01, "
                                       "\"max_grad_norm\": 0.3, \"neftune_noise_alpha\": 5}; checked in preflight. "
                                       "Arguments the job sets itself are refused, naming the setting for them.")

    # --- speed levers: none changes what is trained; auto picks from the card, its free memory and the
    # model (job/speed/; `job preflight` prints the choice and why)
    gradient_checkpointing: str = setting("auto", "Recompute activations in backward: true (every layer), false, "
                                          "offload (every layer, checkpoints kept in CPU memory); auto recomputes "
                                          "as few layers as the memory allows.",
                                          choices=("auto", "true", "false", "offload"), group="speed",
                                          identity=False)
    attn_implementation: str = setting("auto", "Attention kernel; varlen is PyTorch's built-in flash kernel over "
                                       "packed rows (cuDNN's for a row that is one sample); auto picks varlen on "
                                       "CUDA GPUs that have it, else flex_attention, and sdpa on CPU.",
                                       choices=("auto", "varlen", "flex_attention", "sdpa", "eager",
                                                "flash_attention_2"), group="speed", identity=False)
    liger: str = setting("auto", "Liger's fused RMSNorm, SwiGLU and RoPE kernels; auto uses them on CUDA when "
                         "liger-kernel is installed.", choices=("auto", "true", "false"), group="speed",
                         identity=False)
    lora_kernel: str = setting("auto", "One fused autograd function per adapted layer (4-bit matmul + adapter, "
                               "adapter added in the matmul epilogue); auto uses it on CUDA.",
                               choices=("auto", "true", "false"), group="speed", identity=False)
    nf4_kernel: str = setting("auto", "Dequantize each 4-bit weight (double-quantized scales included) in one Triton "
                              "kernel instead of bitsandbytes' three launches; auto does with the fused LoRA layer "
                              "on CUDA.", choices=("auto", "true", "false"), group="speed", identity=False)
    dequant_cache: str = setting("auto", "Keep a 16-bit copy of the frozen 4-bit weights on the GPU instead of "
                                 "dequantizing them every pass; auto does when the memory left allows.",
                                 choices=("auto", "true", "false"), group="speed", identity=False)
    offload_embeddings: str = setting("auto", "Keep the frozen input embedding table in CPU memory (a row gather "
                                      "a step), and the output layer too, streamed in chunks; true moves both; auto "
                                      "moves the input table, or both, only when that buys a faster plan or any.",
                                      choices=("auto", "true", "false"), group="speed", identity=False)
    offload_layers: int = setting(-1, "Decoder layers whose activations go to pinned CPU memory during the forward "
                                  "and come back for the backward, instead of being recomputed; only where some "
                                  "layers are recomputed and others kept (under a memory cap). -1 lets auto choose "
                                  "(at most the kept layers, a quarter of all, and what half the free CPU memory "
                                  "holds), 0 never.",
                                  group="speed", identity=False)
    gpu_memory_gib: float = setting(0.0, "Cap on the GPU memory the job may use, in GiB, as on a smaller card; "
                                    "0 means the card's free memory. The speed choice plans within it.",
                                    group="speed", identity=False)
    dataloader_workers: int = setting(-1, "Data loader worker processes; -1 picks 2 on a GPU and 0 on CPU.",
                                      group="speed", identity=False)
    long_context: str = setting("auto", "Long-context mode (docs/long-context.md): checkpoints in pinned CPU "
                                "memory, MLP in token chunks, attention output cached on CPU; auto turns it on "
                                "on a GPU from 65,536 tokens per micro-batch or when the plain path does not fit.",
                                choices=("auto", "on", "off"), group="speed", identity=False)

    # --- evaluation, checkpoints, logs
    eval_fraction: float = setting(0.05, "Share of rows held out when there is no EVAL_SPLIT.")
    max_eval_samples: int = setting(200, "Cap on evaluation rows, so evaluation stays cheap.")
    eval_steps: int = setting(50, "Evaluate every N optimizer steps.", group="monitoring", identity=False)
    save_steps: int = setting(50, "Checkpoint every N optimizer steps.", group="monitoring", identity=False)
    logging_steps: int = setting(10, "Log training loss every N optimizer steps.", group="monitoring",
                                 identity=False)
    save_total_limit: int = setting(2, "Complete checkpoints kept (the newest is never deleted).",
                                    group="monitoring", identity=False)
    sample_prompts: int = setting(3, "Evaluation prompts generated from before and after training.",
                                  group="monitoring", identity=False)
    max_new_tokens: int = setting(64, "Token limit for those sample generations.", group="monitoring",
                                  identity=False)
    report_to: str = setting("tensorboard", "Trackers for metrics, comma-separated (tensorboard, wandb, mlflow, "
                             "none).", group="monitoring", identity=False)

    # --- publishing
    hub_model_id: str | None = setting(None, "Hub repo to push to (user/name); unset means no push.",
                                       group="publish", identity=False)
    hub_private: bool = setting(True, "Create the hub repo as private (an existing repo keeps its visibility).",
                                group="publish", identity=False)
    push_what: str = setting("merged", "What to push: the merged 16-bit model, the LoRA adapter, or both (the "
                             "adapter then goes under adapter/).", choices=("merged", "adapter", "both"),
                             group="publish", identity=False)
    push_retries: int = setting(5, "Retries of a Hub request that failed transiently (timeout, connection error, "
                                "429, 5xx), with exponential backoff.", group="publish", identity=False)
    push_backoff: float = setting(2.0, "Seconds before the first retry; doubled each retry, at most 120 s; a "
                                  "longer Retry-After from the Hub wins.", group="publish", identity=False)
    merge_device: str = setting("auto", "Where to merge: auto uses the GPU when the memory it may use (free, or "
                                "GPU_MEMORY_GIB) holds the merged model, else (or on out-of-memory) the CPU.", choices=("auto", "cpu", "cuda"),
                                group="publish", identity=False)
    merge_dtype: str = setting("auto", "Dtype of the merged model: float16 (what the tutorials merge into), "
                               "bfloat16 or float32; auto keeps the base checkpoint's own. The merge check allows "
                               "the rounding of it (1.5 steps a weight); a float16 merge that overflows is refused.",
                               choices=("auto", "float16", "bfloat16", "float32"), group="publish", identity=False)
    merge_max_shard_size: str = setting("5GB", "Largest safetensors file of the merged model (e.g. 5GB, 500MB).",
                                        group="publish", identity=False)


    # --- launch: where training runs (docs/launch.md). Unset layout settings are read from Slurm, a Kubernetes
    # Indexed Job or torchrun-style variables (job.launch); `job preflight` prints what it found.
    strategy: str = setting("ddp", "How the ranks share the model: ddp (a copy per GPU), fsdp (FSDP with the 4-bit "
                            "weights sharded), zero2 or zero3 (DeepSpeed). Checkpoints resume only under the "
                            "strategy that wrote them (fsdp, zero2, zero3: on as many processes too).",
                            choices=("ddp", "fsdp", "zero2", "zero3"), group="launch")
    num_machines: int | None = setting(None, "Machines (nodes) in the job; unset: from the scheduler's variables, "
                                       "else 1.", group="launch", identity=False)
    machine_rank: int | None = setting(None, "This machine's index, 0 for the first one (which merges and pushes); "
                                       "unset: from the scheduler's variables, else 0.", group="launch",
                                       identity=False)
    main_address: str | None = setting(None, "Host name or address of machine 0, where the ranks meet; unset: from "
                                       "the scheduler's variables, else this machine.", group="launch",
                                       identity=False)
    main_port: int | None = setting(None, "TCP port on machine 0 where the ranks meet; unset: derived from the "
                                    "Slurm job id, else 29500 (a free port on a single machine).", group="launch",
                                    identity=False)
    num_processes: int | None = setting(None, "Training processes per machine; unset: one per GPU the machine "
                                        "shows (Slurm: SLURM_GPUS_ON_NODE), 1 on CPU.", group="launch",
                                        identity=False)

    def identity(self) -> dict:
        """The settings that define what is trained: a resume must match them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}

    @property
    def output(self) -> Path:
        return Path(self.output_dir)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(f: dataclasses.Field) -> str:
    return f.metadata["env"] or f.name.upper()


def value_type(f: dataclasses.Field) -> type:
    """The non-None type of a field (`str | None` -> str)."""
    hint = typing.get_type_hints(Settings)[f.name]
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_value(f: dataclasses.Field, raw, source: str):
    """Convert a raw value (string from env/flags, or a YAML scalar) to the field's type."""
    name = env_name(f)
    optional = f.default is None
    if raw is None or (isinstance(raw, str) and optional and raw.strip().lower() in {"", "none", "null"}):
        if optional:
            return None
        raise ConfigError(f"{name} ({source}): a value is required")
    kind = value_type(f)
    if f.name == "dataset" and isinstance(raw, (list, dict)):  # YAML: dataset: [{path: ..., weight: ...}, ...]
        raw = json.dumps(raw, ensure_ascii=False)
    elif kind is str and isinstance(raw, (list, tuple)):  # YAML: lora_target_modules: [q_proj, v_proj]
        raw = ",".join(str(item).strip() for item in raw)
    elif kind is str and isinstance(raw, dict):  # YAML: role_map: {bot: assistant}; trainer_args: {...}
        raw = (json.dumps(raw) if f.name == "trainer_args"
               else ",".join(f"{key}={value}" for key, value in raw.items()))
    text = str(raw).strip()
    choices = f.metadata["choices"] or ()
    if kind is str and "true" in choices and text.lower() in _TRUE | _FALSE:
        return "true" if text.lower() in _TRUE else "false"  # YAML booleans and 1/0/yes/no for auto|true|false
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(text)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{name} ({source}): expected {wanted}, got {raw!r}") from None
    return text if kind is str else raw


def load(flags: dict | None = None, environ: dict | None = None, config_file: str | None = None) -> Settings:
    """Resolve settings from defaults, YAML, environment and flags; then validate them all at once."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    config_file = config_file or environ.get("CONFIG_FILE")
    if config_file:
        values.update(_read_yaml(Path(config_file), "CONFIG_FILE"))
    given = {}
    for name, raw in environ.items():
        f = by_name().get(name) if name.isupper() else None
        if f is not None:
            if f.name in given:
                raise ConfigError(f"{given[f.name]} and {name} (environment) both set {env_name(f)}: keep one")
            given[f.name] = name
            values[f.name] = parse_value(f, raw, "environment" if name == env_name(f) else f"environment {name}")
    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = parse_value(FIELDS[name], raw, "flag --" + name.replace("_", "-"))
    preset = values.get("preset", "auto")
    if preset == "auto":
        preset = "tiny-cpu" if values.get("base_model", BUILTIN_MODEL) == BUILTIN_MODEL else "none"
    if preset in PRESET_NAMES:
        values = {**_read_yaml(PRESETS / f"{preset}.yaml", "PRESET"), **values}
    settings = Settings(**{**values, "preset": preset})
    problems = validate(settings) + misspelt_base_model(settings, environ)
    if problems:
        raise ConfigError("invalid settings:\n  - " + "\n  - ".join(problems))
    return settings


def _read_yaml(path: Path, source: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source} {path}: cannot read it: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} {path}: expected a mapping of settings, got {type(data).__name__}")
    names = by_name()
    unknown = [str(k) for k in data if str(k) not in names]
    if unknown:
        raise ConfigError(f"{source} {path}: unknown settings:\n  - "
                          + "\n  - ".join(f"{k}: {suggest(k) or 'not a setting (job --help lists them)'}"
                                           for k in unknown))
    values, keys = {}, {}
    for key, raw in data.items():
        f = names[str(key)]
        if f.name in keys:
            raise ConfigError(f"{source} {path}: {keys[f.name]} and {key} both set {env_name(f)}: keep one")
        keys[f.name] = key
        values[f.name] = parse_value(f, raw, f"{source} {path}")
    return values


def by_name() -> dict[str, dataclasses.Field]:
    """Every name a setting is known by: field name, variable, and the aliases in either case."""
    names = {}
    for f in FIELDS.values():
        names[f.name] = names[env_name(f)] = f
    for alias, name in ALIASES.items():
        names[alias] = names[alias.upper()] = FIELDS[name]
    return names


def suggest(name: str, trainer_arguments: bool = True) -> str | None:
    """What a name that is not a setting was probably meant to be ("did you mean ..."), or None."""
    key = name.lower()
    if key in FOREIGN:
        return f"use {FOREIGN[key]}"
    close = closest_setting(name)
    if close:
        return f"did you mean {close}?"
    if trainer_arguments and trainer_argument(key):
        return "a trainer argument: put it in TRAINER_ARGS"
    return None


def misspelt_variables(environ) -> dict[str, str]:
    """Environment variables that look like a misspelt or foreign setting name, with the suggestion for each."""
    names = by_name()
    candidates = [name for name in environ if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in names
                  and not name.startswith(OTHER_PREFIXES)]
    return {name: hint for name in candidates if (hint := suggest(name, trainer_arguments=False))}


def closest_setting(name: str) -> str | None:
    """The setting (its variable) whose name or alias is closest to `name`, if one is close."""
    names = {key: env_name(f) for key, f in by_name().items() if key.isupper()}
    close = difflib.get_close_matches(name.upper(), list(names), n=1, cutoff=0.8)
    return names[close[0]] if close else None


def misspelt_base_model(s: Settings, environ) -> list[str]:
    """A real DATASET with BASE_MODEL unset and a variable that looks like it: the built-in tiny model would be
    trained on it, which nobody means."""
    if s.base_model != BUILTIN_MODEL or s.dataset == BUILTIN_DATASET:
        return []
    return [f"{name}={environ[name]!r} is not a setting ({hint}); BASE_MODEL is unset, so the built-in tiny model "
            f"would be trained on DATASET={s.dataset!r}" for name, hint in misspelt_variables(environ).items()
            if "BASE_MODEL" in hint]


def trainer_argument(name: str) -> bool:
    """Whether `name` is an argument of TRL's SFTConfig (transformers' TrainingArguments and TRL's own)."""
    from trl import SFTConfig

    return name in {f.name for f in dataclasses.fields(SFTConfig)}


def validate(s: Settings) -> list[str]:
    """Every problem with the settings, each naming the variable, the value and what is allowed."""
    problems = []
    for f in FIELDS.values():
        choices, value = f.metadata["choices"], getattr(s, f.name)
        if choices and value not in choices:
            problems.append(f"{env_name(f)}={value!r} is not one of: {', '.join(choices)}")

    def need(ok: bool, name: str, rule: str):
        if not ok:
            problems.append(f"{env_name(FIELDS[name])}={getattr(s, name)!r}: {rule}")

    need(s.lora_r >= 1, "lora_r", "must be a positive integer (e.g. 16)")
    need(s.lora_alpha >= 1, "lora_alpha", "must be a positive integer (e.g. 2 x LORA_R)")
    need(0 <= s.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(bool(re.fullmatch(r"all-linear|[\w.\-]+(,[\w.\-]+)*", s.lora_target_modules)), "lora_target_modules",
         "must be all-linear or comma-separated module names such as q_proj,v_proj")
    need(0 < s.learning_rate < 1, "learning_rate", "must be in (0, 1), e.g. 2e-4")
    need(0 <= s.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    need(s.epochs > 0, "epochs", "must be positive")
    need(s.max_steps == -1 or s.max_steps > 0, "max_steps", "must be -1 (use EPOCHS) or a positive integer")
    need(s.micro_batch_size >= 1, "micro_batch_size", "must be at least 1")
    need(s.grad_accum >= 1, "grad_accum", "must be at least 1")
    need(s.global_batch_size is None or s.global_batch_size >= 1, "global_batch_size", "must be at least 1")
    need(s.max_length >= 16, "max_length", "must be at least 16 tokens")
    need(s.gpu_memory_gib == 0 or s.gpu_memory_gib >= 1, "gpu_memory_gib", "must be 0 (the whole card) or at least 1")
    need(s.offload_layers >= -1, "offload_layers", "must be -1 (auto) or 0 or more")
    need(s.dataloader_workers >= -1, "dataloader_workers", "must be -1 (auto) or 0 or more")
    need(0 <= s.eval_fraction < 0.5, "eval_fraction", "must be in [0, 0.5)")
    need(s.max_eval_samples >= 1, "max_eval_samples", "must be at least 1")
    for name in ("eval_steps", "save_steps", "logging_steps", "save_total_limit"):
        need(getattr(s, name) >= 1, name, "must be at least 1")
    need(s.sample_prompts >= 0, "sample_prompts", "must be 0 or more")
    need(s.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
    if s.data_format == "template":
        need(bool(s.prompt_template and re.search(r"\{\w+\}", s.prompt_template)), "prompt_template",
             "DATA_FORMAT=template needs PROMPT_TEMPLATE naming at least one {column}")
        need(bool(s.response_column), "response_column", "DATA_FORMAT=template needs RESPONSE_COLUMN")
    elif s.prompt_template or s.response_column:
        problems.append("PROMPT_TEMPLATE and RESPONSE_COLUMN only apply with DATA_FORMAT=template "
                        f"(DATA_FORMAT={s.data_format!r})")
    need(s.chat_template_file is None or s.prompt_format == "auto", "prompt_format",
         "CHAT_TEMPLATE_FILE sets the template itself: leave PROMPT_FORMAT at auto")
    for name in ("column_map", "role_map"):
        need(getattr(s, name) is None or bool(NAME_PAIRS.fullmatch(getattr(s, name))), name,
             "must be comma-separated name=name pairs, e.g. bot=assistant")
    if s.role_map and NAME_PAIRS.fullmatch(s.role_map):
        need(set(name_pairs(s.role_map).values()) <= {"system", "user", "assistant", "tool"}, "role_map",
             "each name must map to system, user, assistant or tool")
    need(s.push_retries >= 0, "push_retries", "must be 0 or more")
    need(s.push_backoff >= 0, "push_backoff", "must be 0 or more seconds")
    need(bool(re.fullmatch(r"\d+(GB|MB|KB|GiB|MiB|KiB)", s.merge_max_shard_size)), "merge_max_shard_size",
         "must be a whole number and a unit (GB, MB, KB, GiB, MiB, KiB), e.g. 5GB")
    need(s.num_machines is None or s.num_machines >= 1, "num_machines", "must be at least 1")
    need(s.machine_rank is None or 0 <= s.machine_rank < (s.num_machines or 2**31), "machine_rank",
         f"must be in [0, NUM_MACHINES={s.num_machines}), 0 being the first machine")
    need(s.main_port is None or 1 <= s.main_port <= 65535, "main_port", "must be a TCP port (1-65535)")
    need(s.num_processes is None or s.num_processes >= 1, "num_processes", "must be at least 1")
    need(s.strategy not in SHARDED or s.quantization != "int8", "strategy",
         "cannot shard 8-bit weights; use QUANTIZATION=nf4 (QLoRA) or none with fsdp and zero3")
    # speed levers that reach into the frozen weights or move them are untested on sharded weights: refused
    for lever in ("lora_kernel", "nf4_kernel", "dequant_cache", "offload_embeddings"):
        need(s.strategy not in SHARDED or getattr(s, lever) != "true", lever,
             f"not supported with STRATEGY={s.strategy} (sharded weights; untested): use auto or false")
    need(s.strategy not in SHARDED or s.long_context != "on", "long_context",
         f"not supported with STRATEGY={s.strategy} (its checkpoints and kernels assume whole layers on one GPU): "
         "use auto or off")
    need(s.hub_model_id is None or bool(HUB_ID.fullmatch(s.hub_model_id)), "hub_model_id",
         "must look like user/name")
    if s.trainer_args is not None:
        try:
            extra = trainer_args(s)
        except ConfigError as error:
            problems.append(str(error))
        else:
            problems += [f"TRAINER_ARGS: {key} is set by the job; use {OWNED_ARGUMENTS[key]}"
                         for key in extra if key in OWNED_ARGUMENTS]
    problems += parse_sources(s.dataset)[1]
    trackers = {t.strip() for t in s.report_to.split(",")}
    need(trackers <= {"tensorboard", "wandb", "mlflow", "none"}, "report_to",
         "must be a comma-separated subset of tensorboard, wandb, mlflow, none")
    return problems


def batch_layout(s: Settings, world_size: int) -> dict:
    """The global batch (rows per optimizer step across all processes) and how `world_size` processes make it:
    GLOBAL_BATCH_SIZE when set, with the accumulation derived from it; else MICRO_BATCH_SIZE x processes x
    GRAD_ACCUM. Raises ConfigError when GLOBAL_BATCH_SIZE does not divide into this layout, saying what would."""
    micro = s.micro_batch_size
    per_pass = micro * world_size  # rows of one micro-batch on every process
    accum = s.grad_accum
    if s.global_batch_size is not None:
        wanted = s.global_batch_size
        if wanted % per_pass:
            raise ConfigError(f"GLOBAL_BATCH_SIZE={wanted} does not divide into MICRO_BATCH_SIZE={micro} x "
                              f"{world_size} process(es) = {per_pass} rows a micro-step: "
                              + divisible_hint(wanted, micro, world_size))
        accum = wanted // per_pass
    return {"global_batch_size": per_pass * accum, "world_size": world_size, "micro_batch_size": micro,
            "grad_accum": accum}


def divisible_hint(wanted: int, micro: int, world_size: int) -> str:
    """What makes a global batch of `wanted` rows work: the process counts it divides into, or the nearest
    multiples of what this layout makes in one micro-step."""
    per_pass = micro * world_size
    lower, higher = wanted // per_pass * per_pass, (wanted // per_pass + 1) * per_pass
    multiples = f"GLOBAL_BATCH_SIZE={higher}" if lower == 0 else f"GLOBAL_BATCH_SIZE={lower} or {higher}"
    counts = process_counts(wanted, micro)
    where = f"run on {', '.join(map(str, counts))} process(es) in all, or " if counts else ""
    return f"{where}use a multiple of {per_pass} ({multiples})"


def process_counts(wanted: int, micro: int, most: int = 8) -> list[int]:
    """The first `most` numbers of processes in all that a global batch of `wanted` rows divides into, at `micro`
    rows a micro-batch."""
    if wanted % micro:
        return []
    return [n for n in range(1, wanted // micro + 1) if (wanted // micro) % n == 0][:most]


def trainer_args(s: Settings) -> dict:
    """TRAINER_ARGS as a mapping of SFTConfig arguments (checked against SFTConfig itself in preflight)."""
    if s.trainer_args is None:
        return {}
    try:
        extra = yaml.safe_load(s.trainer_args)
    except yaml.YAMLError as error:
        raise ConfigError(f"TRAINER_ARGS: not a JSON or YAML mapping: {error}") from None
    if not isinstance(extra, dict) or not all(isinstance(key, str) for key in extra):
        raise ConfigError(f"TRAINER_ARGS={s.trainer_args!r}: must be a mapping of argument names to values, "
                          'e.g. {"weight_decay": 0.01}')
    return extra


def name_pairs(text: str) -> dict[str, str]:
    """COLUMN_MAP / ROLE_MAP: 'a=b, c=d' -> {'a': 'b', 'c': 'd'} (checked against NAME_PAIRS by validate)."""
    return dict((side.strip() for side in pair.split("=")) for pair in text.split(","))


# The keys of a source in the list form of DATASET, and what other tools' keys for a dataset are here.
SOURCE_KEYS = ("path", "weight", "split", "config", "revision")
SOURCE_FOREIGN = {
    "fraction": "weight: TRL's fraction never repeats rows, so it shrinks the mix to what the smallest share "
                "allows; a weight repeats a small source to reach its share",
    "name": "config (the dataset configuration)",
    "type": "nothing: DATA_FORMAT=auto detects each source's format, and COLUMN_MAP renames columns",
    "data_files": "path (a file, or a directory of them)",
}


@dataclass(frozen=True)
class Source:
    """One dataset of DATASET: where it is, its share of the mix, and its own split, configuration or revision
    where it has one (else DATASET_SPLIT, DATASET_CONFIG and DATASET_REVISION)."""
    path: str
    weight: float | None = None
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    def alone(self, s: Settings) -> Settings:
        """The settings as if this source were the whole DATASET, so it is read, split, fingerprinted and named in
        messages as a single dataset is."""
        return dataclasses.replace(s, dataset=self.path, dataset_split=self.split or s.dataset_split,
                                   dataset_config=self.config or s.dataset_config,
                                   dataset_revision=self.revision or s.dataset_revision)


def sources(s: Settings) -> list[Source]:
    """The datasets DATASET mixes (one for a single dataset)."""
    found, problems = parse_sources(s.dataset)
    if problems:
        raise ConfigError("\n".join(problems))
    return found


def parse_sources(text: str) -> tuple[list[Source], list[str]]:
    """DATASET as its sources, and every problem with it, each naming the setting and the source.

    A list (YAML or JSON: a YAML file's `dataset:` list arrives as JSON) holds mappings of SOURCE_KEYS or short
    items. Otherwise the text is comma-separated short items, `path` or `path:weight`, the weight after the last
    colon: Hub ids hold no comma or colon, builtin:tasks is a name, and a path that holds one needs the list form."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            items = yaml.safe_load(stripped)
        except yaml.YAMLError as error:
            return [], [f"DATASET={text!r}: not a YAML or JSON list of sources: {error}"]
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list) or not items:
            return [], [f"DATASET={text!r}: expected a non-empty list of sources"]
    else:
        items = stripped.split(",")
    found, problems = [], []
    for number, item in enumerate(items, start=1):
        try:
            found.append(_source(item))
        except ValueError as error:
            problems.append(f"DATASET source {number} ({item!r}): {error}")
    weighted = [source.weight is not None for source in found]
    if len(found) > 1 and any(weighted) and not all(weighted):
        problems.append("DATASET: give every source a weight, or none (then every row of every source is trained on)")
    if len(found) == 1 and all(weighted):
        problems.append(f"DATASET={text!r}: a weight is a source's share of a mix of several; one source is the "
                        "whole of it: remove the weight")
    return found, problems


def _source(item) -> Source:
    """One item of DATASET as a Source; ValueError says what is wrong with it."""
    if isinstance(item, str):
        item = item.strip()
        path, colon, weight = item.rpartition(":")
        item = {"path": path, "weight": weight} if colon and item != BUILTIN_DATASET else {"path": item}
    if not isinstance(item, dict):
        raise ValueError(f"expected a path or a mapping of {', '.join(SOURCE_KEYS)}")
    for key in item:
        if key not in SOURCE_KEYS:
            raise ValueError(f"{key!r} is not a key of a source; use " + SOURCE_FOREIGN.get(
                key, f"one of {', '.join(SOURCE_KEYS)}"))
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError("no path")
    overrides = {key: str(item[key]).strip() for key in ("split", "config", "revision") if item.get(key) is not None}
    return Source(path.strip(), _weight(item.get("weight")), **overrides)


def _weight(raw) -> float | None:
    if raw is None:
        return None
    try:
        if isinstance(raw, bool):  # YAML's yes/no would pass as 1 and 0
            raise ValueError
        weight = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"the weight {raw!r} is not a number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"the weight {raw!r} must be a positive number (leave the source out to skip it)")
    return weight


def to_json(s: Settings) -> str:
    return json.dumps(dataclasses.asdict(s), indent=2, ensure_ascii=False, sort_keys=True)


def markdown_table() -> str:
    """The README's settings table, generated so it cannot drift from the dataclass."""
    rows = ["| Variable | Default | Allowed | Meaning |", "| --- | --- | --- | --- |"]
    for f in FIELDS.values():
        default = "(unset)" if f.default is None else f"`{f.default}`"
        allowed = ", ".join(f.metadata["choices"] or ()) or value_type(f).__name__
        rows.append(f"| `{env_name(f)}` | {default} | {allowed} | {f.metadata['help']} |")
    return "\n".join(rows)
