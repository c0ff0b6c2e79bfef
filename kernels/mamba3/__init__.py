"""Mamba-3 scan (exponential-trapezoidal discretisation, data-dependent rotary state, SISO or MIMO).

Modules: ``ref`` (the float64-capable sequential walk, the truth), ``chunked`` (vectorised PyTorch, autograd
through plain ops), ``triton_ops`` / ``triton_kernels`` (Triton forward + backward). Entry points:
``seqlab.kernels.mamba3_scan`` and ``seqlab.kernels.mamba3_state_update`` (``kernels/_dispatch.py``).

Shapes (b batch, l length, h heads, p head dim, r MIMO rank (1: SISO), g B/C groups (h divisible by g; head i
reads group i // (h / g)), n state size, a rotary pairs (2a <= n)):

    x (b, l, h, p)         the value V (MIMO: before the mimo_x up-projection)
    dt, A, trap (b, l, h)  step (> 0, already softplus'ed), rate (< 0), trapezoid gate before the sigmoid
    B, C (b, l, r, g, n)   K and Q (after their RMSNorm, before the bias)
    angles (b, l, a)       raw angle projection, shared by all heads
    B_bias, C_bias (h, r, n);  D (h,);  z (b, l, h, p);  mimo_x, mimo_z, mimo_o (h, r, p) (MIMO only)
    state: (angle (b, h, a), ssm (b, h, p, n), k (b, r, h, n), v (b, h, p)), float32 (float64 in float64 runs)

Per position t and head (all per head; the rank index r' runs over 0..r-1):

    angle_t  = (angle_{t-1} + tanh(angles_t) * pi * dt_t)  mod 2 pi                      (per head: dt is)
    k_t[r']  = rot(B_t[r'] + B_bias[r'], angle_t),  q_t[r'] = rot(C_t[r'] + C_bias[r'], angle_t)
    v_t[r']  = x_t * mimo_x[r']          (SISO: v_t[0] = x_t)
    lam_t    = sigmoid(trap_t),  alpha_t = exp(A_t dt_t),  beta_t = (1 - lam_t) dt_t alpha_t,  gamma_t = lam_t dt_t
    h_t (p, n) = alpha_t h_{t-1} + beta_t sum_r' v_{t-1}[r'] k_{t-1}[r']^T + gamma_t sum_r' v_t[r'] k_t[r']^T
    y_t[r']  = h_t q_t[r'] + D v_t[r']
    SISO:  y_t = y_t[0] * silu(z_t)                                   (no gate when z is None)
    MIMO:  y_t = sum_r' mimo_o[r'] * y_t[r'] * silu(z_t * mimo_z[r'])  (no gate when z is None);
           mimo_o None: the per-rank y_t[r'] (b, l, r, h, p), ungated (z must then be None: the caller applies
           its gated norm and mimo_o)

The state after position t is (angle_t, h_t, k_t (rotated, biased), x_t); k_{t-1}, x_{t-1} of the initial state
feed the beta term of the first position. rot(u, theta) rotates the pairs (u_i, u_j) to
(u_i cos - u_j sin, u_i sin + u_j cos), theta = angle[m] for the m-th pair; SISO pairs are interleaved,
(2m, 2m + 1) for m < a; MIMO pairs are halves, (m, m + n/2) for m < a (n even); the other dims are not rotated.
(Sources, mamba_ssm: tests/ops/triton/test_mamba3_siso.py mamba3_siso_step_ref; tests/ops/tilelang/
test_mamba3_mimo.py mamba3_MIMO_step_ref and mamba3_MIMO_chunk_ref's rotate-half layout;
ops/triton/mamba3/mamba3_mimo_rotary_step.py ROTATE_PAIRWISE=False; ops/cute/mamba3/mamba3_step_fn.py for the
MIMO v state (raw x, projected by mimo_x at use) and the gate / mimo_o order; modules/mamba3.py for shapes.)

Packed rows (``cu_seqlens``, batch 1): every sequence starts from zeros or ``initial_state[i]`` (all four parts,
so its first beta term reads that row's k and v) and the final state has one row per sequence.

Unrolled (what the chunked path computes): for s <= t in one sequence, with L(t, s) = prod_{s<j<=t} alpha_j,

    h_t = L(t, t0) [h_{t0} + (1 - lam_{t0+1}) dt_{t0+1} KV_{t0}]
          + sum_{t0<s<=t} L(t, s) (gamma_s + [s < t] (1 - lam_{s+1}) dt_{s+1}) KV_s

(KV_s = sum_r' v_s[r'] k_s[r']^T): the gamma term on the diagonal, the beta term pairing q_t with k_{t-1}.
"""
