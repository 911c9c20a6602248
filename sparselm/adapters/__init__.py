"""Model adapters: where the decoder blocks, attention and MLP projections of a family are.

Engines never assume `model.model.layers`; they ask the adapter found by `config.model_type`.
"""
from sparselm.adapters.base import (ModelAdapter, SUPPORTED_FAMILIES, get_adapter, linear_weight,
                                    set_linear_weight)

__all__ = ["ModelAdapter", "SUPPORTED_FAMILIES", "get_adapter", "linear_weight", "set_linear_weight"]
