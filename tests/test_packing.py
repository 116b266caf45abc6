"""Packed samples never attend to each other, whoever calls the model and how (CPU, the tiny model in 4-bit).

transformers keeps the samples of a packed row apart only when no attention_mask is passed and no KV cache is
built; the job's packing guard (job.speed.packing.install_packing_guard) makes that hold for a mask of ones, for
use_cache on in eval mode and for padding inside packed rows too. Every test compares the logits of a packed row
with each sample run alone; `test_without_the_guard_samples_leak` shows the comparison would catch a leak.
"""

from __future__ import annotations

import pytest
import torch

from job import model
from job.speed.attention import sequence_bounds
from job.speed.kernels import install_lora_kernel
from job.speed.levers import VARLEN
from job.speed.packing import install_packing_guard
from tests.modeltools import lora, nonzero_b

TOL = 1e-4  # float32 on CPU; a leak moves the logits by whole units (the tiny model's output layer is scaled up)
LEAK = 1.0
# In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks the 4-bit weights for a bf16 inference kernel
# (for good: train mode keeps it), whose rounding depends on the number of rows: differences up to ~0.05.
TOL_BF16_KERNEL = 0.1


def tolerance(lm) -> float:
    repacked = any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                   for m in lm.modules())
    return TOL_BF16_KERNEL if repacked else TOL


@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(0)
    lengths = (11, 7, 15)
    return [torch.randint(5, 500, (n,), generator=generator) for n in lengths]


def packed(samples):
    ids = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    return ids, positions


def alone(lm, samples) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([lm(input_ids=s[None], use_cache=False).logits for s in samples], dim=1)


def load(s, tiny_model, attn="sdpa", guard=True, adapter=True):
    base = model.load_model(s, str(tiny_model), attn_implementation=attn)
    if guard:
        install_packing_guard(base)
    return nonzero_b(lora(s, base)) if adapter else base  # a non-zero adapter: its path is part of what is compared


