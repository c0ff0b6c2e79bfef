"""The Mamba-3 mixer: in_proj -> (z, x, B, C, dt, A, trap, angle); RMSNorm on B and C; the Mamba-3 scan
(exponential-trapezoidal update of a rotary state, SISO or MIMO); gate or gated RMSNorm; out_proj.

Parameter names and layouts follow mamba_ssm's ``Mamba3`` module (``mamba_ssm/modules/mamba3.py``), so weights
map one to one: ``in_proj`` (no bias by default) with its rows in the order [z, x, B, C, dd_dt, dd_A, trap,
angle], ``dt_bias`` (h,), ``B_bias`` / ``C_bias`` (h, r, n), ``B_norm`` / ``C_norm`` (RMSNorm over n),
``mimo_x`` / ``mimo_z`` / ``mimo_o`` (h, r, p; MIMO only), ``D`` (h,), ``norm`` (``mamba3_outproj_norm`` only)
and ``out_proj``. There is no convolution. Per position and head:

- ``dt = softplus(dd_dt + dt_bias)``; ``A = min(-heavy_tail(dd_A), -A_floor)`` with ``heavy_tail(u) = 1 + u``
  for u >= 0 and ``1 / (1 - u)`` below (positive, continuous, a heavier tail than exp); the decay is
  ``exp(A * dt)`` (``mamba3_A_activation="softplus"``: ``softplus(dd_A)`` in place of ``heavy_tail``, as the
  mamba-ssm 2.3.2 release's module has it);
- ``trap``: the trapezoid gate (pre-sigmoid) and ``angle``: the rotary rates, shared by the heads; the scan
  (``seqlab.kernels.mamba3_scan``, ``kernels/mamba3/``) does the rest.

The layer state is ``{"angle": (b, h, a), "ssm": (b, h, p, n), "k": (b, r, h, n), "v": (b, h, p)}`` in float32
(float64 in a float64 model): the accumulated angle, the SSM state, and the previous position's rotated key and
value (the trapezoid rule's left end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab import kernels
from seqlab.errors import InputError
from seqlab.mixers.base import LayerState, Mixer, check_states_at, init_dt_bias, project_rows
from seqlab.norm import GatedRMSNorm, RMSNorm

STATE_NAMES = ("angle", "ssm", "k", "v")


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """``1 + u`` for u >= 0 and ``1 / (1 - u)`` for u < 0: positive, continuous, with slope 1 at 0 on both sides
    (the activation of Mamba-3's data-dependent rate)."""
    return u.clamp_min(0) + torch.reciprocal(1 - u.clamp_max(0))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it already is (a float64 reference run stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


class Mamba3Mixer(Mixer):
    def __init__(self, config, layer_idx: int = 0, **options) -> None:
        super().__init__()
        cfg = config.with_layer_options("mamba3", options) if options else config
        s = cfg.mamba3_settings()
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.d_inner = s.d_inner
        self.d_state = s.d_state
        self.headdim = s.headdim
        self.ngroups = s.ngroups
        self.nheads = s.nheads
        self.chunk_size = s.chunk_size
        self.mimo_rank = s.mimo_rank
        self.is_mimo = s.is_mimo
        self.A_floor = s.A_floor
        self.A_activation = s.A_activation
        self.rope_fraction = s.rope_fraction
        self.num_rope_angles = s.num_rope_angles
        self.outproj_norm = s.outproj_norm
        r, g, n, h, p = self.mimo_rank, self.ngroups, self.d_state, self.nheads, self.headdim
        # [z, x, B, C, dd_dt, dd_A, trap, angle], as in mamba_ssm
        self._sizes = (self.d_inner, self.d_inner, r * g * n, r * g * n, h, h, h, self.num_rope_angles)
        self.in_proj = nn.Linear(self.d_model, sum(self._sizes), bias=cfg.proj_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(h, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.B_bias = nn.Parameter(torch.ones(h, r, n))
        self.C_bias = nn.Parameter(torch.ones(h, r, n))
        self.B_norm = RMSNorm(n, eps=cfg.norm_eps)
        self.C_norm = RMSNorm(n, eps=cfg.norm_eps)
        self.mimo_x: nn.Parameter | None = None
        self.mimo_z: nn.Parameter | None = None
        self.mimo_o: nn.Parameter | None = None
        if self.is_mimo:
            self.mimo_x = nn.Parameter(torch.full((h, r, p), 1.0 / r))
            self.mimo_z = nn.Parameter(torch.ones(h, r, p))
            self.mimo_o = nn.Parameter(torch.full((h, r, p), 1.0 / r))
        self.D = nn.Parameter(torch.ones(h))
        self.norm: GatedRMSNorm | None = None
        if self.outproj_norm:  # normalise per head, then gate
            self.norm = GatedRMSNorm(self.d_inner, group_size=p, eps=cfg.norm_eps, norm_before_gate=True)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=cfg.proj_bias)
        for param in (self.dt_bias, self.D):
            param._no_weight_decay = True  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> LayerState:
        b, h, p, n, r = batch_size, self.nheads, self.headdim, self.d_state, self.mimo_rank
        return {
            "angle": torch.zeros(b, h, self.num_rope_angles, device=device),
            "ssm": torch.zeros(b, h, p, n, device=device),
            "k": torch.zeros(b, r, h, n, device=device),
            "v": torch.zeros(b, h, p, device=device),
        }

    def _inputs(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scan's per-position inputs from ``hidden`` (..., d_model): z, x (..., h, p); dt, A, trap (..., h);
        B, C (..., r, g, n) after their RMSNorm; angles (..., a)."""
        z, x, B, C, dd_dt, dd_A, trap, angles = project_rows(self.in_proj, hidden, self._sizes)
        r, g, n, p = self.mimo_rank, self.ngroups, self.d_state, self.headdim
        x = x.unflatten(-1, (-1, p))
        B = self.B_norm(B.unflatten(-1, (r, g, n)))
        C = self.C_norm(C.unflatten(-1, (r, g, n)))
        perturb = self._perturb
        if perturb is not None:  # DRµGS sites: the scan's inputs x (V), B (K), C (Q)
            x, B, C = perturb("x", x), perturb("B", B), perturb("C", C)
        dd_dt, dd_A = _wide(dd_dt), _wide(dd_A)
        return {
            "z": z.unflatten(-1, (-1, p)),
            "x": x,
            "dt": F.softplus(dd_dt + self.dt_bias.to(dd_dt.dtype)),
            "A": torch.clamp(
                -(heavy_tail(dd_A) if self.A_activation == "heavy_tail" else F.softplus(dd_A)), max=-self.A_floor
            ),
            "B": B,
            "C": C,
            "trap": trap,
            "angles": angles,
        }

    def _scan_kwargs(self, z: torch.Tensor) -> dict:
        """The keyword inputs shared by the scan and the step: D, the gate (inside the kernel unless the gated
        norm follows) and the MIMO projections (per-rank output when the norm follows)."""
        return {
            "D": self.D,
            "z": None if self.outproj_norm else z,
            "mimo_x": self.mimo_x,
            "mimo_z": self.mimo_z,
            "mimo_o": None if (self.outproj_norm and self.is_mimo) else self.mimo_o,
        }

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """out_proj of the kernel's y: (..., h, p), or per rank (..., r, h, p) for MIMO with the gated norm."""
        if self.norm is not None:
            if self.is_mimo:
                assert self.mimo_z is not None and self.mimo_o is not None
                zr = torch.einsum("...hp,hrp->...rhp", _wide(z), self.mimo_z.to(_wide(z).dtype))
                y = self.norm(_wide(y).flatten(-2), zr.flatten(-2)).unflatten(-1, (-1, self.headdim))
                y = torch.einsum("...rhp,hrp->...hp", y, self.mimo_o.to(y.dtype))
            else:
                y = self.norm(y.flatten(-2), z.flatten(-2)).unflatten(-1, (-1, self.headdim))
        return self.out_proj(y.flatten(-2).to(z.dtype))  # z: the projection's dtype (the model's)

    @staticmethod
    def _as_tuple(state: LayerState | None):
        return None if state is None else tuple(state[name] for name in STATE_NAMES)

    @staticmethod
    def _as_dict(state) -> LayerState:
        return {name: _wide(t) for name, t in zip(STATE_NAMES, state)}

    def _scan(self, inp: dict, initial_state, return_final_state: bool, cu_seqlens=None, states_at=None):
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        return kernels.mamba3_scan(
            inp["x"],
            inp["dt"],
            inp["A"],
            inp["B"],
            inp["C"],
            inp["trap"],
            inp["angles"],
            self.B_bias,
            self.C_bias,
            self.chunk_size,
            **self._scan_kwargs(inp["z"]),
            initial_state=initial_state,
            return_final_state=return_final_state,
            states_at=states_at,
            backend=self.backend,
            **packed,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        state: LayerState | None = None,
        return_state: bool = True,
        states_at=None,
        cu_seqlens=None,
    ):
        """(out, new_state); with ``states_at`` (strictly increasing positions 1..l of this call) also the layer
        states after those positions: (out, new_state, [state at p for p in states_at]). With ``cu_seqlens``
        (packed rows: hidden (1, T, d), boundaries [0, ..., T]) ``state`` and the new state have one row per
        sequence, and the state restarts at each sequence start."""
        if states_at is not None:
            if cu_seqlens is not None:
                raise InputError("states_at cannot be combined with cu_seqlens (packed rows)")
            return self._forward_states_at(hidden, state, states_at)
        inp = self._inputs(hidden)
        out = self._scan(inp, self._as_tuple(state), return_state, cu_seqlens)
        y, final = out if return_state else (out, None)
        result = self._output(y, inp["z"])
        return result, (None if final is None else self._as_dict(final))

    def step(self, hidden: torch.Tensor, state: LayerState):
        inp = self._inputs(hidden)
        y, new_state = kernels.mamba3_state_update(
            self._as_tuple(state),
            inp["x"],
            inp["dt"],
            inp["A"],
            inp["B"],
            inp["C"],
            inp["trap"],
            inp["angles"],
            self.B_bias,
            self.C_bias,
            **self._scan_kwargs(inp["z"]),
            backend=self.backend,
        )
        return self._output(y, inp["z"]), self._as_dict(new_state)

    def _forward_states_at(self, hidden: torch.Tensor, state: LayerState | None, states_at):
        """The forward with the states after ``states_at``: the inputs are projected once and the kernel's
        ``states_at`` splits the scan at the positions, threading the state (the prefix is never re-run)."""
        positions = check_states_at(states_at, hidden.shape[1])
        inp = self._inputs(hidden)
        y, final, at = self._scan(inp, self._as_tuple(state), True, states_at=positions)
        kept = [self._as_dict(tuple(part[:, i].contiguous() for part in at)) for i in range(len(positions))]
        return self._output(y, inp["z"]), self._as_dict(final), kept
