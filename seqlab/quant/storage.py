"""Quantized models in memory and on disk (issue 20): install ``AQLMLinear`` layers, write and read a quantized
checkpoint.

A model quantized by :func:`seqlab.quant.quantize_model` carries ``model.quantization``, a JSON-able layout::

    {"method": "aqlm", "config": "2x8g8", "full_precision_bits": 16,
     "layers": {"backbone.layers.0.mixer.in_proj": {"config": "2x8g8", "shape": [768, 192]}, ...}}

Each layer named there is either an ``nn.Linear`` of the built model (it becomes an ``AQLMLinear``) or an MoE
expert slice ``<moe>.gate_up[e]`` / ``<moe>.down[e]`` (its weight is the dequantized matrix: the experts are
stacked tensors run by one fused function, so they are stored compressed and dequantized in memory).

The file is an ordinary seqlab model file (``seqlab.checkpoint``: safetensors, format/version, checksum, the
model's fingerprint, config and adapter) with the layout under the metadata key ``"quantization"`` and, per
quantized layer ``L``:

- ``L.codes``: the codes packed as a uint8 bit stream (:func:`seqlab.quant.packing.pack_codes`, B bits each, C
  order of the (out, G, M) code tensor);
- ``L.codebooks`` (M, 2**B, g) and ``L.scales`` (out,), float16.

Tied parameters (a LanguageModel's LM head is its embedding table by default) are written once, the other names
listed under ``"tied"`` (alias -> name written). Every other tensor of the state dict is written at
``full_precision_bits`` (float16 by default: the quantizer
rounded them to fp16 values in memory first, so a save/load round trip is exact) except integer ones and stacked
MoE parameters all of whose experts are quantized (those are omitted, rebuilt from their experts). So the file
holds exactly the bits :class:`~seqlab.quant.QuantReport` counts, plus the unquantized parameters and the header.

:func:`load_quantized` rebuilds such a file into a freshly built full-precision model of the same config (what
``seqlab.checkpoint.load_model`` and hence ``model_from_checkpoint`` and the CLI do when the file has a
``"quantization"`` entry): it swaps the named layers, checks every tensor's name, shape and dtype, and loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from seqlab.errors import CorruptFileError
from seqlab.quant.aqlm import AQLMConfig, AQLMWeight
from seqlab.quant.linear import DEFAULT_LUT_MAX_ROWS, AQLMLinear
from seqlab.quant.packing import pack_codes, packed_nbytes, unpack_codes
from seqlab.safetensors_io import check_weight_names

#: version of the "quantization" metadata entry
QUANT_FORMAT = 1
_EXPERT = re.compile(r"^(?P<moe>.+)\.(?P<part>gate_up|down)\[(?P<e>\d+)\]$")
_PART_SUFFIXES = (".codes", ".codebooks", ".scales")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def install_layers(
    model: nn.Module, weights: dict[str, AQLMWeight], *, lut_max_rows: int = DEFAULT_LUT_MAX_ROWS
) -> None:
    """Put each quantized weight into ``model``: an ``nn.Linear`` named by a key becomes an ``AQLMLinear`` holding it
    (the bias kept, in the layer's dtype); an expert slice ``<moe>.gate_up[e]`` takes the dequantized matrix."""
    for name, q in weights.items():
        expert = _EXPERT.match(name)
        if expert:
            stacked = getattr(model.get_submodule(expert["moe"]), expert["part"])
            with torch.no_grad():
                stacked[int(expert["e"])].copy_(q.dequantize().to(stacked.dtype))
            continue
        parent, leaf = _parent(model, name)
        linear = getattr(parent, leaf)
        if isinstance(linear, AQLMLinear):
            raise CorruptFileError(f"{name} is already an AQLMLinear")
        if not isinstance(linear, nn.Linear):
            raise CorruptFileError(f"{name} is a {type(linear).__name__}, not an nn.Linear or an MoE expert")
        if tuple(linear.weight.shape) != (q.out_features, q.in_features):
            raise CorruptFileError(
                f"{name}: quantized weight is {q.out_features}x{q.in_features}, the model's layer is "
                f"{tuple(linear.weight.shape)}"
            )
        dtype = linear.weight.dtype
        layer = AQLMLinear.from_parts(
            q.codes,
            q.codebooks.to(device=linear.weight.device),
            q.scales.to(device=linear.weight.device),
            None if linear.bias is None else linear.bias.detach(),
            scale_layout=q.config.scales,
            lut_max_rows=lut_max_rows,
            dtype=dtype,
        )
        layer.train(linear.training)
        setattr(parent, leaf, layer)


def _rest_dtype(bits: int) -> torch.dtype:
    return torch.float16 if bits == 16 else torch.float32


def round_rest(model: nn.Module, full_precision_bits: int) -> None:
    """Round every floating-point parameter and buffer of ``model`` to the values it will have on disk (fp16 values
    for ``full_precision_bits`` 16; nothing to do for 32). Codebooks and scales are fp16 values already."""
    if full_precision_bits == 32:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))


