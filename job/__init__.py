"""QLoRA/LoRA fine-tuning job: train, evaluate, merge, verify and push; see README.md."""

__version__ = "0.1.0"
