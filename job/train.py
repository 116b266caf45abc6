"""The training stage: settings -> data -> 4-bit base + LoRA -> SFTTrainer -> adapter in OUTPUT_DIR.

Runs unchanged as one process or under `accelerate launch` / torchrun on every rank:
    python -m job train                       # one process
    accelerate launch -m job train            # every GPU of every node (`job run` does this for you)
Rerunning resumes from the newest complete checkpoint; a finished run is not trained again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import AutoConfig, TrainerCallback

from job import checkpoint, data, model, speed
from job.checkpoint import Layout
from job.config import SHARDED, Settings, batch_layout
from job.errors import Preempted, TrainingFailed
from job.trainer import JobTrainer, build_trainer, run_fields

log = logging.getLogger("job.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Kubernetes eviction / spot reclaim, Slurm's --signal


def train(s: Settings) -> dict:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # on CPU, PartialState() sees one process, not gloo's
    if s.strategy == "fsdp":
        patch_peft_for_fsdp1()  # before any checkpoint is saved or resumed
    layout = Layout(s.output)
    if _finished(layout, state):
        log.info("training already finished: %s", layout.adapter)
        return checkpoint.read_json(layout.metrics / "train.json") or {}
    guard = GuardCallback()  # trap signals first: a preemption while loading still checkpoints after one step
    s, batch, identity = _as_this_layout_trains(s, state.num_processes)

    path = model.resolve(s.base_model)
    tokenizer = model.load_tokenizer(s, path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    levers = speed.setup(s, config)
    prepared = data.load(s, tokenizer, config.model_type, layout.cache, state)
    resumed = _claim(s, layout, state, batch, {**identity, "data_fingerprint": prepared.fingerprint})

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(layout.tensorboard))
    trainer, _ = build_trainer(s, path, config, levers, tokenizer, prepared.train, prepared.eval,
                               stats=prepared.stats, device_map=_device_map(s, state),
                               trainer_class=AtomicCheckpointTrainer, callbacks=[guard, ProgressCallback()],
                               **run_fields(s, layout, evaluates=prepared.eval is not None))
    trainer.keep_checkpoints = s.save_total_limit
    trainer.batch_record = resumed

    metrics = {**_train_steps(trainer, guard, layout, prepared.stats), "data": prepared.stats,
               "data_fingerprint": prepared.fingerprint, "batch": resumed}
    _save_adapter(s, layout, state, trainer, tokenizer, prepared, path)
    if state.is_main_process:
        checkpoint.write_json(layout.metrics / "train.json", metrics)
        plot_loss(trainer.state.log_history, layout.loss_plot)
        log.info("adapter saved: %s", layout.adapter)
    state.wait_for_everyone()
    return metrics


def _finished(layout: Layout, state) -> bool:
    """Whether the adapter is finished; the main process first moves a damaged one aside, to be rebuilt from the
    last checkpoint."""
    if state.is_main_process:
        checkpoint.intact(layout.adapter)
    state.wait_for_everyone()
    return checkpoint.is_complete(layout.adapter)


def _as_this_layout_trains(s: Settings, processes: int) -> tuple[Settings, dict, dict]:
    """The settings with this layout's accumulation (derived from GLOBAL_BATCH_SIZE where set), the batch layout,
    and the run's identity with GRAD_ACCUM as set (the layout's own accumulation is checked by resume_batch)."""
    batch = batch_layout(s, processes)
    if s.global_batch_size is not None and s.grad_accum != 1:
        log.warning("GRAD_ACCUM=%d is ignored: GLOBAL_BATCH_SIZE=%d gives %d accumulation steps on %d process(es)",
                    s.grad_accum, s.global_batch_size, batch["grad_accum"], processes)
    return dataclasses.replace(s, grad_accum=batch["grad_accum"]), batch, s.identity()


def _claim(s: Settings, layout: Layout, state, batch: dict, identity: dict) -> dict | None:
    """OUTPUT_DIR claimed for this run and its checkpoints tidied, by the main process; the batch record written
    into each checkpoint (None on the other ranks)."""
    resumed = None
    if state.is_main_process:
        resumed = checkpoint.resume_batch(layout.checkpoints, batch, strategy=s.strategy,
                                          allow_change=s.allow_batch_change)  # before claim: a refusal changes nothing
        checkpoint.claim(layout, identity, batch)
        shutil.rmtree(layout.staging, ignore_errors=True)  # a save cut off by a kill
        layout.checkpoints.mkdir(parents=True, exist_ok=True)
        checkpoint.latest_intact_checkpoint(layout.checkpoints)  # before rotation, which keeps the newest
        checkpoint.rotate(layout.checkpoints, s.save_total_limit)
    state.wait_for_everyone()
    return resumed


def _train_steps(trainer: AtomicCheckpointTrainer, guard: GuardCallback, layout: Layout, stats: dict) -> dict:
    """Train from the newest checkpoint, or from the start; the steps, loss, time and log. A stop signal ends it
    with Preempted once its checkpoint is written."""
    resume = checkpoint.latest_checkpoint(layout.checkpoints)
    log.info("%s (rows: %d train, %d eval; %s)", f"resuming from {resume.name}" if resume else "starting",
             stats["train_rows"], stats["eval_rows"], _params(trainer.model))
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.check_finite()  # the steps since the last log or save, before the adapter is saved
    if guard.stop_requested:
        raise Preempted(f"stopped by a signal at step {trainer.state.global_step}; checkpoint written")
    return {"steps": trainer.state.global_step, "train_loss": result.training_loss,
            "train_seconds": round(time.time() - started, 1), "log_history": trainer.state.log_history}


def _save_adapter(s: Settings, layout: Layout, state, trainer: AtomicCheckpointTrainer, tokenizer, prepared,
                  path: str) -> None:
    """The trained adapter, checked and sealed into OUTPUT_DIR/adapter with the tokenizer, the chat template and
    job.json (the end-of-turn token, the base model as set and as resolved)."""
    staging = layout.root / ".adapter.staging"
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a save cut off by a kill
    state.wait_for_everyone()
    if trainer.is_fsdp_enabled:  # the adapter as one file, not per-rank shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    with checkpoint.removed_on_failure(staging, layout.root):
        trainer.save_model(str(staging))  # every rank: under FSDP and ZeRO-3 the weights are gathered from all
        if state.is_main_process:
            check_adapter(staging)
            tokenizer.chat_template = prepared.chat_template
            tokenizer.save_pretrained(staging)
            checkpoint.write_json(staging / "job.json", {"end_of_turn_id": prepared.end_of_turn_id,
                                                         "base_model": s.base_model, "resolved_base": path})
            checkpoint.seal(staging, layout.adapter)


def patch_peft_for_fsdp1():
    """PEFT 0.21 finds the adapter's state-dict keys from module names, stripping only a *leading*
    "_fsdp_wrapped_module."; FSDP1's nested units (each decoder layer, each LoRA Linear) leave more of them inside
    the name, so no key matches: saves get 0 tensors and loads put nothing back. Clean the names like torch does,
    and load sharded adapter checkpoints without set_peft_model_state_dict's prefix guess (it reads FSDP's
    wrapped parameter names and strips "base_model.model." from every key)."""
    import accelerate.utils.fsdp_utils as fsdp_utils
    import peft.tuners.tuners_utils as tuners_utils
    from accelerate.utils import extract_model_from_parallel, is_peft_model
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    if getattr(tuners_utils, "_job_fsdp_patched", False):
        return
    prefixes = tuners_utils._get_tuner_state_dict_key_prefixes
    tuners_utils._get_tuner_state_dict_key_prefixes = lambda model, adapter_name=None: {
        clean_tensor_name(p) for p in prefixes(model, adapter_name)}

    set_state = fsdp_utils._set_model_state_dict

    def set_model_state_dict(model, state_dict, adapter_only=False, sd_options=None):
        if not (adapter_only and sd_options is None and is_peft_model(model)):  # FSDP1 adapter checkpoints only
            return set_state(model, state_dict, adapter_only=adapter_only, sd_options=sd_options)
        peft_model = extract_model_from_parallel(model)
        name = peft_model.active_adapter
        config = peft_model.peft_config[name]
        state_dict = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=name, state_dict=state_dict)
        return model.load_state_dict(state_dict, strict=False)

    fsdp_utils._set_model_state_dict = set_model_state_dict
    tuners_utils._job_fsdp_patched = True


def _device_map(s: Settings, state):
    # QLoRA under DDP and ZeRO-2 needs each rank's copy of the quantized weights on its own GPU; ZeRO-3
    # places them itself (and refuses a device map); under FSDP they load on the current GPU (rank 0 only,
    # with cpu_ram_efficient_loading) and FSDP shards them from there
    if not torch.cuda.is_available() or s.strategy in SHARDED:
        return None
    return {"": state.local_process_index}


def check_adapter(directory: Path) -> None:
    """Fail loudly on an adapter saved without its weights (ZeRO-3 and FSDP can write empty tensors or none), with
    values that are not finite, or with nothing learned (every LoRA B still zero, as initialized: a gather or a
    load that put nothing back)."""
    from safetensors import safe_open

    files = sorted(directory.glob("adapter_model*.safetensors"))
    if not files:
        raise TrainingFailed(f"no adapter weights were saved in {directory}")
    with safe_open(str(files[0]), framework="pt") as weights:
        names = list(weights.keys())
        empty = [n for n in names if not weights.get_slice(n).get_shape() or 0 in weights.get_slice(n).get_shape()]
        b_matrices = [n for n in names if "lora_B" in n and n not in empty]
        learned = any(weights.get_tensor(n).count_nonzero() for n in b_matrices)
        diverged = [n for n in names if n not in empty and not torch.isfinite(weights.get_tensor(n)).all()]
    if diverged:  # the last guard before sealing: a NaN adapter is never marked COMPLETE
        raise TrainingFailed(f"the saved adapter {files[0]} holds values that are not finite ({len(diverged)} "
                             f"tensors, e.g. {diverged[0]}): training diverged; lower LEARNING_RATE")
    if not names or empty:
        raise TrainingFailed(f"the saved adapter {files[0]} has {len(names)} tensors, {len(empty)} of them empty "
                             f"(e.g. {(empty or ['-'])[0]}): the strategy did not gather the weights before saving")
    if b_matrices and not learned:
        raise TrainingFailed(f"every LoRA B matrix in the saved adapter {files[0]} is zero, as initialized: the "
                             "trained weights were not gathered (or not restored on resume) before saving")


def _params(peft_model) -> str:
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters"


def plot_loss(history: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            axis.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(".loss.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


class AtomicCheckpointTrainer(JobTrainer):
    """SFTTrainer whose checkpoints appear complete or not at all (see job.checkpoint), and only of finite weights.

    A loss or gradient norm that is not finite at any optimizer step stops training with TrainingFailed (exit 3)
    before the next log, checkpoint or adapter save, so none of them holds a diverged model. Each step only ORs a
    flag on the device; it is read (a sync, agreed across ranks) where the Trainer reads the loss back anyway."""

    keep_checkpoints = 2
    batch_record = None  # checkpoint.resume_batch's record, written into each checkpoint as BATCH

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._nonfinite = None  # (loss, gradient norm) flags since the last check, on the device
        self._checked_step = 0  # the last step known finite: the last check's, or where training (re)started

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # tr_loss sums the losses since the last log, so one NaN step keeps it NaN until it is read
        norm = tr_loss.new_zeros(()) if grad_norm is None else torch.as_tensor(grad_norm, device=tr_loss.device)
        flags = ~torch.isfinite(torch.stack([tr_loss.detach().float().sum(), norm.detach().float()]))
        if self._nonfinite is None:  # the first step since the last check, or since the start or resume
            self._checked_step, self._nonfinite = self.state.global_step - 1, flags
        else:
            self._nonfinite = self._nonfinite | flags
        if self.control.should_log or self.control.should_save or self.control.should_training_stop:
            self.check_finite()
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def check_finite(self) -> None:
        """Raise TrainingFailed if a loss or gradient norm since the last check was not finite, on any rank."""
        if self._nonfinite is None:
            return
        loss, norm = _max_over_ranks(self._nonfinite.float()).tolist()
        self._nonfinite = None
        if not (loss or norm):
            return
        kept = checkpoint.latest_checkpoint(Path(self.args.output_dir))
        what = " and ".join(name for name, bad in (("the loss", loss), ("the gradient norm", norm)) if bad)
        raise TrainingFailed(
            f"{what} stopped being finite between steps {self._checked_step} and {self.state.global_step}: "
            f"LEARNING_RATE={self.args.learning_rate:g} is too high for this model and data (or a row is "
            f"degenerate). Nothing after step {self._checked_step} was saved. To train again, lower LEARNING_RATE in "
            f"a new OUTPUT_DIR (it is part of the run's identity); a rerun here resumes from "
            f"{kept.name if kept else 'the start'} and meets the same step unless the fault was transient")

    def _get_output_dir(self, trial):
        # Trainer writes checkpoint-N here; _save_checkpoint seals it and renames it into place
        return os.path.join(self.args.output_dir, ".staging")

    def _save_checkpoint(self, model, trial):
        name = f"checkpoint-{self.state.global_step}"
        staged = Path(self._get_output_dir(trial), name)
        with checkpoint.removed_on_failure(staged, Path(self.args.output_dir).parent):  # a full disk: exit 2
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero():
                checkpoint.write_json(staged / checkpoint.BATCH, self.batch_record)
                if any(staged.glob("adapter_model*.safetensors")):  # (FSDP writes sharded state instead)
                    check_adapter(staged)  # an adapter saved empty fails at the first checkpoint, not after training
                final = checkpoint.seal(staged, Path(self.args.output_dir, name))
                checkpoint.rotate(final.parent, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()


class GuardCallback(TrainerCallback):
    """Stops training cleanly on a preemption signal (checkpoint, then exit 75).

    Every rank traps the signal; the flag is agreed across ranks each step so all of them save
    the same checkpoint and stop together.
    """

    def __init__(self):
        self.signalled = False
        self.stop_requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if not self.signalled:
            log.warning("received %s: stopping after this optimizer step to write a checkpoint",
                        signal.Signals(signum).name)
        self.signalled = True

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.signalled):
            self.stop_requested = True
            control.should_save = True
            control.should_training_stop = True
        return control


def _any_rank(flag: bool) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    return bool(_max_over_ranks(torch.tensor([1.0 if flag else 0.0], device=device)).item())


def _max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each element's largest value over the ranks (`values` on the backend's device: CUDA under NCCL)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values


class ProgressCallback(TrainerCallback):
    """One readable line per logging step: where we are, loss, learning rate, time left."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.time(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        done = state.global_step - self.first_step
        elapsed = time.time() - self.started
        eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        log.info("step %d/%d %s (%.0fs elapsed, ~%.0fs left)", state.global_step, state.max_steps, text,
                 elapsed, eta)
