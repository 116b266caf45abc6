"""The evaluation stage: eval loss and perplexity of the base and of base + adapter, and the prompt test.

"Before" is the same quantized base with the adapter switched off, so both numbers come from one
load of the model and the same evaluation rows.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import NamedTuple

import torch

from job import checkpoint, data, model, speed
from job.checkpoint import Layout
from job.config import Settings
from job.trainer import evaluation_trainer

log = logging.getLogger("job.evaluate")


def evaluate(s: Settings) -> dict:
    from accelerate import PartialState
    from peft import PeftModel

    layout = Layout(s.output)
    done = checkpoint.read_json(layout.metrics / "evaluate.json")
    if done is not None:
        return done
    path = model.resolve(s.base_model)
    device = speed.probe(s.gpu_memory_gib)
    speed.apply_memory_cap(device)  # as on a smaller card: the cap governs every stage, not only training
    tokenizer = model.load_tokenizer(s, str(layout.adapter))  # carries the chat template used in training
    base = model.load_model(s, path, device_map="auto" if torch.cuda.is_available() else None)
    prepared = data.load(s, tokenizer, base.config.model_type, layout.cache, PartialState())
    tuned = PeftModel.from_pretrained(base, str(layout.adapter))
    model.keep_dora_output_dtype(tuned)
    tuned.eval()

    result = {"eval_loss_before": None, "eval_loss_after": None}
    if prepared.eval is not None:
        with tempfile.TemporaryDirectory() as scratch:
            # under a cap, one sequence at a time: MAX_LENGTH x vocabulary logits (1 GiB in float32 for Llama-3 at
            # 2048 tokens) are what a batch adds on top of the 4-bit model
            batch = 1 if device.capped else s.micro_batch_size
            trainer = evaluation_trainer(s, tuned, tokenizer, prepared.eval, scratch, batch)
            result["eval_loss_after"] = trainer.evaluate()["eval_loss"]
            with tuned.disable_adapter():
                result["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    for when in ("before", "after"):
        loss = result[f"eval_loss_{when}"]
        result[f"perplexity_{when}"] = math.exp(min(loss, 50)) if loss is not None else None

    eos_ids = sorted({tokenizer.eos_token_id, prepared.end_of_turn_id})
    samples = []
    for sample in prepared.samples:
        prompt = tokenizer.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)
        entry = {"prompt": prompt, "reference": sample["reference"]}
        with tuned.disable_adapter():
            entry["before"] = generate(tuned, tokenizer, prompt, s.max_new_tokens, eos_ids).text
        entry["after"] = generate(tuned, tokenizer, prompt, s.max_new_tokens, eos_ids).text
        samples.append(entry)
        log.info("prompt test\n  prompt:    %r\n  reference: %r\n  before:    %r\n  after:     %r",
                 prompt, entry["reference"], entry["before"], entry["after"])
    result["samples"] = samples
    log.info("eval loss %s -> %s, perplexity %s -> %s", _fmt(result["eval_loss_before"]),
             _fmt(result["eval_loss_after"]), _fmt(result["perplexity_before"]), _fmt(result["perplexity_after"]))
    checkpoint.write_json(layout.metrics / "evaluate.json", result)
    return result


class Generation(NamedTuple):
    text: str
    tokens: list[int]  # the new tokens, ending with the stop token when one ended the generation


@torch.no_grad()
def generate(lm, tokenizer, prompt: str, max_new_tokens: int, eos_ids: list[int] | None = None) -> Generation:
    """Greedy generation from prompt (the prompt test), stopping at eos_ids; without them, where the model's own
    generation config says (how the merge checks the saved one)."""
    stops = {"eos_token_id": eos_ids, "pad_token_id": tokenizer.pad_token_id} if eos_ids else {}
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(lm.device)
    output = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **stops)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
