"""Packed rows through the model (issue 23): several sequences end to end in one row, their boundaries as
``cu_seqlens`` (or ``seq_idx``), each run exactly as if alone.

For Mamba-1, Mamba-2, an attention hybrid (Mamba-1, attention, Mamba-2) and an MoE model: the packed forward
equals running each sequence alone (logits, the per-sequence final states tensor by tensor, and the gradients of
the parameters, of the input embeddings and of per-sequence initial states), starting from nothing or from a
per-sequence initial state; hypothesis over random length mixes on the default (chunked) kernels; the refusals
(bidirectional, states_at, batch != 1, state rows != sequences, bad boundaries); and ``seqlab.generate.prefill``,
the ragged prompts' packed prefill, against one-by-one prefill.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab import RecurrentState
from seqlab.errors import InputError, StateMismatchError
from seqlab.generate import generate, prefill
from seqlab.testing import rel_err, tiny_hybrid_options, tiny_lm

MODELS = {
    "mamba1": dict(ssm="mamba1"),
    "mamba2": dict(ssm="mamba2"),
    "hybrid": tiny_hybrid_options(),
    "window": dict(tiny_hybrid_options(), attn_window=3),
    "moe": dict(ssm="mamba2", ffn="moe", moe_experts=3, moe_top_k=2),
    "mamba3": dict(ssm="mamba3", headdim=8, chunk_size=4),
    "mamba3_mimo": dict(ssm="mamba3", headdim=8, chunk_size=4, mamba3_mimo_rank=2),
}


def _model(kind: str, double: bool = False):
    model = tiny_lm(**MODELS[kind])
    return model.double().set_backend("ref") if double else model


_CACHE: dict = {}


def model_of(kind: str, double: bool = False):
    key = (kind, double)
    if key not in _CACHE:
        _CACHE[key] = _model(kind, double)
    return _CACHE[key]


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def trimmed(layer_tensor: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """A packed state's row, cut to the slots of ``want`` (a KV cache is padded on the left to the longest row;
    that padding must be zeros)."""
    if layer_tensor.shape == want.shape:
        return layer_tensor
    extra = layer_tensor.shape[2] - want.shape[2]
    assert extra > 0 and not layer_tensor[:, :, :extra].any(), "a KV cache's left padding must be zeros"
    return layer_tensor[:, :, extra:]


def assert_rows_equal(packed: RecurrentState, alone: list[RecurrentState], tol: float) -> None:
    assert packed.batch_size == len(alone)
    assert packed.positions == tuple(s.position for s in alone)
    for i, state in enumerate(alone):
        row = packed.select(i)
        assert row.position == state.position
        for name, want in state.tensors().items():
            got = trimmed(row.tensors()[name], want)
            if want.is_floating_point():
                assert rel_err(got, want) <= tol, (i, name, rel_err(got, want))
            else:
                assert torch.equal(got, want), (i, name)


def initial_states(model, prefixes: list[int], seed: int) -> list[RecurrentState]:
    """One batch-of-one state per sequence, after a random prefix of the given length (0: a fresh state)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in prefixes:
        if n == 0:
            state = model.init_state(1)
            out.append(state.to(dtype=next(model.parameters()).dtype))
        else:
            out.append(model(torch.randint(0, model.vocab_size, (1, n), generator=g)).state)
    return out


# --------------------------------------------------------------------------------------------------------------
# packed == each alone, float64 references: logits, states, gradients


CASES = [(kind, from_state) for kind in ("mamba1", "mamba2", "hybrid", "window") for from_state in (False, True)]


