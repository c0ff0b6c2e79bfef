"""Streaming stored sequences through models with carried state: equals one pass (docs/architecture.md, the state
contract) for any window and store chunking, bounded reads and memory, refusal of another adapter's model, and a
store as a training source for the Trainer."""

from __future__ import annotations

import tempfile
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.config import BackboneConfig
from seqlab.domains import InputSpec, TokenAdapter, register_adapter
from seqlab.domains.testing import FramesTestAdapter
from seqlab.errors import CorruptFileError, InputError, StateMismatchError
from seqlab.models import LanguageModel, SequenceModel
from seqlab.pipelines import SequenceStore, StoreSource, stream, stream_bits, stream_output
from seqlab.train import SequenceSource, TrainConfig, Trainer, WindowSource

CONFIG = BackboneConfig(d_model=16, n_layer=2, d_state=8)


@register_adapter
class _Tokens(TokenAdapter):
    name = "test-stream-tokens"

    def __init__(self, vocab: int = 16) -> None:
        self.vocab = vocab

    def settings(self):
        return {"vocab": self.vocab}

    @property
    def input_spec(self):
        return InputSpec("tokens", vocab_size=self.vocab)

    def encode(self, raw):
        return torch.as_tensor(raw, dtype=torch.long)

    def decode(self, tensor):
        return tensor.tolist()

    def read(self, path, **options):
        raise NotImplementedError

    def iter_windows(self, path, window, **options):
        raise NotImplementedError

    def write(self, path, raw):
        raise NotImplementedError


@register_adapter
class _Frames(FramesTestAdapter):
    name = "test-stream-frames"
    output_width = 2


def _model(adapter, seed=0):
    torch.manual_seed(seed)
    return adapter.build_model(CONFIG).eval()


def _tokens(n, seed=0, vocab=16):
    return np.random.default_rng(seed).integers(0, vocab, n)


def _pieces(data, size):
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: thread start-up and oversubscription on a busy 2-core machine cost 100x the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return _model(_Tokens())


def _one_pass(model, x):
    with torch.no_grad():
        out = model(x.unsqueeze(0))
    return out.output, out.state


# ------------------------------------------------------------------------------------------------------


