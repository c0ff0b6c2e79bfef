"""Round-to-nearest (RTN) scalar quantization with per-group asymmetric scales: the simplest baseline of issue 20.

Each row of a weight matrix (out, in) is cut into groups of ``group_size`` consecutive input columns. A group gets
an fp16 ``zero`` (the value code 0 stands for: the group's minimum, rounded down to fp16) and an fp16 ``scale``
(the step between codes: (max - zero) / (2^bits - 1), rounded up to fp16), so the codes 0 .. 2^bits - 1 cover the
group's whole [min, max] range and every weight is within half a step of its dequantized value. Scales and zeros
are rounded to fp16 *before* the codes are chosen, so what is stored (and counted by ``storage_bits``) is exactly
what dequantizes.

``ScalarQuantWeight`` is the shared result type of ``quantize_rtn`` and ``seqlab.quant.gptq.quantize_gptq``: both
put weights on the same grid and dequantize the same way, so a comparison of the two measures only how the codes
were chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqlab.errors import ConfigError, InputError

#: code widths the scalar quantizers accept (codes are stored one per uint8, so 8 is the widest)
MIN_BITS, MAX_BITS = 2, 8
#: bits of one stored scale and one stored zero (both fp16)
SCALE_BITS = 16
ZERO_BITS = 16

_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP16_TINY = float(torch.finfo(torch.float16).smallest_normal)


@dataclass(eq=False)
class ScalarQuantWeight:
    """A weight (out, in) stored as integer codes on a per-group affine grid.

    ``q``: uint8 codes (out, in), each in [0, 2^bits). ``scales`` and ``zeros``: fp16 (out, in // group_size), one
    per (row, group of ``group_size`` consecutive columns); column j of row r dequantizes to
    ``zeros[r, j // group_size] + scales[r, j // group_size] * q[r, j]``. ``bits``: the code width (2..8).

    Note: ``bits`` is the code width; the exact storage size is ``storage_bits()`` (a field and a method cannot
    share the name ``bits``).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.q.dim() != 2:
            raise InputError(f"ScalarQuantWeight.q must be 2-D (out, in), got shape {tuple(self.q.shape)}")
        out_features, in_features = self.q.shape
        check_group_size(self.group_size, in_features)
        groups = (out_features, in_features // self.group_size)
        for name in ("scales", "zeros"):
            value = getattr(self, name)
            if tuple(value.shape) != groups or value.dtype != torch.float16:
                raise InputError(
                    f"ScalarQuantWeight.{name} must be float16 of shape {groups}, got {value.dtype} "
                    f"{tuple(value.shape)}"
                )
        if self.q.dtype.is_floating_point or self.q.dtype == torch.bool:
            raise InputError(f"ScalarQuantWeight.q must hold integer codes, got {self.q.dtype}")
        if self.q.numel() and not 0 <= int(self.q.min()) <= int(self.q.max()) < 2**self.bits:
            raise InputError(
                f"ScalarQuantWeight.q has codes in [{int(self.q.min())}, {int(self.q.max())}], outside "
                f"[0, {2**self.bits}) for {self.bits} bits"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this stands for."""
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the codes stand for: zero + scale * code, per group."""
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return zeros + scales * self.q.float()

    def storage_bits(self) -> int:
        """Exact bits to store this weight: ``bits`` per code (out * in codes, bit-packed, no padding counted) plus
        one fp16 scale and one fp16 zero per (row, group). Nothing else is counted (no shape header, no bias: a
        layer's bias stays full precision and is accounted by whoever stores the layer)."""
        out_features, in_features = self.shape
        groups = out_features * (in_features // self.group_size)
        return self.bits * out_features * in_features + (SCALE_BITS + ZERO_BITS) * groups

    def bits_per_parameter(self) -> float:
        """``storage_bits()`` / (out * in): e.g. 4 bits with groups of 128 give 4 + 32/128 = 4.25."""
        out_features, in_features = self.shape
        return self.storage_bits() / (out_features * in_features)


def check_bits(bits: int) -> None:
    """ConfigError unless ``bits`` is an int in [MIN_BITS, MAX_BITS]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def check_group_size(group_size: int, in_features: int) -> None:
    """ConfigError unless ``group_size`` is a positive int dividing ``in_features``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ConfigError(f"group_size must be a positive int, got {group_size!r}")
    if in_features % group_size:
        raise ConfigError(f"group_size {group_size} does not divide the layer's in_features {in_features}")


def check_weight(weight: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """The weight as float64 after checking it is a finite 2-D floating tensor with no empty dimension."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(f"{what} must be a floating-point torch.Tensor (out, in), got {kind}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty 2-D tensor (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    bad = ~torch.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise InputError(f"{what} has a non-finite value {w[r, c].item()} at [{r}, {c}]")
    if w.abs().max().item() > _FP16_MAX / 2:
        raise InputError(f"{what} has values of magnitude {w.abs().max().item():.3g}, beyond fp16 scales and zeros")
    return w


def group_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) per row of ``w`` (rows, g) float64: the grid zero + scale * [0, 2^bits - 1] covering
    each row's [min, max] after fp16 rounding (zero rounded down, scale rounded up), so no weight is clamped."""
    maxq = 2**bits - 1
    lo = w.min(dim=1).values
    hi = w.max(dim=1).values
    zero = lo.to(torch.float16)
    zero = torch.where(zero.double() > lo, torch.nextafter(zero, zero.new_full((), -math.inf)), zero)
    scale = ((hi - zero.double()) / maxq).clamp_min(_FP16_TINY).to(torch.float16)
    # rounding up: step to the next fp16 while the top code falls short of the maximum
    for _ in range(4):
        short = zero.double() + scale.double() * maxq < hi
        if not short.any():
            break
        scale = torch.where(short, torch.nextafter(scale, scale.new_full((), math.inf)), scale)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float64, integral) of ``w`` (rows, ...) on the grid of per-row ``scale`` and ``zero``: nearest code,
    clamped to [0, 2^bits - 1]. Shapes of scale/zero broadcast against w's leading dimension."""
    s = scale.double().reshape(-1, *([1] * (w.dim() - 1)))
    z = zero.double().reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round((w - z) / s).clamp_(0, 2**bits - 1)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> ScalarQuantWeight:
    """Round each weight to the nearest point of its group's min/max grid (see the module docstring).

    ``weight``: a finite floating tensor (out, in); ``bits``: 2..8; ``group_size``: divides ``in``. Every weight
    ends within half a step (its group's scale / 2) of its dequantized value."""
    check_bits(bits)
    w = check_weight(weight)
    out_features, in_features = w.shape
    check_group_size(group_size, in_features)
    groups = w.reshape(out_features, in_features // group_size, group_size)
    flat = groups.reshape(-1, group_size)
    scale, zero = group_grid(flat, bits)
    q = round_to_grid(flat, scale, zero, bits).reshape(out_features, in_features)
    return ScalarQuantWeight(
        q=q.to(torch.uint8),
        scales=scale.reshape(out_features, -1),
        zeros=zero.reshape(out_features, -1),
        bits=bits,
        group_size=group_size,
    )
