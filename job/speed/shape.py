"""The model's shape as the planner and the memory model read it: widths, layers, heads, vocabulary, and what the
attention and output layer need (soft-capping, sliding windows, scaled logits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    plain_head: bool = True       # no logit soft-capping or scaling: the streamed output layer can stand in
    attention_softcap: float = 0.0  # Gemma-2's tanh cap on attention scores
    sliding_window: int = 0         # the shortest attention window of any layer, 0 when every layer sees it all

    @classmethod
    def of(cls, config) -> Shape:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        plain = not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale",
                                                                   "output_multiplier", "lm_head_multiplier",
                                                                   "logits_scaling"))
        layer_types = getattr(config, "layer_types", None)
        windowed = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", True)
        return cls(config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   heads, getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)), plain,
                   float(getattr(config, "attn_logit_softcapping", None) or 0.0),
                   int(getattr(config, "sliding_window", None) or 0) if windowed else 0)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Parameters of the adapted linear layers of all decoder layers (what NF4 quantizes)."""
        h = self.hidden
        return self.layers * (h * self.q * 2 + h * self.kv * 2 + 3 * h * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params * (1 if self.tied else 2)

    def lora_params(self, r: int) -> int:
        h, i = self.hidden, self.intermediate
        per_layer = (h + self.q) + 2 * (h + self.kv) + (self.q + h) + 2 * (h + i) + (i + h)
        return self.layers * r * per_layer
