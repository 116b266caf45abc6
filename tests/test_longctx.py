"""Long-context mode (job/speed/longcontext.py) on CPU: its loss and LoRA gradients equal the plain path's, packed and
unpacked, on the real 4-bit tiny model; its memory plan refuses what cannot fit; the length search."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from job import config, speed
from job.bench import longest
from job.errors import ConfigError
from job.speed import longcontext
from job.speed.attention import CUDNN_ATTENTION
from job.speed.levers import VARLEN
from job.speed.memory import usable_gib
from job.speed.offload import Offloader
from tests import jobtools
from tests.modeltools import LLAMA_8B, LLAMA_8B_MODEL, h100, nonzero_b, tiny_trainer

H100 = h100(78.5, capped=False)  # a whole card, as probed with a little taken
settings = functools.partial(jobtools.settings, base_model=LLAMA_8B_MODEL, micro_batch_size=1)


# ------------------------------------------------------------------------------- chunked token-wise function

class _Block(torch.nn.Module):
    """A per-token block with dropout, like an MLP with a LoRA dropout on its input."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(self.drop(x))))


def test_token_chunks_replay_dropout_and_sum_parameter_grads():
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(2, 13, 8, requires_grad=True)
    weights = torch.randn(2, 13, 8)
    torch.manual_seed(7)  # the reference: the same chunks, in the same order, under autograd
    flat = x.reshape(-1, 8)
    ref = torch.cat([block(flat[i:i + 5].unsqueeze(0)).squeeze(0) for i in range(0, 26, 5)]).view(2, 13, 8)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [x, *block.parameters()])
    longcontext.chunk_module(block, 5)
    torch.manual_seed(7)
    out = block(x)
    grads = torch.autograd.grad((out * weights).sum(), [x, *block.parameters()])
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # evaluation runs chunked too
        torch.manual_seed(7)
        torch.testing.assert_close(block(x), ref)


def test_mlp_forward_is_skipped_in_the_recompute_of_a_checkpointed_layer():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    norm, mlp = torch.nn.LayerNorm(8), _Block()
    mlp.drop.p = 0.0
    x = torch.randn(1, 11, 8, requires_grad=True)

    def layer(h):
        return h + mlp(norm(h))

    ref = checkpoint(layer, x, use_reentrant=False)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    longcontext.chunk_module(mlp, 4, skip_in_recompute=True)
    out = checkpoint(layer, x, use_reentrant=False)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert mlp.forward.__closure__ is not None and _run_of(mlp).skipped == 1


def _run_of(module):
    return next(c.cell_contents for c in module.forward.__closure__ if isinstance(c.cell_contents, longcontext._Chunked))


# ---------------------------------------------------------------------------- the tiny model, both paths

def _trainer(tmp_path, tiny_model, tokenizer, packing: bool, lengths: tuple, cuda: bool = False):
    """The job's trainer on CPU (4-bit tiny Llama, LoRA on every linear layer, TRL's collator) with TRL's own loss,
    and a batch of rows of `lengths`."""
    import datasets
    from transformers import AutoConfig
    from trl import SFTTrainer

    generator = torch.Generator().manual_seed(0)
    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    ids = [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in lengths]
    labels = [[-100] * 5 + row[5:] for row in ids]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    trainer = tiny_trainer(tiny_model, tokenizer, rows, tmp_path, {"lora_dropout": "0", "packing": str(packing)},
                           device_map={"": 0} if cuda else None, trainer_class=SFTTrainer,
                           per_device_train_batch_size=len(lengths), max_length=2048, use_cpu=not cuda, bf16=cuda)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:  # fp32 adapters (TRL keeps them in bf16, whose rounding would hide what is compared)
                p.data = p.data.float()
    torch.manual_seed(1)
    nonzero_b(trainer.model)
    batch = trainer.data_collator([rows[i] for i in range(len(lengths))])
    if cuda:
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if packing:  # the plain path with the kernel the job uses for packed rows on a GPU (CPU: per-sample sdpa)
        speed.register_attention()
        trainer.model.get_base_model().set_attn_implementation(VARLEN)
    return trainer, batch


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing, lengths", [(True, (37, 61, 23)), (False, (45, 30)), (False, (53,))],
                         ids=["packed", "padded", "one-sequence"])
