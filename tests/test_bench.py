"""The plumbing of `job bench` on CPU (no timing): its data, recipes, report, CLI, and one tiny phase end to end."""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path

import pytest

from job.bench import phase, recipes, report, workload


def test_rows_look_like_instruction_data():
    rows = workload.make_rows(2000, 128256, 2048, seed=1)
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert 255 <= statistics.median(lengths) <= 345  # median ~300
    assert max(lengths) <= 2048 and min(lengths) >= 16 and max(lengths) > 1500  # a long tail, cut at MAX_LENGTH
    for ids, labels in zip(rows["input_ids"][:50], rows["labels"][:50]):
        prompt = labels.count(-100)
        assert 0 < prompt < len(ids) and labels[prompt:] == ids[prompt:]  # the answer is trained, the prompt not
        assert all(1000 <= i < 128256 - 1000 for i in ids)
    assert workload.make_rows(5, 1000, 64, seed=3) == workload.make_rows(5, 1000, 64, seed=3)


def test_the_recipes():
    assert "padded to 2048" in recipes.TUTORIAL.describe(2048) and recipes.TUTORIAL.recompute
    stock = recipes.STOCK_BEST.describe(2048)
    assert "packing" in stock and "flex_attention" in stock and "liger" in stock and "no recompute" in stock
    # the measured peaks: 58.0 GiB without recomputation at batch 4, 14.2 GiB with it at batch 8, 7.9 at 2
    assert recipes.Stock(batch=4).predicted_gib(2048) == pytest.approx(58.0, abs=0.3)
    assert recipes.Stock(recompute=True, batch=8).predicted_gib(2048) == pytest.approx(14.2, abs=0.3)
    assert recipes.Stock(recompute=True, batch=2).predicted_gib(2048) == pytest.approx(7.9, abs=0.3)
    for cap in (8, 16, 24):  # every cap of the issue has a stock recipe that is expected to fit
        assert any(r.predicted_gib(2048) <= cap for r in recipes.STOCK_UNDER_CAP)


def test_variants_parse_settings_by_variable_or_field():
    name, overrides = recipes.parse_variant("flex:ATTN_IMPLEMENTATION=flex_attention,lora_r=8")
    assert name == "flex" and overrides == {"attn_implementation": "flex_attention", "lora_r": "8"}
    assert recipes.parse_variant("plain:") == ("plain", {})
    with pytest.raises(ValueError, match="NOPE"):
        recipes.parse_variant("x:NOPE=1")
    phases = recipes.plan_phases(recipes.Options(variants=(("job profile", {}),)))
    assert [p.name for p in phases] == ["tutorial", "stock", "job", "job profile"] and phases[-1].profile


def test_levers_under_a_cap_run_under_it_only_when_that_cap_is_timed():
    uncapped = recipes.plan_phases(recipes.Options(variants=recipes.lever_variants(("stock", "job"), ())))
    assert all(p.cap_gib == 0 for p in uncapped) and len(uncapped) == 3 + len(recipes.LEVER_VARIANTS)
    capped = recipes.lever_variants(("stock",), (16.0, 5.0))  # no uncapped job phase: no uncapped lever
    phases = recipes.plan_phases(recipes.Options(phases=("stock",), variants=capped))
    assert [p.name for p in phases] == ["stock", "16GiB -layer offload", "16GiB -NF4 kernel"]
    assert all(p.cap_gib == 16.0 and p.overrides["gpu_memory_gib"] == "16" for p in phases[1:])


def results():
    ok = dict(ok=True, steps=8, tokens_per_step=8000.0, step_s=1.0, peak_reserved_gib=40.0, mfu=0.3)
    return [phase.Result("tutorial", "padded", tokens_per_s=1000.0, **ok),
            phase.Result("stock", "packing", tokens_per_s=10000.0, **ok),
            phase.Result("job", "job defaults", tokens_per_s=13000.0, **ok, levers={
                "attn_implementation": "varlen", "liger": True, "lora_kernel": True, "dequant_cache": False,
                "checkpointing": "partial", "checkpoint_layers": 9, "micro_batch_size": 4, "grad_accum": 1,
                "offload_embeddings": False}),
            phase.Result("job again", "a --variant under the cap", cap_gib=8.0, tokens_per_s=9000.0, **ok),
            phase.Result("job@8GiB", "job defaults", cap_gib=8.0, tokens_per_s=6000.0, **ok),
            phase.Result("stock@8GiB", "packing", cap_gib=8.0, tokens_per_s=2000.0, **ok),
            phase.Result("stock@8GiB", "packing", cap_gib=8.0, error="out of memory"),
            phase.Result("job@5GiB", "job defaults", cap_gib=5.0, tokens_per_s=1900.0, **ok)]


def test_ratios_and_table():
    ratios = report.ratios(results())
    assert ratios["job/tutorial"] == 13.0 and ratios["job/stock"] == 1.3
    assert ratios["cap 8 GiB job/best stock"] == 3.0 and ratios["cap 5 GiB job/best stock"] == "no stock recipe fits"
    table = report.table(results())
    assert "recompute 9 layers" in table and "13,000" in table and "out of memory" in table


def test_the_report_renders_from_its_json():
    import dataclasses

    figures = {"device": "NVIDIA H100 80GB HBM3", "model": "llama-3-8b", "max_length": 2048, "warmup_steps": 3,
              "timed_steps": 8, "results": [dataclasses.asdict(r) for r in results()],
              "ratios": report.ratios(results())}
    text = report.render(json.loads(json.dumps(figures)))
    assert "job/stock: 1.3x" in text and "job/tutorial: 13.0x" in text and text.count("\n") > 8