def save_quantized(path: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> Path:
    """Write a model quantized by ``quantize_model`` (it has ``model.quantization``) as a quantized model file (the
    module docstring). ``extra``: more metadata, as in ``seqlab.checkpoint.save_model``."""
    from seqlab.checkpoint import FORMAT_VERSION, MODEL_FORMAT, model_meta
    from seqlab.safetensors_io import write_tensors

    layout = getattr(model, "quantization", None)
    if not layout:
        raise CorruptFileError("this model is not quantized (no model.quantization): use seqlab.checkpoint.save_model")
    rest = _rest_dtype(int(layout.get("full_precision_bits", 16)))
    tensors: dict[str, torch.Tensor] = {}
    skipped: set[str] = set()
    covered: dict[str, set[int]] = {}
    for name in layout["layers"]:
        expert = _EXPERT.match(name)
        if expert:
            covered.setdefault(f"{expert['moe']}.{expert['part']}", set()).add(int(expert["e"]))
            continue
        layer = model.get_submodule(name)
        if not isinstance(layer, AQLMLinear):
            raise CorruptFileError(f"model.quantization names {name}, which is a {type(layer).__name__}")
        tensors[f"{name}.codes"] = pack_codes(layer.codes.detach().cpu(), layer.codebook_bits)
        tensors[f"{name}.codebooks"] = layer.codebooks.detach().cpu().to(torch.float16)
        if layer.scale_layout == "row":
            tensors[f"{name}.scales"] = layer.scales.detach().cpu().to(torch.float16)
        else:
            skipped.add(f"{name}.scales")  # no scales: the layer's constant ones are not stored
    expert_parts = _expert_parts(model, layout)
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if name in tensors or name in skipped:  # an AQLMLinear's codes, codebooks, scales: written above
            continue
        if name in covered and len(covered[name]) == tensor.shape[0]:
            continue  # every expert is stored in its packed form
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.device)
        if tensor.numel() and key in first:  # a tied parameter (the LM head of the embedding): written once
            tied[name] = first[key]
            continue
        first[key] = name
        tensor = tensor.detach().cpu()
        tensors[name] = tensor.to(rest) if tensor.is_floating_point() else tensor.clone()
    for name, q in expert_parts.items():
        tensors[f"{name}.codes"] = pack_codes(q.codes, q.config.codebook_bits)
        tensors[f"{name}.codebooks"] = q.codebooks.to(torch.float16)
        if q.config.scales == "row":
            tensors[f"{name}.scales"] = q.scales.to(torch.float16)
    meta = model_meta(model)
    meta["quantization"] = {"format": QUANT_FORMAT, **layout, "tied": tied}
    meta.update(extra or {})
    return write_tensors(path, tensors, kind=MODEL_FORMAT, version=FORMAT_VERSION, meta=meta)


def _expert_parts(model: nn.Module, layout: dict) -> dict[str, AQLMWeight]:
    """The quantized MoE experts' parts, kept on the model by ``quantize_model`` (``model._aqlm_experts``)."""
    parts = getattr(model, "_aqlm_experts", {})
    missing = [n for n in layout["layers"] if _EXPERT.match(n) and n not in parts]
    if missing:
        raise CorruptFileError(f"the quantized parts of experts {missing[:3]} are not on the model")
    return parts


def _layer_config(path, name: str, entry) -> tuple[AQLMConfig, tuple[int, int]]:
    try:
        config = AQLMConfig.parse(entry["config"])
        out, inp = (int(v) for v in entry["shape"])
    except Exception as exc:  # noqa: BLE001 - any malformed entry is the file's fault
        raise CorruptFileError(f"{path}: quantization entry of {name} is malformed ({exc})") from None
    return config, (out, inp)