def test_long_context_path_matches_plain_path(tmp_path, tiny_model, tiny_tokenizer, packing, lengths):
    trainer, batch = _trainer(tmp_path, tiny_model, tiny_tokenizer, packing, lengths)
    if packing:
        assert (batch["position_ids"] == 0).sum() == 3 and "attention_mask" not in batch
    elif len(lengths) > 1:
        assert not batch["attention_mask"].all()  # right padding: the mask goes to sdpa, uncached
    plain_loss, plain_grads = _loss_and_grads(trainer, batch)
    mode = longcontext.install(trainer.model, batch["input_ids"].numel(), cache=True, mlp_tokens=16, norm_tokens=24,
                           simulate=True)
    long_loss, long_grads = _loss_and_grads(trainer, batch)
    torch.testing.assert_close(long_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == long_grads.keys() and len(plain_grads) == 4 * 7 * 2
    for name, grad in plain_grads.items():
        assert grad.norm() > 0, name
        assert (long_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name
    # the mode really ran: every layer's checkpoint offloaded and back, the MLP forward skipped in each recompute,
    # and (without a padding mask) the attention output taken from the cache instead of recomputed
    layers = len(mode.layers)
    cached = 0 if len(lengths) == 2 and not packing else layers
    assert mode.store.counters["put"] == layers + cached == mode.store.counters["take"]
    assert not mode.store.entries
    assert all(_run_of(layer.mlp).skipped == 1 for layer in mode.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run it on the GPU machine")
@pytest.mark.parametrize("lengths", [(300, 700, 200), (1200,)], ids=["packed-flash-varlen", "one-sample-cudnn"])
def test_gpu_long_context_path_matches_plain_path(tmp_path, tiny_model, tiny_tokenizer, lengths):
    """On a GPU: the real side-stream copies, pinned buffers, flash varlen and cuDNN kernels (bf16, so looser)."""
    trainer, batch = _trainer(tmp_path, tiny_model, tiny_tokenizer, True, lengths, cuda=True)
    plain_loss, plain_grads = _loss_and_grads(trainer, batch)
    mode = longcontext.install(trainer.model, batch["input_ids"].numel(), cache=True, mlp_tokens=256, norm_tokens=384)
    mode.store.min_bytes = 0  # the tiny model's checkpoints are far below the usual 1 MiB
    long_loss, long_grads = _loss_and_grads(trainer, batch)
    torch.cuda.synchronize()
    torch.testing.assert_close(long_loss, plain_loss, rtol=1e-2, atol=1e-2)
    errors = {n: ((long_grads[n] - g).float().norm() / g.float().norm()).item() for n, g in plain_grads.items()}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert mode.own_kernels and CUDNN_ATTENTION["usable"]  # both kernels passed the install self-check
    layers = len(mode.layers)
    # per layer: its checkpoint, the attention output and its log-sum-exp
    assert mode.store.counters["put"] == 3 * layers == mode.store.counters["take"]
    assert mode.store.counters["prefetched"] >= 2 * layers - 3, mode.store.counters
    assert mode.store.pin_method and not mode.store.entries


def test_offloader_prefetches_the_next_layer_in_backward_order():
    store = Offloader(torch.device("cpu"), simulate=True)
    for layer in range(3):
        store.put(("ckpt", layer), layer, torch.full((4,), float(layer)))
    assert store.take(("ckpt", 2)).tolist() == [2.0] * 4
    assert store.take(("ckpt", 1))[0] == 1.0 and list(store.entries) == [("ckpt", 0)]


# ------------------------------------------------------------------------------------------ memory plan

def _levers(s, shape, device=H100):
    """What job.speed picks on that card (fused LoRA kernel on; liger only where it is installed)."""
    return speed.choose(s, shape, device, caps={"varlen": True, "flex": True, "flash_attn": False, "liger": False})


def test_plan_for_llama_8b_on_an_h100():
    shape = LLAMA_8B
    at = {}
    for tokens in (65536, 131072, 262144):
        s = settings(max_length=tokens)
        p = longcontext.plan(s, shape, H100, host_gib=120.0, levers=_levers(s, shape))
        assert p.on and "auto" in p.why
        longcontext.check_fits(p, settings(max_length=tokens))
        at[tokens] = p
    assert at[65536].gpu_gib < 33.7 / 2, at[65536]  # half the stock peak at 65,536 tokens
    assert at[65536].attention_cache and not at[262144].attention_cache
    assert at[262144].gpu_gib < 70 and at[262144].pinned_gib >= 64
    assert 262144 <= at[262144].longest < 2**20
    capped = h100(24.0)
    s = settings(max_length=65536)
    longcontext.check_fits(longcontext.plan(s, shape, capped, host_gib=120.0, levers=_levers(s, shape, capped)), s)


def test_a_length_that_cannot_fit_is_refused_naming_the_longest_that_would():
    shape = LLAMA_8B
    s = settings(max_length=2**20)
    p = longcontext.plan(s, shape, H100, host_gib=120.0)
    with pytest.raises(ConfigError, match=r"MAX_LENGTH=1048576 .* longest that fits here is MAX_LENGTH=(\d+)") as e:
        longcontext.check_fits(p, s)
    longest = int(e.value.args[0].rsplit("MAX_LENGTH=", 1)[1].split()[0])
    assert 262144 <= longest < 2**20
    longcontext.check_fits(longcontext.plan(settings(max_length=longest), shape, H100, host_gib=120.0),
                       settings(max_length=longest))


def test_auto_decides_from_the_length_and_the_data():
    shape = LLAMA_8B
    assert not longcontext.plan(settings(max_length=8192), shape, H100, host_gib=120.0).on
    assert longcontext.plan(settings(max_length=8192, long_context="on"), shape, H100, host_gib=120.0).on
    assert not longcontext.plan(settings(max_length=131072, long_context="off"), shape, H100, host_gib=120.0).on
    cpu = speed.Device("cpu", "cpu")
    assert not longcontext.plan(settings(max_length=131072), shape, cpu, host_gib=20.0).on
    # unpacked rows are only as long as the data: a long MAX_LENGTH over short rows needs nothing
    short = {"tokens_max": 3000, "train_tokens": 10**7}
    assert not longcontext.plan(settings(max_length=131072, packing="false"), shape, H100, short, host_gib=120.0).on
    assert longcontext.plan(settings(max_length=131072), shape, H100, short, host_gib=120.0).on


def test_rope_warning_past_the_trained_context():
    from transformers import LlamaConfig

    cfg = LlamaConfig(max_position_embeddings=8192)
    assert longcontext.rope_note(cfg, 8192) is None
    note = longcontext.rope_note(cfg, 262144)
    assert "32.0x the 8,192 positions" in note and "extrapolated" in note


def test_setting_long_context():
    assert config.load({}, environ={}).long_context == "auto"
    assert config.load({}, environ={"LONG_CONTEXT": "on"}).long_context == "on"
    with pytest.raises(ConfigError, match="LONG_CONTEXT='sometimes' is not one of: auto, on, off"):
        config.load({}, environ={"LONG_CONTEXT": "sometimes"})


# -------------------------------------------------------------------------------------------- the search

@pytest.mark.parametrize("limit", [300_000, 40_000, 7_000])
def test_search_doubles_then_bisects(limit):
    seen = []
    found = longest.search(lambda n: {"length": n, "ok": n <= limit}, start=65536, limit=2**21,
                           granularity=8192, report=seen.append)
    if limit >= 8192:
        assert found["longest"] <= limit < found["longest"] + 8192 and found["first_failure"] > limit
    else:
        assert found["longest"] == 0
    assert len(seen) < 12


def test_the_speed_planner_leaves_memory_to_the_long_context_mode():
    """At 65,536 tokens under a 24 GiB cap job.speed once moved the embeddings to CPU memory, which the mode's
    chunked layers do not handle (a device run failed on it): in the mode, speed plans no memory of its own."""
    shape = LLAMA_8B
    capped = h100(24.0)
    for s in (settings(max_length=65536), settings(max_length=8192, long_context="on")):
        levers = _levers(s, shape, capped)
        assert (levers.checkpointing, levers.checkpoint_layers, levers.offload_embeddings) == ("offload", 32, False)
        assert "long-context mode" in levers.reasons["checkpointing"]
    eight = h100(8.0)
    plain = _levers(settings(max_length=2048), shape, eight)
    assert plain.offload_embeddings  # outside the mode the 8 GiB plan still moves them
    # a plain plan that fits its cap, however tightly, leaves the mode off (it once turned on above 90%)
    tight = dataclasses.replace(plain, estimated_peak_gib=7.4)  # the plan with liger on the H100: 7.2
    assert 0.9 * 8.0 < tight.estimated_peak_gib <= usable_gib(8.0)
    assert not longcontext.plan(settings(max_length=2048), shape, eight, levers=tight, host_gib=120.0).on
    with pytest.raises(ConfigError, match="OFFLOAD_EMBEDDINGS=true does not combine with the long-context mode"):
        _levers(settings(max_length=65536, offload_embeddings="true"), shape, capped)


def test_sharded_strategies_leave_the_long_context_mode_off():
    shape = LLAMA_8B
    p = longcontext.plan(settings(max_length=131072, strategy="fsdp"), shape, H100, host_gib=120.0)
    assert not p.on and "STRATEGY=fsdp" in p.why
    levers = _levers(settings(max_length=131072, strategy="fsdp"), shape)
    assert "long-context mode" not in levers.reasons["checkpointing"]


def test_a_trial_trains_the_jobs_path_with_the_mode_on(tiny_model):
    """`python -m job.bench.longest trial` (what the search and scripts/gpu/longctx.sh run): one step, finite loss, the
    mode installed by the same assembly as `job train`."""
    result = longest.trial(str(tiny_model), 512, 1, "long")
    assert result["ok"], result.get("error")
    assert result["long"]["long_context"] is True
