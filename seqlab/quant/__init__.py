"""Weight quantization of seqlab models (issue 20): AQLM additive multi-codebook quantization, with
round-to-nearest and a GPTQ-style second-order method as baselines, calibrated on real activations.

- per matrix: ``quantize_aqlm``, ``quantize_rtn``, ``quantize_gptq``; every format counts its exact storage
  (``storage_bits()``, ``bits_per_parameter()``);
- calibration: ``linear_layers`` (the targets of every block kind), ``collect_input_moments`` (X^T X streamed with
  the state threaded), and ``seqlab.pipelines.calibration.calibration_windows`` (from files or a store, the
  adapter checked);
- whole models: ``quantize_weights`` (simulated: weights replaced by their dequantized values, to measure quality
  of any method) and ``quantize_model`` (AQLM for real: ``AQLMLinear`` layers with a lookup-table decode path);
  ``finetune_quantized`` (KL to the full-precision model, codebooks, scales and norms trained);
- storage: ``save_quantized``/``load_quantized`` (packed codes, fp16 codebooks and scales), used by
  ``seqlab.checkpoint.save_model``/``load_model`` and hence ``model_from_checkpoint`` and the CLI
  (``seqlab quantize``). See docs/quantization.md."""

from seqlab.quant.aqlm import AQLMConfig, AQLMWeight, objective, quantize_aqlm
from seqlab.quant.calibrate import LinearTarget, Moments, collect_input_moments, linear_layers
from seqlab.quant.finetune import FinetuneReport, finetune_quantized
from seqlab.quant.gptq import layer_error, quantize_gptq
from seqlab.quant.linear import AQLMLinear
from seqlab.quant.model import LayerReport, QuantReport, quantize_model, quantize_weights
from seqlab.quant.packing import pack_codes, packed_nbytes, unpack_codes
from seqlab.quant.rtn import ScalarQuantWeight, quantize_rtn
from seqlab.quant.storage import load_quantized, save_quantized

__all__ = [
    "AQLMConfig",
    "AQLMLinear",
    "AQLMWeight",
    "FinetuneReport",
    "LayerReport",
    "LinearTarget",
    "Moments",
    "QuantReport",
    "ScalarQuantWeight",
    "collect_input_moments",
    "finetune_quantized",
    "layer_error",
    "linear_layers",
    "load_quantized",
    "objective",
    "pack_codes",
    "packed_nbytes",
    "quantize_aqlm",
    "quantize_gptq",
    "quantize_model",
    "quantize_rtn",
    "quantize_weights",
    "save_quantized",
    "unpack_codes",
]