def padding_free_trainer(trainer_class, s, base, samples, tokenizer, output_dir):
    """`trainer_class` (TRL's SFTTrainer or the job's JobTrainer) as TRL's padding-free packing sets it up, on the
    samples as rows."""
    import datasets
    from trl import SFTConfig

    rows = datasets.Dataset.from_dict({"input_ids": [sample.tolist() for sample in samples],
                                       "labels": [sample.tolist() for sample in samples]})
    args = SFTConfig(output_dir=str(output_dir), packing=True, padding_free=True, max_length=64, use_cpu=True,
                     bf16=False, report_to="none", per_device_train_batch_size=1, dataset_num_proc=None,
                     activation_checkpointing=False)
    torch.manual_seed(0)
    return trainer_class(model=base, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=model.lora_config(s, base))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_trainer_path_keeps_samples_apart(quiet, tiny_model, tiny_tokenizer, samples, tmp_path, mode):
    """SFTTrainer's own compute_loss on a batch from its padding-free collator, in train and in eval mode."""
    from trl import SFTTrainer

    base = load(quiet, tiny_model, adapter=False)
    trainer = padding_free_trainer(SFTTrainer, quiet, base, samples, tiny_tokenizer, tmp_path)
    batch = trainer.data_collator([{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(s) for s in samples))
    getattr(trainer.model, mode)()
    with torch.no_grad(), pytest.warns(FutureWarning):
        _, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    expected = alone(trainer.model, samples)
    assert (outputs.logits - expected).abs().max() < tolerance(trainer.model)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_the_job_trainers_loss_is_each_sample_alone(quiet, tiny_model, tiny_tokenizer, samples, tmp_path, mode,
                                                      attn):
    """The job's own loss (JobTrainer.compute_loss, TRL's fused head, the guard passing NO_MASK under varlen
    so that transformers builds no mask) on a padding-free batch: the loss of the samples scored one by one."""
    from job.trainer import JobTrainer

    base = load(quiet, tiny_model, attn=attn, adapter=False)
    trainer = padding_free_trainer(JobTrainer, quiet, base, samples, tiny_tokenizer, tmp_path)
    batch = trainer.data_collator([{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples])
    getattr(trainer.model, mode)()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        scored = [torch.nn.functional.cross_entropy(trainer.model(input_ids=s[None], use_cache=False).logits[0, :-1],
                                                    s[1:], reduction="sum") for s in samples]
    expected = sum(scored) / sum(len(s) - 1 for s in samples)
    assert abs(loss.item() - expected.item()) < tolerance(trainer.model)
    assert trainer._pending_metrics[mode]  # its metrics wait for the log step


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_a_mask_of_ones_does_not_join_samples(quiet, tiny_model, samples, mode, attn):
    lm = load(quiet, tiny_model, attn=attn)
    getattr(lm, mode)()
    ids, positions = packed(samples)
    with torch.no_grad():
        logits = lm(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
    assert (logits - alone(lm, samples)).abs().max() < tolerance(lm)


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_use_cache_in_eval_mode_does_not_join_samples(quiet, tiny_model, samples, attn):
    lm = load(quiet, tiny_model, attn=attn)
    lm.eval()  # the config's use_cache=True applies: transformers would build a cache and skip the sample mask
    ids, positions = packed(samples)
    with torch.no_grad():
        logits = lm(input_ids=ids, position_ids=positions, use_cache=True).logits
        with_mask = lm(input_ids=ids, position_ids=positions, use_cache=True,
                       attention_mask=torch.ones_like(ids)).logits
    expected = alone(lm, samples)
    assert (logits - expected).abs().max() < tolerance(lm)
    assert (with_mask - expected).abs().max() < tolerance(lm)


def test_padding_inside_a_packed_row(quiet, tiny_model, samples):
    """Right padding after packed samples (a mask with zeros): each sample still sees only itself."""
    lm = load(quiet, tiny_model)
    lm.eval()
    ids, positions = packed(samples)
    pad = 4
    ids = torch.cat([ids, torch.zeros(1, pad, dtype=ids.dtype)], dim=1)
    positions = torch.cat([positions, torch.zeros(1, pad, dtype=positions.dtype)], dim=1)
    mask = (torch.arange(ids.shape[1]) < ids.shape[1] - pad).long()[None]
    with torch.no_grad():
        logits = lm(input_ids=ids, position_ids=positions, attention_mask=mask).logits[:, :-pad]
    assert (logits - alone(lm, samples)).abs().max() < tolerance(lm)


def test_the_fused_lora_layer_keeps_samples_apart(quiet, tiny_model, samples):
    lm = load(quiet, tiny_model)
    assert install_lora_kernel(lm) > 0
    lm.train()
    ids, positions = packed(samples)
    with torch.no_grad():
        logits = lm(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
    assert (logits - alone(lm, samples)).abs().max() < TOL


def test_without_the_guard_samples_leak(quiet, tiny_model, samples):
    """The negative control: stock transformers with a mask of ones lets the later samples see the earlier."""
    lm = load(quiet, tiny_model, guard=False)
    lm.eval()
    ids, positions = packed(samples)
    with torch.no_grad():
        without_mask = lm(input_ids=ids, position_ids=positions, use_cache=False).logits
        ones = lm(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
    expected = alone(lm, samples)
    tol = tolerance(lm)
    assert (without_mask - expected).abs().max() < tol  # transformers' own rule when nothing gets in the way
    first = len(samples[0])
    assert (ones[:, :first] - expected[:, :first]).abs().max() < tol  # the first sample has nothing before it
    assert (ones[:, first:] - expected[:, first:]).abs().max() > LEAK  # the others attended across


def test_sequence_bounds_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = sequence_bounds(positions, 1, 9)
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
    # two rows: every row start is a sample start, even when its positions continue the previous row
    rows = torch.tensor([[0, 1, 2], [3, 4, 0]])
    cu, longest = sequence_bounds(rows, 2, 3)
    assert cu.tolist() == [0, 3, 5, 6] and longest == 3
