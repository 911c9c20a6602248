"""Activation sparsity: measurement, TEAL-style thresholds, ReLU-fication, and a linear
layer that skips the weight rows of zero inputs at decode."""
from sparselm.activation.install import install_thresholds
from sparselm.activation.measure import measure_activations
from sparselm.activation.relufy import relufy, relufy_and_finetune
from sparselm.activation.sparse_linear import ActivationSparseLinear
from sparselm.activation.thresholds import calibrate_thresholds, collect_projection_inputs

__all__ = ["ActivationSparseLinear", "calibrate_thresholds", "collect_projection_inputs", "install_thresholds",
           "measure_activations", "relufy", "relufy_and_finetune"]
