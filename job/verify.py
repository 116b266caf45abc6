"""The merge check: is the saved merged model base + adapter, to within the rounding of its dtype?

A merged 16-bit model can never equal base + adapter exactly: each adapted weight W + scale·B·A is rounded to 16
bits once. So no check here uses a free tolerance; every bound is a number of rounding steps of the merge dtype.

1. Weights (`check_weights`), read tensor by tensor from the saved files and from the base checkpoint's and the
   adapter's own files (nothing from PEFT's merge is trusted): every adapted weight must equal
   W + scale·B·A (DoRA: m / ||W + scale·B·A|| · (W + scale·B·A), row-wise), computed in float32 (float64 for
   a float32 merge), within 1.5 rounding steps of the merge dtype at the magnitude of its operands
   (|W| + |scale·B·A|): one for the sum, half for the update, which PEFT rounds before adding it (plus, where
   it shows, the float32 error of the product B·A itself); every other tensor
   must equal the base's, exactly. A failure names the tensor and what it looks like: not merged, the update
   scaled wrongly, DoRA's magnitude ignored, the base part changed (as a merge into dequantized 4-bit weights
   does), a tensor or a weight file missing, a float16 overflow.
2. Logits (`compare_logits`), on a few short evaluation rows: the saved model, loaded as users load it, must give
   the logits the merged model gave in memory (config and loading are right), and its gap to the unmerged
   base + adapter must be within three times the gap that one rounding step on every adapted weight makes
   (measured on the same model and rows: the "rounding twin"), which is what a correct merge's rounding can do
   and depends on how sensitive the model is, not on a constant. Top-1 agreement is reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("job.merge")

ADAPTER_PREFIX = "base_model.model."
# the sum W + update is rounded once (up to a step at the operands' magnitude) after the update itself was rounded
# (half a step at most): a correct merge is within 1.5 steps, a wrong one off by the update's size (hundreds)
WEIGHT_STEPS = 1.5
TWIN_MARGIN = 3.0  # the merge's rounding is at most half a step per weight; the twin moves every weight a full step
SHOWN = 4  # problems named one by one; the rest are counted


# ------------------------------------------------------------------------------------------- rounding

def rounding_step(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at each |magnitude| (one rounding step), as a tensor of magnitude's dtype."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude.abs())  # magnitude = m * 2**e with m in [0.5, 1)
    step = torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)  # eps is the step at 1
    return torch.where(magnitude == 0, torch.full_like(magnitude, info.tiny * info.eps),
                       step.clamp_min(info.tiny * info.eps))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precise enough to judge `dtype`'s rounding: float32 for 16-bit, float64 for float32."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def nudge(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Move every element one rounding step up or down at random, in place (the rounding twin)."""
    work = weight.to(work_dtype(weight.dtype))
    sign = torch.randint(0, 2, work.shape, generator=generator, dtype=torch.int8).to(work.device) * 2 - 1
    weight.copy_((work + sign * rounding_step(work, weight.dtype)).to(weight.dtype))


# ------------------------------------------------------------------------------------------- files

class SafetensorsFolder:
    """Tensors of a checkpoint folder by name, read one at a time (a 16-bit 8B model never has to fit twice)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.missing_files: list[str] = []
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = {name: "model.safetensors" for name in _keys(self.folder / "model.safetensors")}
        else:
            weight_map = {}
        self.files = {}
        for name, file in weight_map.items():
            if (self.folder / file).is_file():
                self.files[name] = self.folder / file
            elif file not in self.missing_files:
                self.missing_files.append(file)
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path].get_tensor(name)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def checkpoint_folder(path: str) -> Path | None:
    """The local folder holding a base checkpoint's safetensors (a directory, or a Hub id already downloaded by
    from_pretrained), or None where it has none (an old .bin checkpoint)."""
    if Path(path).is_dir():
        folder = Path(path)
        return folder if list(folder.glob("*.safetensors")) else None
    from transformers.utils import cached_file

    for name in ("model.safetensors.index.json", "model.safetensors"):
        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        if found:
            return Path(found).parent
    return None


class Adapter:
    """The LoRA factors, scales and DoRA magnitudes of a saved adapter, by the base tensor they update."""

    def __init__(self, folder: Path):
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        from safetensors.torch import load_file

        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                module, found, _ = key.removeprefix(ADAPTER_PREFIX).partition("." + part)
                if found:
                    factors.setdefault(module + ".weight", {})[part] = tensor
        self.modules = {}
        for weight, parts in factors.items():
            a, b = parts["lora_A"], parts["lora_B"]
            rank = a.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, weight, config["lora_alpha"])
            scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
            self.modules[weight] = (a, b, scale, parts.get("lora_magnitude_vector"))

    def update(self, weight: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """scale·B·A for the base tensor `weight`, shaped like it, and how far a float32 product of them may be
        off: rank · float32 eps · scale·|B|·|A| (each element is a sum of `rank` products)."""
        a, b, scale, _ = self.modules[weight]
        a, b = a.to(device, dtype), b.to(device, dtype)
        delta = scale * (b @ a)
        error = (a.shape[0] * torch.finfo(torch.float32).eps * scale) * (b.abs() @ a.abs())
        return (delta.T, error.T) if self.fan_in_fan_out else (delta, error)


def _pattern_value(patterns: dict, weight: str, default):
    """PEFT's alpha_pattern: the first key that matches the end of the module's name."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(patterns.keys(), weight.removesuffix(".weight"))
    return patterns.get(key, default)


