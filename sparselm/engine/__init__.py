"""Engines that walk a model: the block-by-block calibration engine."""
from sparselm.engine.calibration import BlockContext, StopBlock, capture_block_inputs, run_blockwise

__all__ = ["BlockContext", "StopBlock", "capture_block_inputs", "run_blockwise"]