def test_stream_equals_one_pass_and_continues_from_a_state(tmp_path, lm):
    data = _tokens(1000)
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("seq", _pieces(data, 300), adapter=_Tokens(), chunk_elements=128)
    want, want_state = _one_pass(lm, torch.from_numpy(data))

    steps = list(stream(lm, store, "seq", window=96))
    assert [(s.index, s.start, s.stop) for s in steps][:2] == [(0, 0, 96), (1, 96, 192)] and steps[-1].stop == 1000
    got = torch.cat([s.output for s in steps], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert steps[-1].state.position == 1000
    for a, b in zip(steps[-1].state.tensors().values(), want_state.tensors().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # stop early, then pick up from the state (start defaults to state.position), with another window
    first, state = stream_output(lm, tmp_path / "s.zarr", "seq", window=250, stop=420, prefetch=False)
    rest, state = stream_output(lm, tmp_path / "s.zarr", "seq", window=33, state=state)
    torch.testing.assert_close(torch.cat([first, rest], 1), want, atol=1e-5, rtol=1e-5)
    assert state.position == 1000


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_any_window_and_chunking_equals_one_pass(data, lm):
    length = data.draw(st.integers(1, 240), label="length")
    chunk = data.draw(st.integers(4, 64), label="chunk_elements")
    write_piece = data.draw(st.integers(1, 100), label="write piece")
    window = data.draw(st.integers(1, 120), label="window")
    split = data.draw(st.integers(0, length), label="split")
    window2 = data.draw(st.integers(1, 120), label="window after split")
    tokens = _tokens(length, seed=length)
    want, _ = _one_pass(lm, torch.from_numpy(tokens))
    with tempfile.TemporaryDirectory() as folder:
        store = SequenceStore(f"{folder}/s.zarr")
        store.write("x", _pieces(tokens, write_piece), adapter=_Tokens(), chunk_elements=chunk)
        parts, state = [], None
        for step in stream(lm, store, "x", window=window, stop=split):
            parts.append(step.output)
            state = step.state
        for step in stream(lm, store, "x", window=window2, state=state, start=split):
            parts.append(step.output)
    torch.testing.assert_close(torch.cat(parts, 1), want, atol=1e-5, rtol=1e-5)


def test_stream_continuous_frames(tmp_path):
    adapter = _Frames()
    model = _model(adapter, seed=1)
    frames = np.random.default_rng(2).normal(size=(300, 3)).astype(np.float32)
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("clip", _pieces(frames, 64), adapter=adapter, chunk_elements=50)
    want, _ = _one_pass(model, torch.from_numpy(frames))
    got, state = stream_output(model, store, "clip", window=70)
    assert got.shape == (1, 300, 2) and state.position == 300
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reads_and_memory_stay_bounded_as_the_sequence_grows(tmp_path, lm):
    store = SequenceStore(tmp_path / "s.zarr")
    chunk, window = 512, 256
    for name, n in (("short", 8 * chunk), ("long", 32 * chunk)):
        store.write(name, _pieces(_tokens(n, seed=n), 10_000), adapter=_Tokens(), chunk_elements=chunk)

    def walk(name):
        tracemalloc.start()
        try:
            last = None
            for step in stream(lm, store, name, window=window):
                # never more than this window's chunk and the next window's (prefetch) have been decoded
                assert step.chunk_reads <= (min(step.stop + window, store.describe(name).length) - 1) // chunk + 1
                last = step
            return tracemalloc.get_traced_memory()[1], last
        finally:
            tracemalloc.stop()

    peak_short, last_short = walk("short")
    peak_long, last_long = walk("long")
    assert last_short.chunk_reads == 8 and last_long.chunk_reads == 32  # each chunk decoded exactly once
    assert peak_long < 1.5 * peak_short + (256 << 10), (peak_short, peak_long)


def test_store_is_a_training_source(tmp_path):
    tokens = _tokens(3000, seed=3)
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("a", [tokens[:1700]], adapter=_Tokens(), chunk_elements=256)
    store.write("b", [tokens[1700:]], adapter=_Tokens(), chunk_elements=100)

    source = store.source(["a", "b"], batch_size=3, window=64)
    assert isinstance(source, WindowSource)  # what the Trainer asks of its data (seqlab.train)
    reference = SequenceSource(torch.from_numpy(tokens), batch_size=3, window=64)
    assert source.num_windows == reference.num_windows == len(source)
    for i in range(source.num_windows):
        for got, want in zip(source.window(i), reference.window(i)):
            assert got.dtype == torch.int64 and torch.equal(got, want)
    with pytest.raises(IndexError):
        source.window(source.num_windows)

    def train(data):
        model = _model(_Tokens(), seed=4).train()
        config = TrainConfig(lr=1e-2, max_steps=5, batch_size=3, window=64, progress=False)
        return [r["loss"] for r in Trainer(model, config, data).fit()]

    store_losses = train(StoreSource(tmp_path / "s.zarr", ["a", "b"], 3, 64, model=_model(_Tokens())))
    assert len(store_losses) == 5 and store_losses == train(reference)


def test_continuous_training_source_shifts_frames(tmp_path):
    frames = np.random.default_rng(5).normal(size=(401, 3)).astype(np.float32)
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("clip", [frames], adapter=_Frames(), chunk_elements=64)
    inputs, targets = store.source("clip", batch_size=2, window=50).window(1)
    assert inputs.shape == targets.shape == (2, 50, 3) and inputs.dtype == torch.float32
    assert torch.equal(inputs[1], torch.from_numpy(frames[250:300])) and torch.equal(targets[1, :-1], inputs[1, 1:])


def test_stream_refuses_bad_input(tmp_path, lm):
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("seq", [_tokens(200)], adapter=_Tokens(), chunk_elements=64)
    store.write("clip", [np.zeros((10, 3), np.float32)], adapter=_Frames())
    with pytest.raises(
        InputError,
        match=r"s.zarr: sequence 'seq' was written by adapter .*'vocab': 16.*"
        r"built by adapter .*'vocab': 32",
    ):
        stream(_model(_Tokens(vocab=32)), store, "seq")
    with pytest.raises(InputError, match="written by adapter"):
        store.source("seq", 2, 16, model=_model(_Tokens(vocab=32)))
    # the model's build options (recorded beside the adapter in adapter_info) are not part of the encoding
    built = _model(_Tokens())
    built.adapter_info = {**built.adapter_info, "model": {"tie_embeddings": False}}
    assert stream_output(built, store, "seq", window=64)[1].position == 200
    # models that do not say their adapter are still checked for the kind of input they take
    with pytest.raises(InputError, match="sequence 'clip' holds continuous frames, the model takes token ids"):
        stream(LanguageModel(CONFIG, vocab_size=16), store, "clip")
    with pytest.raises(InputError, match="sequence 'seq' holds token ids, the model takes continuous frames"):
        stream(SequenceModel(CONFIG, d_input=3), store, "seq")
    with pytest.raises(InputError, match=r"frames of shape \(3,\) \(3 values\), the model takes d_input=4"):
        stream(SequenceModel(CONFIG, d_input=4), store, "clip")
    with pytest.raises(InputError, match=r"ids in \[0, 16\), the model's vocabulary is 8"):
        stream(LanguageModel(CONFIG, vocab_size=8), store, "seq")
    with pytest.raises(InputError, match=r"has no sequence 'nope'"):
        stream(lm, store, "nope")
    with pytest.raises(InputError, match=r"does not exist"):
        stream(lm, tmp_path / "missing.zarr", "seq")
    with pytest.raises(InputError, match=r"sequence 'seq': stream range \[150, 260\) is out of range.* 200"):
        stream(lm, store, "seq", start=150, stop=260)
    with pytest.raises(StateMismatchError):
        stream(lm, store, "seq", state=lm.init_state(2))
    with pytest.raises(InputError, match="too few"):
        store.source("seq", batch_size=4, window=64)

    writer = store.writer("growing", adapter=_Tokens(), chunk_elements=16)
    writer.write(_tokens(40))  # two chunks committed, no finish: an interrupted ingest
    with pytest.raises(InputError, match="sequence 'growing' is incomplete"):
        stream(lm, store, "growing")
    assert [s.stop for s in stream(lm, store, "growing", window=20, allow_incomplete=True)] == [20, 32]


def test_corrupt_chunk_mid_stream_names_the_positions(tmp_path, lm):
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("seq", [_tokens(500)], adapter=_Tokens(), chunk_elements=100)
    (tmp_path / "s.zarr" / "seq" / "c" / "3").write_bytes(b"garbage")
    seen = []
    with pytest.raises(CorruptFileError, match=r"sequence 'seq': chunk 3 \(positions \[300, 400\)\)"):
        for step in stream(lm, store, "seq", window=50):
            seen.append(step.stop)
    assert seen == [50, 100, 150, 200, 250, 300]  # every window before the damaged chunk came through


def test_stream_bits_equal_a_direct_pass_for_any_range_and_warm_up(tmp_path):
    """stream_bits: the bits of every prediction (default), or of a range warmed up on what precedes it, equal
    those of one direct pass (the same pass when the warm-up starts at 0), window size aside."""
    import math

    ids = _tokens(700, seed=3)
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("seq", [ids], adapter=_Tokens(), chunk_elements=64)
    model = _model(_Tokens())
    x = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        logits = model(x[None]).logits[0, :-1].double()
    direct = (-torch.log_softmax(logits, -1).gather(1, x[1:, None])[:, 0] / math.log(2)).numpy()

    pieces = []
    total, count = stream_bits(model, store, "seq", window=50, sink=pieces.append)
    assert count == 699 and np.allclose(np.concatenate(pieces), direct, atol=1e-4)
    assert math.isclose(total, direct.sum(), rel_tol=1e-6)
    total, count = stream_bits(model, store, "seq", window=64, start=300, stop=500, warm=0)
    assert count == 200 and math.isclose(total, direct[300:500].sum(), rel_tol=1e-5)
    cold, _ = stream_bits(model, store, "seq", window=64, start=300, stop=500)  # a zero state at 300
    assert not math.isclose(cold, total, rel_tol=1e-5)
    assert stream_bits(model, store, "seq", start=10, stop=10) == (0.0, 0)
