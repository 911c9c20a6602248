"""`shrink`: make a model genuinely smaller by removing MLP neurons, attention heads and layers.

One call, in this order: check every argument against the model (before any work), score
everything on the unpruned model with one calibration pass (plus one backward pass for Taylor
scores), remove neurons, then heads, then whole layers, then optionally heal by distillation
against a copy of the unpruned model. Uniform ratios give a standard config that plain
`transformers` loads; per-layer neuron ratios are recorded in the config (see `per_layer`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselm.adapters import get_adapter, linear_weight
from sparselm.errors import SparselmError
from sparselm.lowrank.input_statistics import check_calibration, collect_input_statistics, model_device
from sparselm.structured import heads as H
from sparselm.structured import neurons as N
from sparselm.structured.heal import evaluate_distillation, heal
from sparselm.structured.layers import LAYER_SELECTIONS, check_layers_to_remove, remove_layers, select_layers_to_remove
from sparselm.structured.per_layer import record_intermediate_sizes

HEAD_FAMILIES = ("llama", "mistral", "qwen2")  # families whose config takes an explicit head_dim


@dataclass
class ShrinkReport:
    """What `shrink` removed and what it cost, in numbers."""

    params_before: int
    params_after: int
    intermediate_sizes: list[int]
    num_heads: int
    num_kv_heads: int
    removed_layers: list[int]
    block_influence: list[float] = field(default_factory=list)
    heal_losses: list[float] = field(default_factory=list)
    distill_before: float | None = None
    distill_after: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _per_layer(value, num_layers: int, name: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise SparselmError(f"{name} lists {len(value)} ratios for {num_layers} decoder layers; give one per layer")
        return [float(v) for v in value]
    return [float(value)] * num_layers


def _taylor_gradients(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> None:
    """Accumulate dL/dW of the language-model loss over all calibration rows into `.grad`."""
    device = model_device(model)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            batch = calib_ids[start:start + batch_size].to(device)  # [B, S]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # [B, S-1, V]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            (loss / calib_ids[:, 1:].numel()).backward()
    finally:
        model.train(was_training)


def shrink(model: nn.Module, calib_ids: torch.Tensor | None = None, *, neurons: float | list[float] = 0.0,
           heads: float = 0.0, layers: int = 0, score: str = "activation", head_mode: str = "groups",
           layer_selection: str = "iterative", heal_steps: int = 0, heal_lr: float = 3e-4, batch_size: int = 8, progress: bool = True) -> ShrinkReport:
    """Remove `neurons` (fraction per MLP, or a list per layer), `heads` (fraction of query heads,
    in whole GQA units, see `heads.units_to_remove`) and `layers` (count, lowest block influence,
    re-measured after each removal with `layer_selection="iterative"`, or measured once: "once")
    from `model`, in place, scored on `calib_ids` [n, seq_len]. `score` is "activation" or
    "taylor". With `heal_steps` > 0, distils the result against the unpruned model.

    Guarantees: all arguments are checked before the model is touched; zero ratios leave the
    model bit-for-bit unchanged; the config is updated to the new sizes.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    config = model.config
    num_layers = len(blocks)
    neuron_ratios = _per_layer(neurons, num_layers, "neurons")
    if score not in N.SCORES:
        raise SparselmError(f"unknown score {score!r}; choose one of {', '.join(N.SCORES)}")
    if not isinstance(heal_steps, int) or heal_steps < 0:
        raise SparselmError(f"heal_steps={heal_steps!r} must be a whole number >= 0")
    check_layers_to_remove(layers, num_layers)
    if layer_selection not in LAYER_SELECTIONS:
        raise SparselmError(f"unknown layer selection {layer_selection!r}; choose one of {', '.join(LAYER_SELECTIONS)}")
    do_neurons, do_heads = any(r > 0 for r in neuron_ratios), heads > 0
    mlps = [adapter.mlp_projections(b) for b in blocks] if do_neurons or isinstance(neurons, (list, tuple)) else []
    for i, proj in enumerate(mlps):
        N.check_neuron_ratio(neuron_ratios[i], linear_weight(proj["down"]).shape[1], f"layer {i}")
    num_heads, num_kv, head_dim = adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)
    head_units = H.units_to_remove(heads, num_heads, num_kv, head_mode)
    if do_heads and adapter.family not in HEAD_FAMILIES:
        raise SparselmError(f"head pruning supports the {', '.join(HEAD_FAMILIES)} families (explicit head_dim in "
                            f"the config); this model is {adapter.family!r}; prune neurons or layers instead")
    if (do_neurons or do_heads or layers or heal_steps):
        if calib_ids is None:
            raise SparselmError("structured pruning needs calibration data; pass calib_ids "
                                "(sparselm.data.calibration(tokenizer, ...))")
        check_calibration(calib_ids)
    params_before = sum(p.numel() for p in model.parameters())
    teacher = copy.deepcopy(model).requires_grad_(False) if heal_steps else None

    # --- scores, all on the unpruned model -----------------------------------------------
    dropped, influence = select_layers_to_remove(model, blocks, calib_ids, layers, layer_selection, batch_size,
                                                 progress) if layers else ([], None)
    stats = {}
    if score == "activation" and (do_neurons or do_heads):
        watched = {}
        for i, block in enumerate(blocks):
            if do_neurons:
                watched[f"{i}.down"] = mlps[i]["down"]
            if do_heads:
                watched[f"{i}.o"] = adapter.attention_projections(block)["o"]
        kinds = ("sq_mean", "gram") if do_heads else ("sq_mean",)
        stats = collect_input_statistics(model, calib_ids, watched, kinds, batch_size, progress)
    elif score == "taylor" and (do_neurons or do_heads):
        _taylor_gradients(model, calib_ids, batch_size)

    # --- surgery ------------------------------------------------------------------------
    with torch.no_grad():
        for i, block in enumerate(blocks):
            if do_neurons and neuron_ratios[i] > 0:
                proj = mlps[i]
                if score == "activation":
                    s = N.activation_neuron_scores(linear_weight(proj["down"]), stats[f"{i}.down"]["sq_mean"])
                else:
                    s = N.taylor_neuron_scores(proj)
                N.prune_mlp_neurons(adapter.mlp(block), proj, N.select_neurons(s, neuron_ratios[i]))
            if do_heads:
                proj = adapter.attention_projections(block)
                if score == "activation":
                    q_scores = H.head_output_energy(proj["o"].weight, stats[f"{i}.o"]["gram"], head_dim)
                    kv_scores = None
                else:
                    q_scores, kv_scores = H.taylor_head_scores(proj["q"], proj["k"], proj["v"], proj["o"],
                                                               num_heads, num_kv, head_dim)
                    kv_scores = kv_scores if head_mode == "groups" else None
                kept_q, kept_kv = H.kept_head_layout(q_scores, kv_scores, num_kv, head_units, head_mode)
                H.prune_attention_heads(adapter.attention(block), proj, kept_q, kept_kv, head_dim)
    if score == "taylor":
        model.zero_grad(set_to_none=True)
    if do_neurons:
        sizes = [linear_weight(adapter.mlp_projections(b)["down"]).shape[1] for b in blocks]
        record_intermediate_sizes(config, sizes, N.width_field(config))
    if do_heads:
        new_heads = num_heads - (head_units * (num_heads // num_kv) if head_mode == "groups" else head_units * num_kv)
        config.num_attention_heads = new_heads
        config.num_key_value_heads = num_kv - head_units if head_mode == "groups" else num_kv
        config.head_dim = head_dim  # hidden_size / heads no longer gives it
    if dropped:
        remove_layers(model, blocks, dropped)
        per_layer_sizes = getattr(config, "sparselm_intermediate_sizes", None)
        if per_layer_sizes:
            record_intermediate_sizes(config, [per_layer_sizes[i] for i in range(num_layers) if i not in dropped],
                                      N.width_field(config))

    report = ShrinkReport(
        params_before=params_before, params_after=sum(p.numel() for p in model.parameters()),
        intermediate_sizes=[linear_weight(adapter.mlp_projections(b)["down"]).shape[1] for b in blocks]
        if adapter.family != "generic" else [],
        num_heads=getattr(config, "num_attention_heads", num_heads),
        num_kv_heads=getattr(config, "num_key_value_heads", num_kv), removed_layers=dropped,
        block_influence=influence.tolist() if influence is not None else [])
    if heal_steps:
        report.distill_before = evaluate_distillation(model, teacher, calib_ids, batch_size)
        report.heal_losses = heal(model, teacher, calib_ids, heal_steps, lr=heal_lr, batch_size=batch_size,
                                  progress=progress)
        report.distill_after = evaluate_distillation(model, teacher, calib_ids, batch_size)
    return report
