"""States at chosen positions of one forward (``model(x, state, states_at=[...])``), the rollback points of
speculative decoding (issue 19): each must equal the state that stepping one token at a time reaches, and
continuing from it must give the stepped run's logits. Mamba-1, Mamba-2, a Mamba + attention hybrid with
grouped-query heads, a sliding-window attention stack (window 5, shorter than the input: the earlier caches need
entries the final cut drops) and an MoE stack; batch 2; ref, chunked and (under the interpreter) triton backends.
"""

import pytest
import torch

from seqlab import RecurrentState
from seqlab.errors import InputError
from seqlab.kernels import triton_available
from seqlab.testing import rel_err, tiny_hybrid_options, tiny_lm, tiny_moe_options

MOE = tiny_moe_options()
ATTN_HYBRID = tiny_hybrid_options()
WINDOW = dict(ssm="attention", n_layer=2, ffn="mlp", d_ffn=24, attn_heads=2, attn_window=5, attn_bias=True)
STACKS = {"moe": MOE, "attn_hybrid": ATTN_HYBRID, "window": WINDOW}
KINDS = ["mamba1", "mamba2", "attn_hybrid", "window", "moe"]
PREFIX, LENGTH, BATCH = 6, 7, 2


def model_for(kind: str, seed: int = 0):
    return tiny_lm(**STACKS[kind], seed=seed) if kind in STACKS else tiny_lm(kind, seed=seed)


def assert_states_equal(got: RecurrentState, want: RecurrentState, tol: float = 1e-5) -> None:
    assert got.position == want.position
    assert got.fingerprint == want.fingerprint
    assert got.batch_size == want.batch_size
    tg, tw = got.tensors(), want.tensors()
    assert tg.keys() == tw.keys()
    for key in tg:
        assert tg[key].shape == tw[key].shape, key
        assert tg[key].dtype == tw[key].dtype, key
        assert rel_err(tg[key], tw[key]) <= tol, key


def stepped(model, ids, state):
    """The states after each token of ids, stepping one token at a time from ``state``."""
    states = []
    for t in range(ids.shape[1]):
        state = model.step(ids[:, t], state).state
        states.append(state)
    return states


def check_kind(kind: str, backend: str, positions=None, seed: int = 0) -> None:
    model = model_for(kind).set_backend(backend)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 32, (BATCH, PREFIX), generator=gen)
    ids = torch.randint(0, 32, (BATCH, LENGTH), generator=gen)
    after = torch.randint(0, 32, (BATCH, 3), generator=gen)
    positions = list(range(1, LENGTH + 1)) if positions is None else positions
    with torch.no_grad():
        state = model(prompt).state
        out = model(ids, state, states_at=positions)
        plain = model(ids, state)
        want = stepped(model, ids, state)
        assert rel_err(out.logits, plain.logits) <= 1e-5
        assert_states_equal(out.state, plain.state)
        assert out.states_at is not None and len(out.states_at) == len(positions)
        for p, got in zip(positions, out.states_at):
            assert got.position == PREFIX + p
            assert_states_equal(got, want[p - 1])
            # rolling back to got and continuing equals continuing from the stepped state
            assert rel_err(model(after, got).logits, model(after, want[p - 1]).logits) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_every_position_equals_stepping(kind, backend):
    check_kind(kind, backend)


@pytest.mark.parametrize("kind", KINDS)
def test_random_subset_equals_stepping(kind):
    gen = torch.Generator().manual_seed(len(kind))
    chosen = sorted(int(p) + 1 for p in torch.randperm(LENGTH, generator=gen)[:3])
    check_kind(kind, "chunked", chosen, seed=1)
    check_kind(kind, "ref", [LENGTH], seed=2)


