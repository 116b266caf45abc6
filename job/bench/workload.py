"""The benchmark's model and rows: a random-init checkpoint of a real architecture, its NF4 copy, and instruction-like token rows."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

ARCHITECTURES = {
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                   "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "sliding_window": None},
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_rows(count: int, vocab: int, max_length: int, seed: int = 0, median: int = 300, sigma: float = 0.8):
    """Instruction-like rows: lognormal total length (median `median`), a prompt of 30-70% of it that is not
    trained on, random token ids (the model is random too; only the shapes matter)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(median), sigma, count)), 16, max_length).astype(int)
    rows = {"input_ids": [], "labels": []}
    low, high = min(1000, vocab // 4), max(vocab - 1000, vocab // 2)
    for length in lengths:
        ids = rng.integers(low, high, int(length)).tolist()
        prompt = int(length * rng.uniform(0.3, 0.7))
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return rows


def dataset(rows):
    import datasets

    return datasets.Dataset.from_dict(rows)


def build_model(arch: str, root: Path) -> tuple[Path, Path]:
    """The architecture with random weights saved in bf16 (as a hub checkpoint would be), and the NF4 copy the
    job's loader makes of it, saved once so that every phase loads the same quantized weights quickly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from job import config as job_config
    from job import model as job_model

    bf16_dir, nf4_dir = root / arch, root / f"{arch}-nf4"
    if not (bf16_dir / "config.json").is_file():
        started = time.time()
        spec = dict(ARCHITECTURES[arch])
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device("cuda"):
            lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        lm.save_pretrained(bf16_dir)
        _save_tokenizer(bf16_dir)
        del lm
        torch.cuda.empty_cache()
        log(f"built random-init {arch} ({_params(cfg) / 1e9:.2f}B parameters) in {time.time() - started:.0f}s: {bf16_dir}")
    if not (nf4_dir / "config.json").is_file():
        started = time.time()
        s = job_config.load({"base_model": str(bf16_dir), "output_dir": str(root / "out")}, environ={})
        lm = job_model.load_model(s, str(bf16_dir), device_map={"": 0})
        log(f"loaded and quantized it the job's way (NF4, double quant, bf16 compute) in {time.time() - started:.0f}s")
        lm.save_pretrained(nf4_dir)
        _save_tokenizer(nf4_dir)
        del lm
        torch.cuda.empty_cache()
    os.sync()  # the ~22 GB just written is flushed now, not by the kernel's writeback while phases are timed
    return bf16_dir, nf4_dir


def _save_tokenizer(target: Path) -> None:
    """The bench feeds token ids directly; SFTTrainer still wants a tokenizer for its pad token."""
    from transformers import AutoTokenizer

    from job.model import build_tiny

    AutoTokenizer.from_pretrained(build_tiny()).save_pretrained(target)


def _params(cfg) -> int:
    from job.speed import Shape

    return Shape.of(cfg).params


def job_settings(model_dir, output_dir: str, **flags):
    """The job's settings for a timed run of its own path: its defaults, the speed and model settings of the
    environment (so `LIGER=false job bench` times that), and `flags` (field names) on top."""
    from job import config

    wanted = {config.env_name(f) for f in config.FIELDS.values() if f.metadata["group"] in ("speed", "model")}
    return config.load({"base_model": str(model_dir), "output_dir": output_dir, **flags},
                       environ={k: v for k, v in os.environ.items() if k in wanted})
