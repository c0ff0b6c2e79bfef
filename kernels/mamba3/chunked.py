"""Mamba-3 scan, chunked form in plain PyTorch: the vectorised CPU path (autograd through plain torch ops).

The sequence is cut into chunks of ``chunk_size`` positions; a Python loop runs over chunks, never over sequences
or positions. With the notation of this package's docstring (L(t, s) = prod_{s<j<=t} alpha_j, lam = sigmoid(trap),
KV_s = sum_r v_s[r] k_s[r]^T), inside a chunk, for t and s of one sequence:

1. angles:   a running sum of tanh(angles) pi dt from the position the chunk (or the sequence) is entered at, on
             top of the carried angle (or the sequence's initial angle), mod 2 pi; then q and k are rotated.
2. intra:    y_t[R] += sum_{s <= t} W(t, s) sum_r (q_t[R] . k_s[r]) v_s[r]
             W(t, s) = L(t, s) (gamma_s + [s < t] (1 - lam_{s+1}) dt_{s+1})
             (the gamma term on the diagonal; the beta term of position s + 1, which pairs q_{s+1..} with k_s).
3. entry:    y_t[R] += L(t, e - 1) E q_t[R], e the position the chunk / sequence is entered at, and
             E = S + (1 - lam_e) dt_e KV_{e-1}: the carried state S with the beta term of position e, which
             reads the previous position's k and v (the carried ones, or the sequence's initial k and v).
4. carry:    the state after the chunk's last position t: L(t, e - 1) E + sum_s W(t, s) KV_s; its k, v, angle.

Packed rows (``cu_seqlens``, batch 1): the masks of step 2 keep t and s in one sequence; a position whose
sequence starts inside the chunk enters from that sequence's initial state (zeros or ``initial_state[i]``)
instead of the carried one; the state after every sequence's last position is computed as in step 4 (for all
the sequences ending in a chunk at once).

Everything runs in float32 (float64 when any input is float64); y is cast back to x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._varlen import seq_idx_from_cu_seqlens
from .ref import (
    _prepared,
    _step,
    angle_increment,
    check_scan_args,
    check_step_args,
    expand_groups,
    rotate,
    wrap_angle,
    zero_state,
)

__all__ = ["mamba3_scan_chunked", "mamba3_state_update_chunked"]


def _ranked(t: torch.Tensor, w) -> torch.Tensor:
    """t (b, l, h, p) -> per rank (b, l, r, h, p): t * w[:, r] (MIMO), or t itself as rank 0 (SISO, w None)."""
    if w is None:
        return t.unsqueeze(2)
    return t.unsqueeze(2) * w.transpose(0, 1)


def _kv(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum over ranks of v k^T: v (..., r, h, p), k (..., r, h, n) -> (..., h, p, n)."""
    return torch.einsum("...rhp,...rhn->...hpn", v, k)


def _packed_states_after(idx, cont, Sp, Hp, seqc, W, Vc, K, dec_entry):
    """Packed rows (batch 1): the states (len(idx), h, p, n) after the chunk positions ``idx``: the entry state
    (carried, or the sequence's own) decayed, plus the chunk's terms of the same sequence (masked in W)."""
    keep = cont[idx].to(Sp.dtype)[:, None, None, None]
    E = Sp[0] * keep
    if Hp is not None:
        E = E + Hp[seqc[idx]] * (1.0 - keep)
    inner = torch.einsum("ish,srhp,srhn->ihpn", W[0, idx], Vc[0], K[0])
    return dec_entry[0, idx][..., None, None] * E + inner