@pytest.mark.skipif(not triton_available(), reason="Triton kernels cannot run here")
def test_triton_backend_under_the_interpreter():
    """Triton splits the call at the positions and threads the state (as chunked does): kernel-level, tiny shapes
    (the whole model under the interpreter took ~10 s)."""
    from seqlab import kernels

    gen = torch.Generator().manual_seed(7)
    b, d, n, l = 1, 4, 2, 5
    u, delta = torch.randn(b, d, l, generator=gen), torch.randn(b, d, l, generator=gen)
    A = -torch.rand(d, n, generator=gen)
    B, C = torch.randn(b, n, l, generator=gen), torch.randn(b, n, l, generator=gen)
    want = kernels.selective_scan(u, delta, A, B, C, delta_softplus=True, states_at=[2, 5], backend="ref")
    got = kernels.selective_scan(u, delta, A, B, C, delta_softplus=True, states_at=[2, 5], backend="triton")
    for have, ref in zip(got, want):
        assert rel_err(have, ref) <= 1e-5
    x, dt = torch.randn(b, l, 2, 4, generator=gen), torch.randn(b, l, 2, generator=gen)
    Bs, Cs = torch.randn(b, l, 1, n, generator=gen), torch.randn(b, l, 1, n, generator=gen)
    A2 = -torch.rand(2, generator=gen)
    want = kernels.ssd_scan(x, dt, A2, Bs, Cs, 4, dt_softplus=True, states_at=[3], backend="ref")
    got = kernels.ssd_scan(x, dt, A2, Bs, Cs, 4, dt_softplus=True, states_at=[3], backend="triton")
    for have, ref in zip(got, want):
        assert rel_err(have, ref) <= 1e-5


def test_fresh_state_and_default_path_unchanged():
    model = model_for("attn_hybrid")
    ids = torch.randint(0, 32, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, states_at=[2, 5])
        want = stepped(model, ids, None)
        plain = model(ids)
    assert plain.states_at is None
    assert len(plain) == 2 and len(out) == 2  # still unpacks as (output, state)
    assert_states_equal(out.states_at[0], want[1])
    assert_states_equal(out.states_at[1], want[4])
    assert model(ids, states_at=[]).states_at == []


def test_long_input_split_in_blocks():
    model = model_for("window")
    model.inference_block = 4
    ids = torch.randint(0, 32, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, states_at=[3, 4, 5, 9, 11])
        want = stepped(model, ids, None)
    for p, got in zip([3, 4, 5, 9, 11], out.states_at):
        assert_states_equal(got, want[p - 1])
    assert_states_equal(out.state, want[-1])


def test_gradients_flow_through_states_at():
    model = model_for("mamba2")
    ids = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(5))
    out = model(ids, states_at=[2])
    out.states_at[0].layers[0]["ssm"].sum().backward()
    assert model.backbone.layers[0].mixer.in_proj.weight.grad is not None


@pytest.mark.parametrize(
    "bad, words",
    [
        ([0], "states_at[0] = 0 is outside 1..4"),
        ([5], "states_at[0] = 5 is outside 1..4"),
        ([1.5], "states_at[0] = 1.5 is not an int"),
        ([True], "states_at[0] = True is not an int"),
        ([3, 2], "states_at[1] = 2 does not come after states_at[0] = 3"),
        ([2, 2], "states_at[1] = 2 does not come after"),
        (3, "states_at must be a list of int positions, got int"),
        ("12", "states_at must be a list of int positions, got str"),
    ],
)
def test_bad_positions_are_input_errors(bad, words):
    model = model_for("mamba1")
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        model(torch.zeros(1, 4, dtype=torch.long), states_at=bad)


