"""seqlab.streaming: the one streaming routine. Any piece sizes (0 and 1 included) give what one pass over the whole
stream gives (outputs, final state, metric), for token and continuous inputs, with and without next-element
targets; a state continues a stream; ``grad=True`` keeps the graph; bad inputs raise InputError/StateMismatchError."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.errors import InputError, StateMismatchError
from seqlab.models import SequenceModel
from seqlab.streaming import StreamStep, stream_metric, stream_pieces
from seqlab.testing import rel_err, tiny_config, tiny_lm

TOL = 1e-5
FRAME = (2, 3)  # continuous frames (t, 2, 3) -> (t, 6) features
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class BitsAdapter:
    """The least an adapter needs for streaming: an input kind and a per-position metric (-log2 p(target))."""

    continuous = False

    def position_metric(self, output, targets):
        logp = torch.log_softmax(output.logits.float(), dim=-1)
        return -logp.gather(-1, targets[..., None].long())[..., 0] / math.log(2)


class SquaredErrorAdapter:
    """Continuous frames: the mean squared error of the predicted next frame, per position."""

    continuous = True

    def position_metric(self, output, targets):
        return ((output.output.float() - targets.float()) ** 2).mean(-1)


def lm():
    return tiny_lm("mamba1", vocab=32, seed=0)


def frame_model():
    torch.manual_seed(1)
    width = FRAME[0] * FRAME[1]
    return SequenceModel(tiny_config("mamba2"), d_input=width, d_output=width).eval()


def tokens(length, seed=0):
    return torch.randint(0, 32, (length,), generator=torch.Generator().manual_seed(seed))


def frames(length, seed=0):
    return torch.randn((length, *FRAME), generator=torch.Generator().manual_seed(seed))


def split(seq, sizes):
    pieces, at = [], 0
    for n in sizes:
        pieces.append(seq[at : at + n])
        at += n
    return pieces


def flat(seq):
    return seq if seq.dim() == 1 else seq.flatten(1)


def assert_states_close(a, b):
    assert a.position == b.position
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert rel_err(ta[key], tb[key]) <= TOL, key


KINDS = {"tokens": (lm, tokens, BitsAdapter), "frames": (frame_model, frames, SquaredErrorAdapter)}


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(sizes=st.lists(st.integers(0, 9), max_size=8), start=st.integers(0, 5))
def test_inputs_any_chunking_equals_one_pass(kind, sizes, start):
    make_model, make_seq, _ = KINDS[kind]
    model, seq = make_model(), make_seq(sum(sizes))
    steps = list(stream_pieces(model, split(seq, sizes), start=start))
    # one model call per non-empty piece, in order, covering the stream without gaps
    assert [s.index for s in steps] == list(range(len(steps)))
    assert [s.stop - s.start for s in steps] == [n for n in sizes if n]
    assert [s.start for s in steps] == [start + sum(n for n in sizes[:i]) for i, n in enumerate(sizes) if n]
    assert all(s.targets is None and s.metric is None for s in steps)
    if not sum(sizes):
        assert steps == []
        return
    with torch.no_grad():
        whole = model(flat(seq)[None])
    assert rel_err(torch.cat([s.output.output for s in steps], dim=1), whole.output) <= TOL
    assert_states_close(steps[-1].state, whole.state)
    assert steps[-1].stop == start + len(seq)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(sizes=st.lists(st.integers(0, 9), max_size=8))
def test_targets_any_chunking_equals_one_pass(kind, sizes):
    make_model, make_seq, make_adapter = KINDS[kind]
    model, seq, adapter = make_model(), make_seq(sum(sizes), seed=len(sizes)), make_adapter()
    steps = list(stream_pieces(model, split(seq, sizes), adapter=adapter, targets=True))
    value, count = stream_metric(model, adapter, split(seq, sizes))
    if len(seq) < 2:
        assert steps == [] and (value, count) == (None, 0)
        return
    inputs, targets = flat(seq)[:-1][None], flat(seq)[1:][None]
    with torch.no_grad():
        whole = model(inputs)
    want = adapter.position_metric(whole, targets)[0]
    assert [s.start for s in steps] == [0] + [s.stop for s in steps[:-1]]
    assert steps[-1].stop == len(seq) - 1
    assert rel_err(torch.cat([s.output.output for s in steps], dim=1), whole.output) <= TOL
    assert torch.equal(torch.cat([s.targets for s in steps], dim=1), targets)
    assert_states_close(steps[-1].state, whole.state)
    metric = torch.cat([s.metric for s in steps])
    assert metric.dtype == torch.float32 and metric.shape == (len(seq) - 1,)
    assert rel_err(metric, want) <= TOL
    assert count == len(seq) - 1
    assert value == pytest.approx(float(want.double().mean()), rel=TOL)


def test_stream_metric_equals_the_whole_pass_cross_entropy():
    """Against an independent number: the mean next-token cross-entropy in bits of one pass (F.cross_entropy)."""
    model, seq = lm(), tokens(200, seed=3)
    with torch.no_grad():
        logits = model(seq[:-1][None]).logits[0]
    want = float(F.cross_entropy(logits, seq[1:])) / math.log(2)
    value, count = stream_metric(model, BitsAdapter(), split(seq, [1, 0, 37, 1, 1, 60, 100]))
    assert count == 199
    assert value == pytest.approx(want, rel=1e-5)


def _dna():
    from seqlab.domains.dna import DNAAdapter

    adapter = DNAAdapter(add_bos_eos=True)  # <bos>/<eos> targets are not bases: NaN positions, not counted
    return adapter, adapter.encode([("r1", "ACGTNACGGTTACAGT" * 3), ("r2", "TTGACNNAC")])


def _bytes():
    from seqlab.domains.bytes import ByteAdapter

    adapter = ByteAdapter()
    return adapter, adapter.encode(b"streamed bytes, state carried: " * 3)


def _frames():
    from seqlab.domains.testing import FramesTestAdapter

    class Wide(FramesTestAdapter):  # predicts the first 2 of 6 features
        width, output_width = 6, 2

    return Wide(), torch.randn((70, 2, 3), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("make", [_dna, _bytes, _frames])
def test_real_adapters_stream_metric_equals_their_metric_of_one_pass(make):
    """What the eval command relies on: the adapter's own ``metric`` over one pass (weighted by
    ``metric_weight``), whatever the pieces."""
    adapter, seq = make()
    torch.manual_seed(0)
    model = adapter.build_model(tiny_config()).eval()
    inputs, targets = flat(seq)[:-1][None], flat(seq)[1:][None]
    with torch.no_grad():
        want = adapter.metric(model(inputs), targets)
    weight = adapter.metric_weight(targets)
    for sizes in ([len(seq)], [1, 0, 9, 1, 30, len(seq)]):
        value, count = stream_metric(model, adapter, split(seq, sizes))
        assert count == weight
        assert value == pytest.approx(want, rel=1e-5)


def test_nan_positions_are_not_counted():
    class EvenTargetsOnly(BitsAdapter):
        def position_metric(self, output, targets):
            bits = super().position_metric(output, targets)
            return bits.masked_fill(targets % 2 == 1, float("nan"))

    model, seq = lm(), tokens(50, seed=4)
    with torch.no_grad():
        bits = BitsAdapter().position_metric(model(seq[:-1][None]), seq[1:][None])[0]
    even = seq[1:] % 2 == 0
    value, count = stream_metric(model, EvenTargetsOnly(), split(seq, [7, 20, 23]))
    assert count == int(even.sum())
    assert value == pytest.approx(float(bits[even].double().mean()), rel=1e-5)


@pytest.mark.parametrize("targets", [False, True])
def test_a_state_continues_the_stream(targets):
    model, seq = lm(), tokens(60, seed=5)
    first = list(stream_pieces(model, [seq[:25]], targets=targets))
    rest = list(
        stream_pieces(
            model, [seq[24:] if targets else seq[25:]], state=first[-1].state, start=first[-1].stop, targets=targets
        )
    )
    whole = list(stream_pieces(model, [seq], targets=targets))
    assert rest[0].start == first[-1].stop
    assert rest[-1].stop == whole[-1].stop
    got = torch.cat([s.output.output for s in first + rest], dim=1)
    assert rel_err(got, whole[-1].output.output) <= TOL
    assert_states_close(rest[-1].state, whole[-1].state)
    assert rest[-1].state.position == whole[-1].state.position


def test_a_state_is_not_modified_by_streaming():
    model, seq = lm(), tokens(30)
    state = list(stream_pieces(model, [seq]))[-1].state
    before = state.clone()
    list(stream_pieces(model, [seq, seq], state=state))
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), before.tensors().values()))


def test_no_grad_by_default_and_gradients_with_grad_true():
    model, seq = lm(), tokens(40)
    plain = list(stream_pieces(model, split(seq, [10, 30])))
    assert not any(s.output.output.requires_grad for s in plain)
    model.zero_grad()
    steps = list(stream_pieces(model, split(seq, [10, 30]), grad=True))
    loss = sum(s.output.output.float().pow(2).mean() for s in steps)
    loss.backward()
    grad = model.embeddings.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    # the state is carried with its graph: the second window's output depends on the first window's inputs
    model.zero_grad()
    steps = list(stream_pieces(model, split(seq, [10, 30]), grad=True))
    steps[1].output.output.float().sum().backward()
    assert float(model.embeddings.weight.grad[seq[:10].unique()].abs().sum()) > 0


def test_progress_is_told_every_element():
    class Bar:
        n = 0

        def update(self, n):
            self.n += n

    bar = Bar()
    stream_metric(lm(), BitsAdapter(), split(tokens(31), [0, 1, 10, 0, 20]), progress=bar)
    assert bar.n == 31


def test_device_argument():
    steps = list(stream_pieces(lm(), [tokens(5)], device="cpu"))
    assert steps[0].output.output.device.type == "cpu"


def test_a_step_is_a_stream_step():
    step = next(stream_pieces(lm(), [tokens(5)]))
    assert isinstance(step, StreamStep) and step.state.position == 5


# ------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "piece, message",
    [
        (torch.zeros(2, 3, dtype=torch.long), r"pieces\[1\] must be 1-D token ids, got shape \(2, 3\)"),
        (torch.tensor(3), r"pieces\[1\] must be 1-D token ids"),
        ([1, 2, 3], r"pieces\[1\] must be a torch.Tensor, got list"),
    ],
)
def test_bad_token_pieces(piece, message):
    with pytest.raises(InputError, match=message):
        list(stream_pieces(lm(), [tokens(4), piece]))


def test_bad_frame_pieces():
    model = frame_model()
    with pytest.raises(InputError, match=r"pieces\[0\] must hold continuous frames"):
        list(stream_pieces(model, [torch.zeros(6)]))
    with pytest.raises(InputError, match=r"pieces\[0\] has 5 features per element, the model takes 6"):
        list(stream_pieces(model, [torch.zeros(4, 5)]))


def test_an_id_outside_the_vocabulary_is_refused():
    with pytest.raises(InputError, match="outside the vocabulary"):
        list(stream_pieces(lm(), [torch.tensor([1, 2, 99])]))


def test_the_state_of_another_model_is_refused_before_anything_runs():
    other = tiny_lm("mamba2", vocab=32)
    state = list(stream_pieces(other, [tokens(5)]))[-1].state
    with pytest.raises(StateMismatchError, match="fingerprint"):
        stream_pieces(lm(), [tokens(5)], state=state)  # raised at the call, not at the first step


def test_a_batch_of_two_is_refused():
    model = lm()
    state = model.init_state(2)
    with pytest.raises(StateMismatchError, match="batch of 2"):
        stream_pieces(model, [tokens(5)], state=state)


def test_not_a_state_and_a_bad_start_are_refused():
    with pytest.raises(InputError, match="must be a RecurrentState"):
        stream_pieces(lm(), [tokens(5)], state={"layers": []})
    for start in (-1, 1.5, True):
        with pytest.raises(InputError, match="start must be an int"):
            stream_pieces(lm(), [tokens(5)], start=start)


def test_stream_metric_needs_an_adapter():
    with pytest.raises(InputError, match="needs the adapter"):
        stream_metric(lm(), None, [tokens(5)])


def test_a_bidirectional_model_cannot_stream():
    model = tiny_lm("mamba1", bidirectional=True)
    with pytest.raises(InputError, match="bidirectional"):
        stream_pieces(model, [tokens(5)])
