"""Loading the base model and tokenizer (hub id, local dir, or the built-in tiny Llama) and the LoRA config."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from job.config import BUILTIN_MODEL, Settings
from job.data import BUNDLED_DATASET
from job.errors import ConfigError, unreachable_or

TINY_VERSION = "v2"  # bump when the tiny model's recipe changes, so caches rebuild


def compute_dtype() -> torch.dtype:
    """bf16 on GPUs that have it (Ampere+), else fp16; fp32 on CPU, where bf16 matmuls are slower."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve(name: str) -> str:
    """A path or hub id from_pretrained accepts; the built-in tiny model is built on first use."""
    if name == BUILTIN_MODEL:
        return str(build_tiny())
    path = Path(name)
    if name.startswith((".", "/")) and not path.is_dir():
        raise ConfigError(f"BASE_MODEL={name}: no such directory")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"BASE_MODEL={name}: the directory has no config.json, so it is not a model")
    return name


def build_tiny(root: Path | None = None) -> Path:
    """A tiny Llama (about 1M parameters) and a byte-level BPE tokenizer trained on the bundled data.

    Built locally and deterministically so the default job and the tests need no download. Written
    to a temporary directory and renamed, so concurrent ranks never see half a model.
    """
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    root = root or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "job"
    target = root / f"tiny-llama-{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-"))
    special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [" ".join(json.loads(line).values()) for line in BUNDLED_DATASET.read_text(encoding="utf-8").splitlines()]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        additional_special_tokens=special[3:])
    tokenizer.save_pretrained(staging)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # At the usual 0.02 init a frozen random output layer caps logits near 2.6, so no adapter
        # could bring the loss below ~3.6; a pretrained model's output layer has no such cap.
        model.lm_head.weight.mul_(10)
    model = model.to(torch.bfloat16)
    # not model.save_pretrained: once torch.distributed is up it writes on global rank 0 only, and another
    # rank's weightless copy could win the rename below
    config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another rank finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(s: Settings, path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    except OSError as error:
        raise unreachable_or(error, f"BASE_MODEL={s.base_model}",
                             ConfigError(f"BASE_MODEL={s.base_model}: cannot load its tokenizer: {error}")) from None
    if tokenizer.pad_token is None:
        # Labels come from our loss mask, not from pad ids, so reusing a token cannot hide EOS.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def quantization_config(s: Settings):
    from transformers import BitsAndBytesConfig

    if s.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(), bnb_4bit_quant_storage=compute_dtype())
    if s.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(s: Settings, path: str, *, quantized: bool = True, device_map=None, attn_implementation=None):
    """The base model for training (quantized as QUANTIZATION says) or for merging (16-bit).

    attn_implementation: the kernel job.speed chose ("varlen" is registered with transformers first)."""
    from transformers import AutoModelForCausalLM

    extra = {}
    if attn_implementation:
        from job import speed

        speed.register_attention()
        extra["attn_implementation"] = attn_implementation
    quantization = quantization_config(s) if quantized else None
    if quantization is not None and isinstance(device_map, dict) and "cpu" in device_map.values():
        # frozen 16-bit embeddings kept in CPU memory (job.speed's OFFLOAD_EMBEDDINGS); a checkpoint quantized
        # already brings its own quantization config, which must say so too
        quantization.llm_int8_enable_fp32_cpu_offload = True
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=s.trust_remote_code)
        if isinstance(getattr(config, "quantization_config", None), dict):
            config.quantization_config["llm_int8_enable_fp32_cpu_offload"] = True
            extra["config"] = config
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=compute_dtype(), quantization_config=quantization,
            device_map=device_map, trust_remote_code=s.trust_remote_code, **extra)
    except OSError as error:
        raise ConfigError(f"BASE_MODEL={s.base_model}: cannot load the model: {error}") from None


def lora_config(s: Settings, model):
    from peft import LoraConfig

    targets = "all-linear" if s.lora_target_modules == "all-linear" else s.lora_target_modules.split(",")
    if targets != "all-linear":
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = sorted(set(targets) - present)
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
            raise ConfigError(f"LORA_TARGET_MODULES: {', '.join(missing)} not in the model; "
                              f"its linear layers are: {', '.join(linear)}")
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=targets,
                      use_dora=s.use_dora, bias="none", task_type="CAUSAL_LM")


def keep_dora_output_dtype(peft_model) -> int:
    """Cast each DoRA layer's output back to its input's dtype; returns how many layers it hooked.

    Under autocast, PEFT's 4- and 8-bit LoRA layers leave the dtype to autocast, but DoRA's magnitude vector is
    float32 (TRL keeps it so: its updates are below bf16's resolution) and elementwise products are not autocast,
    so a DoRA layer returns float32, and every layer after it runs in float32; flash attention kernels refuse it.
    Hand-written: neither PEFT nor TRL has an option for it."""
    from peft.tuners.lora import LoraLayer

    def cast_back(module, args, output):
        if torch.is_tensor(output) and args and torch.is_tensor(args[0]) and output.dtype != args[0].dtype:
            return output.to(args[0].dtype)
        return None

    hooked = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and any(getattr(module, "use_dora", {}).values()):
            module.register_forward_hook(cast_back)
            hooked += 1
    return hooked
