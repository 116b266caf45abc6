"""Every setting of the job, declared once.

`Settings` is the single source of truth: the click flags, the environment variables, `--help`,
the README table and the validation messages are all generated from its fields.
Resolution order: defaults < YAML file (CONFIG_FILE) < environment < command-line flags. `validate` checks every
rule that needs no model and reports all problems at once. Other tools' names for the settings, and what a misspelt
name was meant to be, are job.names; DATASET's sources (one dataset or a weighted mix) are job.sources.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from job.errors import ConfigError
from job.names import ALIASES, OWNED_ARGUMENTS, misspelt_variables, suggest
from job.sources import BUILTIN_DATASET, Source, parse_sources

BUILTIN_MODEL = "builtin:tiny-llama"
PRESETS = Path(__file__).parent / "presets"
PRESET_NAMES = tuple(sorted(p.stem for p in PRESETS.glob("*.yaml")))
SHARDED = ("fsdp", "zero3")  # strategies that split each weight across the ranks
HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")  # user/name on the Hub
NAME_PAIRS = re.compile(r"\s*[^=,\s][^=,]*=[^=,]*[^=,\s]\s*(,\s*[^=,\s][^=,]*=[^=,]*[^=,\s]\s*)*")  # a=b, c=d


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
        known = known_names()
        raise ConfigError(f"{source} {path}: unknown settings:\n  - "
                          + "\n  - ".join(f"{k}: {suggest(k, known) or 'not a setting (job --help lists them)'}"
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


def known_names() -> dict[str, str]:
    """Every name a setting goes by (by_name), mapped to the setting's variable: what job.names checks names against."""
    return {name: env_name(f) for name, f in by_name().items()}


def misspelt_base_model(s: Settings, environ) -> list[str]:
    """A real DATASET with BASE_MODEL unset and a variable that looks like it: the built-in tiny model would be
    trained on it, which nobody means."""
    if s.base_model != BUILTIN_MODEL or s.dataset == BUILTIN_DATASET:
        return []
    return [f"{name}={environ[name]!r} is not a setting ({hint}); BASE_MODEL is unset, so the built-in tiny model "
            f"would be trained on DATASET={s.dataset!r}"
            for name, hint in misspelt_variables(environ, known_names()).items() if "BASE_MODEL" in hint]


def validate(s: Settings) -> list[str]:
    """Every problem with the settings, each naming the variable, the value and what is allowed: every group's rules
    are checked, so one run reports them all."""
    return [problem for check in (_check_choices, _check_inputs, _check_adapter, _check_optimisation, _check_speed,
                                  _check_evaluation_and_logs, _check_publishing, _check_launch)
            for problem in check(s)]


def _broken(s: Settings, rules) -> list[str]:
    """For each rule (holds, setting, what is allowed) that does not hold: the setting's variable, value and rule."""
    return [f"{env_name(FIELDS[name])}={getattr(s, name)!r}: {rule}" for holds, name, rule in rules if not holds]


def _check_choices(s: Settings) -> list[str]:
    """Settings whose values are a fixed set."""
    return [f"{env_name(f)}={getattr(s, f.name)!r} is not one of: {', '.join(f.metadata['choices'])}"
            for f in FIELDS.values() if f.metadata["choices"] and getattr(s, f.name) not in f.metadata["choices"]]


def _check_inputs(s: Settings) -> list[str]:
    """What is trained on and how it is read: DATASET's sources, the data format, the column and role maps, the chat
    template; and OUTPUT_DIR."""
    # Path("") is the current directory
    found = [] if s.output_dir.strip() else ["OUTPUT_DIR is empty: set it to the directory the job may write into"]
    if s.data_format == "template":
        found += _broken(s, [
            (bool(s.prompt_template and re.search(r"\{\w+\}", s.prompt_template)), "prompt_template",
             "DATA_FORMAT=template needs PROMPT_TEMPLATE naming at least one {column}"),
            (bool(s.response_column), "response_column", "DATA_FORMAT=template needs RESPONSE_COLUMN"),
        ])
    elif s.prompt_template or s.response_column:
        found.append("PROMPT_TEMPLATE and RESPONSE_COLUMN only apply with DATA_FORMAT=template "
                     f"(DATA_FORMAT={s.data_format!r})")
    found += _broken(s, [
        (s.chat_template_file is None or s.prompt_format == "auto", "prompt_format",
         "CHAT_TEMPLATE_FILE sets the template itself: leave PROMPT_FORMAT at auto"),
        *((getattr(s, name) is None or bool(NAME_PAIRS.fullmatch(getattr(s, name))), name,
           "must be comma-separated name=name pairs, e.g. bot=assistant") for name in ("column_map", "role_map")),
        (not (s.role_map and NAME_PAIRS.fullmatch(s.role_map))
         or set(name_pairs(s.role_map).values()) <= {"system", "user", "assistant", "tool"}, "role_map",
         "each name must map to system, user, assistant or tool"),
    ])
    return found + parse_sources(s.dataset)[1]