def _read_part(path, tensors: dict, name: str, config: AQLMConfig, shape: tuple[int, int]) -> AQLMWeight:
    """Unpack layer ``name``'s codes, codebooks and scales from the file's tensors, every size checked."""
    out, inp = shape
    if inp % config.group_size:
        raise CorruptFileError(f"{path}: {name}: group size {config.group_size} does not divide {inp}")
    groups, m = inp // config.group_size, config.num_codebooks
    want = {
        ".codes": ((packed_nbytes(out * groups * m, config.codebook_bits),), torch.uint8),
        ".codebooks": ((m, config.codebook_size, config.group_size), torch.float16),
    }
    if config.scales == "row":
        want[".scales"] = ((out,), torch.float16)
    elif name + ".scales" in tensors:
        raise CorruptFileError(f"{path}: {name} is stored without scales ({config.name}) but has {name}.scales")
    for suffix, (want_shape, dtype) in want.items():
        tensor = tensors.get(name + suffix)
        if tensor is None:
            raise CorruptFileError(f"{path}: the quantized layer {name} has no {name + suffix}")
        if tuple(tensor.shape) != want_shape or tensor.dtype != dtype:
            raise CorruptFileError(
                f"{path}: {name + suffix} is {tuple(tensor.shape)} {tensor.dtype}, expected {want_shape} {dtype}"
            )
    codes = unpack_codes(tensors[name + ".codes"], config.codebook_bits, (out, groups, m))
    scales = tensors[name + ".scales"].float() if config.scales == "row" else torch.ones(out)
    return AQLMWeight(codes, tensors[name + ".codebooks"].float(), scales, config)


def load_quantized(
    path: str | os.PathLike,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    *,
    lut_max_rows: int = DEFAULT_LUT_MAX_ROWS,
) -> dict:
    """Load a quantized model file's ``tensors`` and ``meta`` (already read and fingerprint-checked by
    ``seqlab.checkpoint.load_model``) into ``model``, a freshly built full-precision model of the recorded config:
    the quantized layers are swapped in, every other tensor is checked (name, shape) and loaded in the model's
    dtype. On any mismatch a ``CorruptFileError`` names the file and the tensor, and ``model`` is left as it was."""
    layout = meta.get("quantization")
    if not isinstance(layout, dict) or not isinstance(layout.get("layers"), dict):
        raise CorruptFileError(f"{path}: the quantization entry is not a JSON object with 'layers'")
    if layout.get("format") != QUANT_FORMAT:
        raise CorruptFileError(
            f"{path}: quantization format {layout.get('format')!r}; this seqlab reads format {QUANT_FORMAT}"
        )
    if getattr(model, "quantization", None):
        raise CorruptFileError(f"{path}: load a quantized file into a freshly built model, not a quantized one")
    weights: dict[str, AQLMWeight] = {}
    for name, entry in layout["layers"].items():
        config, shape = _layer_config(path, name, entry)
        expert = _EXPERT.match(name)
        try:
            if expert:
                stacked = getattr(model.get_submodule(expert["moe"]), expert["part"])
                have = tuple(stacked.shape[1:]) if int(expert["e"]) < stacked.shape[0] else None
            else:
                layer = model.get_submodule(name)
                have = tuple(layer.weight.shape) if isinstance(layer, nn.Linear) else None
        except AttributeError:
            have = None
        if have != shape:
            raise CorruptFileError(f"{path}: quantized layer {name} ({shape}) does not match the model ({have})")
        weights[name] = _read_part(path, tensors, name, config, shape)
    packed = {n + s for n in layout["layers"] for s in _PART_SUFFIXES}
    own = model.state_dict()
    linear_names = {n for n in layout["layers"] if not _EXPERT.match(n)}
    expected = {
        n
        for n in own
        if not (n.endswith(".weight") and n[: -len(".weight")] in linear_names)
        and not _all_experts_quantized(n, own[n], layout["layers"])
    }
    tied = layout.get("tied") or {}
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CorruptFileError(f"{path}: the quantization entry's 'tied' is not an object of names")
    for alias, primary in tied.items():
        if alias not in own or primary not in own or own[alias].shape != own[primary].shape:
            raise CorruptFileError(f"{path}: tied weights {alias} = {primary} do not match the model")
    expected -= set(tied)
    present = set(tensors) - packed
    check_weight_names(path, tensors, own, present, expected)
    for name in present:
        if tensors[name].is_floating_point() != own[name].is_floating_point():
            raise CorruptFileError(f"{path}: {name} has dtype {tensors[name].dtype}, the model's is {own[name].dtype}")
    # everything checked: now change the model
    with torch.no_grad():
        for name in present:
            own[name].copy_(tensors[name].to(own[name].dtype))
        for alias, primary in tied.items():  # one tensor already when the model ties them; else a copy
            own[alias].copy_(tensors[primary].to(own[alias].dtype))
    install_layers(model, weights, lut_max_rows=lut_max_rows)  # biases: loaded above into the nn.Linear, carried over
    model._aqlm_experts = {n: q for n, q in weights.items() if _EXPERT.match(n)}  # type: ignore[assignment]
    model.quantization = {k: v for k, v in layout.items() if k not in ("format", "tied")}  # type: ignore[assignment]
    return meta


