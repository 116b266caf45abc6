"""Model assembly details that only show on a GPU, reproduced on CPU."""

from __future__ import annotations

import torch

from job import config, model


def test_dora_layers_return_their_input_dtype_under_autocast(tiny_model, monkeypatch):
    """On a GPU, PEFT's 4-bit layers leave the output dtype to CUDA autocast, and DoRA's float32 magnitude made
    q_proj return float32, which flash attention refuses. CPU has no CUDA autocast: CPU autocast plus PEFT told
    that autocast is on reproduce the same path."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    s = config.load(environ={"USE_DORA": "true"})
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, quantization_config=quantization)
    tuned = get_peft_model(base, model.lora_config(s, base))
    q_proj = tuned.base_model.model.model.layers[1].self_attn.q_proj

    def forward():
        """q_proj's output dtype as the attention after it sees it (observed after every other hook)."""
        outputs = {}
        observer = q_proj.register_forward_hook(lambda module, args, out: outputs.update(q=out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tuned(input_ids=torch.tensor([[1, 5, 6, 7]]))
        observer.remove()
        return outputs["q"]

    import peft.tuners.lora.bnb

    class TorchUnderCudaAutocast:  # torch as PEFT's 4-bit layers see it on a GPU in training
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def is_autocast_enabled(*device):
            return True

    monkeypatch.setattr(peft.tuners.lora.bnb, "torch", TorchUnderCudaAutocast())
    assert forward() == torch.float32  # the defect, as on the GPU
    assert model.keep_dora_output_dtype(tuned) == 28
    assert forward() == torch.bfloat16