def test_kernels_states_at_match_ref():
    """The kernels' own ``states_at``: chunked (split and threaded) equals ref (kept while walking)."""
    from seqlab import kernels

    gen = torch.Generator().manual_seed(6)
    b, d, n, l = 2, 6, 3, 9
    u, delta = torch.randn(b, d, l, generator=gen), torch.randn(b, d, l, generator=gen)
    A = -torch.rand(d, n, generator=gen)
    B, C = torch.randn(b, n, l, generator=gen), torch.randn(b, n, l, generator=gen)
    h0 = torch.randn(b, d, n, generator=gen)
    got = {
        backend: kernels.selective_scan(
            u, delta, A, B, C, initial_state=h0, delta_softplus=True, states_at=[2, 9], backend=backend
        )
        for backend in ("ref", "chunked")
    }
    assert got["ref"][1].shape == (b, 2, d, n)
    for want, have in zip(got["ref"], got["chunked"]):
        assert rel_err(have, want) <= 1e-5
    x = torch.randn(b, l, 2, 4, generator=gen)
    dt = torch.randn(b, l, 2, generator=gen)
    Bs, Cs = torch.randn(b, l, 1, n, generator=gen), torch.randn(b, l, 1, n, generator=gen)
    A2 = -torch.rand(2, generator=gen)
    ssd = {
        backend: kernels.ssd_scan(
            x, dt, A2, Bs, Cs, 4, dt_softplus=True, return_final_state=True, states_at=[1, 5], backend=backend
        )
        for backend in ("ref", "chunked")
    }
    assert ssd["ref"][2].shape == (b, 2, 2, 4, n)
    for want, have in zip(ssd["ref"], ssd["chunked"]):
        assert rel_err(have, want) <= 1e-5
    conv_y, conv_final, tails = kernels.causal_conv1d(
        u, torch.randn(d, 4, generator=gen), return_final_state=True, states_at=[1, 9], backend="chunked"
    )
    assert tails.shape == (b, 2, d, 3)
    assert torch.equal(tails[:, 1], conv_final)
    assert torch.equal(tails[:, 0, :, 2], u[:, :, 0])
    with pytest.raises(kernels.KernelInputError, match=r"states_at\[0\] = 10 is outside 1\.\.9"):
        kernels.selective_scan(u, delta, A, B, C, states_at=[10], backend="chunked")


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_scan_copies_states_out_of_its_blocks(grad):
    """Without autograd the chunked scan copies the states out of its blocks' pass 2; small chunks and blocks put
    the positions in several chunks and blocks. With autograd it splits and threads; both equal ref."""
    from seqlab.kernels.scan.chunked import selective_scan_chunked
    from seqlab.kernels.scan.ref import selective_scan_ref

    gen = torch.Generator().manual_seed(8)
    b, d, n, l = 2, 4, 3, 23
    u, delta = torch.randn(b, d, l, generator=gen), torch.randn(b, d, l, generator=gen)
    A = -torch.rand(d, n, generator=gen)
    B, C = torch.randn(b, 2, n, l, generator=gen), torch.randn(b, 2, n, l, generator=gen)
    z, h0 = torch.randn(b, d, l, generator=gen), torch.randn(b, d, n, generator=gen)
    positions = [1, 2, 7, 8, 16, 17, 22, 23]
    options = dict(D=torch.rand(d, generator=gen), z=z, delta_softplus=True, initial_state=h0)
    want = selective_scan_ref(u, delta, A, B, C, return_final_state=True, states_at=positions, **options)
    u_in = u.clone().requires_grad_(grad)
    got = selective_scan_chunked(
        u_in, delta, A, B, C, return_final_state=True, states_at=positions, chunk_size=2, block_elems=64, **options
    )
    assert got[2].shape == (b, len(positions), d, n)
    for have, ref in zip(got, want):
        assert rel_err(have, ref) <= 1e-5
    if grad:
        got[2].sum().backward()
        assert u_in.grad is not None
    only = selective_scan_chunked(u, delta, A, B, C, states_at=[5], chunk_size=2, block_elems=64, **options)
    ref_only = selective_scan_ref(u, delta, A, B, C, states_at=[5], **options)
    assert len(only) == 2 and rel_err(only[1], ref_only[1]) <= 1e-5


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_ssd_states_directly_and_split(grad):
    """The chunked SSD scan's states at positions, from the segment sums for short calls and split and threaded
    for long ones (monkeypatched bound), equal ref's; gradients flow."""
    from seqlab.kernels.ssd import chunked
    from seqlab.kernels.ssd.ref import ssd_scan_ref

    gen = torch.Generator().manual_seed(9)
    b, l, h, p, g, n = 2, 13, 4, 3, 2, 5
    x, dt = torch.randn(b, l, h, p, generator=gen), torch.randn(b, l, h, generator=gen)
    A = -torch.rand(h, generator=gen) * 2
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    options = dict(
        D=torch.rand(h, generator=gen),
        z=torch.randn(b, l, h, p, generator=gen),
        dt_bias=torch.rand(h, generator=gen),
        dt_softplus=True,
        initial_state=torch.randn(b, h, p, n, generator=gen),
        return_final_state=True,
    )
    positions = [1, 4, 5, 12, 13]
    want = ssd_scan_ref(x, dt, A, B, C, 4, states_at=positions, **options)
    x_in = x.clone().requires_grad_(grad)
    for bound in (chunked._DIRECT_STATES_MAX, 0):
        old, chunked._DIRECT_STATES_MAX = chunked._DIRECT_STATES_MAX, bound
        try:
            got = chunked.ssd_scan_chunked(x_in, dt, A, B, C, 4, states_at=positions, **options)
        finally:
            chunked._DIRECT_STATES_MAX = old
        assert got[2].shape == (b, len(positions), h, p, n)
        for have, ref in zip(got, want):
            assert rel_err(have, ref) <= 1e-5
        if grad:
            got[2].sum().backward()
            assert x_in.grad is not None and bool(torch.isfinite(x_in.grad).all())
