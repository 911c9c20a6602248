"""Low-rank factorization: plain SVD, ASVD and whitened SVD (SVD-LLM), with rank allocation."""
from sparselm.lowrank.io import load_lowrank, save_lowrank
from sparselm.lowrank.linear import LowRankLinear
from sparselm.lowrank.model_factorization import LowRankReport, lowrank

__all__ = ["lowrank", "LowRankReport", "LowRankLinear", "save_lowrank", "load_lowrank"]
