"""The one place a trainer is assembled: every SFTConfig field is decided here.

Training (`job.train`), evaluation (`job.evaluate`), the benchmark's phases and the long-sequence trial
(`job.bench`) all build their trainers with these functions, so what is measured is what users train with:

    build_trainer       the job's model and SFTTrainer: 4-bit base, speed levers, LoRA, the long-context mode
    evaluation_trainer  an SFTTrainer that only evaluates an adapted model
    stock_trainer       a stock TRL recipe (the knobs tutorials and TRL's docs turn, nothing of the job's), the
                        baseline the benchmark compares against

SFTConfig fields come from four sources, never two for one field: the job's own (`job_fields`: length, packing,
precision, device), the speed levers (`lever_fields`: micro batch, accumulation, recomputation, data loading),
the caller's (`run_fields` for training: schedule, steps, saving, logging), and TRAINER_ARGS for the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from job import model, speed
from job.checkpoint import Layout
from job.config import Settings, trainer_args
from job.errors import ConfigError
from job.speed import longcontext


def job_fields(s: Settings) -> dict:
    """What the job's settings and the machine decide for every trainer it builds."""
    return dict(
        max_length=s.max_length,
        packing=s.packing,
        padding_free=s.packing,
        bf16=model.compute_dtype() == torch.bfloat16,
        fp16=model.compute_dtype() == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        dataset_num_proc=None,  # the data is tokenized already (job.data)
    )


def lever_fields(levers: speed.Levers) -> dict:
    """What the chosen speed levers decide."""
    checkpointing = levers.checkpointing != "none"
    return {
        "per_device_train_batch_size": levers.micro_batch_size,
        "gradient_accumulation_steps": levers.grad_accum,
        "activation_checkpointing": checkpointing,
        # "offload" is installed by speed.prepare_adapted (job.speed.offload's asynchronous offloader), not transformers'
        "activation_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "dataloader_num_workers": levers.dataloader_workers,
        "dataloader_pin_memory": levers.device != "cpu",
        "dataloader_persistent_workers": levers.dataloader_workers > 0,
        # a blocking copy of the batch waits for the GPU to finish the previous step before the host may queue
        # the next forward; from pinned memory the copy needs no wait
        "accelerator_config": {"non_blocking": levers.device != "cpu"},
        # the filter reads every micro-step's loss back from the GPU, and logs a running mean in place of a NaN,
        # hiding a diverged run from the job's guard (job.train.AtomicCheckpointTrainer)
        "logging_nan_inf_filter": False,
    }


def run_fields(s: Settings, layout: Layout, evaluates: bool) -> dict:
    """A training run's schedule, steps, saving and logging."""
    return dict(
        output_dir=str(layout.checkpoints),
        per_device_eval_batch_size=s.micro_batch_size,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=s.eval_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=None,  # retention is ours: it must skip incomplete checkpoints
        logging_steps=s.logging_steps,
        report_to=[t for t in s.report_to.split(",") if t != "none"] or "none",
        seed=s.seed,
        data_seed=s.seed,
        disable_tqdm=True,  # progress goes to the log as lines, readable in a batch job's output
        ddp_timeout=3 * 3600,  # rank 0 may be saving or tokenizing while others wait
    )


def fixed_steps(output_dir: str, steps: int, logging_steps: int) -> dict:
    """A timed run's fields (the benchmark's phases, the long-sequence trial): constant-rate steps, nothing saved."""
    return dict(output_dir=output_dir, max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant",
                warmup_steps=0, logging_steps=logging_steps, save_strategy="no", eval_strategy="no",
                report_to="none", disable_tqdm=True, seed=42, data_seed=42)


def sft_config(s: Settings, levers: speed.Levers | None = None, **fields) -> SFTConfig:
    """The SFTConfig: the job's fields, the levers', the caller's, and TRAINER_ARGS for anything else."""
    ours = {**job_fields(s), **(lever_fields(levers) if levers else {}), **fields}
    extra = trainer_args(s)
    clash = sorted(extra.keys() & ours.keys())
    if clash:  # names.OWNED_ARGUMENTS refuses these in validation; this keeps the two in step
        raise ConfigError(f"TRAINER_ARGS: {', '.join(clash)} set by the job itself")
    return SFTConfig(**ours, **extra)


