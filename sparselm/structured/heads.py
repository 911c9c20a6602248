"""Attention head pruning that keeps grouped-query attention valid.

Legend: E = hidden size, H = query heads, K = key/value heads (groups), G = H / K query heads
per group, D = head dim, N = calibration tokens.

Query head h reads key/value head h // G. Two ways to remove heads keep every group the same
size, so the result is still a standard config (`num_attention_heads`, `num_key_value_heads`,
explicit `head_dim`):

- mode "groups": remove whole KV groups, i.e. one K/V head together with its G query heads
  (for plain multi-head attention, G = 1, this is ordinary head pruning);
- mode "query": remove the same number of query heads from every group, keeping all K/V heads.

Scores (per query head, summed over a group when groups are removed):
- "activation": the output energy of the head, E||W_o[:, h] a_h||^2 = trace(W_h C_hh W_h^T),
  with a_h the head's attention output [D] and C = mean a a^T the second moment of the
  o_proj input (the structured analogue of Wanda's |W| ||X||, as in FLAP, An et al. 2024).
- "taylor": sum of |w * dL/dw| over the head's rows of q (and, for groups, k and v) and its
  columns of o (LLM-Pruner, Ma et al. 2023).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sparselm.errors import SparselmError
from sparselm.structured.module_slicing import replace_child, slice_linear, top_indices

MODES = ("groups", "query")


def head_output_energy(o_weight: torch.Tensor, o_input_gram: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per query head trace(W_h C_hh W_h^T) for o_weight [E, H*D] and o_input_gram [H*D, H*D] -> [H]."""
    num_heads = o_weight.shape[1] // head_dim
    w = o_weight.double().reshape(o_weight.shape[0], num_heads, head_dim)  # [E, H, D]
    c = o_input_gram.double().reshape(num_heads, head_dim, num_heads, head_dim)
    c_diag = torch.stack([c[h, :, h, :] for h in range(num_heads)])  # [H, D, D]
    # trace(W_h C_hh W_h^T) = sum_{d,e} (W_h^T W_h)_{de} C_hh_{de}
    gram_w = torch.einsum("ehd,ehf->hdf", w, w)  # [H, D, D]
    return (gram_w * c_diag).sum(dim=(1, 2))  # [H]


def taylor_head_scores(q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, num_heads: int,
                       num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head [H], per KV head [K]) sums of |w * grad|; q/o parts go to the query heads,
    k/v parts to their KV head. Needs `.grad` on all four weights."""
    for name, layer in (("q", q), ("k", k), ("v", v), ("o", o)):
        if layer.weight.grad is None:
            raise SparselmError(f"taylor scores need gradients on the {name} projection; run a backward pass first")

    def saliency(layer):
        return (layer.weight.data.double() * layer.weight.grad.double()).abs()  # [O, I]

    per_query = saliency(q).reshape(num_heads, head_dim, -1).sum(dim=(1, 2))  # [H]
    per_query = per_query + saliency(o).reshape(o.weight.shape[0], num_heads, head_dim).sum(dim=(0, 2))
    per_kv = (saliency(k) + saliency(v)).reshape(num_kv_heads, head_dim, -1).sum(dim=(1, 2))  # [K]
    return per_query, per_kv


def heads_per_group(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise SparselmError(f"{num_heads} query heads do not split into {num_kv_heads} key/value groups; "
                            "the model config is inconsistent")
    return num_heads // num_kv_heads


def units_to_remove(ratio: float, num_heads: int, num_kv_heads: int, mode: str) -> int:
    """How many groups (mode "groups") or query heads per group (mode "query") `ratio` removes.

    Raises SparselmError when `ratio` is out of range, leaves no heads, or cannot be met by whole
    units (the error lists the ratios that can).
    """
    if mode not in MODES:
        raise SparselmError(f"unknown head pruning mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise SparselmError(f"head ratio {ratio!r} must be in [0, 1): it is the fraction of query heads removed")
    group = heads_per_group(num_heads, num_kv_heads)
    units = num_kv_heads if mode == "groups" else group
    remove = int(round(ratio * units))
    achievable = ", ".join(f"{i / units:g}" for i in range(units))
    what = (f"whole key/value groups of {group} query heads ({num_kv_heads} groups)" if mode == "groups"
            else f"the same number of query heads from each of the {num_kv_heads} groups of {group}")
    if ratio > 0 and remove == 0:
        raise SparselmError(f"heads={ratio:g} of {num_heads} query heads cannot be removed as {what}; "
                            f"achievable ratios: {achievable}" + ("; or try mode 'query'" if mode == "groups" else ""))
    if remove >= units:
        raise SparselmError(f"heads={ratio:g} would remove every attention head; pass a smaller ratio "
                            f"(achievable: {achievable})")
    return remove


def kept_head_layout(query_scores: torch.Tensor, kv_scores: torch.Tensor | None, num_kv_heads: int,
                     remove: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept KV heads) as sorted indices, from per-query-head scores [H]
    (plus optional per-KV-head scores [K] that count toward their group)."""
    num_heads = query_scores.numel()
    group = heads_per_group(num_heads, num_kv_heads)
    by_group = query_scores.double().reshape(num_kv_heads, group)  # [K, G]
    if mode == "groups":
        group_scores = by_group.sum(1) + (kv_scores.double() if kv_scores is not None else 0)  # [K]
        kept_kv = top_indices(group_scores, num_kv_heads - remove)
        kept_q = (kept_kv[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        return kept_q, kept_kv
    kept_in_group = [top_indices(by_group[g], group - remove) + g * group for g in range(num_kv_heads)]
    return torch.cat(kept_in_group), torch.arange(num_kv_heads)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the kept heads in a [heads*D, ...] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_attention_heads(attention: nn.Module, projections: dict[str, nn.Module], kept_q: torch.Tensor,
                          kept_kv: torch.Tensor, head_dim: int) -> None:
    """Keep query heads `kept_q` and KV heads `kept_kv` in `attention`, in place.

    The kept query heads of each surviving group must still read their own KV head, which holds
    for layouts made by `kept_head_layout`. Module attributes that cache head counts are updated.
    """
    q_rows, kv_rows = head_rows(kept_q, head_dim), head_rows(kept_kv, head_dim)
    for key, index, dim in (("q", q_rows, "out"), ("k", kv_rows, "out"), ("v", kv_rows, "out"), ("o", q_rows, "in")):
        replace_child(attention, projections[key], slice_linear(projections[key], index, dim))
    num_heads, num_kv = kept_q.numel(), kept_kv.numel()
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = num_heads // num_kv
    for name, value in (("num_heads", num_heads), ("num_attention_heads", num_heads),
                        ("num_key_value_heads", num_kv)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)