def test_the_architectures_have_their_real_sizes():
    from transformers import AutoConfig

    from job.speed import Shape

    sizes = {}
    for arch, spec in workload.ARCHITECTURES.items():
        spec = dict(spec)
        sizes[arch] = Shape.of(AutoConfig.for_model(spec.pop("model_type"), **spec)).params
    assert sizes["llama-3-8b"] == pytest.approx(8.03e9, rel=0.01)
    assert sizes["mistral-7b"] == pytest.approx(7.25e9, rel=0.01)


def test_bench_says_it_needs_a_gpu(hf_home):
    import torch

    from tests.jobtools import run_job

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    result = run_job(hf_home, "bench", "--steps", "1")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_a_tiny_phase_runs_end_to_end_on_cpu(tiny_model):
    """The phase machinery (settings, levers, trainer, token count, timing) on the tiny model: tokens per step is
    what the padding-free collator packed (no padding), and a padded recipe counts only non-pad tokens."""
    rows = workload.make_rows(120, 1024, 256, seed=0, median=60)
    opts = recipes.Options(max_length=256, warmup=1, steps=2)
    hooks = list(gc.callbacks)
    job = phase.run_phase(recipes.Phase("job", "job"), Path(tiny_model), rows, opts)
    assert job.ok, job.error
    assert gc.callbacks == hooks and 0 <= job.gc_s_per_step < job.step_s  # the collector's time, and its hook gone
    assert job.levers["attn_implementation"] == "sdpa" and job.steps == 2
    assert 900 <= job.tokens_per_step <= 4 * 256 and job.tokens_per_s > 0
    padded = phase.run_phase(recipes.Phase("tutorial", "stock", recipes.Stock(
        packing=False, attn="sdpa", liger=False, recompute=True, batch=4, pad_to_max=True)), Path(tiny_model), rows, opts)
    assert padded.ok, padded.error
    assert padded.tokens_per_step < 4 * 256  # pad tokens are not counted
    accumulated = phase.run_phase(recipes.Phase("stock 2x2", "stock", recipes.Stock(
        attn="sdpa", liger=False, recompute=True, batch=2, accum=2)), Path(tiny_model), rows, opts)
    assert accumulated.ok, accumulated.error
    assert accumulated.rows_per_step == job.rows_per_step == 4
    assert 900 <= accumulated.tokens_per_step <= 4 * 256  # an optimizer step is 2 micro-batches of 2 packed rows


def test_the_bench_times_the_path_users_train_with(tiny_model):
    """The job's phase is assembled by trainer.build_trainer, as `job train` is: a setting that turns the
    long-context mode on installs it in the bench too (an earlier copy of the path skipped it)."""
    rows = workload.make_rows(40, 1024, 256, seed=0, median=60)
    opts = recipes.Options(max_length=256, warmup=1, steps=1)
    long = phase.run_phase(recipes.Phase("job long", "job", overrides={"long_context": "on"}), Path(tiny_model),
                           rows, opts)
    assert long.ok, long.error
    assert long.installed["long_context"]["long_context"] is True


def test_under_a_cap_stock_is_also_timed_at_the_jobs_rows_per_step():
    """The fastest stock recipe under 16-24 GiB takes 8 rows a step where the job's settings say 4: other
    training. The same-rows recipes accumulate instead, and the ratio against them is reported on its own."""
    assert [r.describe(2048).rsplit(", ", 1)[1] for r in recipes.same_rows_recipes(4)] == ["batch 4", "batch 2x2",
                                                                                         "batch 1x4"]
    assert all(r.recompute and r.rows == 4 for r in recipes.same_rows_recipes(4))
    results = [phase.Result("job@16GiB", "job", 16.0, ok=True, tokens_per_s=10400.0, rows_per_step=4),
               phase.Result("stock@16GiB", "stock", 16.0, ok=True, tokens_per_s=9041.0, rows_per_step=8),
               phase.Result("stock@16GiB 4 rows", "stock", 16.0, ok=True, tokens_per_s=8000.0, rows_per_step=4)]
    got = report.ratios(results)
    assert got["cap 16 GiB job/best stock"] == round(10400 / 9041, 2)
    assert got["cap 16 GiB job/stock at 4 rows a step"] == 1.3


def test_the_stock_script_times_stock_trl_in_a_process_of_its_own(tiny_model, tmp_path):
    """The stock recipe run by a script that imports nothing of the job, on the bench's model and rows; the job's
    ratio is taken against the faster of it and the bench's own stock phase."""
    import ast

    from job.bench import compare

    source = ast.parse(compare.STOCK_SCRIPT.read_text())
    imported = {a.name for n in ast.walk(source) if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in ast.walk(source) if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "job" for name in imported)
    rows = workload.make_rows(40, 1024, 256, seed=0, median=60)
    opts = recipes.Options(max_length=256, warmup=1, steps=2)
    result = compare.stock_script(Path(tiny_model), rows, opts, tmp_path,
                                  recipes.Stock(attn="sdpa", liger=False, batch=2))
    assert result.ok, result.error
    assert result.steps == 2 and result.tokens_per_s > 0 and 0 < result.tokens_per_step <= 2 * 256
    ok = {"ok": True, "rows_per_step": 4}
    faster = [phase.Result("job", "job", tokens_per_s=14000.0, **ok), phase.Result("stock", "s", tokens_per_s=10000.0, **ok),
              phase.Result("stock script", "s", tokens_per_s=11200.0, **ok)]
    assert report.ratios(faster)["job/stock"] == 1.25 and report.ratios(faster)["stock script/stock phase"] == 1.12
