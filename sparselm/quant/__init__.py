"""Weight-only quantization (int8 / int4, group-wise), GPTQ, joint sparse + quantized
SparseGPT, and packed sparse + quantized storage."""
from sparselm.quant.checkpoint import bytes_per_parameter, load_quantized, pack_quantized, save_quantized
from sparselm.quant.config import GPTQ, METHODS, RTN, QuantConfig, SparseGPTQ, make_quant_config
from sparselm.quant.gptq import gptq_quantize, layer_output_error, sparse_gptq
from sparselm.quant.groupwise import GroupColumnQuantizer, QuantizedWeight, quantize_rtn, sqnr_db
from sparselm.quant.packed import QuantSparseLinear
from sparselm.quant.quantize import QuantizeReport, quantize

__all__ = ["bytes_per_parameter", "load_quantized", "pack_quantized", "save_quantized", "GPTQ", "METHODS", "RTN",
           "QuantConfig", "SparseGPTQ", "make_quant_config", "gptq_quantize", "layer_output_error", "sparse_gptq",
           "GroupColumnQuantizer", "QuantizedWeight", "quantize_rtn", "sqnr_db", "QuantSparseLinear",
           "QuantizeReport", "quantize"]
