"""The Mamba-1 mixer: in_proj -> causal conv + SiLU -> selective scan (gated by SiLU(z)) -> out_proj.

Parameter names and layouts match mamba_ssm / HF transformers' MambaMixer, so weights map one to one. With
``BackboneConfig.mamba_inner_norms`` the mixer also normalises dt, B and C (RMSNorm each, after ``x_proj``) as
Jamba's mixer does, with Jamba's parameter names (``dt_layernorm``, ``b_layernorm``, ``c_layernorm``).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from seqlab import kernels
from seqlab.mixers.base import LayerState, Mixer, init_dt_bias, project_no_bias, project_rows
from seqlab.norm import RMSNorm


class Mamba1Mixer(Mixer):
    def __init__(self, config, layer_idx: int = 0, **options) -> None:
        super().__init__()
        cfg = config.with_layer_options("mamba1", options) if options else config
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.d_inner = cfg.d_inner
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = cfg.dt_rank

        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1, bias=cfg.conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(
            torch.log(
                repeat(torch.arange(1, self.d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner).contiguous()
            )
        )
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=cfg.proj_bias)
        self.dt_layernorm: RMSNorm | None = None
        self.b_layernorm: RMSNorm | None = None
        self.c_layernorm: RMSNorm | None = None
        if cfg.mamba_inner_norms:
            self.dt_layernorm = RMSNorm(self.dt_rank, eps=cfg.norm_eps)
            self.b_layernorm = RMSNorm(self.d_state, eps=cfg.norm_eps)
            self.c_layernorm = RMSNorm(self.d_state, eps=cfg.norm_eps)

        std = self.dt_rank**-0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        # the optimizer reads this mark (seqlab.train._param_groups), as in mamba_ssm
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> LayerState:
        return {
            "conv": torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device),
        }

    def _conv_weight(self) -> torch.Tensor:
        return rearrange(self.conv1d.weight, "d 1 w -> d w")

    def _project_in(self, hidden: torch.Tensor):
        return project_rows(self.in_proj, hidden, (self.d_inner, self.d_inner))

    def _split_x_dbl(self, x_dbl: torch.Tensor):
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_layernorm is not None and self.b_layernorm is not None and self.c_layernorm is not None:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return dt, B, C

    def forward(
        self,
        hidden: torch.Tensor,
        state: LayerState | None = None,
        return_state: bool = True,
        states_at=None,
        cu_seqlens: torch.Tensor | None = None,
    ):
        """(out, new_state); with ``states_at`` (strictly increasing positions 1..l of this call) also the layer
        states after those positions: (out, new_state, [state at p for p in states_at]).

        ``cu_seqlens`` (N + 1,) (packed rows: hidden (1, T, d), N sequences end to end): the conv and the scan
        restart at every sequence (from zeros, or from row i of ``state``, which then has N rows) and the new
        state has one row per sequence."""
        if states_at is not None:
            return self._forward_states_at(hidden, state, states_at)
        x, z = (rearrange(t, "b l d -> b d l") for t in self._project_in(hidden))
        conv_out = kernels.causal_conv1d(
            x,
            self._conv_weight(),
            self.conv1d.bias,
            activation="silu",
            initial_state=None if state is None else state["conv"],
            return_final_state=return_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        x, conv_state = conv_out if return_state else (conv_out, None)
        dt, B, C = self._split_x_dbl(self.x_proj(rearrange(x, "b d l -> b l d")))
        delta = rearrange(project_no_bias(self.dt_proj, dt), "b l d -> b d l")
        perturb = self._perturb
        if perturb is not None:  # DRµGS sites: the scan's inputs x, B, C (dt comes from the unperturbed x)
            x = rearrange(perturb("x", rearrange(x, "b d l -> b l d")), "b l d -> b d l")
            B, C = perturb("B", B), perturb("C", C)
        scan_out = kernels.selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l n -> b n l"),
            rearrange(C, "b l n -> b n l"),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=None if state is None else state["ssm"],
            return_final_state=return_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        y, ssm_state = scan_out if return_state else (scan_out, None)
        out = self.out_proj(rearrange(y, "b d l -> b l d"))
        if not return_state:
            return out, None
        assert conv_state is not None  # the conv ran with return_final_state=True
        return out, {"conv": conv_state.float(), "ssm": ssm_state}

    def step(self, hidden: torch.Tensor, state: LayerState):
        x, z = self._project_in(hidden)
        x, conv_state = kernels.causal_conv1d_update(
            x, state["conv"], self._conv_weight(), self.conv1d.bias, activation="silu", backend=self.backend
        )
        dt, B, C = self._split_x_dbl(self.x_proj(x))
        perturb = self._perturb
        if perturb is not None:
            x, B, C = perturb("x", x), perturb("B", B), perturb("C", C)
        y, ssm_state = kernels.selective_state_update(
            state["ssm"],
            x,
            project_no_bias(self.dt_proj, dt),
            -torch.exp(self.A_log.float()),
            B,
            C,
            D=self.D.float(),
            z=z,
            dt_bias=self.dt_proj.bias.float(),
            dt_softplus=True,
            backend=self.backend,
        )
        return self.out_proj(y), {"conv": conv_state.float(), "ssm": ssm_state}

    def _forward_states_at(self, hidden: torch.Tensor, state: LayerState | None, states_at):
        """The forward with the states at ``states_at``: the conv tails (raw inputs before the conv) and the scan
        states at those positions, from the kernels' ``states_at`` (the prefix is never re-run)."""
        x, z = (rearrange(t, "b l d -> b d l") for t in self._project_in(hidden))
        x, conv_state, conv_tails = kernels.causal_conv1d(
            x,
            self._conv_weight(),
            self.conv1d.bias,
            activation="silu",
            initial_state=None if state is None else state["conv"],
            return_final_state=True,
            states_at=states_at,
            backend=self.backend,
        )
        dt, B, C = self._split_x_dbl(self.x_proj(rearrange(x, "b d l -> b l d")))
        delta = rearrange(project_no_bias(self.dt_proj, dt), "b l d -> b d l")
        perturb = self._perturb
        if perturb is not None:
            x = rearrange(perturb("x", rearrange(x, "b d l -> b l d")), "b l d -> b d l")
            B, C = perturb("B", B), perturb("C", C)
        y, ssm_state, ssm_states = kernels.selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l n -> b n l"),
            rearrange(C, "b l n -> b n l"),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=None if state is None else state["ssm"],
            return_final_state=True,
            states_at=states_at,
            backend=self.backend,
        )
        out = self.out_proj(rearrange(y, "b d l -> b l d"))
        at = [
            {"conv": conv_tails[:, i].float().contiguous(), "ssm": ssm_states[:, i].contiguous()}
            for i in range(ssm_states.shape[1])
        ]
        return out, {"conv": conv_state.float(), "ssm": ssm_state}, at
