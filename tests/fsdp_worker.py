"""One of two gloo processes for tests/test_fsdp.py: a PEFT LoRA model under FSDP1, wrapped as transformers'
Trainer has accelerate do it (PEFT's auto-wrap policy: every decoder layer and every LoRA Linear its own unit),
then the final adapter saved and a sharded adapter checkpoint saved and loaded back, the way the Trainer does.
Prints one JSON line (rank 0): what was saved and what came back."""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main(out: str, patched: bool) -> None:
    from accelerate import PartialState
    from accelerate.utils import load_fsdp_model, save_fsdp_model
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors import safe_open
    from torch.distributed.fsdp import (
        FullStateDictConfig,
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from job.train import patch_peft_for_fsdp1

    PartialState(cpu=True)
    if patched:
        patch_peft_for_fsdp1()
    rank = dist.get_rank()
    torch.manual_seed(0)  # both ranks build the same weights (FSDP's sync_module_states needs a GPU)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    peft_model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16),
                                LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # non-zero, so a load that puts nothing back shows
    trained = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    model = FSDP(peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model), use_orig_params=False,
                 device_id=torch.device("cpu"))
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()

    # the final adapter: FULL_STATE_DICT, then PeftModel.save_pretrained(state_dict=...) (Trainer.save_model)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        full = model.state_dict()
    saved = 0
    if rank == 0:
        model.module.save_pretrained(f"{out}/adapter", state_dict=full, is_main_process=True)
        with safe_open(f"{out}/adapter/adapter_model.safetensors", framework="pt") as weights:
            saved = len(list(weights.keys()))
    dist.barrier()

    # a checkpoint and a resume: accelerate's adapter-only sharded save and load (Trainer's FSDP checkpoints)
    plugin = SimpleNamespace(state_dict_type=StateDictType.SHARDED_STATE_DICT,
                             state_dict_config=ShardedStateDictConfig(),
                             optim_state_dict_config=ShardedOptimStateDictConfig(), fsdp_version=1)
    accelerator = SimpleNamespace(process_index=rank, num_processes=2, is_fsdp2=False, is_main_process=rank == 0,
                                  wait_for_everyone=dist.barrier)
    save_fsdp_model(plugin, accelerator, model, f"{out}/checkpoint", adapter_only=True)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.zero_()  # as in a fresh process: the trained LoRA weights must come from the checkpoint
    load_fsdp_model(plugin, accelerator, model, f"{out}/checkpoint", adapter_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        back = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if rank == 0:
        restored = sum(torch.equal(v, trained[k]) for k, v in back.items())
        print(json.dumps({"lora_tensors": len(trained), "saved": saved, "restored": restored}), flush=True)
    dist.barrier()
    # Skips interpreter teardown: gloo's threads under FSDP1 can abort there ("terminate called without an active
    # exception", SIGABRT) after everything above has passed; what this worker checks is done by now.
    os._exit(0)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(sys.argv[1], os.environ.get("PATCHED") == "1")
