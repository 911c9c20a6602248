"""`sparsify(model, config, calib)`: prune every linear layer of the decoder blocks in place.

Calibrated methods run through the sequential engine (one block at a time, statistics from
the outputs of the already-pruned blocks). The embedding stays dense; so does the LM head
unless the config asks for it (`lm_head=True`: pruned last, calibrated on the final norm's
outputs of the pruned stack).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparselm.adapters import get_adapter, linear_weight, set_linear_weight
from sparselm.adapters.base import LINEAR_TYPES
from sparselm.engine.calibration import BlockContext, StopBlock, run_blockwise
from sparselm.errors import SparselmError
from sparselm.prune.config import Magnitude, PruneConfig, SparseGPT
from sparselm.prune.magnitude import global_magnitude_threshold, magnitude_prune
from sparselm.prune.masks import check_nm_width
from sparselm.prune.owl import outlier_ratio, owl_sparsities
from sparselm.prune.refine import refine_kept_weights
from sparselm.prune.sparsegpt import sparsegpt_prune
from sparselm.prune.statistics import HessianAccumulator, InputNormAccumulator
from sparselm.prune.wanda import wanda_prune, wanda_scores


@dataclass
class SparsifyReport:
    method: str
    pattern: str
    target_sparsity: float
    sparsity: float  # measured over all pruned layers
    layer_sparsity: dict[str, float]
    block_sparsity: list[float]  # target per block (differs across blocks with OWL)
    seconds: float
    calibration: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _prunable(adapter, block, config: PruneConfig) -> dict[str, nn.Module]:
    layers = adapter.linear_layers(block)
    return {n: m for n, m in layers.items() if not any(s in n for s in config.ignore)}


class _StatHooks:
    """Forward pre-hooks feeding one accumulator per distinct input: layers that read the same
    tensor (q/k/v, gate/up) share an accumulator instead of computing it three times.

    Sharing is decided on each layer's first call by tensor *identity*, holding references to
    those first inputs so that no address can be reused meanwhile (comparing data pointers is
    wrong: the allocator hands a freed norm output's memory to the next norm's output).

    With `block` given, the block's calls are counted: when the first call ran every layer
    exactly once, later calls stop (StopBlock) right after the last layer's input is recorded,
    so the statistics pass skips that layer's product and everything after it.
    """

    def __init__(self, layers: dict[str, nn.Module], make_acc, block: nn.Module | None = None):
        self.acc: dict[str, object] = {}
        self._owner: dict[str, bool] = {}
        self._first_inputs: list[tuple[torch.Tensor, str]] = []
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]
        self._make = make_acc
        self._names = sorted(layers)
        self._calls: list[str] = []  # layers called so far in the current block call
        self._block_calls = 0
        self._stop_after: str | None = None
        if block is not None:
            self._handles.append(block.register_forward_pre_hook(self._new_call))

    def _new_call(self, module, args):
        if self._block_calls == 1 and self._calls and sorted(self._calls) == self._names:
            self._stop_after = self._calls[-1]
        self._block_calls += 1
        self._calls = []

    def _hook(self, name):
        def fn(module, args):
            x = args[0]
            if name not in self.acc:
                first = next((n for t, n in self._first_inputs if t is x), None)
                if first is not None:
                    self.acc[name], self._owner[name] = self.acc[first], False
                else:
                    self.acc[name], self._owner[name] = self._make(x.shape[-1], x.device), True
                    self._first_inputs.append((x, name))
            if self._owner[name]:
                self.acc[name].add(x.detach())
            self._calls.append(name)
            if name == self._stop_after:
                raise StopBlock
        return fn

    def groups(self) -> list[list[str]]:
        """Layer names grouped by shared input (for inspection and tests)."""
        out: dict[int, list[str]] = {}
        for name, acc in self.acc.items():
            out.setdefault(id(acc), []).append(name)
        return list(out.values())

    def remove(self):
        for h in self._handles:
            h.remove()
        self._first_inputs.clear()


def _lm_head(adapter, model, config) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the LM head when the config prunes it, else None."""
    if not config.lm_head:
        return None
    head = adapter.lm_head(model)
    if not isinstance(head, LINEAR_TYPES):
        raise SparselmError(f"lm_head=True: the LM head is a {type(head).__name__}, not a linear layer sparselm "
                            "can prune; leave lm_head off")
    if adapter.lm_head_tied(model):
        raise SparselmError("lm_head=True: the LM head shares its weight with the input embedding "
                            "(tie_word_embeddings), so pruning it would prune the embedding too; untie them "
                            "first (model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())) or "
                            "leave lm_head off")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def _measure(adapter, model, config) -> tuple[dict[str, float], float]:
    prefix = adapter.blocks_prefix(model)
    named = [(f"{prefix}.{i}.{name}", mod) for i, block in enumerate(adapter.blocks(model))
             for name, mod in _prunable(adapter, block, config).items()]
    head = _lm_head(adapter, model, config)
    if head is not None:
        named.append(head)
    per_layer, zeros, total = {}, 0, 0
    for name, mod in named:
        w = linear_weight(mod)
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return per_layer, zeros / max(1, total)


def _owl_block_sparsities(model, config, calib_ids, batch_size, device, progress) -> list[float]:
    adapter = get_adapter(model)
    ratios, sizes = [], []

    def measure(ctx: BlockContext):
        layers = _prunable(adapter, ctx.block, config)
        hooks = _StatHooks(layers, lambda c, d: InputNormAccumulator(c, d), ctx.block)
        ctx.forward()
        hooks.remove()
        scores = [wanda_scores(linear_weight(m), hooks.acc[n].sq_mean) for n, m in layers.items()]
        ratios.append(outlier_ratio(scores, config.owl_threshold))
        sizes.append(sum(s.numel() for s in scores))

    run_blockwise(model, calib_ids, measure, batch_size=batch_size, device=device, progress=progress, desc="OWL ratios")
    return owl_sparsities(ratios, config.sparsity, config.owl_lambda, weights=sizes)


