"""Weight quantization of seqlab models (issue 20, in progress): AQLM additive multi-codebook quantization, with
round-to-nearest and a GPTQ-style second-order method as baselines, calibrated on real activations.

What exists: the per-matrix quantizers (``quantize_aqlm``, ``quantize_rtn``, ``quantize_gptq``), the calibration
statistics of every linear map of a model (``linear_layers``, ``collect_input_moments``), the quantized linear
layer with its lookup-table decode path (``AQLMLinear``) and the code packing for storage (``pack_codes``).
Every weight format counts its exact storage with ``storage_bits()`` and ``bits_per_parameter()``.
``quantize_weights`` applies one method to every linear map of a model as simulated quantization (weights
replaced by their dequantized values, to measure quality). Not yet: models running on ``AQLMLinear``, quantized
checkpoints, ``seqlab quantize``."""

from seqlab.quant.aqlm import AQLMConfig, AQLMWeight, objective, quantize_aqlm
from seqlab.quant.calibrate import LinearTarget, Moments, collect_input_moments, linear_layers
from seqlab.quant.gptq import layer_error, quantize_gptq
from seqlab.quant.linear import AQLMLinear
from seqlab.quant.model import LayerReport, QuantReport, quantize_weights
from seqlab.quant.packing import pack_codes, packed_nbytes, unpack_codes
from seqlab.quant.rtn import ScalarQuantWeight, quantize_rtn

__all__ = [
    "AQLMConfig",
    "AQLMLinear",
    "AQLMWeight",
    "LayerReport",
    "LinearTarget",
    "Moments",
    "QuantReport",
    "ScalarQuantWeight",
    "collect_input_moments",
    "layer_error",
    "linear_layers",
    "objective",
    "pack_codes",
    "packed_nbytes",
    "quantize_aqlm",
    "quantize_gptq",
    "quantize_rtn",
    "quantize_weights",
    "unpack_codes",
]
