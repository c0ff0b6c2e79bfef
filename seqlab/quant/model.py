"""Quantize every linear map of a model with one method and measure what it cost (issue 20, in progress).

``quantize_weights(model, windows, method)`` is *simulated* quantization: each target's weight (``linear_layers``)
is quantized with RTN, GPTQ or AQLM, and the model's weight is replaced by the dequantized matrix W_hat (the values
the quantized model computes with). The model keeps its fp32 modules, so every part of seqlab (generation,
evaluation, the state contract) runs on it unchanged; it is how the quality of a method at a bit budget is
measured. Storing and running the quantized form (``AQLMLinear``, packed codes in a checkpoint) is the next step.

All layers are calibrated once on the full-precision model (``collect_input_moments``), then quantized
independently; GPTQ's paper quantizes layer by layer with inputs re-collected from the already-quantized layers
before, which is not done here. The model's weights are replaced only after every layer has been quantized, so a
failure (a bad setting, an interrupt) leaves the model as it was.

With ``layers=None`` (every linear map) or a name filter, a layer whose input width the group size does not
divide stays at full precision (e.g. a Mamba ``dt_proj`` with a dt rank of 12 under groups of 8); the report lists
it and counts its parameters at ``full_precision_bits``. Layers named one by one must all be divisible (else a
ConfigError names them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.quant.aqlm import AQLMConfig, AQLMWeight, quantize_aqlm
from seqlab.quant.calibrate import LinearTarget, collect_input_moments, linear_layers, select_targets
from seqlab.quant.gptq import layer_error, quantize_gptq
from seqlab.quant.linear import DEFAULT_LUT_MAX_ROWS
from seqlab.quant.rtn import ScalarQuantWeight, quantize_rtn

METHODS = ("rtn", "gptq", "aqlm")


@dataclass
class LayerReport:
    """One target: ``bits`` its exact storage (None when ``skipped``), ``error`` the calibration objective
    trace((W - W_hat) XtX (W - W_hat)^T) (None without calibration data), ``skipped`` why it stayed in full
    precision (None when quantized)."""

    name: str
    shape: tuple[int, int]
    bits: int | None
    error: float | None = None
    skipped: str | None = None

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantReport:
    """What ``quantize_weights`` did, layer by layer."""

    method: str
    setting: str
    layers: list[LayerReport] = field(default_factory=list)
    full_precision_bits: int = 16

    def total_bits(self) -> int:
        """Storage of every target: quantized layers exactly, skipped ones at ``full_precision_bits`` each."""
        return sum(r.bits if r.bits is not None else r.params * self.full_precision_bits for r in self.layers)

    def bits_per_parameter(self) -> float:
        params = sum(r.params for r in self.layers)
        return self.total_bits() / params if params else 0.0

    def table(self) -> str:
        """A markdown table: one row per layer, then the total."""
        rows = ["| layer | shape | bits/param | calibration error |", "|---|---|---|---|"]
        for r in self.layers:
            bpp = f"{r.bits / r.params:.3f}" if r.bits is not None else f"{self.full_precision_bits} ({r.skipped})"
            error = "-" if r.error is None else f"{r.error:.4g}"
            rows.append(f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {bpp} | {error} |")
        rows.append(f"| total ({self.method} {self.setting}) | | {self.bits_per_parameter():.3f} | |")
        return "\n".join(rows)


def _quantize_targets(
    model: nn.Module,
    windows: Iterable[torch.Tensor] | None,
    method: str,
    *,
    bits: int | None,
    group_size: int,
    config: AQLMConfig | str | None,
    layers,
    head: bool,
    seed: int,
    full_precision_bits: int,
    aqlm_options: dict | None,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[QuantReport, list[tuple[LinearTarget, ScalarQuantWeight | AQLMWeight, torch.Tensor]]]:
    """Quantize every selected target without touching the model: the report, and per quantized target
    (target, quantized weight, W_hat in the weight's dtype)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in ("rtn", "gptq"):
        if bits is None:
            raise ConfigError(f"method {method!r} needs bits (2..8)")
        if config is not None:
            raise ConfigError(f"config is an AQLM setting; method {method!r} takes bits and group_size")
        setting = f"{bits}-bit g{group_size}"
        width = group_size
    else:
        if bits is not None:
            raise ConfigError("method 'aqlm' takes config (e.g. '2x8g8'), not bits")
        aqlm = AQLMConfig.parse(config) if isinstance(config, str) else (config or AQLMConfig())
        if not isinstance(aqlm, AQLMConfig):
            raise ConfigError(f"config must be an AQLMConfig or a name like '2x8g8', got {type(config).__name__}")
        setting = aqlm.name
        width = aqlm.group_size
    if isinstance(full_precision_bits, bool) or full_precision_bits not in (16, 32):
        raise ConfigError(f"full_precision_bits must be 16 or 32, got {full_precision_bits!r}")
    if windows is None and method != "rtn":
        raise InputError(f"method {method!r} is calibrated: pass calibration windows (token id tensors)")

    targets = select_targets(model, layers)  # unknown names refused
    if head and not any(t.name == "lm_head" for t in targets):
        targets += [t for t in linear_layers(model, head=True) if t.name == "lm_head"]
    if layers is not None and not callable(layers):  # layers named one by one must all be quantizable
        bad = [f"{t.name} ({t.in_features} inputs)" for t in targets if t.in_features % width]
        if bad:
            raise ConfigError(f"group size {width} does not divide the input width of {', '.join(bad)}")
    names = [t.name for t in targets]
    moments = collect_input_moments(model, windows, layers=names) if windows is not None else {}
    report = QuantReport(method, setting, full_precision_bits=full_precision_bits)
    done_list: list[tuple[LinearTarget, ScalarQuantWeight | AQLMWeight, torch.Tensor]] = []
    # AQLM trains its codebooks with autograd, so the loop runs with gradients enabled (weights detached)
    for done, target in enumerate(targets, start=1):
        weight = target.weight
        out_features, in_features = weight.shape
        shape = (int(out_features), int(in_features))
        if in_features % width:
            why = f"group size {width} does not divide {in_features}"
            report.layers.append(LayerReport(target.name, shape, None, skipped=why))
        else:
            w = weight.detach().float()
            xtx = moments[target.name].xtx if target.name in moments else None
            q: ScalarQuantWeight | AQLMWeight
            if method == "rtn":
                q = quantize_rtn(w, bits, group_size)  # type: ignore[arg-type]
            elif method == "gptq":
                assert xtx is not None
                q = quantize_gptq(w, xtx, bits, group_size)  # type: ignore[arg-type]
            else:
                q = quantize_aqlm(w, xtx, aqlm, seed=seed, **(aqlm_options or {}))
            w_hat = q.dequantize().detach().to(weight.dtype)
            error = float(layer_error(w, w_hat.float(), xtx)) if xtx is not None else None
            report.layers.append(LayerReport(target.name, shape, q.storage_bits(), error))
            done_list.append((target, q, w_hat))
        if progress is not None:
            progress(target.name, done, len(targets))
    return report, done_list


def quantize_weights(
    model: nn.Module,
    windows: Iterable[torch.Tensor] | None,
    method: str,
    *,
    bits: int | None = None,
    group_size: int = 64,
    config: AQLMConfig | str | None = None,
    layers=None,
    head: bool = False,
    seed: int = 0,
    full_precision_bits: int = 16,
    aqlm_options: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantReport:
    """Replace every target weight of ``model`` by its quantized-then-dequantized value; return the report.

    ``method``: ``"rtn"`` or ``"gptq"`` (``bits`` 2..8 with per-group scales of ``group_size``) or ``"aqlm"``
    (``config``: an ``AQLMConfig`` or its name such as ``"2x8g8"``; ``aqlm_options`` go to ``quantize_aqlm``).
    ``windows``: calibration token windows (``collect_input_moments``); required by GPTQ and AQLM, optional for RTN
    (then used only to report the calibration error). ``layers``: as in ``collect_input_moments``; ``head=True``
    adds the LM head (``lm_head``; with a tied embedding the embedding table keeps its own full-precision weight).
    ``progress(name, done, total)`` after each layer. A LASER'd model (``model.low_rank``) is refused, as by
    :func:`quantize_model`: ``seqlab.posttrain.laser.densify`` it first."""
    _refuse_low_rank(model)
    report, done = _quantize_targets(
        model, windows, method, bits=bits, group_size=group_size, config=config, layers=layers, head=head, seed=seed,
        full_precision_bits=full_precision_bits, aqlm_options=aqlm_options, progress=progress,
    )  # fmt: skip
    with torch.no_grad():  # only now: a failure above leaves the model as it was
        for target, _, w_hat in done:
            target.weight.copy_(w_hat)
    return report


def quantize_model(
    model: nn.Module,
    windows: Iterable[torch.Tensor],
    config: AQLMConfig | str = "2x8g8",
    *,
    layers=None,
    head: bool = False,
    seed: int = 0,
    full_precision_bits: int = 16,
    aqlm_options: dict | None = None,
    lut_max_rows: int = DEFAULT_LUT_MAX_ROWS,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantReport:
    """Quantize ``model`` with AQLM **in place, for real**: every selected ``nn.Linear`` becomes an ``AQLMLinear``
    (codes, fp16-valued codebooks and scales; the lookup table for decode), each selected MoE expert slice takes its
    dequantized value (experts are stacked tensors run by one fused function; they are stored compressed and
    dequantized in memory), and every other floating-point parameter and buffer is rounded to
    ``full_precision_bits`` (16: fp16 values, as a quantized checkpoint stores them; the tensors keep their dtype).
    Biases of quantized layers are rounded to fp16 as well. The model records ``model.quantization`` (the layout
    :func:`seqlab.quant.storage.save_quantized` writes; ``seqlab.checkpoint.save_model`` uses it).

    ``windows``: calibration token windows (``collect_input_moments``). ``layers``, ``seed``, ``aqlm_options``,
    ``progress``: as in :func:`quantize_weights`. Layers whose input width the group size does not divide stay
    ``nn.Linear`` (at ``full_precision_bits``). Nothing in the model changes until every layer is quantized.
    Returns the report (exact bits of every target).

    A LASER'd model (``model.low_rank``, ``seqlab.posttrain.laser``) is refused (ConfigError):
    ``seqlab.posttrain.laser.densify(model)`` first turns it into a dense model with the same outputs, whose
    layout it recorded (``model.laser_densified``) is then kept as ``model.quantization["laser"]``, which the
    quantized model file stores. LASER's quality carries over, its parameter saving does not."""
    from seqlab.quant.storage import install_layers, round_rest

    if getattr(model, "quantization", None):
        raise ConfigError("this model is already quantized (model.quantization is set); start from the fp model")
    _refuse_low_rank(model)
    report, done = _quantize_targets(
        model, windows, "aqlm", bits=None, group_size=64, config=config, layers=layers, head=head, seed=seed,
        full_precision_bits=full_precision_bits, aqlm_options=aqlm_options, progress=progress,
    )  # fmt: skip
    weights = {target.name: q for target, q, _ in done if isinstance(q, AQLMWeight)}
    assert len(weights) == len(done)
    round_rest(model, full_precision_bits)  # first: the experts' dequantized values below are stored exactly
    install_layers(model, weights, lut_max_rows=lut_max_rows)
    model._aqlm_experts = {n: q for n, q in weights.items() if "[" in n}  # type: ignore[assignment]
    layout: dict = {
        "method": "aqlm",
        "config": report.setting,
        "full_precision_bits": full_precision_bits,
        "layers": {
            name: {"config": q.config.name, "shape": [q.out_features, q.in_features]} for name, q in weights.items()
        },
    }
    laser = getattr(model, "laser_densified", None)  # seqlab.posttrain.laser.densify's provenance: kept in the file
    if laser:
        layout["laser"] = json.loads(json.dumps(laser))
    model.quantization = layout  # type: ignore[assignment]
    return report


def _refuse_low_rank(model: nn.Module) -> None:
    """ConfigError for a LASER'd model (``model.low_rank``, ``seqlab.posttrain.laser``): its ``LowRankLinear``
    layers are no quantization targets and its reduced experts' factors would not follow their quantized slices."""
    if getattr(model, "low_rank", None):
        raise ConfigError(
            "this model has low-rank (LASER) layers (model.low_rank is set), which AQLM does not quantize: call "
            "seqlab.posttrain.laser.densify(model) first: it keeps LASER's weights (its quality) but not its "
            "parameter saving, since AQLM stores every weight at 2-3 bits"
        )
