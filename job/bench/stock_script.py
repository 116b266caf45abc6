"""Stock QLoRA fine-tuning as TRL's documentation writes it, timed, without importing the job.

`job bench` runs this file beside its own stock phase, on the same saved model and rows, and takes the job's
ratio against the faster of the two: a stock phase assembled inside the bench's process could run slower than
stock run on its own, which would flatter the job. It imports nothing of the job: run it by path with `python -P`
(the -P keeps this folder's modules off sys.path), as the bench does; it ships in the package so the image has it.

    python -P job/bench/stock_script.py --model-dir DIR --rows ROWS.jsonl [--max-length 2048] [--warmup 3] [--steps 8]
        [--batch 4] [--attn flex_attention] [--no-liger] [--recompute]

ROWS.jsonl: one {"input_ids": [...], "labels": [...]} a line (tokenized already, as the bench's rows are). Prints
one JSON line: useful (non-pad) tokens/s over the timed steps, seconds a step, peak reserved GPU memory.
"""

import argparse
import json
import sys
import time

import datasets
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--attn", default="flex_attention")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--recompute", action="store_true")
    return parser.parse_args(argv)


class Clock(TrainerCallback):
    """Marks the end of warm-up and of the last step, the GPU synchronized only there."""

    def __init__(self, warmup: int, counted: list):
        self.warmup, self.counted, self.marks = warmup, counted, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, state.max_steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), int(sum(self.counted))))


def main(argv=None) -> int:
    opts = arguments(argv)
    cuda = torch.cuda.is_available()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(opts.model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 quantization_config=quantization,
                                                 device_map={"": 0} if cuda else None, attn_implementation=opts.attn)
    tokenizer = AutoTokenizer.from_pretrained(opts.model_dir)
    rows = datasets.load_dataset("json", data_files=opts.rows, split="train")
    counted: list = []  # useful tokens of each micro-batch, summed on the GPU until a mark reads them

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            counted.append(mask.sum() if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    steps = opts.warmup + opts.steps
    clock = Clock(opts.warmup, counted)
    args = SFTConfig(output_dir="/tmp/stock-sft", max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant",
                     logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
                     bf16=cuda, use_cpu=not cuda, max_length=opts.max_length, packing=True, padding_free=True,
                     per_device_train_batch_size=opts.batch, activation_checkpointing=opts.recompute,
                     use_liger_kernel=cuda and not opts.no_liger)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora,
                       callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    (step0, time0, tokens0), (step1, time1, tokens1) = clock.marks[0], clock.marks[-1]
    seconds = time1 - time0
    print(json.dumps({"tokens_per_s": (tokens1 - tokens0) / seconds, "step_s": seconds / (step1 - step0),
                      "steps": step1 - step0, "peak_reserved_gib":
                      round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else 0.0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
