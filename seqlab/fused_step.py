"""The fused CPU decode step: one compiled call per run of blocks instead of ~60 small eager ops per layer.

``model.step`` (and so ``generate``) goes through ``Backbone.step``, which asks :func:`fused_step` first. At d_model
256 the eager step's cost is almost all per-op overhead (about 2.5 ms per token for 4 layers); the compiled step
(``kernels/csrc/step.c``) does, per block and in one OpenMP region: RMSNorm, in_proj, the conv step and SiLU, the
Mamba-1 x_proj / dt_proj / softplus / selective state update / D skip / SiLU(z) gate, or the Mamba-2 dt softplus /
SSD state update / D skip / gated RMSNorm, or Mamba-3's B/C norms, dt and rate, rotary trapezoid update (SISO or
MIMO, ``kernels/csrc/seqlab_mamba3_head.h``, shared with its state-update kernel) and gate or per-head gated norm,
or an attention mixer's q/k/v projections, rotary embedding at each row's position, the new KV cache (sized here,
``_attention_io``: it grows a slot per step up to the window) and one-pass softmax attention over it, then
out_proj (o_proj) and the residual add, then the feed-forward where the block has one: its RMSNorm and the gated MLP
(gate_up, SiLU gate, down) or the mixture of experts at evaluation (float32 router, top-k, each expert's rows as
one GEMM pair), and the residual add; any projection may be dense, LASER low-rank or AQLM-quantized. Consecutive
fused blocks go in one call; every other block (one with a hook, ...) runs its own eager ``step`` in the same
loop, so a model is fused where it can be.

When it applies (else the eager step runs, with the same results, silently):

- CPU tensors, float32 or float64 (the float64 build follows the eager float64 path: norms in float32, the conv
  state stored in float32, as seqlab/norm.py and the mixers do), or bfloat16 (every block kind above, and the
  whole-model call): the step computes in float32, reading the dense projection weights, the experts, the
  embedding and the head as bfloat16 (half the bytes; widened exactly in the rows GEMM) and the other parameters
  from float32 copies made once (norms, conv, biases, A, D, LASER factors, AQLM codebooks; a parameter kept in
  float32 is taken as it is). Hidden states and logits come back rounded to bfloat16, as the eager bfloat16 step
  returns them (the states, attention's KV cache included, are float32 in both). So the result is, bit for bit,
  the compiled step of the model converted to float32, rounded; it is closer to the float64 forward than the eager
  bfloat16 step, which rounds every op (tests/test_core/test_fused_step.py). float16 is not fused;
- no autograd: ``torch.is_grad_enabled()`` is False, or neither the input, the state nor any parameter of the
  block requires grad;
- a plain block: ``Block`` with an ``RMSNorm``; a ``Mamba1Mixer`` (without Jamba's inner norms), a
  ``Mamba2Mixer`` (ungated-before-norm output norm), a ``Mamba3Mixer`` (any but MIMO with the output norm) or an
  ``AttentionMixer`` (head_dim up to 256; q/k/v/o may be LASER'd or AQLM'd like the others); no
  feed-forward, the gated MLP (``GatedMLP``, bias-free) or the MoE (``MoEFeedForward``, top-k up to 16; while it
  trains with autograd on, its capacity and jitter run eagerly) after an ``RMSNorm``; every projection a plain
  ``nn.Linear``, a LASER ``LowRankLinear`` or an ``AQLMLinear`` (group size up to 64, not on the Triton backend;
  the MoE router: ``nn.Linear``), no forward hooks, no DRµGS perturbation
  rotating this step (its protected steps, where the hooks are idle, fuse: they must equal plain decoding bit for
  bit), kernel backend ``"auto"`` or ``"native"`` (a model set to ``"ref"``, ``"chunked"`` or ``"triton"`` runs
  those kernels);
- the compiled library builds here (``SEQLAB_NATIVE=0`` turns it off with the other compiled kernels).

CUDA: not fused (CUDA graphs need a GPU to be built and tested); a model on a GPU runs the eager step.

Turn it off per model with ``model.fused_step = False`` (or ``Backbone.step(..., fused=False)``). The plan (weight
pointers, derived parameters such as ``A = -exp(A_log)``) is built once per model and checked on every step
against the parameters' storage and version counters and the blocks' modules, so ``load_state_dict``, an in-place
edit, ``model.to(...)``, ``model.double()`` or a replaced submodule rebuild it. :func:`fused_layers` says which
layers run fused and why the others do not.
"""

from __future__ import annotations

import array
import ctypes
import operator
import weakref
from itertools import chain

import torch
from torch import nn

__all__ = ["KVRoom", "fused_layers", "fused_lm_greedy", "fused_lm_step", "fused_step"]

_KINDS = {"mamba1": 1, "mamba2": 2, "mamba3": 3, "attention": 4}
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backbone -> _Plan (not on the module: pickling)
_LIBRARY: list = []  # [ctypes.CDLL or None], loaded on first use
# states this module's step returned -> (plan, position, what their tensors looked like then): the next step may
# skip the full state check for them (a weak map, not an attribute: a state pickles and copies without it)
_TRUSTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Proj(ctypes.Structure):
    """How a projection's weight is held (step.c's ``st_proj``): kind 0 dense, 1 low-rank (LASER), 2 AQLM."""

    _fields_ = [(name, ctypes.c_int64) for name in ("kind", "rank", "n_codebooks", "code_bits", "group_size")] + [
        (name, ctypes.c_void_p) for name in ("a", "b", "codes")
    ]


#: the projections that may be low-rank or AQLM-quantized: _Layer's descriptor field per module name
_PROJ_FIELDS = {
    "in_proj": "in_q",
    "x_proj": "x_q",
    "dt_proj": "dt_q",
    "out_proj": "out_q",
    "ffn.gate_up": "gu_q",
    "ffn.down": "down_q",
    # an attention mixer's: q and o where in_proj's and out_proj's go
    "q_proj": "in_q",
    "k_proj": "k_q",
    "v_proj": "v_q",
    "o_proj": "out_q",
}
#: the largest AQLM group size the compiled step takes (step.c's ST_AQLM_MAX_GROUP)
_MAX_AQLM_GROUP = 64


class _Layer(ctypes.Structure):
    """One block for step.c (``st_layer``: every field 8 bytes, in this order)."""

    _fields_ = (
        [
            (name, ctypes.c_int64)
            for name in (
                "kind",
                "d_model",
                "d_inner",
                "d_state",
                "d_conv",
                "dt_rank",
                "nheads",
                "headdim",
                "ngroups",
                "n_in",
                "conv_ch",
                "residual_fp32",
                "gate_group",
            )
        ]
        + [
            ("norm_eps", ctypes.c_double),
            ("gate_eps", ctypes.c_double),
        ]
        + [
            (name, ctypes.c_void_p)
            for name in (
                "norm_w",
                "in_w",
                "in_b",
                "conv_w",
                "conv_b",
                "x_w",
                "dt_w",
                "dt_b",
                "A",
                "D",
                "gate_w",
                "out_w",
                "out_b",
            )
        ]
        # the feed-forward (d_ffn 0: the block has none): the gated MLP, or the MoE when n_experts > 0
        + [("d_ffn", ctypes.c_int64), ("ffn_eps", ctypes.c_double)]
        + [(name, ctypes.c_void_p) for name in ("ffn_norm_w", "ffn_gu_w", "ffn_down_w")]
        + [(name, ctypes.c_int64) for name in ("n_experts", "top_k", "renormalize")]
        + [("router_w", ctypes.c_void_p)]
        # Mamba-3
        + [(name, ctypes.c_int64) for name in ("mimo_rank", "n_angles", "a_softplus", "outproj_norm")]
        + [(name, ctypes.c_double) for name in ("a_floor", "b_eps", "c_eps")]
        + [
            (name, ctypes.c_void_p)
            for name in ("b_norm_w", "c_norm_w", "b_bias", "c_bias", "mimo_x", "mimo_z", "mimo_o")
        ]
        + [(field, _Proj) for field in ("in_q", "x_q", "dt_q", "out_q", "gu_q", "down_q")]
        # attention
        + [(name, ctypes.c_int64) for name in ("rope_dim", "window")]
        + [(name, ctypes.c_void_p) for name in ("inv_freq", "k_w", "k_b", "v_w", "v_b")]
        + [(field, _Proj) for field in ("k_q", "v_q")]
    )


