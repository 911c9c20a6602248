"""FlexAttention backend: the pattern's rule becomes a `mask_mod`, compiled into a block mask.

`torch.nn.attention.flex_attention` (PyTorch >= 2.5) skips the tiles the block mask marks
empty and applies the rule inside partial tiles. Compiled, it generates a fused kernel;
eager, it materialises the scores (fine for small tests only).

Limits (torch 2.13, measured): on CPU it has no backward (it raises as soon as an input
requires grad), so `dispatch` never picks it for training on CPU; every new (length,
pattern) costs a block mask build and, compiled, a kernel compile of seconds.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from sparselm.attention.backends.reference import check_shapes
from sparselm.attention.pattern import Pattern
from sparselm.errors import SparselmError

_BLOCK_MASKS: OrderedDict = OrderedDict()  # (pattern, Tq, Tk, q_offset, device, compiled) -> BlockMask
_MAX_CACHED_MASKS = 16
_COMPILED = {}


def flex_available() -> bool:
    """True where this PyTorch ships FlexAttention."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def pattern_block_mask(pattern: Pattern, tq: int, tk: int, q_offset: int, device, compiled: bool = True):
    """The FlexAttention BlockMask of `pattern` for queries at q_offset + i over tk keys (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (pattern, tq, tk, q_offset, str(device), compiled)
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    pattern.prepare(max(tk, tq + q_offset))
    probe = torch.zeros(1, dtype=torch.int32, device=device)
    pattern.allows(probe, probe)  # eagerly: lookup tables are copied to `device` before the mask is compiled

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allows(q_idx + q_offset, kv_idx)

    # compiled, the mask is built without materialising [Tq, Tk] (seconds and GBs at 16k otherwise)
    block_mask = _block_mask_builder(create_block_mask, compiled)(mask_mod, None, None, tq, tk, device=device)
    _BLOCK_MASKS[key] = block_mask
    if len(_BLOCK_MASKS) > _MAX_CACHED_MASKS:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


def _block_mask_builder(create_block_mask, compiled: bool):
    """`create_block_mask`, compiled when asked: through its `_compile` flag where this PyTorch
    has it (deprecated since 2.11, which asks for torch.compile instead), else torch.compile'd."""
    import inspect
    import warnings

    if not compiled:
        return create_block_mask
    if "_compile" in inspect.signature(create_block_mask).parameters:
        def build(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*_compile.*", category=DeprecationWarning)
                return create_block_mask(*args, _compile=True, **kwargs)
        return build
    if create_block_mask not in _COMPILED:
        _COMPILED[create_block_mask] = torch.compile(create_block_mask)
    return _COMPILED[create_block_mask]


def _flex_function(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def flex_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid=None) -> str | None:
    """None if FlexAttention can run this call, else the reason it cannot."""
    if not flex_available():
        return "this PyTorch has no FlexAttention (needs >= 2.5)"
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and q.device.type == "cpu":
        return "FlexAttention has no backward on CPU"
    if key_valid is not None:
        return "padding masks are handled by the blocked backend"
    return None


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                          scale: float | None = None, q_offset: int | None = None,
                          compiled: bool = True) -> torch.Tensor:
    """Sparse attention [B, H, Tq, D] through FlexAttention; queries without keys give zeros."""
    check_shapes(q, k, v)
    reason = flex_supports(q, k, v)
    if reason:
        raise SparselmError(f"the flex backend cannot run here: {reason}; use backend='blocked' or 'auto'")
    tq, tk = q.shape[2], k.shape[2]
    q_offset = tk - tq if q_offset is None else q_offset
    block_mask = pattern_block_mask(pattern, tq, tk, q_offset, q.device, compiled)
    fn = _flex_function(compiled)
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
