"""Sparse training: a mask manager (static, GMP, SET, RigL; uniform or ERK densities;
optional N:M), usable from a plain loop, a `transformers.Trainer` callback, or DDP.

Import the heavy pieces from their modules; this package only re-exports the main names.
"""
from sparselm.training.config import METHODS, SparseTrainingConfig
from sparselm.training.densities import erk_densities, layer_densities, uniform_densities
from sparselm.training.mask_manager import MaskManager

__all__ = ["METHODS", "MaskManager", "SparseTrainingConfig", "erk_densities", "layer_densities",
           "uniform_densities"]