#: the widest top-k the compiled MoE takes (step.c's ST_MAX_TOP_K)
_MAX_TOP_K = 16
#: the widest attention head the compiled step takes (step.c's ST_MAX_HEAD_DIM)
_MAX_HEAD_DIM = 256


class _LM(ctypes.Structure):
    """The LanguageModel around the blocks for step.c's ``sl_lm_step`` (``st_lm``: every field 8 bytes)."""

    _fields_ = (
        ("vocab", ctypes.c_int64),
        ("d_model", ctypes.c_int64),
        ("norm_eps", ctypes.c_double),
        ("emb_w", ctypes.c_void_p),
        ("norm_w", ctypes.c_void_p),
        ("head_w", ctypes.c_void_p),
        ("head_b", ctypes.c_void_p),
        ("bf16", ctypes.c_int64),  # emb_w and head_w hold bfloat16; the logits are rounded to bfloat16
    )


class _Sampling(ctypes.Structure):
    """Sampling options for step.c's sampler (seqlab_sample.h's ``st_sampling``: every field 8 bytes)."""

    _fields_ = (
        ("temperature", ctypes.c_double),  # > 0
        ("top_k", ctypes.c_int64),  # 0: none
        ("top_p", ctypes.c_double),  # >= 1: none
        ("min_p", ctypes.c_double),  # <= 0: none
    )


#: the hidden-state dtypes the compiled step takes -> the dtype it computes in (a bfloat16 model steps in float32:
#: its dense weights are read as bfloat16, every other parameter converted once, see _Plan)
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}

_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")


def _library():
    if not _LIBRARY:
        from seqlab.kernels._native import native_library

        lib = native_library("step.c")
        if lib is not None:
            for suffix in ("f32", "f64"):
                fn = getattr(lib, f"sl_step_{suffix}")
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                fn.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                fn.restype = ctypes.c_int
                lm = getattr(lib, f"sl_lm_step_{suffix}")
                lm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                lm.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                lm.restype = ctypes.c_int
                greedy = getattr(lib, f"sl_lm_greedy_{suffix}")
                greedy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                greedy.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
                greedy.argtypes += [ctypes.c_void_p, ctypes.c_int64]  # banned ids
                greedy.argtypes += [ctypes.c_void_p, ctypes.c_double]  # seen ids (NULL: none), repetition penalty
                greedy.argtypes += [ctypes.c_void_p, ctypes.c_void_p]  # sampling options (NULL: argmax), uniforms
                greedy.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                greedy.restype = ctypes.c_int64
                sample = getattr(lib, f"sl_sample_{suffix}")
                sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                sample.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
                sample.restype = ctypes.c_int64
            abi = (lib.sl_step_abi, lib.sl_lm_step_abi, lib.sl_sample_abi)
            for fn in abi:
                fn.restype = ctypes.c_int
            # a stale build: never call it with these layouts
            if [fn() % 1000 for fn in abi] != [ctypes.sizeof(t) for t in (_Layer, _LM, _Sampling)]:
                lib = None
        _LIBRARY.append(lib)
    return _LIBRARY[0]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _block_reason(block, dtype: torch.dtype):
    """(kind, None) when ``block`` can run fused in ``dtype``, else (None, why not)."""
    from seqlab.blocks import Block, GatedMLP
    from seqlab.ffn.moe import MoEFeedForward
    from seqlab.mixers.attention import AttentionMixer
    from seqlab.mixers.mamba1 import Mamba1Mixer
    from seqlab.mixers.mamba2 import Mamba2Mixer
    from seqlab.mixers.mamba3 import Mamba3Mixer
    from seqlab.norm import GatedRMSNorm, RMSNorm

    if type(block) is not Block:
        return None, f"block is {type(block).__name__}"
    linears: dict[str, nn.Module] = {}
    ffn = block.ffn
    if ffn is not None:
        if type(block.ffn_norm) is not RMSNorm:
            return None, "the feed-forward's norm is not the stock RMSNorm"
        if type(ffn) is GatedMLP:
            linears = {"ffn.gate_up": ffn.gate_up, "ffn.down": ffn.down}
            if ffn.gate_up.bias is not None or ffn.down.bias is not None:
                return None, "the feed-forward's projections have biases"
            if ffn.gate_up.out_features != 2 * ffn.down.in_features:
                return None, "the feed-forward's gate_up is not twice down's width"
        elif type(ffn) is MoEFeedForward:
            linears = {"ffn.router": ffn.router}
            if ffn.router.bias is not None:
                return None, "the MoE router has a bias"
            if ffn.settings.top_k > _MAX_TOP_K:
                return None, f"MoE top_k {ffn.settings.top_k} (the compiled step takes up to {_MAX_TOP_K})"
            if type(ffn.gate_up) is not nn.Parameter or type(ffn.down) is not nn.Parameter:
                return None, "the MoE experts are not the stock stacked parameters"
        else:
            return None, f"the feed-forward is a {type(ffn).__name__} (the gated MLP and the MoE fuse)"
    mixer = block.mixer
    if type(mixer) is Mamba1Mixer:
        kind = "mamba1"
        if mixer.dt_layernorm is not None:
            return None, "Mamba-1 with inner norms (mamba_inner_norms)"
        linears.update(in_proj=mixer.in_proj, x_proj=mixer.x_proj, dt_proj=mixer.dt_proj, out_proj=mixer.out_proj)
    elif type(mixer) is Mamba2Mixer:
        kind = "mamba2"
        norm = mixer.norm
        if type(norm) is not GatedRMSNorm or norm.norm_before_gate:
            return None, "Mamba-2 output norm is not the gated RMSNorm (gate before norm)"
        if mixer.nheads % mixer.ngroups or mixer.d_inner % norm.group_size:
            return None, "Mamba-2 heads or norm groups do not divide evenly"
        linears.update(in_proj=mixer.in_proj, out_proj=mixer.out_proj)
    elif type(mixer) is Mamba3Mixer:
        kind = "mamba3"
        if mixer.is_mimo and mixer.outproj_norm:
            return None, "Mamba-3 MIMO with the output norm (mamba3_outproj_norm)"
        if mixer.A_activation not in ("heavy_tail", "softplus"):
            return None, f"Mamba-3 rate activation {mixer.A_activation!r}"
        if type(mixer.B_norm) is not RMSNorm or type(mixer.C_norm) is not RMSNorm:
            return None, "Mamba-3's B or C norm is not the stock RMSNorm"
        if mixer.norm is not None and (type(mixer.norm) is not GatedRMSNorm or not mixer.norm.norm_before_gate):
            return None, "Mamba-3 output norm is not the per-head gated RMSNorm (norm before gate)"
        linears.update(in_proj=mixer.in_proj, out_proj=mixer.out_proj)
    elif type(mixer) is AttentionMixer:
        kind = "attention"
        if mixer.head_dim > _MAX_HEAD_DIM:
            return None, f"attention head_dim {mixer.head_dim} (the compiled step takes up to {_MAX_HEAD_DIM})"
        why = _attention_shapes(block, mixer)
        if why is not None:  # the eager step names the mismatch; the compiled one would read past the weights
            return None, why
        linears.update(q_proj=mixer.q_proj, k_proj=mixer.k_proj, v_proj=mixer.v_proj, o_proj=mixer.o_proj)
    else:
        return None, f"mixer is {type(mixer).__name__}"
    for name, layer in linears.items():
        if type(layer) is nn.Linear:
            continue
        why = _proj_reason(layer) if name in _PROJ_FIELDS else "not a plain nn.Linear"
        if why is not None:
            return None, f"{name} is a {type(layer).__name__}: {why}"
    if kind == "mamba1" and (linears["x_proj"].bias is not None or linears["dt_proj"].bias is None):
        return None, "x_proj has a bias or dt_proj has none"
    if (kind in ("mamba1", "mamba2") and type(mixer.conv1d) is not nn.Conv1d) or type(block.norm) is not RMSNorm:
        return None, "conv1d or the block norm is not the stock module"
    if any(_has_hooks(m) for m in block.modules()):
        return None, "a forward hook is registered"
    if mixer.backend not in ("auto", "native"):
        return None, f"kernel backend {mixer.backend!r} was chosen"
    # a bfloat16 model steps in float32: its parameters bfloat16 (dense weights read as such) or float32
    allowed = (torch.bfloat16, torch.float32) if dtype == torch.bfloat16 else (dtype,)
    for name, p in block.named_parameters():
        if p.dtype not in allowed or p.device.type != "cpu":
            return None, f"parameter {name} is {p.dtype} on {p.device}, the input {dtype} on cpu"
    return kind, None


