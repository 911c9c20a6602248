"""A minimal decode loop for Llama-family models, to measure what the weights cost.

At batch 1 a decode step of a small model is mostly framework work: the transformers forward
builds masks, cache objects, attention-interface dispatch and output records, and its
`DynamicCache` concatenates the whole cache every step. None of that depends on the weights,
so it hides what a sparse or smaller weight saves. `LeanDecoder` runs the same modules
(embedding, norms, q/k/v/o and MLP projections, LM head: dense `nn.Linear` or packed
`SparseLinear` alike) with a preallocated KV cache written in place and one SDPA call per
layer, which is what a lean serving loop does. Its logits equal the transformers forward's
(tested), so speed measured through it is the speed of the same model.

Supported: the llama, mistral and qwen2 adapter families with full attention (no sliding
window inside the decoded length), rotary position embeddings computed by the model's own
rotary module (so every rope scaling variant the model uses is honoured).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.errors import SparselmError

LEAN_FAMILIES = ("llama", "mistral", "qwen2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """Prefill and greedy decode with a preallocated cache for up to `max_len` positions.

        dec = LeanDecoder(model, max_len=256, batch_size=1)
        logits = dec.step(prompt_ids)      # [B, V], last position; fills the cache
        logits = dec.step(next_ids[:, None])
        dec.reset()                        # start a new sequence
    """

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1):
        from sparselm.adapters import get_adapter

        adapter = get_adapter(model)
        if adapter.family not in LEAN_FAMILIES:
            raise SparselmError(f"the lean decode loop supports the {', '.join(LEAN_FAMILIES)} families; this model "
                                f"is {adapter.family!r}: benchmark it with the transformers forward instead")
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
            raise SparselmError(f"the model attends within a sliding window of {window} tokens, shorter than "
                                f"{max_len}; the lean decode loop implements full attention only")
        inner = model.model
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, name):
                raise SparselmError(f"model.model has no {name!r}: not the Llama layout the lean loop expects")
        self.model, self.inner, self.head = model, inner, model.lm_head
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        param = next(model.parameters())
        shape = (len(self.layers), batch_size, self.kv_heads, max_len, self.head_dim)  # [L, B, Hkv, S, hd]
        dtype = self.inner.embed_tokens.weight.dtype
        self.k_cache = torch.zeros(shape, dtype=dtype, device=param.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=param.device)
        self.max_len, self.batch_size, self.pos = max_len, batch_size, 0

    def reset(self) -> None:
        self.pos = 0

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids` [B, T] at the next T positions; returns the last position's logits [B, V]."""
        B, T = ids.shape
        start, end = self.pos, self.pos + T
        if B != self.batch_size:
            raise SparselmError(f"this decoder was built for batch {self.batch_size}, got {B}")
        if end > self.max_len:
            raise SparselmError(f"{end} positions exceed the cache of {self.max_len}; build the decoder with a "
                                f"larger max_len")
        x = self.inner.embed_tokens(ids)  # [B, T, D]
        positions = torch.arange(start, end, device=ids.device).unsqueeze(0)  # [1, T]
        cos, sin = self.inner.rotary_emb(x, positions)  # [1, T, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, hd]
        mask = None
        if T > 1 and start > 0:  # a chunk after earlier tokens: causal within the chunk, all before it
            mask = torch.ones(T, end, dtype=torch.bool, device=ids.device).tril(start)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
            k = attn.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
            v = attn.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[i, :, :, start:end] = k
            self.v_cache[i, :, :, start:end] = v
            keys, values = self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.pos = end
        return self.head(self.inner.norm(x[:, -1:]))[:, -1]  # [B, V]
