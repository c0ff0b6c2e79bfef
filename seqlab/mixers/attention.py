"""Causal multi-head attention as a mixer: grouped-query heads, rotary positions, optional sliding window.

The layer's state is its KV cache: ``k`` and ``v`` of shape (batch, kv_heads, slots, head_dim) and ``seen``
(batch,), the number of tokens each row has consumed (int64). The cache grows along ``slots`` (the only state
dim that starts at size 0, which is how ``seqlab.state`` knows it may grow) and is right-aligned: row b's real
entries are its last ``min(seen[b], slots)`` slots, older slots are padding. That layout lets rows of different
lengths share one batch (``generate``'s ragged prompts pad on the left) and lets a sliding window keep only its
last ``window`` slots, so the state of a windowed layer stays bounded. Without a window the cache costs
``2 * kv_heads * head_dim * 4`` bytes per token per layer (fp32).

Parameter names are Llama's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) so HF weights map one to one;
rotary embeddings use the half-split layout of HF's ``rotate_half`` on the first ``rope_dim`` dims of each head.
The math is torch's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ATTN_FIELDS, AttentionSettings
from seqlab.errors import InputError
from seqlab.mixers.base import LayerState, Mixer, check_states_at


def rope_inverse_frequencies(settings: AttentionSettings) -> torch.Tensor:
    """The rotary frequencies (rope_dim / 2,), with HF's "linear" or "llama3" scaling applied (float64)."""
    dim = settings.rope_dim
    inv = 1.0 / settings.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling = settings.rope_scaling
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths divided by factor, short ones kept, a smooth blend between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rotate the first ``rope_dim`` dims of x (b, heads, l, head_dim) by positions' cos/sin (b, 1, l, rope_dim)."""
    if rope_dim == 0:
        return x
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out.to(x.dtype), rest), dim=-1) if rest.shape[-1] else out.to(x.dtype)


