"""What the benchmark compares: the stock TRL recipes, the job's phase and its variants, and the options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stock:
    """A stock TRL recipe: the knobs the tutorials and TRL's docs turn, nothing of the job's own."""
    packing: bool = True
    attn: str = "flex_attention"
    liger: bool = True
    recompute: bool = False
    batch: int = 4
    pad_to_max: bool = False
    accum: int = 1                    # gradient accumulation steps: rows per optimizer step = batch x accum

    @property
    def rows(self) -> int:
        return self.batch * self.accum

    def describe(self, max_length: int) -> str:
        data = "packing (padding-free)" if self.packing else (
            f"padded to {max_length}" if self.pad_to_max else "dynamic padding")
        parts = [data, self.attn, "liger" if self.liger else "", "recompute" if self.recompute else "no recompute",
                 f"batch {self.batch}" + (f"x{self.accum}" if self.accum > 1 else "")]
        return ", ".join(p for p in parts if p)

    def predicted_gib(self, max_length: int) -> float:
        """Peak reserved memory as measured on an H100 (Llama-3-8B shape, the benchmark's rows): 58.0 GiB at 4
        packed rows without recomputation, 18.8 at 1; with recomputation 14.2 GiB at 8 rows, 10.1 at 4, 7.9 at 2,
        6.9 at 1."""
        per_token = (58.0 - 5.85) / 8192 if not self.recompute else (14.2 - 5.85) / 16384
        return 5.85 + self.batch * max_length * per_token


TUTORIAL = Stock(packing=False, attn="sdpa", liger=False, recompute=True, batch=4, pad_to_max=True)


STOCK_BEST = Stock()


# Stock recipes for a memory cap, fastest first as measured on an H100 (docs/performance.md: recomputation with a
# large batch beats no recomputation with a small one); the bench runs the first `stock_tries` that are predicted to
# fit (and any further one when those run out of memory) and keeps the fastest.
STOCK_UNDER_CAP = (Stock(batch=4), Stock(batch=2), Stock(recompute=True, batch=8), Stock(recompute=True, batch=4),
                   Stock(recompute=True, batch=2), Stock(batch=1), Stock(recompute=True, batch=1))


def same_rows_recipes(rows: int) -> tuple:
    """Stock recipes that train what the job trains (`rows` packed rows per optimizer step), fastest first: the
    fastest stock recipe under a cap may take more rows a step than the job's settings, which is other training."""
    return tuple(Stock(recompute=True, batch=b, accum=rows // b) for b in range(rows, 0, -1) if rows % b == 0)


@dataclass
class Phase:
    name: str
    kind: str                                  # "job" or "stock"
    stock: Stock | None = None
    overrides: dict = field(default_factory=dict)   # job settings (field names) on top of the defaults
    cap_gib: float = 0.0
    profile: bool = False                      # profile two steps after warm-up (their timing is then not clean)
    step_model: dict = field(default_factory=dict)  # StepModel fields the plan is made with (job.speed.planner)


# Each lever of the job's path changed on its own, for docs/performance.md (`--levers`), beside the job's phase it
# changes: uncapped when that phase is timed, and under each cap timed for the levers only a capped plan uses.
LEVER_VARIANTS = (
    ("job attn=flex", {"attn_implementation": "flex_attention"}),
    ("job attn=sdpa", {"attn_implementation": "sdpa"}),
    ("job -fused LoRA", {"lora_kernel": "false"}),
    ("job -weight cache", {"dequant_cache": "false"}),
    ("job -liger", {"liger": "false"}),
    ("job recompute all", {"gradient_checkpointing": "true"}),
    ("job 0 workers", {"dataloader_workers": "0"}),
    ("job dropout 0", {"lora_dropout": "0"}),            # changes the recipe: for information
    ("job micro 1x4", {"micro_batch_size": "1", "grad_accum": "4"}),
)


CAPPED_LEVER_VARIANTS = (
    (24, "-layer offload", {"offload_layers": "0"}),
    (16, "-layer offload", {"offload_layers": "0"}),
    (16, "-NF4 kernel", {"nf4_kernel": "false"}),
    (8, "-NF4 kernel", {"nf4_kernel": "false"}),
    (8, "input embedding on GPU", {"offload_embeddings": "false"}),
    (8, "checkpoints on GPU", {"gradient_checkpointing": "true"}),
)


def lever_variants(phases: tuple, caps: tuple) -> tuple:
    capped = tuple((f"{cap}GiB {name}", {"gpu_memory_gib": str(cap), **overrides})
                   for cap, name, overrides in CAPPED_LEVER_VARIANTS if cap in caps)
    return (LEVER_VARIANTS if "job" in phases else ()) + capped


@dataclass
class Options:
    model: str = "llama-3-8b"
    max_length: int = 2048
    warmup: int = 3
    steps: int = 8
    rows: int = 3000
    memory_caps: tuple = ()
    phases: tuple = ("tutorial", "stock", "job")
    variants: tuple = ()             # (name, {setting: value}) job phases with levers forced
    stock_tries: int = 2             # stock recipes timed per memory cap (the fastest that fits wins)
    workdir: str = ""
    as_json: bool = False
    out: str = ""


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:KEY=VALUE,KEY=VALUE' (keys as environment variables or field names, or step.FIELD of the planner's
    StepModel) -> (name, {field or step.FIELD: value})."""
    from job import config as job_config

    name, _, body = text.partition(":")
    overrides = {}
    by_env = {job_config.env_name(f): f.name for f in job_config.FIELDS.values()}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key.startswith("step."):
            from job.speed.planner import StepModel

            fields = [f.name for f in dataclasses.fields(StepModel)]
            if key.removeprefix("step.") not in fields:
                raise ValueError(f"--variant {text!r}: {key!r} is not one of step.{', step.'.join(fields)}")
            overrides[key] = float(value)
            continue
        field_name = by_env.get(key, key.lower())
        if field_name not in job_config.FIELDS:
            raise ValueError(f"--variant {text!r}: unknown setting {key!r}")
        overrides[field_name] = value
    return name.strip(), overrides


def plan_phases(opts: Options) -> list[Phase]:
    phases = []
    for name in opts.phases:
        if name == "tutorial":
            phases.append(Phase("tutorial", "stock", TUTORIAL))
        elif name == "stock":
            phases.append(Phase("stock", "stock", STOCK_BEST))
        elif name == "job":
            phases.append(Phase("job", "job"))
        else:
            raise ValueError(f"unknown phase {name!r}: use tutorial, stock, job")
    for name, overrides in opts.variants:
        step_model = {k.removeprefix("step."): v for k, v in overrides.items() if k.startswith("step.")}
        settings = {k: v for k, v in overrides.items() if not k.startswith("step.")}
        phases.append(Phase(name, "job", overrides=settings, profile="profile" in name,
                            cap_gib=float(settings.get("gpu_memory_gib", 0)), step_model=step_model))
    return phases


def job_phase_name(cap: float) -> str:
    return f"job@{cap:g}GiB"
