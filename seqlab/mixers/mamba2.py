"""The Mamba-2 mixer: in_proj -> (z, xBC, dt); causal conv + SiLU on xBC; SSD scan; gated RMSNorm; out_proj.

Parameter names and layouts match mamba_ssm / HF transformers' Mamba2Mixer (including Codestral Mamba's
ngroups > 1), so weights map one to one.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from seqlab import kernels
from seqlab.mixers.base import LayerState, Mixer, init_dt_bias, project_rows
from seqlab.norm import GatedRMSNorm


class Mamba2Mixer(Mixer):
    def __init__(self, config, layer_idx: int = 0, **options) -> None:
        super().__init__()
        cfg = config.with_layer_options("mamba2", options) if options else config
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.d_inner = cfg.d_inner
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.headdim = cfg.headdim
        self.ngroups = cfg.ngroups
        self.nheads = cfg.d_inner // cfg.headdim
        self.chunk_size = cfg.chunk_size
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state

        self.in_proj = nn.Linear(self.d_model, self.d_inner + self.conv_dim + self.nheads, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1, bias=cfg.conv_bias
        )
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        lo, hi = cfg.A_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // self.ngroups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=cfg.proj_bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> LayerState:
        return {
            "conv": torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device),
            "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device),
        }

    def _conv_weight(self) -> torch.Tensor:
        return rearrange(self.conv1d.weight, "d 1 w -> d w")

    def _project_in(self, hidden: torch.Tensor):
        return project_rows(self.in_proj, hidden, (self.d_inner, self.conv_dim, self.nheads))

    def _split_xbc(self, xbc: torch.Tensor):
        return torch.split(xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)

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
        z, xbc, dt = self._project_in(hidden)
        conv_out = kernels.causal_conv1d(
            rearrange(xbc, "b l c -> b c l"),
            self._conv_weight(),
            self.conv1d.bias,
            activation="silu",
            initial_state=None if state is None else state["conv"],
            return_final_state=return_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        xbc, conv_state = conv_out if return_state else (conv_out, None)
        x, B, C = self._split_xbc(rearrange(xbc, "b c l -> b l c"))
        perturb = self._perturb
        if perturb is not None:  # DRµGS sites: the scan's inputs x, B, C
            x, B, C = perturb("x", x), perturb("B", B), perturb("C", C)
        scan_out = kernels.ssd_scan(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            self.chunk_size,
            D=self.D.float(),
            dt_bias=self.dt_bias.float(),
            dt_softplus=True,
            initial_state=None if state is None else state["ssm"],
            return_final_state=return_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        y, ssm_state = scan_out if return_state else (scan_out, None)
        y = self.norm(rearrange(y, "b l h p -> b l (h p)"), z)
        out = self.out_proj(y)
        if not return_state:
            return out, None
        assert conv_state is not None  # the conv ran with return_final_state=True
        return out, {"conv": conv_state.float(), "ssm": ssm_state}

    def step(self, hidden: torch.Tensor, state: LayerState):
        z, xbc, dt = self._project_in(hidden)
        xbc, conv_state = kernels.causal_conv1d_update(
            xbc, state["conv"], self._conv_weight(), self.conv1d.bias, activation="silu", backend=self.backend
        )
        x, B, C = self._split_xbc(xbc)
        perturb = self._perturb
        if perturb is not None:
            x, B, C = perturb("x", x), perturb("B", B), perturb("C", C)
        y, ssm_state = kernels.ssd_state_update(
            state["ssm"],
            rearrange(x, "b (h p) -> b h p", p=self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b (g n) -> b g n", g=self.ngroups),
            rearrange(C, "b (g n) -> b g n", g=self.ngroups),
            D=self.D.float(),
            dt_bias=self.dt_bias.float(),
            dt_softplus=True,
            backend=self.backend,
        )
        y = self.norm(rearrange(y, "b h p -> b (h p)"), z)
        return self.out_proj(y), {"conv": conv_state.float(), "ssm": ssm_state}

    def _forward_states_at(self, hidden: torch.Tensor, state: LayerState | None, states_at):
        """The forward with the states at ``states_at``: the conv tails (raw xBC inputs before the conv) and the
        SSD states at those positions, from the kernels' ``states_at`` (the prefix is never re-run)."""
        z, xbc, dt = self._project_in(hidden)
        xbc, conv_state, conv_tails = kernels.causal_conv1d(
            rearrange(xbc, "b l c -> b c l"),
            self._conv_weight(),
            self.conv1d.bias,
            activation="silu",
            initial_state=None if state is None else state["conv"],
            return_final_state=True,
            states_at=states_at,
            backend=self.backend,
        )
        x, B, C = self._split_xbc(rearrange(xbc, "b c l -> b l c"))
        perturb = self._perturb
        if perturb is not None:
            x, B, C = perturb("x", x), perturb("B", B), perturb("C", C)
        y, ssm_state, ssm_states = kernels.ssd_scan(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            self.chunk_size,
            D=self.D.float(),
            dt_bias=self.dt_bias.float(),
            dt_softplus=True,
            initial_state=None if state is None else state["ssm"],
            return_final_state=True,
            states_at=states_at,
            backend=self.backend,
        )
        out = self.out_proj(self.norm(rearrange(y, "b l h p -> b l (h p)"), z))
        at = [
            {"conv": conv_tails[:, i].float().contiguous(), "ssm": ssm_states[:, i].contiguous()}
            for i in range(ssm_states.shape[1])
        ]
        return out, {"conv": conv_state.float(), "ssm": ssm_state}, at
