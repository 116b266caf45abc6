"""The benchmark's report: ratios of the job against stock, and the table."""

from __future__ import annotations

from job.bench.phase import Result
from job.bench.recipes import job_phase_name


def ratios(results: list[Result]) -> dict:
    by = {r.name: r for r in results if r.ok and not r.cap_gib}
    out = {}
    if "job" in by and "tutorial" in by:
        out["job/tutorial"] = round(by["job"].tokens_per_s / by["tutorial"].tokens_per_s, 2)
    stock = max((by[name] for name in ("stock", "stock script") if name in by), key=lambda r: r.tokens_per_s,
                default=None)
    if "job" in by and stock:  # the faster of the bench's stock phase and the stock script run on its own
        out["job/stock"] = round(by["job"].tokens_per_s / stock.tokens_per_s, 2)
    if "stock" in by and "stock script" in by:
        out["stock script/stock phase"] = round(by["stock script"].tokens_per_s / by["stock"].tokens_per_s, 2)
    for cap in sorted({r.cap_gib for r in results if r.cap_gib}):
        job = next((r for r in results if r.name == job_phase_name(cap) and r.ok), None)  # not a variant
        stock = max((r for r in results if r.cap_gib == cap and r.name.startswith("stock") and r.ok),
                    key=lambda r: r.tokens_per_s, default=None)
        key = f"cap {cap:g} GiB job/best stock"
        if job and stock:
            out[key] = round(job.tokens_per_s / stock.tokens_per_s, 2)
        elif job:
            out[key] = "no stock recipe fits"
        same = max((r for r in results if r.cap_gib == cap and r.name.startswith("stock") and r.ok and job
                    and r.rows_per_step == job.rows_per_step), key=lambda r: r.tokens_per_s, default=None)
        if job and same:
            out[f"cap {cap:g} GiB job/stock at {job.rows_per_step} rows a step"] = round(
                job.tokens_per_s / same.tokens_per_s, 2)
    return out


def table(results: list[Result]) -> str:
    head = f"{'phase':<22} {'recipe':<58} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>9} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        recipe = r.recipe if r.levers is None else _describe_levers(r.levers)
        if r.ok:
            lines.append(f"{r.name:<22} {recipe[:58]:<58} {r.tokens_per_s:>9,.0f} {r.step_s:>7.3f} "
                         f"{r.peak_reserved_gib:>9.1f} {r.mfu:>6.1%}")
        else:
            lines.append(f"{r.name:<22} {recipe[:58]:<58} {r.error or 'failed':>34}")
    return "\n".join(lines)


def _describe_levers(levers: dict) -> str:
    parts = [levers["attn_implementation"], "liger" if levers["liger"] else "",
             "fused LoRA" if levers["lora_kernel"] else "", "NF4 kernel" if levers.get("nf4_kernel") else "",
             "bf16 weight cache" if levers["dequant_cache"] else "",
             {"none": "no recompute", "full": "recompute all", "offload": "recompute+offload",
              "partial": f"recompute {levers['checkpoint_layers']} layers"}[levers["checkpointing"]],
             f"{levers['offloaded_layers']} layers' activations on CPU" if levers.get("offloaded_layers") else "",
             f"batch {levers['micro_batch_size']}x{levers['grad_accum']}",
             ("embeddings on CPU" if levers.get("offload_head") else "input embedding on CPU")
             if levers["offload_embeddings"] else ""]
    return "job: " + ", ".join(p for p in parts if p)


def render(report: dict) -> str:
    results = [Result(**r) for r in report["results"]]
    lines = [f"{report['model']} QLoRA (NF4 + bf16, LoRA r=16 all-linear), max length {report['max_length']}, "
             f"{report['device']}; {report['timed_steps']} timed steps after {report['warmup_steps']} warm-up",
             table(results), ""]
    lines += [f"{k}: {v}x" if isinstance(v, float) else f"{k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)
