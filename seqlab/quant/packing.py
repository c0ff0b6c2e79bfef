"""Dense bit packing of integer codes (issue 20): ``bits``-wide codes stored back to back, nothing wasted.

An AQLM layer's codes take ``B`` bits each (``B`` = codebook bits, 8 or 16 in the usual "2x8" and "1x16" configs,
but any width 1..16 is allowed). Written as int64 they would take 64 bits each, which would make a 2-bit model's
file larger than the fp32 one. Why hand-written: torch has no sub-byte or odd-width integer dtype to pack into
(``torch.uint1..uint7`` are placeholders without packing ops, and there is nothing for 9..15 bits), and safetensors
stores whole dtypes only, so the codes go to the file as one ``uint8`` tensor holding a bit stream.

The format: flatten the codes in C order; code ``i`` occupies stream bits ``i*bits .. i*bits+bits-1``, least
significant bit first; stream bit ``k`` is bit ``k % 8`` (least significant first) of byte ``k // 8``. That is a
little-endian bit stream: for ``bits`` = 8 the bytes are the codes themselves, for ``bits`` = 16 each code is two
little-endian bytes. The last byte is padded with zero bits, so ``n`` codes take exactly ``ceil(n*bits/8)`` bytes
(:func:`packed_nbytes`). The shape is not stored: the caller keeps it (the layer's shape determines it).

Both directions are vectorised: the codes are expanded into a (n, bits) tensor of 0/1 bytes, which is then
regrouped by eight (one uint8 temporary of n*bits bytes, i.e. 8x the packed size, and an int32 one 4x that);
widths 8 and 16 are byte-aligned and take a direct path (each code's little-endian bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seqlab.errors import InputError

MAX_BITS = 16


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise InputError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return bits


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed: ``ceil(count * bits / 8)``."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2**bits)``) into a 1-D uint8 bit stream (module docstring).

    Returns a tensor on the codes' device of exactly ``ceil(codes.numel() * bits / 8)`` bytes.
    Raises InputError for a non-integer tensor, ``bits`` outside 1..16 or a code outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise InputError(f"codes must be an integer tensor, got {got}")
    if codes.dtype == torch.bool:
        raise InputError("codes must be an integer tensor, got torch.bool")
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    if n:
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= 1 << bits:
            raise InputError(
                f"codes must lie in [0, {1 << bits}) for bits={bits}; codes of shape {tuple(codes.shape)} hold "
                f"values from {low} to {high}"
            )
    if bits % 8 == 0:  # byte-aligned: the little-endian bytes of each code, no bit expansion
        shifts = torch.arange(0, bits, 8, device=flat.device, dtype=torch.int64)
        return ((flat.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    shifts32 = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat.to(torch.int32).unsqueeze(1) >> shifts32) & 1).to(torch.uint8).reshape(-1)  # (n*bits,) LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=flat.device)
    # each byte's eight bits are distinct powers of two, so the sum fits in uint8 without carries
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: an int64 tensor of ``shape`` from the 1-D uint8 stream ``packed``.

    Raises InputError for ``bits`` outside 1..16, a ``packed`` that is not a 1-D uint8 tensor, a negative
    dimension in ``shape``, or a buffer whose length is not ``ceil(prod(shape) * bits / 8)`` (the message names the
    expected and the actual byte count).
    """
    _check_bits(bits)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(f"shape must have non-negative dimensions, got {shape}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed)
        raise InputError(f"packed codes must be a 1-D torch.uint8 tensor, got {got}")
    n = 1
    for s in shape:
        n *= s
    expected = packed_nbytes(n, bits)
    if packed.numel() != expected:
        raise InputError(
            f"packed codes for shape {shape} at {bits} bits must be {expected} bytes, got {packed.numel()} bytes"
        )
    if bits % 8 == 0:  # byte-aligned: each code is bits // 8 little-endian bytes
        weights8 = torch.tensor([1 << k for k in range(0, bits, 8)], dtype=torch.int64, device=packed.device)
        return (packed.view(n, bits // 8).to(torch.int64) * weights8).sum(dim=1).reshape(shape)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits]  # (n*bits,) 0/1, LSB first
    weights = torch.tensor([1 << k for k in range(bits)], dtype=torch.int64, device=packed.device)
    return (stream.view(n, bits).to(torch.int64) * weights).sum(dim=1).reshape(shape)


__all__ = ["MAX_BITS", "pack_codes", "packed_nbytes", "unpack_codes"]
