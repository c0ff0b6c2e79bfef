"""The AQLM quantized linear layer (issue 20): a lookup-table matmul for decode, dequantise-then-GEMM for prefill.

Weight format (what ``seqlab.quant``'s quantizer produces; this module only consumes tensors):

- ``W`` is (out_features, in_features); the group size ``g`` divides in_features; ``G = in_features // g``.
- ``codes``: integers (out_features, G, M) in ``[0, 2**B)``: M codebooks of B bits each.
- ``codebooks``: (M, 2**B, g); ``scales``: (out_features,); optional ``bias``: (out_features,).
- ``W_hat[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]]``.

Two ways to compute ``x @ W_hat.T``, picked per call by the number of input rows (``x.numel() // in_features``)
and the codebook size (:meth:`AQLMLinear.path_for`):

- **Lookup table** (rows <= ``lut_max_rows``, default 8: decode; and ``2**B <= out_features``). For every
  group ``j`` and codebook ``m`` the input's slice ``x[..., j*g:(j+1)*g]`` is dotted with all ``2**B``
  codewords once (one small GEMM, ``(rows*G, g) @ (g, M*2**B)``: the table), then each output is the
  gather-and-sum
  ``out[o] = scales[o] * sum_{j,m} lut[j, m, codes[o, j, m]]``. The gather indexes the table flattened over
  ``(j, m, c)`` with one precomputed int32 index per code, so few ops do all of it. One row: ``index_select``
  per block of outputs (about 2**18 gathered values, so they stay in cache until summed) with the index laid out
  (G*M, block), then a sum over the first dimension: consecutive gathers read the same (j, m) slice of the
  table (1 KiB at B = 8, in L1) and the sum adds contiguous rows; measured 15-30% faster than the (out, G*M)
  layout on a 2048 -> 8192 layer, and faster than ``embedding_bag``, whose per-index loop is slow at width 1.
  Several rows: ``embedding_bag(mode="sum")`` over bags of the (out, G*M) layout, the table laid out
  (G*M*2**B, rows) so that one index fetches every row's value. The (out, in) matrix is never formed. Work:
  ``rows * in * M * 2**B`` multiply-adds for the table plus ``out * G * M`` gathered adds, against
  ``rows * out * in`` for a dense layer; with 2x8g8 that is 4x fewer (scalar, random-access) operations than the
  dense layer's (vectorised, streaming) ones. Measured (``bench/quant_linear.py``, one thread, 2-core EPYC):
  at one row the 2x8g8 lookup takes 0.55-0.77x fp32's time when the fp32 weights come from DRAM, as in a
  model's decode step, and 0.73x on a 2048 -> 8192 layer even when they do not; a small layer called again and
  again keeps its fp32 weight in cache and then beats the lookup (1.9-2.9x). The gather, one scalar load per
  code through ``index_select``, is the limit. With 1x16 the table alone costs as much as a dense layer with
  65,536 outputs, so the lookup table only pays for very wide layers.
- **Dequantise, then GEMM** (longer inputs: prefill, training on windows): ``F.linear`` on the dequantised
  weight, formed by blocks of output rows (about 2**18 weights each) so that the whole fp32 matrix never exists
  at once either; the GEMM amortises the dequantisation over the rows.

A layer narrower than its codebook (``out_features < 2**B <= 256``, :meth:`AQLMLinear.is_narrow`) never takes the
lookup table; without gradients it computes with a cached ``W_hat`` (at most 256 x in_features floats) instead of
dequantising on every call.

Both paths are plain differentiable torch ops, so gradients reach ``x``, ``codebooks``, ``scales`` and ``bias``
(a later fine-tune trains the codebooks and scales; the codes are integers and stay fixed), equal to those of
:meth:`AQLMLinear.forward_reference` (tested).

Memory: ``codes`` is kept as an **int32** buffer (4 bytes per code rather than int64's 8; every code is below
2**16). The gather needs flat indices ``(j*M + m) * 2**B + code`` (LUT) and ``m * 2**B + code`` (dequantise); each
is an int32 (out, G*M) tensor built on first use and rebuilt when ``codes`` changes (an in-place write such as
``load_state_dict`` bumps the tensor's version counter, which is the cache key), so a layer used by one path
holds 8 bytes per code: 2 bytes per weight at 2x8g8 (1/2 of fp32) or 1 byte per weight at 1x16g8; each further
path used (one-row lookup, several-row lookup, GEMM: three index layouts) adds 4 bytes per code. The compact
form is the packed one (:mod:`seqlab.quant.packing`), used for storage; :meth:`AQLMLinear.storage_bits` counts that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.quant.aqlm import SCALE_LAYOUTS
from seqlab.quant.packing import MAX_BITS, packed_nbytes

#: rows (tokens) up to which forward uses the lookup table; above, dequantise-then-GEMM
DEFAULT_LUT_MAX_ROWS = 8
#: values gathered at a time by the one-row lookup (1 MiB of fp32, in cache until summed): measured 10-15% faster
#: than one gather of all out*G*M values on a 2048 -> 8192 layer
LUT_BLOCK_GATHERS = 1 << 18
#: weights dequantised at a time by the GEMM path (1 MiB of fp32): see ``AQLMLinear._forward_gemm``
GEMM_BLOCK_WEIGHTS = 1 << 18


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class AQLMLinear(nn.Module):
    """A linear layer whose weight is stored as AQLM codes, codebooks and per-output scales (module docstring).

    ``codes`` (int32 buffer, (out_features, G, M)) are fixed; ``codebooks`` (M, 2**B, g) and ``scales``
    (out_features,) are parameters, as is the optional ``bias``. A layer built with the constructor holds zero
    codes, zero codebooks and unit scales, to be filled by ``load_state_dict``; :meth:`from_parts` builds one from
    a quantizer's tensors. ``lut_max_rows`` is the largest number of input rows that take the lookup-table path
    (settable; 0 sends every call to dequantise-then-GEMM). ``path_counts`` counts the calls of each path.
    ``backend``: "auto" (default: the Triton kernels of ``seqlab.kernels.aqlm`` for CUDA inputs when no gradient
    is needed, the torch paths otherwise), "torch" or "triton"; ``triton_calls`` counts the Triton calls.
    """

    codes: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_codebooks: int,
        codebook_bits: int,
        group_size: int,
        bias: bool = True,
        *,
        scale_layout: str = "row",
        lut_max_rows: int = DEFAULT_LUT_MAX_ROWS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if scale_layout not in SCALE_LAYOUTS:
            raise ConfigError(f"scale_layout must be one of {', '.join(SCALE_LAYOUTS)}, got {scale_layout!r}")
        self.scale_layout = scale_layout
        in_features = _positive_int("in_features", in_features)
        out_features = _positive_int("out_features", out_features)
        num_codebooks = _positive_int("num_codebooks", num_codebooks)
        group_size = _positive_int("group_size", group_size)
        if isinstance(codebook_bits, bool) or not isinstance(codebook_bits, int) or not 1 <= codebook_bits <= MAX_BITS:
            raise ConfigError(f"codebook_bits must be an integer in 1..{MAX_BITS}, got {codebook_bits!r}")
        if in_features % group_size:
            raise ConfigError(
                f"group_size {group_size} does not divide in_features {in_features} (the layer's input width)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_codebooks = num_codebooks
        self.codebook_bits = codebook_bits
        self.group_size = group_size
        self.lut_max_rows = lut_max_rows
        self.path_counts = {"lut": 0, "gemm": 0}
        self.backend = "auto"
        self.triton_calls = 0
        groups = in_features // group_size
        size = 1 << codebook_bits
        factory = {"device": device, "dtype": dtype}
        self.register_buffer(
            "codes", torch.zeros(out_features, groups, num_codebooks, dtype=torch.int32, device=device)
        )
        self.codebooks = nn.Parameter(torch.zeros(num_codebooks, size, group_size, **factory))  # type: ignore[arg-type]
        self.scales: torch.Tensor
        if scale_layout == "row":
            self.scales = nn.Parameter(torch.ones(out_features, **factory))  # type: ignore[arg-type]
        else:  # no scales: a constant buffer of ones (not trained, not stored)
            self.register_buffer("scales", torch.ones(out_features, **factory))  # type: ignore[arg-type]
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))  # type: ignore[arg-type]
        else:
            self.register_parameter("bias", None)
        self._index_cache: dict[str, tuple[tuple[int, int, torch.device], torch.Tensor]] = {}
        self._narrow_cache: tuple[tuple, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def from_parts(
        cls,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        scale_layout: str = "row",
        lut_max_rows: int = DEFAULT_LUT_MAX_ROWS,
        dtype: torch.dtype | None = None,
    ) -> AQLMLinear:
        """A layer holding these tensors (the format in the module docstring); ``codebooks``, ``scales`` and ``bias``
        are copied into parameters of ``dtype`` (default: torch's default dtype, float32: fp16 arithmetic is slow
        on CPU), ``codes`` into the int32 buffer. Raises InputError naming the shapes when they disagree, when the
        codebook size is not a power of two, or when a code is outside ``[0, 2**B)``."""
        for name, t in (("codes", codes), ("codebooks", codebooks), ("scales", scales)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(t).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise InputError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() != 3:
            raise InputError(f"codes must be (out_features, groups, num_codebooks), got shape {tuple(codes.shape)}")
        if codebooks.dim() != 3:
            raise InputError(
                f"codebooks must be (num_codebooks, 2**bits, group_size), got shape {tuple(codebooks.shape)}"
            )
        out_features, groups, num_codebooks = codes.shape
        m, size, group_size = codebooks.shape
        if m != num_codebooks:
            raise InputError(
                f"codes of shape {tuple(codes.shape)} use {num_codebooks} codebooks but codebooks of shape "
                f"{tuple(codebooks.shape)} hold {m}"
            )
        if size < 2 or size & (size - 1) or size > 1 << MAX_BITS:
            raise InputError(
                f"codebooks of shape {tuple(codebooks.shape)}: the codebook size {size} must be a power of two "
                f"in 2..{1 << MAX_BITS}"
            )
        if out_features < 1 or groups < 1 or group_size < 1:
            raise InputError(f"codes {tuple(codes.shape)} and codebooks {tuple(codebooks.shape)} must not be empty")
        if tuple(scales.shape) != (out_features,):
            raise InputError(
                f"scales must be (out_features,) = ({out_features},) for codes of shape {tuple(codes.shape)}, "
                f"got {tuple(scales.shape)}"
            )
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise InputError(f"bias must be (out_features,) = ({out_features},), got {got}")
        _check_code_range(codes, size)
        layer = cls(
            groups * group_size,
            out_features,
            num_codebooks,
            size.bit_length() - 1,
            group_size,
            bias=bias is not None,
            scale_layout=scale_layout,
            lut_max_rows=lut_max_rows,
            device=codebooks.device,
            dtype=dtype,
        )
        if scale_layout == "none" and not bool((scales == 1).all()):
            raise InputError("scale_layout 'none' takes scales of ones (the layout has no scales)")
        with torch.no_grad():
            layer.codes.copy_(codes)
            layer.codebooks.copy_(codebooks)
            layer.scales.copy_(scales)
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias)
        return layer

    # ---------------------------------------------------------------------------------------------- indices

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def codebook_size(self) -> int:
        return 1 << self.codebook_bits

    def _index(self, kind: str) -> torch.Tensor:
        """The flat int32 gather index, (out, G*M): "lut" -> ``(j*M + m) * K + code``, "dequant" -> ``m*K + code``;
        "lut_t" is "lut" by blocks of :meth:`_lut_block` outputs, each block transposed to (G*M, block), all flat.
        Cached; rebuilt (and the codes range-checked) when ``codes`` is replaced or written in place."""
        codes = self.codes
        key = (codes.data_ptr(), codes._version, codes.device)
        hit = self._index_cache.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        expected = (self.out_features, self.groups, self.num_codebooks)
        if tuple(codes.shape) != expected:
            raise InputError(f"codes must be {expected} for this layer, got shape {tuple(codes.shape)}")
        size = self.codebook_size
        _check_code_range(codes, size)
        m_offsets = torch.arange(self.num_codebooks, device=codes.device, dtype=torch.int64) * size
        if kind in ("lut", "lut_t"):
            j_offsets = torch.arange(self.groups, device=codes.device, dtype=torch.int64) * (self.num_codebooks * size)
            offsets = j_offsets[:, None] + m_offsets  # (G, M)
            if self.groups * self.num_codebooks * size >= 2**31:
                raise InputError(f"the lookup table of {self.groups * self.num_codebooks * size} entries is too large")
        else:
            offsets = m_offsets.expand(self.groups, -1)
        index = (codes.to(torch.int64) + offsets).to(torch.int32).reshape(self.out_features, -1)
        if kind == "lut_t":  # blocks of outputs, each laid out (G*M, block outputs), concatenated flat
            block = self._lut_block()
            index = torch.cat([index[start : start + block].t().reshape(-1) for start in range(0, len(index), block)])
        index = index.contiguous()
        self._index_cache[kind] = (key, index)
        return index

    def _lut_block(self) -> int:
        """Outputs per block of the one-row lookup: about :data:`LUT_BLOCK_GATHERS` gathered values."""
        return max(1, LUT_BLOCK_GATHERS // (self.groups * self.num_codebooks))

    def _apply(self, fn, recurse=True):
        self._index_cache.clear()  # .to(device) etc. replace the codes tensor; the caches follow on next use
        self._narrow_cache = None
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------------------------------------- compute

    def _words(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``W_hat`` before the scales: (stop - start, in_features), differentiable."""
        index = self._index("dequant")[start:stop].reshape(-1, self.num_codebooks)  # ((stop-start)*G, M)
        flat = self.codebooks.reshape(-1, self.group_size)  # (M*K, g)
        if self.num_codebooks == 1:
            words = F.embedding(index.view(-1), flat)  # (rows*G, g)
        else:
            words = F.embedding_bag(index, flat, mode="sum")  # (rows*G, g): the M codewords summed per group
        return words.view(stop - start, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` (out_features, in_features) in the parameters' dtype, differentiable in codebooks and scales."""
        return self._words(0, self.out_features) * self.scales.unsqueeze(1)

    def _forward_gemm(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Dequantise-then-GEMM by blocks of output rows (:data:`GEMM_BLOCK_WEIGHTS` weights each), the scales and
        bias applied to the output. Blocks keep each dequantised piece in cache between its write and the GEMM's
        read, and small enough that the allocator reuses its memory: a fresh (out, in) fp32 matrix per call costs
        page faults (on the 2-core bench machine, filling a new 64 MiB tensor took 55 ms, 15x the fp32 GEMV it
        feeds). Measured on a 2048 -> 8192 layer, 64 rows: 49 ms blocked vs 161 ms whole vs 48 ms fp32."""
        block = max(1, GEMM_BLOCK_WEIGHTS // self.in_features)
        pieces = [
            F.linear(x, self._words(start, min(start + block, self.out_features)))
            for start in range(0, self.out_features, block)
        ]
        out = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)) * self.scales
        return out + self.bias if bias and self.bias is not None else out

    def path_for(self, x: torch.Tensor) -> str:
        """Which path :meth:`forward` takes for ``x``: "lut" when ``0 < rows <= lut_max_rows`` and the codebooks
        are no longer than the layer is wide (``2**B <= out_features``), else "gemm". The second condition says
        that a row's table (G*M*2**B dot products) costs no more than the gathers it serves (out*G*M): a 1x16
        layer narrower than 65,536 outputs tabulates more than it looks up, and dequantise-then-GEMM is faster
        (5x at 768 -> 3072, one row, ``bench/quant_linear.py``)."""
        rows = x.numel() // self.in_features if self.in_features else 0
        lut = 0 < rows <= self.lut_max_rows and self.codebook_size <= self.out_features
        return "lut" if lut else "gemm"

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise InputError(
                f"x must be (..., in_features) = (..., {self.in_features}) for this layer, got shape {tuple(x.shape)}"
            )
        if x.dtype != self.codebooks.dtype:
            raise InputError(f"x has dtype {x.dtype} but the layer's codebooks are {self.codebooks.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_hat.T + bias`` for ``x`` (..., in_features), by the lookup table or dequantise-then-GEMM."""
        return self._run(x, bias=True)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_hat.T`` without the bias (what ``F.linear(x, weight)`` is for an ``nn.Linear``: Mamba-1's
        dt_proj, whose bias goes into the scan; ``seqlab.mixers.base.project_no_bias``), path as :meth:`forward`."""
        return self._run(x, bias=False)

    def _use_triton(self, x: torch.Tensor) -> bool:
        """Whether this call runs the Triton kernels (:attr:`backend`): never when a gradient is needed (they have
        no backward); "auto" on CUDA tensors when Triton is available; "triton" always (CUDA, or CPU tensors under
        ``TRITON_INTERPRET=1``: the suite's check)."""
        backend = self.backend
        if backend == "torch" or (backend == "auto" and not x.is_cuda):  # the CPU decode path: decided first
            return False
        if backend not in ("auto", "triton"):
            raise ConfigError(f"AQLMLinear.backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, self.codebooks, self.scales, self.bias) if t is not None
        ):
            return False
        if backend == "triton":
            return True
        from seqlab.kernels import triton_available

        return triton_available()

    def _run(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        self._check_input(x)
        path = self.path_for(x)
        self.path_counts[path] += 1
        if self._use_triton(x):
            from seqlab.kernels.aqlm.triton_ops import aqlm_matmul_triton

            self.triton_calls += 1
            return aqlm_matmul_triton(
                x, self.codes, self.codebooks, self.scales, self.bias if bias else None, self.lut_max_rows
            )
        if path == "lut":
            return self._forward_lut(x, bias)
        if self.is_narrow() and not torch.is_grad_enabled():
            out = F.linear(x, self._narrow_weight())
            return out + self.bias if bias and self.bias is not None else out
        return self._forward_gemm(x, bias)

    def is_narrow(self) -> bool:
        """Whether the layer has fewer outputs than its codebooks have entries, with codebooks of at most 2**8
        (a Mamba-1 ``x_proj``, or an ``out_proj`` of a model under 256 wide, under 2x8): such a layer never takes
        the lookup table (:meth:`path_for`), and dequantising it on every decode step cost more than the step's
        GEMV. Without gradients it computes with a cached ``W_hat`` (scales folded in; at most
        ``256 * in_features`` floats, rebuilt when codes, codebooks or scales change). Layers at least 256 wide,
        and every 1x16 layer, never cache: their fp32 matrix is never formed whole."""
        return self.out_features < self.codebook_size <= 256

    def _narrow_weight(self) -> torch.Tensor:
        # the key: the three tensors themselves (a replaced parameter is another object) and their version
        # counters (an in-place write, e.g. load_state_dict or an optimizer step, bumps them)
        codes, books, scales = self.codes, self.codebooks, self.scales
        cache = self._narrow_cache
        if cache is not None:
            (c, cv), (b, bv), (s, sv) = cache[0]
            if (
                c is codes
                and b is books
                and s is scales
                and (cv, bv, sv)
                == (
                    codes._version,
                    books._version,
                    scales._version,
                )
            ):
                return cache[1]
        key = ((codes, codes._version), (books, books._version), (scales, scales._version))
        self._narrow_cache = (key, self.dequantize().detach())
        return self._narrow_cache[1]

    def forward_lut(self, x: torch.Tensor) -> torch.Tensor:
        """The lookup-table path whatever the number of rows (for tests and benches; :meth:`forward` chooses)."""
        self._check_input(x)
        if x.numel() == 0:
            return self._forward_gemm(x)
        return self._forward_lut(x)

    def forward_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantise-then-GEMM path whatever the number of rows (for tests and benches)."""
        self._check_input(x)
        return self._forward_gemm(x)

    def _forward_lut(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // self.in_features
        groups, m, size, g = self.groups, self.num_codebooks, self.codebook_size, self.group_size
        # the table: every group slice of every row dotted with every codeword, one GEMM (rows*G, g) @ (g, M*K)
        lut = x.reshape(rows * groups, g) @ self.codebooks.reshape(m * size, g).t()  # (rows*G, M*K)
        if rows == 1:
            # one row: per block of outputs, a flat gather in the (G*M, block) layout, then a sum of G*M contiguous
            # rows (module docstring)
            flat, index, block, pieces = lut.reshape(-1), self._index("lut_t"), self._lut_block(), []
            for start in range(0, self.out_features, block):
                n = min(block, self.out_features - start)
                part = index[start * groups * m : (start + n) * groups * m]
                pieces.append(flat.index_select(0, part).view(groups * m, n).sum(dim=0))
            out = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).unsqueeze(0)  # (1, out)
        else:
            index = self._index("lut")  # (out, G*M): one bag per output
            table = lut.view(rows, groups * m * size).t().contiguous()  # (G*M*K, rows): one index fetches all rows
            out = F.embedding_bag(index, table, mode="sum").t()  # (rows, out)
        out = out * self.scales
        if bias and self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def forward_reference(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The plain definition, for tests: ``F.linear(x, W_hat, bias)`` with everything cast to ``dtype``
        (float64 by default). Differentiable like :meth:`forward`."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x must be (..., in_features) = (..., {self.in_features}) for this layer, got {got}")
        codes = self.codes.to(torch.int64)
        words = torch.stack([self.codebooks[i].to(dtype)[codes[:, :, i]] for i in range(self.num_codebooks)])
        weight = words.sum(0).reshape(self.out_features, self.in_features) * self.scales.to(dtype)[:, None]
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), weight, bias)

    # ---------------------------------------------------------------------------------------------- accounting

    def bits_breakdown(self) -> dict[str, int]:
        """Storage bits of each part as written to a checkpoint: "codes" packed (``ceil(n*B/8)`` bytes, see
        :mod:`seqlab.quant.packing`), "codebooks" and "scales" in fp16, and "bias" (fp16 too; 0 without a bias)."""
        n_codes = self.out_features * self.groups * self.num_codebooks
        return {
            "codes": 8 * packed_nbytes(n_codes, self.codebook_bits),
            "codebooks": 16 * self.num_codebooks * self.codebook_size * self.group_size,
            "scales": 16 * self.out_features if self.scale_layout == "row" else 0,
            "bias": 16 * self.out_features if self.bias is not None else 0,
        }

    def storage_bits(self) -> int:
        """Exact storage bits of the quantized weight: packed codes + fp16 codebooks + fp16 scales. The bias is
        not a weight and is not counted here (it would be 16 * out_features more in fp16: :meth:`bits_breakdown`)."""
        parts = self.bits_breakdown()
        return parts["codes"] + parts["codebooks"] + parts["scales"]

    @property
    def config_name(self) -> str:
        """The ``AQLMConfig`` name of this layer's format, e.g. ``"2x8g8"`` or ``"2x8g8-noscale"``."""
        base = f"{self.num_codebooks}x{self.codebook_bits}g{self.group_size}"
        return base if self.scale_layout == "row" else f"{base}-noscale"

    def represented_parameters(self) -> int:
        """The parameters of the ``nn.Linear`` this layer stands for (``out * in`` + bias): what
        ``seqlab.ffn.parameter_counts`` and ``seqlab describe`` count for it."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    def bits_per_parameter(self) -> float:
        """:meth:`bits` over ``out_features * in_features``."""
        return self.storage_bits() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"config={self.config_name}, bias={self.bias is not None}, "
            f"lut_max_rows={self.lut_max_rows}, bits_per_parameter={self.bits_per_parameter():.3f}"
        )


def _check_code_range(codes: torch.Tensor, size: int) -> None:
    if codes.numel() == 0:
        return
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= size:
        raise InputError(
            f"codes of shape {tuple(codes.shape)} must lie in [0, {size}) (codebooks of {size} = "
            f"2**{int(math.log2(size))} entries), got values from {low} to {high}"
        )


__all__ = ["DEFAULT_LUT_MAX_ROWS", "GEMM_BLOCK_WEIGHTS", "LUT_BLOCK_GATHERS", "AQLMLinear"]