def _attention_shapes(block, mixer) -> str | None:
    """None when the attention mixer's projections have the shapes its heads give (and its rotary dims fit a head),
    else what does not match."""
    d, q, kv = block.norm.weight.shape[0], mixer.heads * mixer.head_dim, mixer.kv_heads * mixer.head_dim
    for name, want in {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}.items():
        layer = getattr(mixer, name)
        weight = getattr(layer, "weight", None) if type(layer) is nn.Linear else None
        got = tuple(weight.shape) if weight is not None else (layer.out_features, layer.in_features)
        if got != want:
            return f"{name} maps {got[1]} -> {got[0]} features, the layer's heads need {want[1]} -> {want[0]}"
    rope = mixer.settings.rope_dim
    if rope % 2 or rope > mixer.head_dim:
        return f"attention rope_dim {rope} is odd or wider than head_dim {mixer.head_dim}"
    return None


def _proj_reason(layer) -> str | None:
    """None when the compiled step runs ``layer`` (a LASER ``LowRankLinear`` or an ``AQLMLinear`` on the CPU path),
    else why not."""
    from seqlab.posttrain.laser import LowRankLinear
    from seqlab.quant.linear import AQLMLinear

    if type(layer) is LowRankLinear:
        return None
    if type(layer) is AQLMLinear:
        if layer.backend not in ("auto", "torch"):
            return f"its backend {layer.backend!r} was chosen"
        if layer.group_size > _MAX_AQLM_GROUP:
            return f"AQLM group size {layer.group_size} (the compiled step takes up to {_MAX_AQLM_GROUP})"
        codes, scales, books = layer.codes, layer.scales, layer.codebooks
        if codes.dtype != torch.int32 or codes.device.type != "cpu" or scales.dtype != books.dtype:
            return f"codes {codes.dtype} on {codes.device}, scales {scales.dtype}, codebooks {books.dtype}"
        return None
    return "not an nn.Linear, LowRankLinear or AQLMLinear"


def _idle_check(perturb):
    """A zero-argument callable saying whether the perturbation hook ``perturb`` returns every tensor unchanged
    this step (then its block may run fused), or None when that cannot be known (the block runs eagerly).

    A hook says so itself with an ``idle`` attribute (a zero-argument callable): DRµGS's hooks
    (seqlab.decoding.drugs) are idle on protected steps (``protect_prompt``, ``protect_first``), which must give
    exactly plain decoding, which is fused. Any other hook runs its block eagerly."""
    idle = getattr(perturb, "idle", None)
    return idle if callable(idle) else None


def _perturb_checks(block) -> tuple[list, str | None]:
    """The idle checks of the perturbation hooks on ``block`` and its mixer, or a reason it cannot fuse."""
    checks = []
    for module in (block, block.mixer):
        perturb = getattr(module, "_perturb", None)
        if perturb is None:
            continue
        check = _idle_check(perturb)
        if check is None:
            return [], "a perturbation hook (DRµGS site) is installed"
        checks.append(check)
    return checks, None


