"""`quantize(model, config, calib_ids)`: quantize every linear layer of the decoder blocks.

The dequantized weights are written back into the layers (so every evaluation tool works on
the result unchanged), and each layer remembers its integer codes and group parameters in the
attribute `sparselm_quant` (a `QuantizedWeight`), from which `pack_quantized` builds the
packed `QuantSparseLinear` layers. The embedding and the LM head stay as they are.

Calibrated methods (GPTQ, SparseGPTQ) run through the sequential engine: block i is
calibrated on the outputs of the already-quantized blocks before it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparselm.adapters import get_adapter, linear_weight, set_linear_weight
from sparselm.engine.calibration import BlockContext, run_blockwise
from sparselm.errors import SparselmError
from sparselm.prune.masks import check_nm_width
from sparselm.prune.statistics import HessianAccumulator
from sparselm.quant.config import GPTQ, RTN, QuantConfig, SparseGPTQ
from sparselm.quant.gptq import gptq_quantize, sparse_gptq
from sparselm.quant.groupwise import QuantizedWeight, quantize_rtn, sqnr_db

QUANT_ATTR = "sparselm_quant"


@dataclass
class QuantizeReport:
    method: str
    label: str
    layers: int
    sparsity: float  # fraction of exact zeros over the quantized layers
    mean_sqnr_db: float  # of the quantized weights against the weights before this pass
    seconds: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def quantizable_layers(model: nn.Module, config: QuantConfig | None = None) -> dict[str, nn.Module]:
    """Full name -> linear module for every linear layer of the decoder blocks (minus `ignore`)."""
    adapter = get_adapter(model)
    prefix = adapter.blocks_prefix(model)
    ignore = config.ignore if config is not None else ()
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(adapter.blocks(model))
            for n, m in adapter.linear_layers(b).items() if not any(s in n for s in ignore)}


class _HessianHooks:
    """One Hessian per distinct input tensor: q/k/v (and gate/up) read the same activations."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.acc: dict[str, HessianAccumulator] = {}
        self._owner: set[str] = set()  # the layer that feeds a shared accumulator
        self._first_reader: dict[tuple, str] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def fn(module, args, output):
            x = args[0]
            if name not in self.acc:  # sharing is decided on the first batch
                key = (x.data_ptr(), tuple(x.shape))
                first = self._first_reader.get(key)
                if first is not None:
                    self.acc[name] = self.acc[first]
                else:
                    self.acc[name] = HessianAccumulator(x.shape[-1], x.device)
                    self._owner.add(name)
                    self._first_reader[key] = name
            if name in self._owner:
                self.acc[name].add(x.detach())
        return fn

    def remove(self):
        for h in self._handles:
            h.remove()


def _quantize_layer(weight: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None) -> QuantizedWeight:
    if isinstance(config, SparseGPTQ):
        return sparse_gptq(weight, hessian, config.sparsity, config.parsed_pattern, config.bits, config.group_size,
                           config.symmetric, config.blocksize, config.percdamp)
    if isinstance(config, GPTQ):
        return gptq_quantize(weight, hessian, config.bits, config.group_size, config.symmetric, config.blocksize,
                             config.percdamp)
    return quantize_rtn(weight, config.bits, config.group_size, config.symmetric)


def _apply(module: nn.Module, qw: QuantizedWeight) -> float:
    before = linear_weight(module).float().clone()
    set_linear_weight(module, qw.dequantize())
    qw.codes, qw.scales, qw.zeros = qw.codes.cpu(), qw.scales.cpu(), qw.zeros.cpu()
    qw.keep = None if qw.keep is None else qw.keep.cpu()
    setattr(module, QUANT_ATTR, qw)
    return sqnr_db(before, linear_weight(module).float())


def quantize(model: nn.Module, config: QuantConfig, calib_ids: torch.Tensor | None = None, *, batch_size: int = 8,
             device: str | torch.device | None = None, progress: bool = True) -> QuantizeReport:
    """Quantize `model` in place with `config` (RTN, GPTQ or SparseGPTQ); see the module doc.

    calib_ids: LongTensor [n, seq_len] (from `sparselm.data.calibration`), needed by GPTQ and
    SparseGPTQ. Guarantees: each quantized layer's weight equals `layer.sparselm_quant.dequantize()`
    cast to the layer's dtype; with SparseGPTQ the pruned weights are exactly zero.
    """
    if not isinstance(config, QuantConfig):
        raise SparselmError(f"config must be a sparselm quantization config (RTN, GPTQ, SparseGPTQ); got {config!r}")
    if config.needs_calibration and (calib_ids is None or calib_ids.ndim != 2 or calib_ids.numel() == 0):
        raise SparselmError(f"{config.name} needs calibration samples: a LongTensor [n, seq_len] from "
                            f"sparselm.data.calibration(...)")
    layers = quantizable_layers(model, config)
    if isinstance(config, SparseGPTQ):
        for name, mod in layers.items():
            check_nm_width(config.parsed_pattern, linear_weight(mod).shape[1], name)
    adapter = get_adapter(model)
    t0 = time.perf_counter()
    sqnrs: list[float] = []
    if isinstance(config, RTN):
        for mod in layers.values():
            sqnrs.append(_apply(mod, _quantize_layer(linear_weight(mod), config, None)))
    else:
        def process(ctx: BlockContext):
            block_layers = {n: m for n, m in adapter.linear_layers(ctx.block).items()
                            if not any(s in n for s in config.ignore)}
            hooks = _HessianHooks(block_layers)
            ctx.forward()
            hooks.remove()
            for name, mod in block_layers.items():
                if name not in hooks.acc:  # never called (e.g. an expert no token reached): left as is
                    continue
                qw = _quantize_layer(linear_weight(mod).float(), config, hooks.acc[name].hessian)
                sqnrs.append(_apply(mod, qw))

        run_blockwise(model, calib_ids, process, batch_size=batch_size, device=device, progress=progress,
                      desc=config.label)
    zeros = sum(int((linear_weight(m) == 0).sum()) for m in layers.values())
    total = sum(linear_weight(m).numel() for m in layers.values())
    finite = [s for s in sqnrs if s != float("inf")]
    return QuantizeReport(config.name, config.label, len(sqnrs), zeros / max(1, total),
                          sum(finite) / max(1, len(finite)), time.perf_counter() - t0, config.to_dict())