@pytest.mark.parametrize("kind, from_state", [*CASES, ("moe", True), ("mamba3", True), ("mamba3_mimo", True)])
def test_packed_equals_alone_with_gradients(kind, from_state):
    model = model_of(kind, double=True)
    lengths = [3, 1, 6, 2]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.vocab_size, (1, sum(lengths)), generator=g)
    cu = cu_of(lengths)
    # leaves: the input embeddings and (from_state) every floating tensor of the stacked initial states
    embedded = model.embeddings(ids).detach().requires_grad_(True)
    start = None
    if from_state:
        start = RecurrentState.stack(initial_states(model, [2, 0, 5, 4], seed=2)).detach()
        for layer in start.layers:
            for name, t in layer.items():
                if t.is_floating_point():
                    layer[name] = t.clone().requires_grad_(True)
    weights = torch.randn(1, sum(lengths), model.config.d_model, generator=g, dtype=torch.float64)

    def loss_of(hidden, state, w):
        return (hidden * w).sum() + sum((t.double() ** 2).sum() for t in state.tensors().values() if t.requires_grad)

    model.zero_grad()
    hidden, packed = model.backbone(embedded, start, cu_seqlens=cu)
    loss_of(hidden, packed, weights).backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grad_embedded = embedded.grad.clone()
    grad_start = None if start is None else {n: t.grad.clone() for n, t in start.tensors().items() if t.requires_grad}

    # each sequence alone, from its own row of the same leaves
    embedded.grad = None
    if start is not None:
        for t in start.tensors().values():
            t.grad = None
    model.zero_grad()
    logits_alone, states_alone, total = [], [], 0
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        row = None
        if start is not None:
            row = RecurrentState(
                [{n: t[i : i + 1] for n, t in layer.items()} for layer in start.layers], 0, start.fingerprint
            )
            row.position = start.positions[i]
        h, s = model.backbone(embedded[:, a:b], row)
        total = total + loss_of(h, s, weights[:, a:b])
        logits_alone.append(model.head(h))
        states_alone.append(s)
    total.backward()

    # the MoE router runs in fp32 (seqlab.ffn.moe.route): one GEMM over the packed row vs one per sequence
    tol = 1e-6 if kind == "moe" else 1e-10
    assert rel_err(model.head(hidden), torch.cat(logits_alone, 1)) <= tol
    assert_rows_equal(packed, states_alone, tol)
    assert rel_err(embedded.grad, grad_embedded) <= tol
    # A_log, D and dt_bias enter the kernels through .float() (fp32 even in a float64 model), so their gradients
    # are rounded to fp32 once per call: one packed call vs one call per sequence differ at that level
    rounded = ("A_log", "D", "dt_bias", "dt_proj.bias", "B_bias", "C_bias")
    for name, p in model.named_parameters():
        if name in grads_packed:
            assert rel_err(grads_packed[name], p.grad) <= (1e-6 if name.endswith(rounded) else tol * 10), name
    if grad_start is not None:
        assert grad_start  # the states' tensors do get gradients
        for name, grad in grad_start.items():
            assert rel_err(grad, start.tensors()[name].grad) <= tol * 10, name