class _Plan:
    """The compiled step's view of one backbone in one dtype: a ctypes array of ``_Layer`` per run of fused
    blocks, the tensors it points to (kept alive), and what to check before each use."""

    def __init__(self, backbone, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the hidden states'
        self.compute = _COMPUTE[dtype]  # the compiled step's (bfloat16: float32, the dense weights read as bfloat16)
        self.blocks = list(backbone.layers)
        self.reasons: list[str | None] = []
        self.fusable: list[bool] = []
        self.idle_checks: list[list] = []  # per block: perturbation hooks that must be idle for it to fuse
        self.keep: list[torch.Tensor] = []
        self.containers: list[dict] = []  # dicts whose values must stay the same objects
        self.hook_dicts: list[dict] = []  # forward (pre-)hooks: only whether there are any matters
        self.attrs: list[tuple[dict, str]] = []  # (a module's __dict__, key) whose value must stay the same object
        self.params: list[torch.nn.Parameter] = []
        self.moe: list = []  # the fused MoE layers: eager while one trains with autograd on (capacity, jitter)
        # per block: an attention layer's window (0: none; its new cache is sized by _state_io), else None
        self.windows: list[int | None] = [None] * len(self.blocks)
        self.specs = (_Layer * len(self.blocks))()  # zeros where a block is not fusable (never passed to C)
        for i, block in enumerate(self.blocks):
            kind, reason = _block_reason(block, dtype)
            checks: list = []
            if kind is not None:
                checks, reason = _perturb_checks(block)
                if reason is not None:
                    kind = None
            self._watch(backbone, block, i)
            self.fusable.append(kind is not None)
            self.idle_checks.append(checks)
            if kind is not None:
                self.specs[i] = self._spec(block, kind)
                if kind == "attention":
                    self.windows[i] = block.mixer.window or 0
                if checks:
                    reason = "fused while its DRµGS perturbation is idle, eager while it perturbs"
            self.reasons.append(reason)
        self.any_fusable = any(self.fusable)
        self.attention = any(w is not None for w in self.windows)
        self.conditional = any(self.idle_checks)
        self.static_segments = self._segments(self.fusable)
        self.base = ctypes.addressof(self.specs)
        self.held = [(d, list(d.values())) for d in self.containers] + [(d, d.get(k)) for d, k in self.attrs]
        self.key = self._key()

    @staticmethod
    def _segments(fused: list[bool]) -> list[tuple[bool, list[int]]]:
        """Runs of consecutive blocks: (True, [i, i+1, ...]) fused in one call, (False, [i]) eager."""
        segments: list[tuple[bool, list[int]]] = []
        for i, f in enumerate(fused):
            if f and segments and segments[-1][0]:
                segments[-1][1].append(i)
            else:
                segments.append((f, [i]))
        return segments

    def segments(self) -> list[tuple[bool, list[int]]]:
        """This step's runs: a block whose perturbation hooks are armed now runs eagerly."""
        if not self.conditional:
            return self.static_segments
        fused = [f and all(check() for check in checks) for f, checks in zip(self.fusable, self.idle_checks)]
        return self._segments(fused)

    def _watch(self, backbone, block, i: int) -> None:
        """Record what must stay the same for this plan to hold: the block object, the block's, mixer's and
        feed-forward's children, the parameters and buffers (AQLM's codes) of each module, whether any module has
        hooks, the perturbation slots, the kernel backends (the mixer's, an AQLM layer's), an MoE's settings, the
        parameters' and buffers' storage and version counters."""
        if i == 0:
            self.containers.append(backbone.layers._modules)
        self.containers += [block._modules, block.mixer._modules]  # a leaf gaining a child changes nothing
        self.attrs += [(block.__dict__, "_perturb"), (block.mixer.__dict__, "_perturb")]
        if "window" in block.mixer.__dict__:  # attention: its window sizes the new cache, its settings the rotation
            self.attrs += [(block.mixer.__dict__, "window"), (block.mixer.__dict__, "settings")]
        if block.ffn is not None:
            self.containers.append(block.ffn._modules)
            self.attrs.append((block.ffn.__dict__, "settings"))  # an MoE's top_k, renormalize: new settings rebuild
        self.params.extend(block.parameters())
        for module in block.modules():
            if module._parameters:
                self.containers.append(module._parameters)
            if module._buffers:
                self.containers.append(module._buffers)
                self.params.extend(t for t in module._buffers.values() if t is not None)
            if "backend" in module.__dict__:
                self.attrs.append((module.__dict__, "backend"))
            self.hook_dicts += [module._forward_hooks, module._forward_pre_hooks]

    def _key(self) -> tuple:
        return _watch_key(self.containers, self.hook_dicts, self.attrs, self.params)

    def still_valid(self) -> bool:
        return self._key() == self.key

    def _weight(self, layer) -> int:
        """A dense projection's weight pointer (a bfloat16 weight as it is: its st_proj kind 3 says so); 0 for a
        low-rank or AQLM one (its _Proj holds its tensors)."""
        return self._tensor(layer.weight, keep_bf16=True) if type(layer) is nn.Linear else 0

    def _tensor(self, t: torch.Tensor | None, keep_bf16: bool = False) -> int:
        """``t``'s pointer, ``t`` kept alive: a bfloat16 ``t`` converted to the compute dtype once here (a bfloat16
        model's norms, conv, biases, LASER factors, AQLM codebooks) unless ``keep_bf16`` (a dense weight the rows
        GEMM reads as it is)."""
        if t is None:
            return 0
        t = t.detach()
        if t.dtype == torch.bfloat16 and not keep_bf16:
            t = t.to(self.compute)
        if not t.is_contiguous():
            t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _spec(self, block, kind: str) -> _Layer:
        m = block.mixer
        dt = self.compute
        spec = _Layer()
        spec.kind = _KINDS[kind]
        spec.d_model = block.norm.weight.shape[0]
        spec.residual_fp32 = int(bool(block.residual_in_fp32))
        spec.norm_eps = float(block.norm.eps)
        spec.norm_w = self._tensor(block.norm.weight)
        self._ffn_spec(block, spec)
        for name, field in _PROJ_FIELDS.items():
            owner, _, attr = name.rpartition(".")
            layer = getattr(block.ffn if owner else m, attr, None)
            if isinstance(layer, nn.Module) and type(layer) is not nn.Linear:
                self._proj_spec(layer, getattr(spec, field))
            elif type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16:  # read as such by the GEMM
                getattr(spec, field).kind = 3
        if kind == "attention":
            self._attention_spec(m, spec)
            return spec
        spec.d_inner, spec.d_state = m.d_inner, m.d_state
        spec.n_in = m.in_proj.out_features
        spec.in_w, spec.in_b = self._weight(m.in_proj), self._tensor(m.in_proj.bias)
        spec.out_w, spec.out_b = self._weight(m.out_proj), self._tensor(m.out_proj.bias)
        if kind == "mamba3":
            self._mamba3_spec(m, spec)
            return spec
        spec.d_conv = m.d_conv
        spec.conv_w = self._tensor(m.conv1d.weight.reshape(m.conv1d.weight.shape[0], -1))
        spec.conv_b = self._tensor(m.conv1d.bias)
        with torch.no_grad():  # the derived parameters, by the very ops the eager step uses
            A = (-torch.exp(m.A_log.float())).to(dt)
            D = m.D.float().to(dt)
            if kind == "mamba1":
                spec.dt_rank, spec.conv_ch = m.dt_rank, m.d_inner
                spec.x_w, spec.dt_w = self._weight(m.x_proj), self._weight(m.dt_proj)
                spec.dt_b = self._tensor(m.dt_proj.bias.float().to(dt))
            else:
                spec.nheads, spec.headdim, spec.ngroups, spec.conv_ch = m.nheads, m.headdim, m.ngroups, m.conv_dim
                spec.dt_b = self._tensor(m.dt_bias.float().to(dt))
                spec.gate_group, spec.gate_eps = m.norm.group_size, float(m.norm.eps)
                spec.gate_w = self._tensor(m.norm.weight)
            spec.A, spec.D = self._tensor(A), self._tensor(D)
        return spec

    def _proj_spec(self, layer, proj: _Proj) -> None:
        """A LASER low-rank or AQLM projection's descriptor (its bias goes where a dense layer's does)."""
        if hasattr(layer, "left"):  # LowRankLinear
            proj.kind, proj.rank = 1, layer.rank
            proj.a, proj.b = self._tensor(layer.left), self._tensor(layer.right)
        else:  # AQLMLinear (_proj_reason let nothing else through)
            proj.kind, proj.n_codebooks = 2, layer.num_codebooks
            proj.code_bits, proj.group_size = layer.codebook_bits, layer.group_size
            proj.a, proj.b = self._tensor(layer.codebooks), self._tensor(layer.scales)
            proj.codes = self._tensor(layer.codes)

    def _attention_spec(self, m, spec: _Layer) -> None:
        """An attention mixer's fields: q_proj where in_proj goes, o_proj where out_proj goes, its rotary
        frequencies in float64 (the float32 values, as the eager step takes them: ``_frequencies``)."""
        spec.nheads, spec.ngroups, spec.headdim = m.heads, m.kv_heads, m.head_dim
        spec.d_inner, spec.n_in = m.heads * m.head_dim, (m.heads + 2 * m.kv_heads) * m.head_dim
        spec.in_w, spec.in_b = self._weight(m.q_proj), self._tensor(m.q_proj.bias)
        spec.k_w, spec.k_b = self._weight(m.k_proj), self._tensor(m.k_proj.bias)
        spec.v_w, spec.v_b = self._weight(m.v_proj), self._tensor(m.v_proj.bias)
        spec.out_w, spec.out_b = self._weight(m.o_proj), self._tensor(m.o_proj.bias)
        spec.rope_dim, spec.window = m.settings.rope_dim, m.window or 0
        if spec.rope_dim:
            from seqlab.mixers.attention import rope_inverse_frequencies

            spec.inv_freq = self._tensor(rope_inverse_frequencies(m.settings).float().double())

    def _mamba3_spec(self, m, spec: _Layer) -> None:
        """A Mamba-3 mixer's fields: its parameters as the mixer hands them to the kernel (in the model's dtype)."""
        spec.nheads, spec.headdim, spec.ngroups = m.nheads, m.headdim, m.ngroups
        spec.mimo_rank, spec.n_angles = m.mimo_rank, m.num_rope_angles
        spec.conv_ch = 2 * m.mimo_rank * m.ngroups * m.d_state  # the workspace of the normed B and C
        spec.a_softplus = int(m.A_activation == "softplus")
        spec.a_floor = float(m.A_floor)
        spec.b_eps, spec.c_eps = float(m.B_norm.eps), float(m.C_norm.eps)
        spec.b_norm_w, spec.c_norm_w = self._tensor(m.B_norm.weight), self._tensor(m.C_norm.weight)
        spec.b_bias, spec.c_bias = self._tensor(m.B_bias), self._tensor(m.C_bias)
        spec.dt_b, spec.D = self._tensor(m.dt_bias), self._tensor(m.D)
        # the gate inside the kernel; with the output norm, z goes to the norm, and MIMO's mimo_o then stays out
        spec.mimo_x, spec.mimo_z, spec.mimo_o = (self._tensor(t) for t in (m.mimo_x, m.mimo_z, m.mimo_o))
        if m.norm is not None:
            spec.outproj_norm = 1
            spec.gate_w, spec.gate_eps = self._tensor(m.norm.weight), float(m.norm.eps)

    def _ffn_spec(self, block, spec: _Layer) -> None:
        """The block's feed-forward fields (none, the gated MLP or the MoE)."""
        ffn = block.ffn
        if ffn is not None:
            spec.ffn_eps = float(block.ffn_norm.eps)
            spec.ffn_norm_w = self._tensor(block.ffn_norm.weight)
            if isinstance(ffn.gate_up, nn.Module):  # the gated MLP
                spec.d_ffn = ffn.down.in_features
                spec.ffn_gu_w, spec.ffn_down_w = self._weight(ffn.gate_up), self._weight(ffn.down)
            else:  # the MoE: stacked experts, the router in float32 (seqlab.ffn.moe.route)
                self.moe.append(ffn)
                spec.d_ffn = ffn.down.shape[2]
                # bfloat16 experts are read as such (both or neither: one kind flag, gu_q's, says so in step.c)
                raw = self.compute != self.dtype and ffn.gate_up.dtype == ffn.down.dtype == torch.bfloat16
                spec.ffn_gu_w, spec.ffn_down_w = self._tensor(ffn.gate_up, raw), self._tensor(ffn.down, raw)
                if raw:
                    spec.gu_q.kind = spec.down_q.kind = 3
                spec.n_experts, spec.top_k = ffn.settings.experts, ffn.settings.top_k
                renormalize = ffn.settings.renormalize
                spec.renormalize = int(ffn.settings.top_k > 1 if renormalize is None else renormalize)
                spec.router_w = self._tensor(ffn.router.weight.float())


def _watch_key(containers: list[dict], hook_dicts: list[dict], attrs: list[tuple[dict, str]], params: list) -> tuple:
    """What a plan checks before every step: the objects in ``containers`` (by id: the plan holds them, so an id
    cannot be reused while it lives, and comparing ids never calls a tensor's elementwise ==) and how many each
    holds, which ``hook_dicts`` are non-empty, the values of ``attrs``, the parameters' storage and version
    counters. It runs on every decoded token: built from C-level maps, not Python loops (~10 us for 4 layers)."""
    return (
        list(map(id, chain.from_iterable(map(dict.values, containers)))),
        list(map(len, containers)),
        list(map(bool, hook_dicts)),
        [id(d.get(k)) for d, k in attrs],
        list(map(_data_ptr, params)),
        list(map(_version, params)),
    )


def _plan(backbone, dtype: torch.dtype) -> _Plan:
    plan = _PLANS.get(backbone)
    if plan is None or plan.dtype != dtype or not plan.still_valid():
        plan = _Plan(backbone, dtype)
        _PLANS[backbone] = plan
    return plan


def fused_layers(model, dtype: torch.dtype | None = None) -> list[str | None]:
    """Per layer of ``model`` (a model or its backbone): None where ``model.step`` runs it fused, else the reason
    it runs eagerly. ``dtype``: the hidden states' dtype (default: the first parameter's)."""
    backbone = getattr(model, "backbone", model)
    if dtype is None:
        dtype = next(backbone.parameters()).dtype
    if _library() is None:
        return ["the compiled step library is unavailable"] * len(backbone.layers)
    if dtype not in _COMPUTE:
        return [f"dtype {dtype} (float32, float64 and bfloat16 are fused)"] * len(backbone.layers)
    return list(_plan(backbone, dtype).reasons)


def _state_key(state) -> list | None:
    """Everything the full state check looks at in ``state``'s tensors (names, shapes, dtypes, devices), or None
    when a layer no longer holds a dict of tensors (then the full check runs and names the problem)."""
    try:
        return [(name, t.shape, t.dtype, t.device) for layer in state.layers for name, t in layer.items()]
    except AttributeError:
        return None


def trusted_plan(backbone, state, hidden: torch.Tensor) -> _Plan | None:
    """The plan to run ``hidden`` with when ``state`` is one this backbone's fused step returned and nothing the
    state check reads has changed since (its fingerprint, position, layer names, tensor shapes, dtypes and devices,
    the model's parameters and modules, and the batch): then ``Backbone.step`` skips that check. Else None (the
    full check runs). A state given by a caller, loaded, copied or edited is checked in full as before."""
    if hidden.device.type != "cpu" or hidden.dim() != 2:
        return None
    return _trusted(backbone, state, hidden.dtype, hidden.shape[0])


def _trusted(backbone, state, dtype: torch.dtype, batch: int) -> _Plan | None:
    """:func:`trusted_plan` for a step of ``batch`` rows in ``dtype`` on the CPU."""
    try:
        entry = _TRUSTED.get(state)
    except TypeError:  # not a RecurrentState at all (unhashable or not weakly referenceable): the check says so
        return None
    if entry is None:
        return None
    plan: _Plan = entry[0]
    position, key = entry[1], entry[2]
    if (
        _PLANS.get(backbone) is not plan
        or dtype != plan.dtype
        or state.fingerprint != backbone.fingerprint
        or state._position != position
        or not key
        or batch != key[0][1][0]
        or _state_key(state) != key
        or not plan.still_valid()
    ):
        return None
    return plan


def trust(backbone, state) -> None:
    """Remember ``state`` (just returned by a fused ``Backbone.step``) as valid for ``backbone``'s current plan."""
    plan = _PLANS.get(backbone)
    key = _state_key(state)
    if plan is not None and key:
        _TRUSTED[state] = (plan, state._position, key)


def _grad_needed(plan: _Plan, hidden: torch.Tensor, state) -> bool:
    if hidden.requires_grad or any(p.requires_grad for p in plan.params):
        return True
    return any(t.requires_grad for layer in state.layers for t in layer.values())


def _moe_eager(plan: _Plan) -> bool:
    """Whether an MoE layer of ``plan`` must run its own forward this step: one in training mode with autograd on
    routes with capacity and jitter and records its router statistics. Otherwise the eager forward would leave
    ``last_stats`` None; so does this step."""
    if torch.is_grad_enabled() and any(m.training for m in plan.moe):
        return True
    for m in plan.moe:
        if m.last_stats is not None:
            m.last_stats = None
    return False


def fused_step(backbone, hidden: torch.Tensor, state, plan: _Plan | None = None):
    """``Backbone.step``'s layer loop with the fusable blocks compiled: (hidden after the last block, new layer
    states), or None where the fused step does not apply (the caller runs the eager loop). ``state`` (a checked
    RecurrentState of the same batch) is never modified: every new state tensor is new memory. ``plan``: the one
    :func:`trusted_plan` just validated (saves checking it twice)."""
    if hidden.device.type != "cpu" or hidden.dtype not in _COMPUTE or hidden.dim() != 2:
        return None
    lib = _library()
    if lib is None:
        return None
    if plan is None:
        plan = _plan(backbone, hidden.dtype)
    if not plan.any_fusable:
        return None
    if torch.is_grad_enabled() and _grad_needed(plan, hidden, state):
        return None
    if plan.moe and _moe_eager(plan):
        return None
    from seqlab.kernels._native import num_threads

    # hooks registered on every module at once fire in the eager step (out_proj is called as a module)
    if _global_hooks():
        return None
    dtype = plan.compute  # a bfloat16 model's runs take and give float32 hidden states, rounded between them
    run = lib.sl_step_f32 if dtype == torch.float32 else lib.sl_step_f64
    batch = hidden.shape[0]
    new_layers: list = [None] * len(plan.blocks)
    h = hidden.contiguous()
    threads = num_threads()
    segments = plan.segments()
    if not any(fused for fused, _ in segments):
        return None
    for fused, idx in segments:
        if not fused:
            i = idx[0]
            h, new_layers[i] = plan.blocks[i].step(h, state.layers[i])
            h = h.contiguous()
            continue
        io = _state_io(state, idx, dtype, new_layers, windows=plan.windows)
        if io is None:
            return None
        pointers, alive = io
        h = h.to(dtype)
        out = torch.empty((batch, h.shape[1]), dtype=dtype)
        code = run(
            plan.base + idx[0] * ctypes.sizeof(_Layer),
            pointers.buffer_info()[0],
            len(idx),
            batch,
            h.data_ptr(),
            out.data_ptr(),
            threads,
        )
        if code != 0:
            raise MemoryError(f"the fused decode step failed (code {code}): out of memory for its workspace")
        del alive
        h = out.to(plan.dtype)
    return h, new_layers


def _reusable(spare, like: torch.Tensor) -> bool:
    """Whether ``spare`` (a tensor of a state nobody else holds) can take the new values of ``like``'s slot."""
    return (
        type(spare) is torch.Tensor
        and spare.shape == like.shape
        and spare.dtype == like.dtype
        and spare.device == like.device
        and not spare.requires_grad
        and spare.is_contiguous()
        and spare.data_ptr() != like.data_ptr()
    )


#: the state tensors of a fused layer, in step.c's st_io order (the dicts _state_io builds keep it): Mamba-1 /
#: Mamba-2, Mamba-3
_CONV_SSM = ("conv", "ssm")
_MAMBA3_STATE = ("angle", "ssm", "k", "v")


#: the 8-byte fields of step.c's st_io (and st_attn_io)
_IO_FIELDS = 10


def _io_pointers(src: dict, dst: dict) -> list[int]:
    """One layer's ``st_io``: (in, out) for each state tensor in ``src``'s order (conv, ssm; or angle, ssm, k, v),
    zeros for the slots a Mamba-1/2 layer does not have."""
    pointers = [p for name in src for p in (src[name].data_ptr(), dst[name].data_ptr())]
    return pointers + [0] * (_IO_FIELDS - len(pointers))


def _cache_sizes(layer: dict, window: int | None) -> tuple[int, int] | None:
    """An attention layer's cache slots now and after this step: the new cache holds the last
    min(max(seen) + 1, window, slots + 1) entries of [cache, this token], as ``AttentionMixer._cache_at`` cuts it.
    None for an empty batch or a seen that is not int64 (the eager step handles them)."""
    seen = layer["seen"]
    if seen.dtype != torch.int64 or not seen.numel():
        return None
    slots = layer["k"].shape[2]
    return slots, min(int(seen.max()) + 1, slots + 1, window or slots + 1)


def _in_place_io(k: torch.Tensor, v: torch.Tensor, seen_in, seen_out, slots: int, keep: int, start: int) -> list[int]:
    """An ``st_attn_io`` appending in place (stride > 0): buffers ``k`` / ``v`` holding the old cache (``slots``
    entries from slot ``start``), seen in and out, the new cache's size ``keep`` (0: C sizes it each step)."""
    return [0, k.data_ptr(), 0, v.data_ptr(), seen_in.data_ptr(), seen_out.data_ptr(), slots, keep, k.shape[2], start]


def _attention_io(layer: dict, window: int, dtype: torch.dtype, spare) -> tuple[list[int], dict, list] | None:
    """An attention layer's ``st_io`` (step.c's ``st_attn_io``): k, v and seen in and out, then the old and new
    cache sizes (``_cache_sizes``). (pointers, the new layer state, the tensors to keep alive), or None (the eager
    step handles the layer)."""
    sizes = _cache_sizes(layer, window)
    if sizes is None:
        return None
    slots, keep = sizes
    k, v, seen = layer["k"], layer["v"], layer["seen"]
    src = {"k": k.to(dtype).contiguous(), "v": v.to(dtype).contiguous(), "seen": seen.contiguous()}
    dst = {}
    for name, t in src.items():
        old = spare.get(name) if spare is not None else None
        if (name == "seen" or keep == slots) and _reusable(old, t):  # a windowed cache keeps its size
            dst[name] = old
        elif name == "seen":
            dst[name] = torch.empty_like(t)
        else:
            dst[name] = t.new_empty((t.shape[0], t.shape[1], keep, t.shape[3]))
    return _io_pointers(src, dst)[:6] + [slots, keep, 0, 0], dst, list(src.values())


def _attention_buffers(layer: dict, dtype: torch.dtype, steps: int) -> tuple[list[int], dict, list] | None:
    """An attention layer's ``st_attn_io`` for the greedy loop (stride > 0): its cache copied to the start of a
    pair of buffers with room for ``steps`` more slots, where each step appends in place (``fused_lm_greedy``)."""
    if _cache_sizes(layer, None) is None:
        return None
    k, v, seen = layer["k"], layer["v"], layer["seen"]
    b, heads, slots, dim = k.shape
    buffers = {}
    for name, t in (("k", k), ("v", v)):
        buffers[name] = t.new_empty((b, heads, slots + steps, dim), dtype=dtype)
        buffers[name][:, :, :slots] = t
    seen = seen.contiguous()
    dst = {**buffers, "seen": torch.empty_like(seen)}
    return _greedy_pointers({"seen": seen}, dst, slots), dst, [seen]


class KVRoom:
    """Room to grow for the attention caches of one step-by-step decoding loop (``generate``'s): a step that
    continues the state the loop's previous step returned appends its key and value in place, in buffers with
    spare slots, and returns views of them as the new cache, instead of copying the whole cache every step.

    Only for a loop that owns its states: the new state's k and v share memory with the state passed in (the
    entries both hold; the step writes only after the old cache's end). A state that is not the last one this
    room handed out for that layer (the first step, rows dropped, a step that was not taken) is copied into new
    buffers, so a state is never written through another one. A new buffer holds the cache and a quarter more
    (at least 64 slots; a sliding-window layer's, its window and a quarter of it): memory up to 1.25x the cache's,
    and a copy of the cache every quarter-cache steps, about four entries copied per new token."""

    def __init__(self) -> None:
        self.layers: dict[int, list] = {}  # layer -> [k buffer, v buffer, slots filled, the k view handed out]
        self.copies = 0  # caches copied into new buffers (the tests count them)

    def io(self, i: int, layer: dict, window: int, dtype: torch.dtype) -> tuple[list[int], dict, list] | None:
        """Layer ``i``'s ``st_attn_io`` appending in place (stride > 0), the new layer state, the inputs to keep."""
        sizes = _cache_sizes(layer, window)
        if sizes is None:
            return None
        slots, keep = sizes
        k, v, seen = layer["k"], layer["v"], layer["seen"]
        b, heads, dim = k.shape[0], k.shape[1], k.shape[3]
        entry = self.layers.get(i)
        if entry is None or entry[3] is not k or entry[2] >= entry[0].shape[2] or entry[0].dtype != dtype:
            room = slots + max((window or slots) // 4, 64)
            entry = [k.new_empty((b, heads, room, dim), dtype=dtype), v.new_empty((b, heads, room, dim), dtype=dtype)]
            entry[0][:, :, :slots], entry[1][:, :, :slots] = k, v
            entry += [slots, None]
            self.layers[i] = entry
            self.copies += 1
        kb, vb, end = entry[0], entry[1], entry[2]
        start = end - slots  # the old cache's first slot; this token's entry goes to `end`
        entry[2] = end + 1
        dst = {"k": kb[:, :, end + 1 - keep : end + 1], "v": vb[:, :, end + 1 - keep : end + 1]}
        dst["seen"] = torch.empty_like(seen)
        entry[3] = dst["k"]
        seen = seen.contiguous()
        return _in_place_io(kb, vb, seen, dst["seen"], slots, keep, start), dst, [seen]


def _greedy_pointers(src: dict, dst: dict, slots: int = 0) -> list[int]:
    """One layer's ``st_io`` in the greedy loop: an attention layer's in-place buffers (those of ``dst``, its cache
    at slots [0, ``slots``)) and seen from ``src`` to ``dst``; any other layer's ``_io_pointers``."""
    if "seen" not in dst:
        return _io_pointers(src, dst)
    return _in_place_io(dst["k"], dst["v"], src["seen"], dst["seen"], slots, 0, 0)


def _state_io(
    state, idx: list[int], dtype: torch.dtype, new_layers: list, reuse=None, windows=None, steps=0, room=None
):
    """The step.c ``st_io`` pointers of layers ``idx`` (``_io_pointers``; ``_attention_io`` for an attention layer,
    whose window ``windows[i]`` gives) and the input tensors that must live until the call returns; the new state
    tensors go into ``new_layers``. None when a layer cannot run fused (a float64 conv state feeds its float64
    values: the eager step handles it).

    ``reuse``: a state of the same layout whose tensors nobody will read again (``generate``'s state from two steps
    back): the new values are written into its tensors instead of new memory. At batch 16 a Mamba-2 state is
    megabytes, and memory freed and taken again every step cost hundreds of page faults per step."""
    pointers = array.array("q")
    alive: list[torch.Tensor] = []
    for i in idx:
        layer = state.layers[i]
        spare = reuse.layers[i] if reuse is not None else None
        if "seen" in layer:
            if steps:  # the greedy loop: the cache appended to in place
                attention = _attention_buffers(layer, dtype, steps)
            elif room is not None:  # a step-by-step loop's: appended to in place where it can be
                attention = room.io(i, layer, windows[i], dtype)
            else:
                attention = _attention_io(layer, windows[i], dtype, spare)
            if attention is None:
                return None
            io, new_layers[i], inputs = attention
            pointers.extend(io)
            alive += inputs
            continue
        names = _CONV_SSM if "conv" in layer else _MAMBA3_STATE
        if "conv" in layer and layer["conv"].dtype != torch.float32:
            return None
        src: dict = {}
        dst: dict = {}
        for name in names:
            t = layer[name]
            if name != "conv" and t.dtype != dtype:  # a float64 model starts from float32 zeros, as eager widens them
                t = t.to(dtype)
            t = src[name] = t.contiguous()
            # a spare tensor, else new memory (empty_like: a third of torch.empty(shape, dtype=...)'s cost)
            dst[name] = spare[name] if spare is not None and _reusable(spare.get(name), t) else torch.empty_like(t)
        new_layers[i] = dst
        alive += src.values()
        pointers.extend(_io_pointers(src, dst))
    return pointers, alive


_LM_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LanguageModel -> _LMPlan


class _LMPlan:
    """The whole-model step (embedding, every block fused, final norm, head) of one LanguageModel on top of its
    backbone's :class:`_Plan`: applies when the embedding, final norm and head are the stock modules without hooks
    in the plan's dtype, and every block fuses (one with DRµGS sites only on steps where they are idle)."""

    def __init__(self, model, plan: _Plan) -> None:
        from seqlab.models import LanguageModel
        from seqlab.norm import RMSNorm

        self.plan = plan
        backbone = model.backbone
        emb, norm, head = model.embeddings, backbone.norm_f, model.lm_head
        modules = (emb, norm, head)
        self.containers = [model._modules, backbone._modules] + [m._parameters for m in modules]
        self.hook_dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.params = [p for m in modules for p in m.parameters()]
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (hidden, logits) to copy shapes
        self.reason = self._reason(model, LanguageModel, RMSNorm)
        self.spec = _LM()
        if self.reason is None:
            self.spec.vocab, self.spec.d_model = head.weight.shape
            self.spec.norm_eps = float(norm.eps)
            bf16 = plan.compute != plan.dtype  # the embedding and head stay bfloat16 (_reason: all in plan.dtype)
            self.spec.bf16 = int(bf16)
            self.spec.emb_w, self.spec.norm_w = plan._tensor(emb.weight, bf16), plan._tensor(norm.weight)
            self.spec.head_w, self.spec.head_b = plan._tensor(head.weight, bf16), plan._tensor(head.bias)
        self.key = self._key()

    def _reason(self, model, lm_type, norm_type) -> str | None:
        plan = self.plan
        emb, norm, head = model.embeddings, model.backbone.norm_f, model.lm_head
        if not all(plan.fusable):  # (a block with DRµGS sites fuses on the steps where they are idle)
            return "not every block runs fused"
        if type(model).head is not lm_type.head or type(model).step is not lm_type.step:
            return "the model's head or step is overridden"
        if type(emb) is not nn.Embedding or emb.max_norm is not None:
            return "the embedding is not a plain nn.Embedding"
        if type(norm) is not norm_type or type(head) is not nn.Linear:
            return "the final norm or the head is not the stock module"
        if any(self.hook_dicts):
            return "a forward hook is registered on the embedding, final norm or head"
        if head.weight.shape[1] != emb.weight.shape[1] or emb.weight.shape[0] != head.weight.shape[0]:
            return "the embedding and the head do not share vocabulary and width"
        if any(p.dtype != plan.dtype or p.device.type != "cpu" for p in self.params):
            return f"the embedding, final norm or head is not {plan.dtype} on the CPU"
        return None

    def _key(self) -> tuple:
        return _watch_key(self.containers, self.hook_dicts, [], self.params)

    def still_valid(self) -> bool:
        return self._key() == self.key


def _lm_ready(model, input_ids, state):
    """(library, plan, LM plan, ids (b,)) when the whole-model compiled step applies to ``input_ids`` continuing
    ``state``, else None (see :func:`fused_lm_step`)."""
    if type(input_ids) is not torch.Tensor or input_ids.dtype != torch.int64 or input_ids.device.type != "cpu":
        return None
    if input_ids.dim() != 1:
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return None
        input_ids = input_ids[:, 0]
    lib = _library()
    backbone = model.backbone
    entry = _PLANS.get(backbone)
    if lib is None or entry is None:
        return None
    plan = _trusted(backbone, state, entry.dtype, input_ids.shape[0])
    if plan is None:
        return None
    lm = _LM_PLANS.get(model)
    if lm is None or lm.plan is not plan or not lm.still_valid():
        lm = _LM_PLANS[model] = _LMPlan(model, plan)
    if lm.reason is not None or _global_hooks():
        return None
    # DRµGS: its protected steps (every hook idle) must give plain decoding bit for bit, and plain decoding takes
    # this path, so they do too; a perturbing step runs the rotated blocks eagerly
    if plan.conditional and not all(check() for checks in plan.idle_checks for check in checks):
        return None
    if torch.is_grad_enabled() and (_grad_needed(plan, input_ids, state) or any(p.requires_grad for p in lm.params)):
        return None
    if plan.moe and _moe_eager(plan):
        return None
    return lib, plan, lm, input_ids.contiguous()


def _lm_outputs(lm: _LMPlan, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """New (hidden, logits) tensors for a step of ``batch`` rows."""
    like = lm.outputs.get(batch)
    if like is None:
        like = lm.outputs[batch] = (
            torch.empty(batch, lm.spec.d_model, dtype=dtype),
            torch.empty(batch, lm.spec.vocab, dtype=dtype),
        )
    return torch.empty_like(like[0]), torch.empty_like(like[1])


def fused_lm_step(model, input_ids, state, reuse=None, room: KVRoom | None = None):
    """``LanguageModel.step`` in one compiled call (embedding, blocks, final norm, head): (logits, new state,
    final hidden), or None where it does not apply (the caller runs ``step`` as usual, with the same results).
    Applies to int64 ids (b,) on the CPU continuing a state this model's fused step returned (the first step after
    a prefill goes the usual way; its result is then trusted), every block fused, no autograd. ``reuse``: a state
    whose tensors the caller guarantees nobody reads again, written over for the new state (see ``_state_io``).
    ``room``: the caller's :class:`KVRoom`, for a loop that owns its states (attention caches appended in place)."""
    ready = _lm_ready(model, input_ids, state)
    if ready is None:
        return None
    lib, plan, lm, ids = ready
    from seqlab.kernels._native import num_threads

    dtype, n, batch = plan.compute, len(plan.blocks), ids.shape[0]
    new_layers: list = [None] * n
    io = _state_io(state, list(range(n)), dtype, new_layers, reuse, plan.windows, room=room)
    if io is None:
        return None
    pointers, alive = io
    hidden, logits = _lm_outputs(lm, batch, dtype)
    run = lib.sl_lm_step_f32 if dtype == torch.float32 else lib.sl_lm_step_f64
    code = run(
        plan.base, pointers.buffer_info()[0], n, batch, ctypes.addressof(lm.spec), ids.data_ptr(),
        hidden.data_ptr(), logits.data_ptr(), num_threads(),
    )  # fmt: skip
    del alive
    if code == -3:  # an id outside the vocabulary: the usual step names it
        return None
    if code != 0:
        raise MemoryError(f"the fused decode step failed (code {code}): out of memory for its workspace")
    new_state = state.advanced(new_layers, 1)
    trust(model.backbone, new_state)
    return logits.to(plan.dtype), new_state, hidden.to(plan.dtype)


def fused_lm_greedy(
    model, input_ids, state, max_steps: int, watch=(), sampling=None, uniforms=None, banned=(), penalty=1.0, seen=None
):
    """Greedy (or, with ``sampling``, sampled) decoding in one compiled call: feed ``input_ids`` (b,) to ``state``,
    then each row's argmax (of the float32 logits, as ``generate`` picks it), for up to ``max_steps`` steps,
    returning early after the first step that fed a token in ``watch`` (the caller's stop tokens). Returns (steps
    run, tokens (steps, b): the token chosen after each step, the new state, the last logits, the last hidden), or
    None where :func:`fused_lm_step` would not apply. The state passed in is never written; the new state is new
    memory. ``generate`` uses it for greedy and sampled decoding (not with DRµGS): one call per stop token
    instead of one Python step per token. An attention layer's KV cache is appended to in place in buffers made
    for the call (a sliding-window layer: the call runs at most max(4 windows, 64) steps, and may return before
    ``max_steps`` without a watched token; the caller calls again).

    ``sampling`` (a :class:`seqlab.sampling.SamplingOptions`) with ``uniforms`` (b, max_steps) float64: sampled
    decoding instead, the token after step k of row j drawn with ``uniforms[j, k]`` by the rule of
    :func:`seqlab.sampling.sample` (the same C code), so the tokens equal a step-by-step loop that samples each
    step's logits with the same uniforms. Logits that cannot be sampled (NaN, +inf) raise InputError.

    ``banned``: ids never chosen (``generate``'s suppress_tokens): their logits count as -inf when a token is
    chosen, greedy or sampled, as ``generate`` fills them before choosing; the logits returned are the model's.
    ``seen`` (b, V) bool with ``penalty`` != 1: ``generate``'s repetition penalty on the ids each row has seen (its
    prompt and the tokens before ``input_ids``; ``input_ids`` and every chosen id join them as the call goes),
    applied to the float32 logits as ``generate`` applies it before choosing."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if sampling is not None and (uniforms is None or tuple(uniforms.shape) != (len(input_ids), max_steps)):
        raise ValueError(f"uniforms must be (batch, max_steps) = ({len(input_ids)}, {max_steps}) when sampling")
    ready = _lm_ready(model, input_ids, state)
    if ready is None:
        return None
    lib, plan, lm, ids = ready
    from seqlab.kernels._native import num_threads

    dtype, n, batch = plan.compute, len(plan.blocks), ids.shape[0]
    windows = [w for w in plan.windows if w]
    if windows:  # a windowed cache's buffers hold window + steps slots: a few windows' worth per call
        max_steps = min(max_steps, max(4 * min(windows), 64))
    first: list = [None] * n  # X: written by steps 0, 2, 4, ...
    io = _state_io(state, list(range(n)), dtype, first, windows=plan.windows, steps=max_steps)
    if io is None:
        return None
    pointers, alive = io
    # Y: odd steps (an attention layer's k and v: the same buffers, appended to in place)
    second = [
        {name: t if "seen" in layer and name != "seen" else torch.empty_like(t) for name, t in layer.items()}
        for layer in first
    ]
    for src, dst in ((first, second), (second, first)):
        for a, b in zip(src, dst):
            pointers.extend(_greedy_pointers(a, b))
    tokens = torch.empty((max_steps, batch), dtype=torch.int64)
    hidden, logits = _lm_outputs(lm, batch, dtype)
    stop = array.array("q", sorted({int(t) for t in watch}))
    ban = array.array("q", sorted({int(t) for t in banned}))
    if ban and not 0 <= ban[0] <= ban[-1] < lm.spec.vocab:
        raise ValueError(f"banned ids must be in [0, {lm.spec.vocab}), got {list(ban)}")
    marks = None
    if seen is not None and penalty != 1.0:
        if bool(((ids < 0) | (ids >= lm.spec.vocab)).any()):
            return None  # an id outside the vocabulary: the usual step names it (as the C call's -3 says)
        if tuple(seen.shape) != (batch, lm.spec.vocab):
            raise ValueError(f"seen must be (batch, vocab) = ({batch}, {lm.spec.vocab}), got {tuple(seen.shape)}")
        marks = seen.to(torch.uint8).contiguous().clone()  # the C loop marks each chosen id in its own copy
        marks[torch.arange(batch), ids] = 1
    options, draws = None, None
    if sampling is not None:
        options = sampling.struct()
        draws = uniforms[:, :max_steps].to(torch.float64).contiguous()  # (a windowed cache may have cut max_steps)
    run = lib.sl_lm_greedy_f32 if dtype == torch.float32 else lib.sl_lm_greedy_f64
    steps = run(
        plan.base, pointers.buffer_info()[0], n, batch, ctypes.addressof(lm.spec), ids.data_ptr(), max_steps,
        stop.buffer_info()[0] if stop else 0, len(stop), ban.buffer_info()[0] if ban else 0, len(ban),
        None if marks is None else marks.data_ptr(), float(penalty),
        None if options is None else ctypes.addressof(options),
        None if draws is None else draws.data_ptr(), tokens.data_ptr(), hidden.data_ptr(), logits.data_ptr(),
        num_threads(),
    )  # fmt: skip
    del alive
    if steps == -3:
        return None
    if steps < 1:
        raise MemoryError(f"the fused decode step failed (code {steps}): out of memory for its workspace")
    if sampling is not None and bool((tokens[steps - 1] < 0).any()):
        from seqlab.sampling import unsampleable

        raise unsampleable(int((tokens[steps - 1] < 0).nonzero()[0, 0]))
    layers = first if steps % 2 else second
    for i, window in enumerate(plan.windows):
        if window is not None:  # the last step's cache: the last entries its buffers got
            k, seen = state.layers[i]["k"], state.layers[i]["seen"]
            end = k.shape[2] + steps
            slots = min(int(seen.max()) + steps, end, window or end)
            layers[i] = dict(layers[i], k=_cut(layers[i]["k"], end, slots), v=_cut(layers[i]["v"], end, slots))
    new_state = state.advanced(layers, steps)
    trust(model.backbone, new_state)
    return steps, tokens[:steps], new_state, logits.to(plan.dtype), hidden.to(plan.dtype)


def _cut(buffer: torch.Tensor, end: int, slots: int) -> torch.Tensor:
    """The cache of ``slots`` entries ending at slot ``end`` of a greedy loop's buffer, contiguous: the buffer
    itself when that is all of it, else a copy (the state does not keep the buffer's other slots alive)."""
    return buffer[:, :, end - slots : end].contiguous()
