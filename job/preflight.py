"""Everything that can be checked before a GPU hour is spent, and the plan that results.

Checks the settings, OUTPUT_DIR, the model and tokenizer, the target modules (on an empty
"meta" copy of the model, no weights loaded), the data (fully tokenized, cached for training),
the loss mask on one rendered sample, and the Hub token when a push is asked for.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid

from job import checkpoint, data, model, publish, speed
from job.checkpoint import Layout
from job.config import Settings, batch_layout, trainer_args
from job.errors import ConfigError, unreachable_or
from job.speed import longcontext

QUANTIZED_BYTES = {"nf4": 0.56, "int8": 1.06, "none": 2.0}  # per parameter, with quantization constants


def check_output_dir(layout: Layout) -> None:
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        probe = layout.root / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"OUTPUT_DIR={layout.root}: not writable ({error.strerror})") from None


def check_packages(s: Settings) -> None:
    """The packages that REPORT_TO and STRATEGY need, before a model is loaded (they would fail at the trainer)."""
    import importlib.util

    needs = {f"REPORT_TO={tracker}": tracker for tracker in ("wandb", "mlflow")
             if tracker in {t.strip() for t in s.report_to.split(",")}}
    if s.strategy in ("zero2", "zero3"):
        needs[f"STRATEGY={s.strategy}"] = "deepspeed"
    missing = [f"{setting} needs the Python package {package}, which is not installed (pip install {package})"
               for setting, package in needs.items() if importlib.util.find_spec(package) is None]
    if missing:
        raise ConfigError("; ".join(missing))


def check_trainer_args(s: Settings) -> None:
    """TRAINER_ARGS against SFTConfig itself: names it has, values its own checks accept."""
    import difflib
    import tempfile

    from trl import SFTConfig

    from job.trainer import sft_config

    extra = trainer_args(s)
    if not extra:
        return
    known = [f.name for f in dataclasses.fields(SFTConfig)]
    unknown = []
    for key in extra:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            unknown.append(f"{key}{f' (did you mean {close[0]}?)' if close else ''}")
    if unknown:
        raise ConfigError(f"TRAINER_ARGS: not arguments of TRL's SFTConfig: {', '.join(unknown)}")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            sft_config(s, output_dir=scratch, report_to="none")
    except (ValueError, TypeError, ImportError) as error:
        raise ConfigError(f"TRAINER_ARGS: SFTConfig refuses {extra}: {error}") from None


def preflight(s: Settings, world_size: int = 1) -> dict:
    from accelerate import PartialState, init_empty_weights
    from transformers import AutoModelForCausalLM

    layout = Layout(s.output)
    check_output_dir(layout)
    check_packages(s)
    check_trainer_args(s)
    finished = checkpoint.is_complete(layout.adapter)  # trained already: this layout trains nothing
    # a GLOBAL_BATCH_SIZE that does not divide into this layout is refused before anything loads
    batch = None if finished else batch_layout(s, world_size)
    as_trained = s if finished else dataclasses.replace(s, grad_accum=batch["grad_accum"])  # s: the run's identity
    check_hub(s, finished)
    path = model.resolve(s.base_model)
    config = load_config(s, path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=s.trust_remote_code)
    model.lora_config(s, skeleton)  # raises when LORA_TARGET_MODULES names layers the model lacks
    shape, device = speed.Shape.of(config), speed.probe(s.gpu_memory_gib)
    levers = speed.choose(as_trained, shape, device)
    tokenizer = model.load_tokenizer(s, path)
    prepared = data.load(s, tokenizer, config.model_type, layout.cache, PartialState())
    long = longcontext.plan(s, shape, device, prepared.stats, levers=levers, config=config)
    longcontext.check_fits(long, s)  # refuses a length that cannot fit, naming the longest that would
    resumed = None if finished else checkpoint.resume_batch(  # before claim: a refusal changes nothing
        layout.checkpoints, batch, strategy=s.strategy, allow_change=s.allow_batch_change)
    checkpoint.claim(layout, {**s.identity(), "data_fingerprint": prepared.fingerprint}, batch)

    return {
        "base_model": s.base_model,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in skeleton.parameters()),
        "dataset": s.dataset,
        "data": prepared.stats,
        "sample_rendered": rendered_sample(tokenizer, prepared.train[0]),
        "sample_legend": "text in [brackets] is trained on (the answer and its end-of-turn token)",
        "end_of_turn_token": tokenizer.convert_ids_to_tokens(prepared.end_of_turn_id),
        "planned_steps": planned_steps(as_trained, prepared.stats, world_size),
        "estimated_gpu_gib": (levers.estimated_peak_gib if levers.device != "cpu"
                              else round(estimate_gpu_gib(s, skeleton, config, levers.checkpointing != "none"), 1)),
        "speed_levers": levers.summary(),  # what job.speed chose for this card and model, and why
        "long_context": long.summary(),  # mode, peak GPU/CPU estimate, longest that fits, RoPE warning
        "device": device.name if device.cuda else "cpu",
        "push": s.hub_model_id,
        "output_dir": str(layout.root.resolve()),
        "resume_from": str(checkpoint.latest_checkpoint(layout.checkpoints) or "") or None,
        "batch": resumed,  # the global batch, this layout's accumulation, and the layouts the run trained under
        "cpu_count": os.cpu_count(),
    }


def check_hub(s: Settings, finished: bool) -> None:
    """With HUB_MODEL_ID: the token a push needs, asked of the Hub before training (a finished run's rerun contacts
    the Hub only to push)."""
    if s.hub_model_id and finished:
        publish.require_token(s)
    elif s.hub_model_id:
        publish.check_access(s)


def load_config(s: Settings, path: str):
    """The base model's config (the Hub being unreachable is HubUnreachable, exit 5)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    except (OSError, ValueError) as error:
        raise unreachable_or(error, f"BASE_MODEL={s.base_model}",
                             ConfigError(f"BASE_MODEL={s.base_model}: cannot load its config: {error}")) from None