@pytest.mark.parametrize("kind", ["mamba2", "hybrid"])
def test_packed_logits_through_the_model_and_seq_idx(kind):
    """LanguageModel.forward(ids, cu_seqlens=...) == seq_idx spelling == each alone; positions per sequence."""
    model = model_of(kind)
    lengths = [5, 2, 7]
    ids = torch.randint(0, 32, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    cu = cu_of(lengths)
    out = model(ids, cu_seqlens=cu)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    again = model(ids, seq_idx=seq_idx)
    assert torch.equal(out.logits, again.logits)
    assert out.state.positions == (5, 2, 7)
    alone = [model(ids[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert rel_err(out.logits, torch.cat([o.logits for o in alone], 1)) <= 1e-5
    assert_rows_equal(out.state, [o.state for o in alone], 1e-5)
    assert model(ids, cu_seqlens=cu, return_state=False).state is None


LENGTHS = st.lists(st.integers(1, 9), min_size=1, max_size=4)


@settings(max_examples=5, deadline=None)
@given(lengths=LENGTHS, prefixes=st.lists(st.integers(0, 4), min_size=4, max_size=4), seed=st.integers(0, 99))
def test_random_length_mixes_on_the_default_kernels(lengths, prefixes, seed):
    """Random length mixes, from random per-sequence states, on the CPU's default (chunked) kernels: the windowed
    hybrid has a Mamba-1, an attention (window 3) and a Mamba-2 layer."""
    for kind in ("window",):
        model = model_of(kind)
        starts = initial_states(model, prefixes[: len(lengths)], seed)
        ids = torch.randint(0, 32, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
        cu = cu_of(lengths)
        out = model(ids, RecurrentState.stack(starts), cu_seqlens=cu)
        alone = [model(ids[:, a:b], s) for (a, b), s in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), starts)]
        assert rel_err(out.logits, torch.cat([o.logits for o in alone], 1)) <= 1e-5, kind
        assert_rows_equal(out.state, [o.state for o in alone], 1e-5)


def test_continuing_a_packed_state_row_by_row():
    """A packed state's rows continue (step, forward) as the states of the sequences alone do."""
    model = model_of("hybrid")
    lengths = [4, 1, 6]
    ids = torch.randint(0, 32, (1, 11), generator=torch.Generator().manual_seed(4))
    packed = model(ids, cu_seqlens=cu_of(lengths)).state
    nxt = torch.tensor([3, 7, 9])
    stepped = model.step(nxt, packed)
    assert stepped.state.positions == (5, 2, 7)
    for i, (a, b) in enumerate([(0, 4), (4, 5), (5, 11)]):
        alone = model.step(nxt[i : i + 1], model(ids[:, a:b]).state)
        assert rel_err(stepped.logits[i : i + 1], alone.logits) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# refusals


def test_packed_refusals():
    model = model_of("hybrid")
    ids = torch.randint(0, 32, (1, 6))
    cu = cu_of([2, 4])
    with pytest.raises(InputError, match="states_at"):
        model(ids, cu_seqlens=cu, states_at=[1])
    with pytest.raises(InputError, match="batch 1"):
        model(ids.expand(2, 6), cu_seqlens=cu)
    with pytest.raises(InputError, match="cu_seqlens or seq_idx, not both"):
        model(ids, cu_seqlens=cu, seq_idx=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(InputError, match="strictly increasing"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 3, 6]))
    with pytest.raises(InputError, match=r"cu_seqlens\[-1\] must be the input's length 6"):
        model(ids, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(StateMismatchError, match="3 rows, the packed input 2 sequences"):
        model(ids, model.init_state(3), cu_seqlens=cu)
    bidirectional = tiny_lm("mamba1", bidirectional=True)
    with pytest.raises(InputError, match="bidirectional"):
        bidirectional(ids, cu_seqlens=cu)


# --------------------------------------------------------------------------------------------------------------
# generation: ragged prompts prefill as one packed row


@pytest.mark.parametrize("kind", ["hybrid", "window"])
def test_prefill_equals_one_by_one(kind):
    model = model_of(kind)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13]]
    logits, state = prefill(model, prompts)
    alone = [model(torch.tensor([p])) for p in prompts]
    assert rel_err(logits, torch.cat([o.logits[:, -1] for o in alone])) <= 1e-5
    assert_rows_equal(state, [o.state for o in alone], 1e-5)
    # from a state of one row per prompt at different positions, and from one state for every prompt
    more = [[3, 1], [2, 2, 2], [9], [8, 7, 6, 5]]
    logits2, state2 = prefill(model, more, state)
    again = [model(torch.tensor([m]), o.state) for m, o in zip(more, alone)]
    assert rel_err(logits2, torch.cat([o.logits[:, -1] for o in again])) <= 1e-5
    assert_rows_equal(state2, [o.state for o in again], 1e-5)
    _, shared = prefill(model, more, alone[2].state)
    assert_rows_equal(shared, [model(torch.tensor([m]), alone[2].state).state for m in more], 1e-5)


def test_generate_uses_one_packed_prefill(monkeypatch):
    """generate's ragged prompts go through one forward with cu_seqlens, and each prompt's tokens and state
    are those it gets alone."""
    model = model_of("hybrid")
    calls = []
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("cu_seqlens"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    batch = generate(model, prompts, 6)
    assert len(calls) == 1 and calls[0] is not None and calls[0].tolist() == [0, 5, 6, 9]
    for i, p in enumerate(prompts):
        one = generate(model, [p], 6)
        assert one.tokens[0] == batch.tokens[i]
        assert batch.states[i].position == len(p) + 6
        for name, want in one.states[0].tensors().items():
            got = batch.states[i].tensors()[name]
            assert got.shape == want.shape and rel_err(got.double(), want.double()) <= 1e-5, name


def test_prefill_falls_back_when_a_kernel_cannot_pack(monkeypatch):
    model = model_of("mamba1")
    forward = type(model).forward

    def no_packing(self, *args, cu_seqlens=None, **kwargs):
        if cu_seqlens is not None:
            raise TypeError("selective_scan_x() got an unexpected keyword argument 'cu_seqlens'")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", no_packing)
    logits, state = prefill(model, [[1, 2], [3, 4, 5]])
    assert state.positions == (2, 3) and logits.shape == (2, 32)


def test_sequence_model_packed():
    from seqlab.models import SequenceModel
    from seqlab.testing import tiny_config

    torch.manual_seed(0)
    model = SequenceModel(tiny_config("mamba2"), d_input=3, d_output=2).eval()
    x = torch.randn(1, 9, 3)
    out = model(x, cu_seqlens=torch.tensor([0, 4, 9]))
    alone = [model(x[:, :4]), model(x[:, 4:])]
    assert rel_err(out.output, torch.cat([a.output for a in alone], 1)) <= 1e-5
    assert_rows_equal(out.state, [a.state for a in alone], 1e-5)