# ------------------------------------------------------------------------------------------- weights

def check_weights(merged_dir: Path, base: str, adapter_dir: Path, dtype: torch.dtype, device: str,
                  tied_names: set[str] = frozenset()) -> dict:
    """Every tensor of the saved merged model against base + adapter (module docstring, part 1)."""
    base_folder = checkpoint_folder(base)
    if base_folder is None:
        log.warning("the base checkpoint %s has no safetensors files: the weight check is skipped; the logit check "
                    "still bounds the merge", base)
        return {"weights_checked": False, "problems": []}
    adapter = Adapter(adapter_dir)
    work = work_dtype(dtype)
    problems: list[str] = []
    worst_steps, worst_share, compared = 0.0, 0.0, 0
    with SafetensorsFolder(merged_dir) as merged, SafetensorsFolder(base_folder) as original:
        for file in merged.missing_files:
            problems.append(f"{file}, named in model.safetensors.index.json, is missing from the saved model (a "
                            "weight shard missing)")
        present, expected = merged.names(), original.names()
        lost = sorted(expected - present - set(tied_names))
        if lost and not merged.missing_files:
            problems.append(f"{len(lost)} tensors of the base are missing from the saved model, e.g. {lost[0]}")
        extra = sorted(present - expected)
        if extra:
            problems.append(f"{len(extra)} tensors are not in the base model, e.g. {extra[0]} (adapter layers left in "
                            "the model?)")
        untouched = [name for name in adapter.modules if name not in expected]
        if untouched:
            problems.append(f"the adapter updates {untouched[0]}, which the base checkpoint does not have")
        for name in sorted(present & expected):
            got, want = merged.get(name).to(device), original.get(name).to(device)
            if got.shape != want.shape:
                problems.append(f"{name}: shape {tuple(got.shape)}, the base's is {tuple(want.shape)}")
                continue
            compared += 1
            if name in adapter.modules:
                steps, share, problem = _check_adapted(name, got, want, adapter, dtype, work)
                worst_steps, worst_share = max(worst_steps, steps), max(worst_share, share)
            else:
                problem = _check_unchanged(name, got, want.to(dtype))
            if problem:
                problems.append(problem)
    if dtype == torch.float16 and any("not finite" in p for p in problems):
        problems.append(f"MERGE_DTYPE={_name(dtype)}: the merged weights overflow {_name(dtype)}; use "
                        "MERGE_DTYPE=bfloat16")
    shown = problems[:SHOWN] + ([f"and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else [])
    return {"weights_checked": True, "tensors_compared": compared, "adapted_tensors": len(adapter.modules),
            "max_rounding_steps": round(worst_steps, 3), "weight_error_of_bound": round(worst_share, 3),
            "problems": shown}


def _check_adapted(name: str, got: torch.Tensor, base: torch.Tensor, adapter: Adapter, dtype, work):
    """(worst error in rounding steps, worst error as a share of its bound, problem or None) for one adapted
    weight. The bound: WEIGHT_STEPS rounding steps at the operands' magnitude, plus what computing the update
    in float32 may add (only a float32 merge notices it)."""
    w, m = base.to(work), got.to(work)
    delta, product_error = adapter.update(name, w.device, work)
    magnitude = adapter.modules[name][3]
    plain = w + delta
    operands = w.abs() + delta.abs()
    want, factor = plain, None
    if magnitude is not None:  # DoRA: the row norms of the unmerged weight rescale each row to its magnitude
        factor = (magnitude.to(w.device, work).reshape(-1) / torch.linalg.vector_norm(plain, dim=1))[:, None]
        want = plain * factor
    if not torch.isfinite(m).all():
        return float("inf"), float("inf"), f"{name}: merged values not finite ({_name(dtype)} overflow?)"

    def off(target, scaled):
        step = rounding_step(operands * scaled, dtype)
        error = (m - target).abs()
        return (error / step).max().item(), (error / (WEIGHT_STEPS * step + product_error * scaled)).max().item()

    steps, share = off(want, 1.0 if factor is None else factor.abs())
    if share <= 1.0:
        return steps, share, None
    # what the fault looks like
    if torch.equal(got, base.to(dtype)):
        return steps, share, f"{name}: not merged (it equals the base weight; the adapter's update is missing)"
    if factor is not None:
        if off(plain, 1.0)[1] <= 1.0:
            return steps, share, (f"{name}: DoRA magnitude ignored (merged as plain LoRA: W + scale·B·A without "
                                  "m/||W+BA||)")
        return steps, share, f"{name}: off by up to {steps:.3g} rounding steps from the DoRA merge m/||W+BA||·(W+BA)"
    applied = ((m - w) * delta).sum() / (delta * delta).sum().clamp_min(1e-30)
    if abs(applied.item() - 1) > 0.05:
        return steps, share, (f"{name}: the merged update is {applied.item():.3g}x scale·B·A (LoRA scale "
                              f"{adapter.modules[name][2]:g} applied wrongly)")
    drift = ((m - delta - w).norm() / w.norm().clamp_min(1e-30)).item()
    return steps, share, (f"{name}: the base part differs from the 16-bit base weight by {drift:.3%} (rms), up to "
                          f"{steps:.3g} rounding steps: merged into changed base weights, e.g. dequantized 4-bit "
                          "ones?")


def _check_unchanged(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    if torch.equal(got, want):
        return None
    if not torch.isfinite(got).all() and torch.isfinite(want.float()).all():
        return f"{name}: values not finite ({_name(got.dtype)} overflow?)"
    gap = (got.float() - want.float()).abs().max().item()
    return f"{name}: changed although no adapter updates it (max difference {gap:.3g})"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------- logits

def compare_logits(loaded: list[torch.Tensor], in_memory: list[torch.Tensor], twin: list[torch.Tensor],
                   reference: list[torch.Tensor], dtype: torch.dtype) -> dict:
    """The logit checks (module docstring, part 2): loaded vs in-memory merged, and loaded vs unmerged
    base + adapter within TWIN_MARGIN x the rounding twin's gap."""
    finite = all(bool(torch.isfinite(t).all()) for t in (*loaded, *reference))
    scale = max(r.abs().max().item() for r in reference) if finite else float("inf")
    reload_gap = _max_gap(loaded, in_memory)
    reload_bound = 2 * rounding_step(torch.tensor([scale]), dtype).item() if finite else 0.0
    rounding_gap = _max_gap(twin, in_memory)
    gap = _max_gap(loaded, reference)
    agree = torch.cat([(c.argmax(-1) == r.argmax(-1)).flatten() for c, r in zip(loaded, reference)])
    return {
        "finite": finite,
        "max_abs_logit_gap": gap,
        "mean_abs_logit_gap": torch.cat([(c - r).abs().flatten() for c, r in zip(loaded, reference)]).mean().item(),
        "logit_scale": scale,
        "relative_gap": gap / max(scale, 1e-6),
        "rounding_twin_gap": rounding_gap,
        "logit_bound": TWIN_MARGIN * rounding_gap,
        "reload_gap": reload_gap,
        "reload_bound": reload_bound,
        "top1_agreement": agree.float().mean().item(),
        "logits_within_rounding": finite and gap <= TWIN_MARGIN * rounding_gap,
        "loads_as_merged": finite and reload_gap <= reload_bound,
    }


def _max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    gaps = [(x - y).abs().max().item() for x, y in zip(a, b)]
    return max(gaps) if all(g == g for g in gaps) else float("inf")  # NaN compares unequal to itself
