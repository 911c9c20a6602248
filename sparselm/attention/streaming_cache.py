"""A bounded key/value cache that keeps only attention sinks + a recent window (StreamingLLM).

Xiao et al. 2023 ("Efficient Streaming Language Models with Attention Sinks", section 3.2)
keep the first `sinks` tokens and the last `window` tokens, and give positions *by slot in
the cache*, not by position in the text, so rotary angles never exceed what the model saw
in training. Memory is constant in the generated length.

How positions are kept right with rotary embeddings (RoPE, Su et al. 2021): the model
rotates each new key by the position it was given before calling `update`. We store keys
*un-rotated* (multiply by the inverse rotation of that position), and on every read rotate
all stored keys by their current slot. Only relative angles matter in RoPE (q_m . k_n
depends on m - n), so slots are shifted by `delta` = (position the model gave the first new
query) - (its slot): whatever absolute positions the caller uses (`generate` counts all
tokens), query-key distances are slot distances. Un-rotating once and rotating once per read
keeps the float error at one rotation (no drift from repeated re-rotation).

Invariant: between calls the cache holds at most sinks + window - 1 tokens, so a decode
step attends to sinks + window keys: the sinks and the window ending at the new token,
exactly the `Sinks(sinks) | SlidingWindow(window)` pattern in slot coordinates.

Shape legend: B batch, G key/value heads, S stored slots, Q new tokens, D head dim.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from sparselm.errors import SparselmError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing of dimension i with i + D/2 (the Hugging Face Llama layout)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def find_rotary(model: nn.Module) -> nn.Module:
    """The model's rotary embedding module (has `inv_freq`, called as rotary(x, position_ids) -> (cos, sin))."""
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq") and "rotary" in (name + type(module).__name__).lower():
            return module
    raise SparselmError(f"{type(model).__name__} has no rotary position embedding (e.g. gpt2/opt learn absolute "
                        "positions); the sinks + window cache re-positions keys and needs a RoPE model (llama, "
                        "mistral, qwen2, ...)")


class SinkWindowLayer(DynamicLayer):
    """One decoder layer's bounded cache; see the module docstring for the invariant."""

    is_sliding = False

    def __init__(self, sinks: int, window: int, rotary: nn.Module):
        super().__init__()
        self.sinks, self.window, self.rotary = sinks, window, rotary
        self._table = None  # (delta, cos, sin): see _cos_sin

    def _cos_sin(self, like: torch.Tensor, delta: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, 1, stop - start, D] of positions delta + start .. delta + stop - 1.

        Cached per delta: with the model's default positions delta stays 0, so decoding reuses
        one small table (at most sinks + window + chunk rows) instead of calling the rotary module.
        """
        cached = self._table
        if cached is None or cached[0] != delta or cached[1].shape[2] < stop or cached[1].dtype != like.dtype:
            length = max(stop, self.sinks + self.window)
            positions = torch.arange(length, device=like.device) + delta  # [L]
            cos, sin = self.rotary(like, positions[None])  # [1, L, D] each
            cached = self._table = (delta, cos[:, None].to(like.dtype), sin[:, None].to(like.dtype))
        return cached[1][:, :, start:stop], cached[2][:, :, start:stop]

    def rotate(self, keys: torch.Tensor, delta: int, start: int) -> torch.Tensor:
        """Apply RoPE to un-rotated keys [B, G, T, D] sitting at slots start.. (positions shifted by delta)."""
        cos, sin = self._cos_sin(keys, delta, start, start + keys.shape[2])
        return keys * cos + _rotate_half(keys) * sin

    def unrotate(self, keys: torch.Tensor, delta: int, start: int) -> torch.Tensor:
        """Inverse of `rotate` (also undoes a RoPE attention scaling factor: cos^2 + sin^2 = scale^2)."""
        cos, sin = self._cos_sin(keys, delta, start, start + keys.shape[2])
        return (keys * cos - _rotate_half(keys) * sin) / (cos * cos + sin * sin)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add Q new (rotated) keys/values; return the S + Q keys rotated by slot, and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stored = self.get_seq_length()
        given = (kwargs.get("kwargs") or {}).get("position_ids")
        delta = 0  # the model's default: positions continue from get_seq_length(), i.e. equal the slots
        if given is not None:
            if given.ndim == 2 and given.shape[0] > 1 and not bool((given == given[:1]).all()):
                raise SparselmError("the sinks + window cache needs the same positions in every batch row "
                                    "(no left padding); pad on the right or generate one sequence at a time")
            first = int(given.reshape(-1)[0])
            delta = first - stored  # shift that maps slots onto the positions the new tokens were rotated by
        raw_new = self.unrotate(key_states, delta, stored)  # [B, G, Q, D]
        if stored:
            old = self.rotate(self.keys, delta, 0)  # [B, G, S, D]
            keys_out = torch.cat([old, key_states], dim=2)  # [B, G, S + Q, D]
            raw_all = torch.cat([self.keys, raw_new], dim=2)
            values_all = torch.cat([self.values, value_states], dim=2)
        else:
            keys_out, raw_all, values_all = key_states, raw_new, value_states
        keep = self.sinks + self.window - 1  # so the next token sees sinks + a full window including itself
        if raw_all.shape[2] > keep:
            evict = slice(self.sinks, raw_all.shape[2] - (self.window - 1))  # oldest non-sink slots
            kept = torch.cat([torch.arange(evict.start), torch.arange(evict.stop, raw_all.shape[2])])
            kept = kept.to(raw_all.device)  # [sinks + window - 1]
            self.keys, self.values = raw_all.index_select(2, kept), values_all.index_select(2, kept)
        else:
            self.keys, self.values = raw_all, values_all
        return keys_out, values_all

    def get_max_length(self) -> int:
        return self.sinks + self.window - 1

    def crop(self, tokens_to_remove: int) -> None:
        raise SparselmError("the sinks + window cache cannot be cropped (assisted decoding is not supported)")

    def nbytes(self) -> int:
        """Bytes held by this layer's stored keys and values."""
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class SinkWindowCache(Cache):
    """A transformers `Cache` with one `SinkWindowLayer` per decoder layer.

    Use with a model patched by `sparselm.attention.apply(model, Sinks(s) | SlidingWindow(w))`
    (`for_model` does it), passing it as `cache=` / `past_key_values=` to forward or generate.
    """

    def __init__(self, sinks: int, window: int, rotary: nn.Module, num_layers: int):
        if sinks < 0 or window <= 0:
            raise SparselmError(f"sinks must be >= 0 and window > 0, got sinks={sinks}, window={window}")
        super().__init__(layers=[SinkWindowLayer(sinks, window, rotary) for _ in range(num_layers)])
        self.sinks, self.window = sinks, window
        self.patch = None  # set by `for_model`

    @classmethod
    def for_model(cls, model: nn.Module, sinks: int, window: int, backend: str = "auto") -> "SinkWindowCache":
        """A bounded cache for `model`, patching its attention to sinks + window (needs RoPE)."""
        from sparselm.attention.hf_patch import apply
        from sparselm.attention.local_patterns import Sinks, SlidingWindow

        rotary = find_rotary(model)
        pattern = SlidingWindow(window) if sinks == 0 else Sinks(sinks) | SlidingWindow(window)
        cache = cls(sinks, window, rotary, model.config.num_hidden_layers)
        cache.patch = apply(model, pattern, backend=backend)  # `cache.patch.remove()` restores dense attention
        return cache

    def nbytes(self) -> int:
        """Bytes of keys and values held now, all layers together."""
        return sum(layer.nbytes() for layer in self.layers)