def rendered_sample(tokenizer, row: dict) -> str:
    """A training row as text, the tokens trained on in [brackets]."""
    return "".join(f"[{tokenizer.decode(ids)}]" if trained else tokenizer.decode(ids)
                   for ids, trained in _runs(row["input_ids"], row["labels"]))


def planned_steps(s: Settings, stats: dict, world_size: int) -> int:
    """Optimizer steps the run will take under `s` as this layout trains it: MAX_STEPS, else EPOCHS over the rows
    (packed: sequences ~95% full)."""
    rows_per_step = s.micro_batch_size * s.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(stats["train_tokens"] / (s.max_length * rows_per_step * 0.95))
                          if s.packing else math.ceil(stats["train_rows"] / rows_per_step))
    return s.max_steps if s.max_steps > 0 else math.ceil(steps_per_epoch * s.epochs)


def _runs(input_ids, labels):
    """Consecutive tokens grouped by whether they are trained on."""
    run, trained = [], None
    for token, label in zip(input_ids, labels):
        is_trained = label != -100
        if run and is_trained != trained:
            yield run, trained
            run = []
        run.append(token)
        trained = is_trained
    if run:
        yield run, trained


def estimate_gpu_gib(s: Settings, skeleton, config, recompute: bool = True) -> float:
    """Rough peak: frozen weights + LoRA with Adam state + activations of one micro-batch."""
    embeddings = sum(p.numel() for n, p in skeleton.named_parameters() if "embed" in n or "lm_head" in n)
    body = sum(p.numel() for p in skeleton.parameters()) - embeddings
    weights = body * QUANTIZED_BYTES[s.quantization] + embeddings * 2
    hidden, layers = config.hidden_size, config.num_hidden_layers
    lora = layers * 7 * s.lora_r * 2 * hidden * 16  # fp32 weights, grads, two Adam moments
    tokens = s.max_length * s.micro_batch_size
    per_layer = 2 * hidden * (2 if recompute else 34)
    activations = tokens * layers * per_layer + tokens * config.vocab_size * 4
    return (weights + lora + activations) / 2**30 + 0.5