class AttentionMixer(Mixer):
    inv_freq: torch.Tensor
    _exact_inv_freq: torch.Tensor | None = None

    def __init__(self, config, layer_idx: int = 0, **options) -> None:
        super().__init__()
        if options:  # built directly with options (a Block passes the layer's override, already merged below)
            unknown = sorted(set(options) - set(ATTN_FIELDS))
            if unknown:
                raise TypeError(f"unknown options {unknown}; attention takes {list(ATTN_FIELDS)}")
            values = {name: getattr(config, name) for name in ATTN_FIELDS} | dict(options)
            settings = AttentionSettings.resolve(config.d_model, values, f"layer {layer_idx}")
        else:
            settings = config.attention_settings(layer_idx)
        self.settings = settings
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.heads, self.kv_heads, self.head_dim = settings.heads, settings.kv_heads, settings.head_dim
        self.window = settings.window
        self.q_proj = nn.Linear(self.d_model, self.heads * self.head_dim, bias=settings.bias)
        self.k_proj = nn.Linear(self.d_model, self.kv_heads * self.head_dim, bias=settings.bias)
        self.v_proj = nn.Linear(self.d_model, self.kv_heads * self.head_dim, bias=settings.bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, self.d_model, bias=settings.out_bias)
        self.register_buffer("inv_freq", rope_inverse_frequencies(settings).float(), persistent=False)

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> LayerState:
        return {
            "k": torch.zeros(batch_size, self.kv_heads, 0, self.head_dim, device=device),
            "v": torch.zeros(batch_size, self.kv_heads, 0, self.head_dim, device=device),
            "seen": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def check_state(self, state: LayerState) -> str | None:
        """What makes ``state`` unusable as this layer's KV cache (None when nothing does): k and v must have this
        layer's key/value heads and head_dim and the same number of slots, at most ``window`` of them, and every
        row's ``seen`` must be >= 0. ``seqlab.state.check_state_tensors`` calls it for every state it checks."""
        k, v, seen = state["k"], state["v"], state["seen"]
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4:
                return f"{name} has shape {tuple(t.shape)}: an attention layer's is (batch, kv_heads, slots, head_dim)"
            if t.shape[1] != self.kv_heads:
                return (
                    f"{name} has {t.shape[1]} key/value heads (shape {tuple(t.shape)}), this attention layer has "
                    f"{self.kv_heads} (attn_kv_heads)"
                )
            if t.shape[3] != self.head_dim:
                return f"{name} has head_dim {t.shape[3]}, this attention layer's is {self.head_dim} (attn_head_dim)"
        if k.shape[2] != v.shape[2]:
            return f"k holds {k.shape[2]} slots and v {v.shape[2]}: one layer's k and v hold the same slots"
        if self.window is not None and k.shape[2] > self.window:
            return f"k and v hold {k.shape[2]} slots, more than the layer's window ({self.window})"
        if seen.dim() == 1 and seen.numel() and bool((seen < 0).any()):
            return f"seen holds {int(seen.min())}: the number of tokens a row has consumed is >= 0"
        return None

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        """The rotary frequencies (fp32 values, as HF's ``inv_freq``) in float64, from the settings, cached per
        device. Not the ``inv_freq`` buffer: ``model.to(torch.bfloat16)`` casts buffers too, which would round each
        frequency to 8 bits (and ``.float()`` afterwards would not undo it), turning every angle at distance d by
        up to d / 256 of its own size."""
        exact = self._exact_inv_freq
        if exact is None or exact.device != device:
            exact = rope_inverse_frequencies(self.settings).float().to(device=device, dtype=torch.float64)
            self._exact_inv_freq = exact
        return exact

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape (b, 1, l, rope_dim) for absolute positions (b, l)."""
        angles = positions.to(torch.float64)[..., None] * self._frequencies(positions.device)
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        state: LayerState | None = None,
        return_state: bool = True,
        states_at=None,
        cu_seqlens: torch.Tensor | None = None,
    ):
        """(out, new_state); with ``states_at`` (strictly increasing positions 1..l of this call) also the KV
        caches after those positions: (out, new_state, [cache at p for p in states_at]).

        ``cu_seqlens`` (N + 1,) (packed rows: hidden (1, T, d), N sequences end to end): causal attention inside
        each sequence only (one block-diagonal mask, one SDPA call), rotary positions from 0 per sequence, or from
        row i's ``seen`` when ``state`` (N rows) holds a cache to continue; the new state holds one cache per
        sequence (right-aligned, ``seen`` per row)."""
        if cu_seqlens is not None:
            if states_at is not None:
                raise InputError("states_at cannot be combined with packed rows (cu_seqlens)")
            return self._forward_packed(hidden, state, return_state, cu_seqlens)
        b, length, _ = hidden.shape
        if states_at is not None:
            states_at = check_states_at(states_at, length)
        q = self.q_proj(hidden).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        seen = torch.zeros(b, dtype=torch.long, device=hidden.device) if state is None else state["seen"]
        positions = seen[:, None] + torch.arange(length, device=hidden.device)
        if self.settings.rope_dim:
            cos, sin = self._rope(positions, torch.float32 if q.dtype != torch.float64 else q.dtype)
            q, k = apply_rope(q, cos, sin, self.settings.rope_dim), apply_rope(k, cos, sin, self.settings.rope_dim)
        perturb = self._perturb
        if perturb is not None:  # DRµGS sites, per head (b, heads, l, head_dim): k and v enter the cache perturbed
            q, k, v = perturb("q", q), perturb("k", k), perturb("v", v)
        slots = 0 if state is None else state["k"].shape[2]
        if state is not None and slots:
            keys = torch.cat((state["k"].to(k.dtype), k), dim=2)
            values = torch.cat((state["v"].to(v.dtype), v), dim=2)
        else:
            keys, values = k, v
        if slots == 0 and self.window is None:
            mask, causal = None, length > 1
        else:
            mask, causal = self._mask(seen, slots, length), False
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        if perturb is not None:
            out = perturb("attn_out", out)
        out = self.o_proj(out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))
        if states_at is not None:
            at = [self._cache_at(keys, values, seen, slots + p, p) for p in states_at]
            return out, self._cache_at(keys, values, seen, keys.shape[2], length), at
        if not return_state:
            return out, None
        return out, self._cache_at(keys, values, seen, keys.shape[2], length)

    def _forward_packed(self, hidden: torch.Tensor, state: LayerState | None, return_state: bool, cu: torch.Tensor):
        """``forward`` over packed rows; see there. No loop over the sequences: every query attends through one
        mask over [the N caches laid end to end, the T new keys]."""
        b, length, _ = hidden.shape
        if b != 1:
            raise InputError(f"packed rows (cu_seqlens) need hidden of batch 1 (sequences end to end), got batch {b}")
        device = hidden.device
        cu = cu.to(device=device, dtype=torch.long)
        n = cu.numel() - 1
        if state is not None and state["seen"].shape[0] != n:
            raise InputError(
                f"state holds {state['seen'].shape[0]} rows, the packed input {n} sequences (cu_seqlens): give one "
                "state row per sequence"
            )
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=length)  # (T,)
        local = torch.arange(length, device=device) - cu[:-1][seq]  # position inside its own sequence
        seen = torch.zeros(n, dtype=torch.long, device=device) if state is None else state["seen"].to(device)
        query_pos = seen[seq] + local  # absolute position of every token in its own sequence (T,)
        q = self.q_proj(hidden).view(1, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(1, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(1, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.settings.rope_dim:
            cos, sin = self._rope(query_pos[None], torch.float32 if q.dtype != torch.float64 else q.dtype)
            q, k = apply_rope(q, cos, sin, self.settings.rope_dim), apply_rope(k, cos, sin, self.settings.rope_dim)
        perturb = self._perturb
        if perturb is not None:
            q, k, v = perturb("q", q), perturb("k", k), perturb("v", v)
        slots = 0 if state is None else state["k"].shape[2]
        # the keys: row i's cache slots (positions seen_i - slots .. seen_i - 1, right-aligned), all rows end to
        # end, then the new keys; key (owner, absolute position) for the mask
        if state is not None and slots:
            cache_k = state["k"].to(k.dtype).permute(1, 0, 2, 3).reshape(1, self.kv_heads, n * slots, self.head_dim)
            cache_v = state["v"].to(v.dtype).permute(1, 0, 2, 3).reshape(1, self.kv_heads, n * slots, self.head_dim)
            keys, values = torch.cat((cache_k, k), dim=2), torch.cat((cache_v, v), dim=2)
            slot = torch.arange(slots, device=device)
            cache_owner = torch.arange(n, device=device).repeat_interleave(slots)
            cache_pos = (seen[:, None] - slots + slot[None, :]).reshape(-1)
            key_owner, key_pos = torch.cat((cache_owner, seq)), torch.cat((cache_pos, query_pos))
        else:
            keys, values, key_owner, key_pos = k, v, seq, query_pos
        ok = (key_owner[None, :] == seq[:, None]) & (key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos[:, None])
        if self.window is not None:
            ok = ok & (key_pos[None, :] > query_pos[:, None] - self.window)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=ok[None, None], enable_gqa=self.kv_heads != self.heads
        )
        if perturb is not None:
            out = perturb("attn_out", out)
        out = self.o_proj(out.transpose(1, 2).reshape(1, length, self.heads * self.head_dim))
        if not return_state:
            return out, None
        # per sequence: its cache then its new keys, the last `keep` of them right-aligned (as a row alone keeps)
        new_seen = seen + lengths
        real = new_seen if self.window is None else new_seen.clamp(max=self.window)  # entries a row alone keeps
        keep = int(real.max())
        r = torch.arange(keep, device=device)
        index = (slots + lengths)[:, None] - keep + r[None, :]  # index into row i's [cache, new keys] (n, keep)
        from_cache = index < slots
        source = torch.where(
            from_cache,
            torch.arange(n, device=device)[:, None] * slots + index.clamp(min=0),
            n * slots + cu[:-1][:, None] + index - slots,
        ).clamp(0, keys.shape[2] - 1)
        valid = r[None, :] >= keep - real[:, None]  # older slots are padding (zeros)
        state_dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32

        def gather(t: torch.Tensor) -> torch.Tensor:
            picked = t[0][:, source.reshape(-1)].view(self.kv_heads, n, keep, self.head_dim).transpose(0, 1)
            return (picked * valid[:, None, :, None]).to(state_dtype).contiguous()

        return out, {"k": gather(keys), "v": gather(values), "seen": new_seen}

    def _cache_at(
        self, keys: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, end: int, consumed: int
    ) -> LayerState:
        """The cache after ``consumed`` tokens of this call: the slots of cat(old cache, new keys) up to ``end``
        (slots + consumed), cut as a step-by-step run cuts them: to the longest row's ``seen`` (older slots are
        padding) and to the window. Taken from the full, uncut keys, so a windowed layer's earlier cache still has
        the entries the final cut drops."""
        new_seen = seen + consumed
        keep = int(new_seen.max())  # slots before every row's first real entry are padding: drop them
        if self.window is not None:
            keep = min(keep, self.window)
        keep = min(keep, end)
        state_dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
        return {
            "k": keys[:, :, end - keep : end].to(state_dtype).contiguous(),
            "v": values[:, :, end - keep : end].to(state_dtype).contiguous(),
            "seen": new_seen,
        }

    def _mask(self, seen: torch.Tensor, slots: int, length: int) -> torch.Tensor:
        """(b, 1, length, slots + length) bool: True where a query may look (real, causal, inside the window)."""
        device = seen.device
        slot = torch.arange(slots + length, device=device)
        # absolute position of every key slot per row: cached slots end at seen - 1, new ones start at seen
        key_pos = seen[:, None] - slots + slot[None, :]  # (b, slots + length)
        query_pos = seen[:, None] + torch.arange(length, device=device)[None, :]  # (b, length)
        ok = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query_pos[:, :, None])
        if self.window is not None:
            ok = ok & (key_pos[:, None, :] > query_pos[:, :, None] - self.window)
        return ok[:, None]

    def step(self, hidden: torch.Tensor, state: LayerState):
        out, new = self.forward(hidden[:, None], state, True)
        return out[:, 0], new