def _check_layers(adapter, model, config):
    pattern = config.parsed_pattern
    prefix = adapter.blocks_prefix(model)
    for i, block in enumerate(adapter.blocks(model)):
        for name, mod in _prunable(adapter, block, config).items():
            check_nm_width(pattern, linear_weight(mod).shape[1], f"{prefix}.{i}.{name}")
    head = _lm_head(adapter, model, config)
    if head is not None:
        check_nm_width(pattern, linear_weight(head[1]).shape[1], head[0])
        if config.needs_calibration:
            adapter.final_norm(model)  # the head's calibration input: fail now, not after the blocks


def sparsify(model: nn.Module, config: PruneConfig, calib_ids: torch.Tensor | None = None, *,
             batch_size: int = 8, device: str | torch.device | None = None, progress: bool = True) -> SparsifyReport:
    """Prune `model` in place with `config`; returns what was done and the measured sparsity.

    calib_ids: LongTensor [n, seq_len] (see `sparselm.data.calibration`); needed by every
    method but magnitude. device: where each block is processed (default: the model's device;
    "cuda" streams blocks from CPU memory to the GPU one at a time).
    """
    if not isinstance(config, PruneConfig):
        raise SparselmError(f"config must be a sparselm pruning config (Magnitude, Wanda, SparseGPT); got {config!r}")
    adapter = get_adapter(model)
    _check_layers(adapter, model, config)
    pattern = config.parsed_pattern
    n_blocks = len(adapter.blocks(model))
    t0 = time.perf_counter()
    if config.needs_calibration and (calib_ids is None or calib_ids.ndim != 2 or calib_ids.numel() == 0):
        raise SparselmError(f"{config.name} needs calibration samples: a LongTensor [n, seq_len] from "
                            f"sparselm.data.calibration(...)")
    block_sparsity = [config.sparsity] * n_blocks
    if isinstance(config, Magnitude):
        _magnitude(adapter, model, config)
    else:
        if config.owl:
            block_sparsity = _owl_block_sparsities(model, config, calib_ids, batch_size, device, progress)

        needs_h = isinstance(config, SparseGPT) or config.refine > 0
        make = (lambda c, d: HessianAccumulator(c, d)) if needs_h else (lambda c, d: InputNormAccumulator(c, d))

        def prune_layer(mod: nn.Module, acc, s: float) -> None:
            dense = linear_weight(mod).float()
            if isinstance(config, SparseGPT):
                w, keep = sparsegpt_prune(dense, acc.hessian, s, pattern, config.blocksize, config.percdamp)
            else:
                w, keep = wanda_prune(dense, acc.sq_mean, s, pattern)
            if config.refine > 0:
                w = refine_kept_weights(w, dense, acc.hessian, keep, iters=config.refine)
            set_linear_weight(mod, w)

        def process(ctx: BlockContext):
            layers = _prunable(adapter, ctx.block, config)
            hooks = _StatHooks(layers, make, ctx.block)
            ctx.forward()
            hooks.remove()
            s = block_sparsity[ctx.index]
            for name, mod in layers.items():
                acc = hooks.acc.get(name)
                if acc is None:  # layer never called (e.g. a routed expert with no tokens): leave it dense
                    continue
                prune_layer(mod, acc, s)

        head = _lm_head(adapter, model, config)

        @torch.no_grad()
        def prune_head(outputs: list[torch.Tensor]) -> None:
            """The LM head, on the final norm of the pruned stack's outputs, at the mean sparsity."""
            norm, mod = adapter.final_norm(model), head[1]
            homes = [(m, next(m.parameters()).device) for m in (norm, mod) if any(True for _ in m.parameters())]
            on = outputs[0].device
            for m, _ in homes:
                m.to(on)
            acc = make(linear_weight(mod).shape[1], on)
            for out in outputs:
                acc.add(norm(out).to(linear_weight(mod).dtype))
            prune_layer(mod, acc, config.sparsity)
            for m, home in homes:
                m.to(home)

        run_blockwise(model, calib_ids, process, batch_size=batch_size, device=device, progress=progress,
                      desc=f"{config.name} {pattern if pattern.is_nm else f'{config.sparsity:.0%}'}",
                      after_last=prune_head if head is not None else None)
    seconds = time.perf_counter() - t0
    per_layer, overall = _measure(adapter, model, config)
    calib = {} if calib_ids is None or not config.needs_calibration else \
        {"samples": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1])}
    return SparsifyReport(config.name, str(pattern), config.effective_sparsity, overall, per_layer,
                          [config.effective_sparsity] * n_blocks if pattern.is_nm else block_sparsity,
                          seconds, calib, config.to_dict())


@torch.no_grad()
def _magnitude(adapter, model, config: Magnitude) -> None:
    pattern = config.parsed_pattern
    layers = [m for b in adapter.blocks(model) for m in _prunable(adapter, b, config).values()]
    head = _lm_head(adapter, model, config)
    if head is not None:
        layers.append(head[1])
    if config.scope == "global":
        thr = global_magnitude_threshold([linear_weight(m) for m in layers], config.sparsity)
        for m in layers:
            w = linear_weight(m)
            set_linear_weight(m, w * (w.abs() > thr))
        return
    for m in layers:
        w, _ = magnitude_prune(linear_weight(m), config.sparsity, pattern)
        set_linear_weight(m, w)
