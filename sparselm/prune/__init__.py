"""Post-training weight pruning: magnitude, Wanda, SparseGPT; unstructured and N:M; OWL."""
from sparselm.prune.config import METHODS, Magnitude, PruneConfig, SparseGPT, Wanda, make_config
from sparselm.prune.masks import Pattern, is_valid_nm, nm_mask, parse_pattern, row_mask
from sparselm.prune.sparsify import SparsifyReport, sparsify

__all__ = ["METHODS", "Magnitude", "PruneConfig", "SparseGPT", "Wanda", "make_config", "Pattern", "is_valid_nm",
           "nm_mask", "parse_pattern", "row_mask", "SparsifyReport", "sparsify"]