def _check_adapter(s: Settings) -> list[str]:
    """The LoRA adapter."""
    return _broken(s, [
        (s.lora_r >= 1, "lora_r", "must be a positive integer (e.g. 16)"),
        (s.lora_alpha >= 1, "lora_alpha", "must be a positive integer (e.g. 2 x LORA_R)"),
        (0 <= s.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
        (bool(re.fullmatch(r"all-linear|[\w.\-]+(,[\w.\-]+)*", s.lora_target_modules)), "lora_target_modules",
         "must be all-linear or comma-separated module names such as q_proj,v_proj"),
    ])


def _check_optimisation(s: Settings) -> list[str]:
    """The schedule, the batch and the sequence length; TRAINER_ARGS for the trainer's other arguments."""
    return _broken(s, [
        (0 < s.learning_rate < 1, "learning_rate", "must be in (0, 1), e.g. 2e-4"),
        (0 <= s.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
        (s.epochs > 0, "epochs", "must be positive"),
        (s.max_steps == -1 or s.max_steps > 0, "max_steps", "must be -1 (use EPOCHS) or a positive integer"),
        (s.micro_batch_size >= 1, "micro_batch_size", "must be at least 1"),
        (s.grad_accum >= 1, "grad_accum", "must be at least 1"),
        (s.global_batch_size is None or s.global_batch_size >= 1, "global_batch_size", "must be at least 1"),
        (s.max_length >= 16, "max_length", "must be at least 16 tokens"),
    ]) + _check_trainer_args(s)


def _check_trainer_args(s: Settings) -> list[str]:
    """TRAINER_ARGS is a mapping that names none of the arguments the job sets itself (preflight checks the rest
    against SFTConfig)."""
    try:
        extra = trainer_args(s)
    except ConfigError as error:
        return [str(error)]
    return [f"TRAINER_ARGS: {key} is set by the job; use {OWNED_ARGUMENTS[key]}"
            for key in extra if key in OWNED_ARGUMENTS]


def _check_speed(s: Settings) -> list[str]:
    """The speed levers, and those a sharded STRATEGY refuses."""
    sharded = s.strategy in SHARDED
    return _broken(s, [
        (s.gpu_memory_gib == 0 or s.gpu_memory_gib >= 1, "gpu_memory_gib", "must be 0 (the whole card) or at least 1"),
        (s.offload_layers >= -1, "offload_layers", "must be -1 (auto) or 0 or more"),
        (s.dataloader_workers >= -1, "dataloader_workers", "must be -1 (auto) or 0 or more"),
        # levers that reach into the frozen weights or move them are untested on sharded weights: refused
        *((not sharded or getattr(s, lever) != "true", lever,
           f"not supported with STRATEGY={s.strategy} (sharded weights; untested): use auto or false")
          for lever in ("lora_kernel", "nf4_kernel", "dequant_cache", "offload_embeddings")),
        (not sharded or s.long_context != "on", "long_context",
         f"not supported with STRATEGY={s.strategy} (its checkpoints and kernels assume whole layers on one GPU): "
         "use auto or off"),
    ])


def _check_evaluation_and_logs(s: Settings) -> list[str]:
    """Evaluation, checkpoints, logs and trackers."""
    trackers = {t.strip() for t in s.report_to.split(",")}
    return _broken(s, [
        (0 <= s.eval_fraction < 0.5, "eval_fraction", "must be in [0, 0.5)"),
        (s.max_eval_samples >= 1, "max_eval_samples", "must be at least 1"),
        *((getattr(s, name) >= 1, name, "must be at least 1")
          for name in ("eval_steps", "save_steps", "logging_steps", "save_total_limit")),
        (s.sample_prompts >= 0, "sample_prompts", "must be 0 or more"),
        (s.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
        (trackers <= {"tensorboard", "wandb", "mlflow", "none"}, "report_to",
         "must be a comma-separated subset of tensorboard, wandb, mlflow, none"),
    ])


def _check_publishing(s: Settings) -> list[str]:
    """The merge and the push."""
    return _broken(s, [
        (s.push_retries >= 0, "push_retries", "must be 0 or more"),
        (s.push_backoff >= 0, "push_backoff", "must be 0 or more seconds"),
        (bool(re.fullmatch(r"\d+(GB|MB|KB|GiB|MiB|KiB)", s.merge_max_shard_size)), "merge_max_shard_size",
         "must be a whole number and a unit (GB, MB, KB, GiB, MiB, KiB), e.g. 5GB"),
        (s.hub_model_id is None or bool(HUB_ID.fullmatch(s.hub_model_id)), "hub_model_id", "must look like user/name"),
    ])


def _check_launch(s: Settings) -> list[str]:
    """The machines and processes, and what STRATEGY can shard."""
    return _broken(s, [
        (s.num_machines is None or s.num_machines >= 1, "num_machines", "must be at least 1"),
        (s.machine_rank is None or 0 <= s.machine_rank < (s.num_machines or 2**31), "machine_rank",
         f"must be in [0, NUM_MACHINES={s.num_machines}), 0 being the first machine"),
        (s.main_port is None or 1 <= s.main_port <= 65535, "main_port", "must be a TCP port (1-65535)"),
        (s.num_processes is None or s.num_processes >= 1, "num_processes", "must be at least 1"),
        (s.strategy not in SHARDED or s.quantization != "int8", "strategy",
         "cannot shard 8-bit weights; use QUANTIZATION=nf4 (QLoRA) or none with fsdp and zero3"),
    ])


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


def sources(s: Settings) -> list[Source]:
    """The datasets DATASET mixes (one for a single dataset)."""
    found, problems = parse_sources(s.dataset)
    if problems:
        raise ConfigError("\n".join(problems))
    return found


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
