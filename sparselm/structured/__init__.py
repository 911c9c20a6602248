"""Structured pruning: remove MLP neurons, attention heads (GQA-aware) and whole layers."""
from sparselm.structured.heal import distillation_loss, heal
from sparselm.structured.per_layer import load_structured
from sparselm.structured.shrink import ShrinkReport, shrink

__all__ = ["shrink", "ShrinkReport", "heal", "distillation_loss", "load_structured"]