def build_trainer(s: Settings, path: str, config, levers: speed.Levers, tokenizer, train_dataset, eval_dataset=None,
                  *, device_map, trainer_class=None, callbacks=(), stats: dict | None = None,
                  **fields) -> tuple[SFTTrainer, dict]:
    """The job's model and trainer, and what was installed on them: 4-bit base, speed levers, LoRA, the
    long-context mode when on. `fields`: the caller's SFTConfig fields (`run_fields`, or `fixed_steps`)."""
    args = sft_config(s, levers, **fields)
    # after the SFTConfig: under ZeRO-3 it makes from_pretrained shard the weights as they load
    base = model.load_model(s, path, device_map=speed.device_map(levers, config, device_map, s.trust_remote_code),
                            attn_implementation=levers.attn_implementation)
    speed.prepare_base(base, levers)
    trainer = (trainer_class or JobTrainer)(model=base, args=args, train_dataset=train_dataset,
                                            eval_dataset=eval_dataset, processing_class=tokenizer,
                                            peft_config=model.lora_config(s, base), callbacks=list(callbacks))
    installed = speed.prepare_adapted(trainer.model, levers)
    if s.use_dora:
        installed["dora_layers_cast_back"] = model.keep_dora_output_dtype(trainer.model)
    installed["long_context"] = longcontext.apply(trainer, s, levers, stats)  # docs/long-context.md
    speed.count_flops_once(trainer)
    return trainer, installed


def evaluation_trainer(s: Settings, adapted, tokenizer, dataset, output_dir: str, batch: int) -> SFTTrainer:
    """A trainer that evaluates `adapted` on `dataset` (SFTTrainer insists on a train_dataset: never trained on)."""
    args = sft_config(s, output_dir=output_dir, per_device_eval_batch_size=batch, report_to="none",
                      disable_tqdm=True)
    return SFTTrainer(model=adapted, args=args, train_dataset=dataset, eval_dataset=dataset,
                      processing_class=tokenizer)


class JobTrainer(SFTTrainer):
    """SFTTrainer whose metrics stay on the GPU until a log step.

    TRL 1.16's compute_loss reads entropy, token accuracy and the token count back after every forward (`.item()`),
    so the host waits for the GPU at each micro-step instead of queueing the next one (+5.7% tokens/s on an H100
    without those reads, docs/performance.md). This is TRL's plain loss and its
    metrics computed the same way, read once per log; every other loss (a custom compute_loss_func, label
    smoothing, DFT, a MoE aux loss, sequence parallelism, outputs asked for) is TRL's own code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending_metrics: dict[str, list] = {}  # mode -> (entropy, accuracy) tensors, one per micro-batch
        self._pending_tokens = 0  # train tokens since the last log, this rank

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._plain_loss():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        gather = self.accelerator.gather_for_metrics
        sums = torch.stack([outputs.entropy.detach().sum().float(), outputs.is_top1.sum().float()])
        valid = gather(outputs.label_mask.sum()).sum()
        # (entropy, accuracy) of this micro-batch; 0 when nothing is trained on, as TRL logs it
        self._pending_metrics.setdefault(mode, []).append(gather(sums[None]).sum(0) / valid.clamp(min=1))
        if mode == "train":  # padding-free rows have no pad: their size is the count, known here without a read
            self._pending_tokens += inputs["attention_mask"].sum() if "attention_mask" in inputs else \
                inputs["position_ids"].size(1)
        return loss

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        pending = self._pending_metrics.pop(mode, [])
        if pending:
            for entropy, accuracy in torch.stack(pending).tolist():  # one read-back per log
                self._metrics[mode]["entropy"].append(entropy)
                self._metrics[mode]["mean_token_accuracy"].append(accuracy)
        tokens = self._pending_tokens
        if self.accelerator.num_processes > 1:  # every rank logs at the same steps
            tokens = self.accelerator.reduce(torch.as_tensor(tokens, device=self.accelerator.device), "sum")
        self._total_train_tokens += int(tokens) // self._tp_size
        self._pending_tokens = 0
        if pending:
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return super().log(logs, start_time)

    def _plain_loss(self) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (self.compute_loss_func is None and self.label_smoother is None and self.args.loss_type == "nll"
                and not self.aux_loss_enabled and not (parallelism is not None and parallelism.sp_enabled))


def stock_trainer(stock, model_dir: str | Path, tokenizer, train_dataset, *, max_length: int,
                  trainer_class=SFTTrainer, callbacks=(), **fields) -> SFTTrainer:
    """`stock` (a job.bench.Stock) as a user of TRL alone would write it: the model quantized as the job's defaults say (NF4, double
    quantization) with the job's default LoRA, and nothing else of the job's."""
    from transformers import AutoModelForCausalLM

    from job import config

    cuda = torch.cuda.is_available()
    defaults = config.load({"base_model": str(model_dir)}, environ={})
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=model.compute_dtype(), quantization_config=model.quantization_config(defaults),
        device_map={"": 0} if cuda else None, attn_implementation=stock.attn)
    args = SFTConfig(**fields, max_length=max_length, bf16=cuda, use_cpu=not cuda, dataset_num_proc=None,
                     packing=stock.packing, padding_free=stock.packing, per_device_train_batch_size=stock.batch,
                     gradient_accumulation_steps=stock.accum, activation_checkpointing=stock.recompute,
                     activation_checkpointing_kwargs={"use_reentrant": False} if stock.recompute else None,
                     use_liger_kernel=stock.liger and cuda,
                     pad_to_multiple_of=max_length if stock.pad_to_max else None)
    return trainer_class(model=base, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                         peft_config=model.lora_config(defaults, base), callbacks=list(callbacks))
