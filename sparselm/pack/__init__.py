"""Packing: turn zeros in weights into smaller, faster layers (CPU formats, GPU 2:4) and
compressed checkpoints."""
from sparselm.pack.auto import PackReport, pack, packable_layers
from sparselm.pack.checkpoint import load_packed, save_packed, size_report
from sparselm.pack.semi_structured import to_semi_structured
from sparselm.pack.sparse_linear import SparseLinear

__all__ = ["PackReport", "SparseLinear", "load_packed", "pack", "packable_layers", "save_packed",
           "size_report", "to_semi_structured"]
