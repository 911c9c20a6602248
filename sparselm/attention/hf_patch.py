"""Sparse attention inside Hugging Face models, through transformers' `AttentionInterface`.

Llama-family attention modules (llama, mistral, qwen2, ...) call
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)` with
`(module, query [B, H, Tq, D], key [B, G, Tk, D], value, attention_mask, dropout=, scaling=, **kwargs)`
after rotary embedding and after the key/value cache update, and expect `(output
[B, Tq, H, D], weights or None)`. `apply` registers one function under the name
"sparselm", points the model's config at it, and stores the pattern on each attention
module, so different models (or layers) can carry different patterns. No model code is
copied or changed.

"sparselm" is registered in transformers' mask interface too, with a function that passes
the 2-D padding mask through (or None); the pattern itself supplies causality. Queries are
the last Tq of the Tk keys, which holds for a plain forward, for `DynamicCache` decoding
and for `SinkWindowCache` (there in cache-slot coordinates, see `streaming_cache`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from sparselm.attention.backends.dispatch import BACKENDS, sparse_attention
from sparselm.attention.parse import parse_pattern
from sparselm.attention.pattern import Pattern
from sparselm.errors import SparselmError

ATTENTION_NAME = "sparselm"
_MODULE_ATTR = "sparselm_attention"


@dataclass
class AttentionPatch:
    """What `apply` did: the pattern, requested backend, patched modules, and the backends that ran."""

    pattern: Pattern
    backend: str
    modules: list[nn.Module]
    previous_implementation: str | None
    model: nn.Module = field(repr=False)
    backends_used: Counter = field(default_factory=Counter)

    def remove(self) -> None:
        """Restore the model's previous attention implementation and drop the pattern."""
        for module in self.modules:
            if getattr(module, _MODULE_ATTR, None) is self:
                delattr(module, _MODULE_ATTR)
        _set_implementation(self.model, self.previous_implementation or "sdpa")

    def summary(self) -> str:
        ran = ", ".join(f"{name} x{count}" for name, count in sorted(self.backends_used.items())) or "not run yet"
        return f"pattern {self.pattern.spec()} on {len(self.modules)} attention layers; backend {self.backend} ({ran})"


def sparselm_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The function registered in `AttentionInterface`; returns ([B, Tq, H, D], None)."""
    patch: AttentionPatch | None = getattr(module, _MODULE_ATTR, None)
    if patch is None:
        raise SparselmError("this attention layer has no sparselm pattern; call sparselm.attention.apply(model, ...)")
    if dropout and module.training:
        raise SparselmError("attention dropout is not supported by sparse attention; set config.attention_dropout=0")
    key_valid = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise SparselmError("sparse attention takes a 2-D padding mask [batch, keys], not a prepared 4-D mask")
        if not bool(attention_mask.bool().all()):
            if attention_mask.shape[-1] != key.shape[2]:
                raise SparselmError(f"the padding mask covers {attention_mask.shape[-1]} positions but attention sees "
                                    f"{key.shape[2]} keys (a bounded cache keeps only sinks + window); generate "
                                    "unpadded sequences, one at a time or of equal length")
            key_valid = attention_mask.bool()  # [B, Tk]
    out, ran = sparse_attention(query, key, value, patch.pattern, backend=patch.backend, scale=scaling,
                                key_valid=key_valid)  # [B, H, Tq, D]
    patch.backends_used[ran] += 1
    return out.transpose(1, 2).contiguous(), None


def sparselm_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                          mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask-interface entry for "sparselm": pass the 2-D padding mask through (None when nothing is padded).

    The pattern, not transformers, supplies causality and locality; only padding is needed.
    Without this entry transformers drops the padding mask for unknown implementations.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.to(torch.bool)  # [B, Tk]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sparselm_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparselm_padding_mask)


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # older transformers: set it directly
        model.config._attn_implementation = name


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder block (via the model adapter when present)."""
    try:
        from sparselm.adapters import get_adapter

        adapter = get_adapter(model)
        modules = [adapter.attention(block) for block in adapter.blocks(model)]
        if modules and all(isinstance(m, nn.Module) for m in modules):
            return modules
    except (ImportError, AttributeError, SparselmError):
        pass
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def apply(model: nn.Module, pattern: Pattern | str, backend: str = "auto") -> AttentionPatch:
    """Make every self-attention layer of `model` attend only where `pattern` allows.

    Works for inference and training (backward) on models whose attention goes through
    transformers' `AttentionInterface` (Llama, Mistral, Qwen2 and most recent decoders).
    The weights are untouched; `patch.remove()` restores dense attention. With a window at
    least as long as the sequence the logits equal the unpatched model's.
    """
    pattern = parse_pattern(pattern)
    if backend not in BACKENDS:
        raise SparselmError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise SparselmError(f"{type(model).__name__} is not a Hugging Face transformers model; "
                            "sparse attention patches PreTrainedModel instances")
    if not getattr(model, "_supports_attention_backend", False):
        raise SparselmError(f"{type(model).__name__} ({config.model_type}) does not route attention through "
                            "transformers' AttentionInterface, so it cannot be patched; use a Llama-family model "
                            "(llama, mistral, qwen2, ...)")
    modules = attention_modules(model)
    if not modules:
        raise SparselmError(f"found no self-attention layers in {type(model).__name__}")
    _register()
    previous = config._attn_implementation
    if previous == ATTENTION_NAME:  # re-patching: remember what was there before the first patch
        previous = getattr(getattr(modules[0], _MODULE_ATTR, None), "previous_implementation", "sdpa")
    patch = AttentionPatch(pattern=pattern, backend=backend, modules=modules, previous_implementation=previous,
                           model=model)
    for module in modules:
        setattr(module, _MODULE_ATTR, patch)
    _set_implementation(model, ATTENTION_NAME)
    return patch