#: fp32 bytes of the quantized layers' weights from which ``build_for_quantized`` builds on the meta device
LEAN_BUILD_MIN_BYTES = 256 << 20


def build_for_quantized(
    build: Callable[[], nn.Module], meta: dict, device=None, *, min_bytes: int = LEAN_BUILD_MIN_BYTES
) -> nn.Module:
    """A model to :func:`load_quantized` a file's ``meta`` into, built without the full-precision weights of the
    layers the file quantizes: ``build()`` runs under the meta device, each quantized ``nn.Linear``'s weight becomes
    a zero-stride placeholder of its shape (no memory; the layer is swapped for an ``AQLMLinear`` on load), and
    every other parameter and buffer is allocated empty on ``device`` (default CPU; tied parameters stay tied) to
    be filled by the load. So loading a quantized file never holds the fp32 model: the peak is the quantized one.

    Builds the plain way (``build()``, then moved to ``device``) when the quantized layers' fp32 weights would take
    less than ``min_bytes`` (256 MiB): the meta device's first use in a process imports parts of torch (sympy
    among them) that cost about 150 MiB of memory once (measured by ``bench/quant.py``), more than a small model's
    weights. Also when the model cannot be built on the meta device or has non-persistent buffers (values computed
    at construction, such as attention's rotary frequencies, that the file does not hold)."""
    target = torch.device(device) if device is not None else torch.device("cpu")
    saved = 0
    for name, entry in (meta.get("quantization") or {}).get("layers", {}).items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not _EXPERT.match(name) and isinstance(shape, list) and len(shape) == 2:
            saved += 4 * int(shape[0]) * int(shape[1])
    lean: nn.Module | None = None
    if saved >= min_bytes:
        try:
            with torch.device("meta"):
                lean = build()
        except Exception:  # noqa: BLE001 - a constructor that needs real tensors: build it the plain way
            lean = None
    if lean is None or any(m._non_persistent_buffers_set for m in lean.modules()):
        plain = build()
        return plain.to(device) if device is not None else plain
    model = lean
    for name in (meta.get("quantization") or {}).get("layers", {}):
        if _EXPERT.match(name):
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            continue  # load_quantized names the mismatch
        if isinstance(linear, nn.Linear):
            placeholder = torch.zeros((), dtype=linear.weight.dtype, device=target).expand(linear.weight.shape)
            linear.weight = nn.Parameter(placeholder, requires_grad=False)
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None or tensor.device.type != "meta":
                    continue
                if id(tensor) not in made:  # one new tensor per old one: tied parameters stay one parameter
                    empty = torch.empty_like(tensor, device=target)
                    made[id(tensor)] = (
                        nn.Parameter(empty, requires_grad=tensor.requires_grad)
                        if isinstance(tensor, nn.Parameter)
                        else empty
                    )
                table[key] = made[id(tensor)]  # type: ignore[assignment]
    return model


def _all_experts_quantized(name: str, tensor: torch.Tensor, layers: dict) -> bool:
    """Whether ``name`` is a stacked MoE parameter (``<moe>.gate_up`` / ``<moe>.down``) all of whose experts are in
    ``layers`` (then the file omits it)."""
    if not (name.endswith(".gate_up") or name.endswith(".down")) or tensor.dim() != 3:
        return False
    return all(f"{name}[{e}]" in layers for e in range(tensor.shape[0]))


__all__ = [
    "LEAN_BUILD_MIN_BYTES",
    "QUANT_FORMAT",
    "build_for_quantized",
    "install_layers",
    "load_quantized",
    "round_rest",
    "save_quantized",
]
