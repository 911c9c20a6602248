"""sparselm: make transformer language models sparse, and measure what it buys.

    import sparselm as sl
    model, tok = sl.load("path/to/hf-model")          # or a built-in name: "tiny", "small"
    calib = sl.data.calibration(tok, "stdlib", n=128, seq_len=512)
    report = sl.sparsify(model, sl.SparseGPT(sparsity=0.5, pattern="2:4"), calib)
    print(sl.evaluate(model, tok).table())
    sl.save(model, tok, "out/")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names -> the module that defines them; imported on first use so that
# `import sparselm` stays cheap and one subsystem's import error cannot break another's.
_EXPORTS = {
    "load": "sparselm.io", "save": "sparselm.io",
    "sparsify": "sparselm.prune", "Magnitude": "sparselm.prune", "Wanda": "sparselm.prune",
    "SparseGPT": "sparselm.prune", "SparsifyReport": "sparselm.prune",
    "evaluate": "sparselm.evaluate", "perplexity": "sparselm.evaluate",
    "SparselmError": "sparselm.errors",
    "load_builtin": "sparselm.zoo",
    # sparse execution
    "pack": "sparselm.pack", "SparseLinear": "sparselm.pack", "PackReport": "sparselm.pack",
    "save_packed": "sparselm.pack", "load_packed": "sparselm.pack", "to_semi_structured": "sparselm.pack",
    # sparse attention patterns (sl.attention.apply patches a model)
    "SlidingWindow": "sparselm.attention", "Sinks": "sparselm.attention", "GlobalTokens": "sparselm.attention",
    "DilatedWindow": "sparselm.attention", "Strided": "sparselm.attention", "Fixed": "sparselm.attention",
    "RandomBlocks": "sparselm.attention", "BlockSparse": "sparselm.attention", "Causal": "sparselm.attention",
    # sparse + quantized weights
    "quantize": "sparselm.quant", "RTN": "sparselm.quant", "GPTQ": "sparselm.quant", "SparseGPTQ": "sparselm.quant",
    "save_quantized": "sparselm.quant", "load_quantized": "sparselm.quant",
    # sparse training and activation sparsity
    "MaskManager": "sparselm.training", "SparseTrainingConfig": "sparselm.training",
    "calibrate_thresholds": "sparselm.activation", "install_thresholds": "sparselm.activation",
    "measure_activations": "sparselm.activation", "relufy": "sparselm.activation",
    "ActivationSparseLinear": "sparselm.activation",
    # structured pruning and low rank (sl.lowrank is the function; its package is sparselm.lowrank)
    "shrink": "sparselm.structured", "ShrinkReport": "sparselm.structured", "load_structured": "sparselm.structured",
    "lowrank": "sparselm.lowrank", "LowRankReport": "sparselm.lowrank", "LowRankLinear": "sparselm.lowrank",
    "save_lowrank": "sparselm.lowrank", "load_lowrank": "sparselm.lowrank",
    # mixture of experts
    "MoEConfig": "sparselm.moe", "MoELayer": "sparselm.moe", "upcycle": "sparselm.moe",
    "prune_experts": "sparselm.moe", "save_moe": "sparselm.moe", "load_moe": "sparselm.moe",
}
_SUBMODULES = {"data", "prune", "zoo", "adapters", "engine", "evaluate", "io", "attention", "pack", "kernels", "moe",
               "bench", "quant", "training", "activation", "structured"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"sparselm.{name}")
    raise AttributeError(f"module 'sparselm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
