"""The one trainer assembly (job.trainer): which SFTConfig field comes from where."""

import pytest

from job import config, speed
from job.errors import ConfigError
from job.trainer import lever_fields, sft_config


def test_the_levers_decide_their_trainer_fields():
    args = lever_fields(speed.Levers(checkpointing="offload", checkpoint_layers=32, micro_batch_size=2,
                                            grad_accum=2, dataloader_workers=2, device="H100"))
    assert args["per_device_train_batch_size"] == 2 and args["gradient_accumulation_steps"] == 2
    # offloading is job.speed.offload's asynchronous offloader, installed by prepare_adapted, not transformers' own
    assert args["activation_checkpointing"] and args["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert args["dataloader_num_workers"] == 2 and args["dataloader_pin_memory"]
    assert args["accelerator_config"] == {"non_blocking": True}  # pinned batches copied without a GPU wait
    assert not args["logging_nan_inf_filter"]  # a NaN loss reaches the guard (tests/test_train.py)
    on_cpu = lever_fields(speed.Levers())
    assert not on_cpu["activation_checkpointing"] and on_cpu["accelerator_config"] == {"non_blocking": False}


def test_trainer_args_fill_in_what_the_job_leaves_and_never_override_it(tmp_path):
    s = config.load({"trainer_args": '{"weight_decay": 0.05, "optim": "adamw_torch"}'}, environ={})
    args = sft_config(s, speed.Levers(micro_batch_size=2), output_dir=str(tmp_path), max_steps=3)
    assert (args.weight_decay, args.optim, args.per_device_train_batch_size, args.max_steps) == \
        (0.05, "adamw_torch", 2, 3)
    assert args.max_length == s.max_length and args.padding_free == s.packing
    with pytest.raises(ConfigError, match="TRAINER_ARGS: max_steps set by the job itself"):
        sft_config(config.Settings(trainer_args='{"max_steps": 5}'), output_dir=str(tmp_path), max_steps=3)