def mamba3_scan_chunked(
    x,
    dt,
    A,
    B,
    C,
    trap,
    angles,
    B_bias,
    C_bias,
    chunk_size=64,
    D=None,
    z=None,
    mimo_x=None,
    mimo_z=None,
    mimo_o=None,
    initial_state=None,
    return_final_state=False,
    cu_seqlens=None,
):
    """Chunked Mamba-3 scan: the arguments and results of ``mamba3_scan_ref`` (see there)."""
    dims, cu = check_scan_args(
        x, dt, A, B, C, trap, angles, B_bias, C_bias, chunk_size, D, z, mimo_x, mimo_z, mimo_o, initial_state,
        cu_seqlens,
    )  # fmt: skip
    cd = dims.compute_dtype
    b, l, h, p, r = dims.b, dims.l, dims.h, dims.p, dims.r
    dev = x.device
    mimo = dims.mimo
    Bb, Cb, Dc, mx, mz, mo = _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o)
    if initial_state is None:
        init = zero_state(dims.rows, dims, dev)
    else:
        init = tuple(t.to(cd) for t in initial_state)
    ang0, h0, k0, v0 = init
    per_rank = mimo and mo is None
    if l == 0:
        y = x.new_zeros((b, 0, r, h, p) if per_rank else (b, 0, h, p))
        return (y, tuple(t.clone() for t in init)) if return_final_state else y

    xc, dtc = x.to(cd), dt.to(cd)
    lam = torch.sigmoid(trap.to(cd))
    adt = A.to(cd) * dtc  # log alpha (b, l, h)
    gamma = lam * dtc
    beta0 = (1.0 - lam) * dtc  # beta / alpha
    Kin = expand_groups(B.to(cd), h) + Bb  # (b, l, r, h, n)
    Qin = expand_groups(C.to(cd), h) + Cb
    inc = angle_increment(angles.to(cd), dtc)  # (b, l, h, a)
    V = _ranked(xc, mx)  # (b, l, r, h, p)

    packed = cu is not None
    Hp = None
    if packed:
        cu = cu.to(dev)
        seq = seq_idx_from_cu_seqlens(cu)[0]  # (l,)
        starts = cu[:-1]
        st = starts[seq]  # the first position of every position's sequence
        # the entry state of every sequence: its initial state plus the beta term of its first position
        if initial_state is not None:
            Hp = h0 + beta0[0, starts][..., None, None] * _kv(_ranked(v0.unsqueeze(1), mx)[:, 0], k0)
        ends_cpu = (cu[1:] - 1).cpu()
        # the carried state is never read before the first chunk (every position there enters its sequence)
        S = h0.new_zeros(1, h, dims.p, dims.n)
        k_prev, v_prev, angle = k0.new_zeros(1, r, h, dims.n), v0.new_zeros(1, h, p), ang0.new_zeros(1, h, dims.a)
    else:
        S, k_prev, v_prev, angle = h0, k0, v0, ang0

    ys = []
    finals = []
    for c0 in range(0, l, chunk_size):
        c1 = min(c0 + chunk_size, l)
        q = c1 - c0
        if packed:
            seqc = seq[c0:c1]
            cont = st[c0:c1] < c0  # entered from the carried state (its sequence began before this chunk)
            rel = (st[c0:c1] - c0).clamp(min=0)  # where each position's run inside the chunk begins
        else:
            cont = torch.ones(q, dtype=torch.bool, device=dev)
            rel = torch.zeros(q, dtype=torch.long, device=dev)
        contf = cont.to(cd)

        # 1. angles: running sums from the entry position, on top of the entry angle
        csum = torch.cumsum(inc[:, c0:c1], dim=1)  # (b, q, h, a)
        cs0 = F.pad(csum, (0, 0, 0, 0, 1, 0))
        base = angle.unsqueeze(1) * contf[None, :, None, None]
        if packed:
            base = base + ang0[seqc].unsqueeze(0) * (1.0 - contf)[None, :, None, None]
        ang = wrap_angle(base + csum - cs0[:, rel])
        K = rotate(Kin[:, c0:c1], ang.unsqueeze(2), mimo)  # (b, q, r, h, n)
        Q = rotate(Qin[:, c0:c1], ang.unsqueeze(2), mimo)
        Vc = V[:, c0:c1]

        # decays: L(t, s) = exp(ca_t - ca_s); from the entry: exp(ca_t - ca_{entry - 1})
        ca = torch.cumsum(adt[:, c0:c1], dim=1)  # (b, q, h)
        ca0 = F.pad(ca, (0, 0, 1, 0))
        dec_entry = torch.exp(ca - ca0[:, rel])  # (b, q, h)

        # 2. intra-chunk weights W (b, t, s, h)
        ar = torch.arange(q, device=dev)
        lower = ar[:, None] >= ar[None, :]
        if packed:
            lower = lower & (seqc[:, None] == seqc[None, :])
        strict = (ar[:, None] > ar[None, :]).to(cd)
        seg = (ca[:, :, None, :] - ca[:, None, :, :]).masked_fill(~lower[None, :, :, None], float("-inf"))
        shifted = F.pad(beta0[:, c0 + 1 : c1], (0, 0, 0, 1))  # (1 - lam_{s+1}) dt_{s+1}; unused at the end
        coef = gamma[:, None, c0:c1, :] + strict[None, :, :, None] * shifted[:, None, :, :]
        W = torch.exp(seg) * coef  # (b, t, s, h)
        qk = torch.einsum("btRhn,bsrhn->bhtRsr", Q, K) * W.permute(0, 3, 1, 2)[:, :, :, None, :, None]
        y_c = torch.einsum("bhtRsr,bsrhp->btRhp", qk, Vc)

        # 3. entry: the carried state with the beta term of the chunk's first position
        Sp = S + beta0[:, c0][..., None, None] * _kv(_ranked(v_prev.unsqueeze(1), mx)[:, 0], k_prev)
        y_c = y_c + torch.einsum("bhpn,btRhn->btRhp", Sp, Q) * (dec_entry * contf[None, :, None])[:, :, None, :, None]
        if Hp is not None:
            Hsel = Hp[seqc]  # (q, h, p, n): the entry state of each position's sequence
            w = (dec_entry[0] * (1.0 - contf)[:, None])[:, None, :, None]
            y_c = y_c + (torch.einsum("thpn,tRhn->tRhp", Hsel, Q[0]) * w).unsqueeze(0)
        ys.append(y_c)

        # 4. the states after given positions of the chunk
        if packed:
            if return_final_state:
                ends = ends_cpu[(ends_cpu >= c0) & (ends_cpu < c1)] - c0
                if ends.numel():
                    idx = ends.to(dev)
                    finals.append(
                        (
                            ang[0, idx],
                            _packed_states_after(idx, cont, Sp, Hp, seqc, W, Vc, K, dec_entry),
                            K[0, idx],
                            xc[0, c0 + idx],
                        )
                    )
            if c1 < l:
                S = _packed_states_after(torch.tensor([q - 1], device=dev), cont, Sp, Hp, seqc, W, Vc, K, dec_entry)
        else:
            S = dec_entry[:, q - 1][..., None, None] * Sp + torch.einsum("bsh,bsrhp,bsrhn->bhpn", W[:, q - 1], Vc, K)
        k_prev, v_prev, angle = K[:, q - 1], xc[:, c1 - 1], ang[:, q - 1]

    y = torch.cat(ys, dim=1)  # (b, l, r, h, p)
    if Dc is not None:
        y = y + Dc[:, None] * V
    if z is not None:
        y = y * F.silu(_ranked(z.to(cd), mz))
    if not mimo:
        y = y[:, :, 0]
    elif mo is not None:
        y = torch.einsum("blrhp,hrp->blhp", y, mo)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    if packed:
        final = tuple(torch.cat([f[j] for f in finals], dim=0) for j in range(4))
    else:
        final = (angle, S, k_prev, v_prev)
    return y, final


def mamba3_state_update_chunked(
    state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D=None, z=None, mimo_x=None, mimo_z=None, mimo_o=None
):
    """One decode step (the reference's step math, vectorised over batch and heads, in float32 / float64):
    (y, new_state); the state passed in is not modified."""
    dims = check_step_args(state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)
    cd = dims.compute_dtype
    Bb, Cb, Dc, mx, mz, mo = _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o)
    dtc = dt.to(cd)
    y, new_state = _step(
        tuple(t.to(cd) for t in state), x.to(cd), dtc, A.to(cd), expand_groups(B.to(cd), dims.h),
        expand_groups(C.to(cd), dims.h), trap.to(cd), angle_increment(angles.to(cd), dtc), Bb, Cb, Dc,
        None if z is None else z.to(cd), mx, mz, mo, dims.mimo,
    )  # fmt: skip
    return y.to(x.dtype), new_state
