"""Packed training rows (seqlab.packing.PackedSource) and the Trainer's packed step.

The source: every element of every document lands in exactly one position, rows are full (only the end of the
last window is padding), a target is the next element of the same document and never crosses a boundary, the
``cu_seqlens`` start a sequence at every document start and every row start; efficiency counts. The Trainer: one
packed step's loss and gradients equal the token-weighted mean over the documents run alone (through a model that
runs each sequence of a packed row by itself, and through the real model's ``cu_seqlens`` when it has them);
refusals (carry_state, a model without cu_seqlens, pack without a packed source, a resume across pack)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError
from seqlab.models import LanguageModel, ModelOutput
from seqlab.packing import IGNORE, PackedSource, padded_positions
from seqlab.train import TrainConfig, Trainer

VOCAB = 23


def docs_of(lengths, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(1, VOCAB, size=n) for n in lengths]


def layout(source: PackedSource):
    """Every window's positions as (document, index in document) or None (padding), read back from the windows
    alone, with the cu_seqlens: checks what the source claims against the documents."""
    seen = []
    for i in range(source.num_windows):
        inputs, targets = source.window(i)
        cu = source.cu_seqlens(i).tolist()
        seen.append((inputs, targets, cu))
    return seen


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda xs: sum(xs) > 0),
    batch=st.integers(1, 3),
    window=st.integers(1, 17),
)
def test_packing_covers_every_element_once_full_rows_no_crossing(lengths, batch, window):
    docs = docs_of(lengths, seed=sum(lengths))
    source = PackedSource.from_documents(docs, batch, window)
    kept = [d for d in docs if len(d)]
    stream = np.concatenate(kept)
    doc_of = np.concatenate([np.full(len(d), k) for k, d in enumerate(kept)])
    index_in = np.concatenate([np.arange(len(d)) for d in kept])
    total = stream.shape[0]
    assert source.num_windows == math.ceil(total / (batch * window))
    flat_inputs, flat_targets, starts = [], [], set()
    for i in range(source.num_windows):
        inputs, targets = source.window(i)
        assert inputs.shape == targets.shape == (batch, window) and inputs.dtype == targets.dtype == torch.int64
        cu = source.cu_seqlens(i)
        assert cu[0] == 0 and cu[-1] == batch * window and bool((cu[1:] > cu[:-1]).all())
        starts.update((i * batch * window + cu[:-1]).tolist())
        flat_inputs.append(inputs.reshape(-1))
        flat_targets.append(targets.reshape(-1))
        # a slice of the rows: the same boundaries, shifted
        if batch > 1:
            sub = source.cu_seqlens(i, slice(1, None)).tolist()
            assert sub == [c - window for c in cu.tolist() if c >= window]
    inputs = torch.cat(flat_inputs).numpy()
    targets = torch.cat(flat_targets).numpy()
    # every element exactly once, in order; only the tail (< one window) is padding
    assert (inputs[:total] == stream).all()
    assert len(inputs) - total < batch * window and (inputs[total:] == 0).all()
    # targets: the next element of the same document, else -100 (a document's last element, padding)
    for p in range(len(inputs)):
        if p < total - 1 and doc_of[p + 1] == doc_of[p]:
            assert targets[p] == stream[p + 1]
        else:
            assert targets[p] == IGNORE
    # a sequence starts at every document start and every row start, nowhere else (the padding: its own)
    expected = {int(s) for s in np.nonzero(index_in == 0)[0]} | set(range(0, len(inputs), window))
    if total < len(inputs):
        expected.add(total)
    assert starts == expected
    s = source.stats()
    assert s.tokens == total and s.documents == len(kept) and s.targets == total - len(kept)
    assert s.positions == len(inputs) and s.efficiency == pytest.approx(s.targets / len(inputs))
    assert s.split == sum(1 for k in range(len(kept)) if len(set(np.nonzero(doc_of == k)[0] // window)) > 1)


def test_efficiency_numbers_and_the_padding_baseline():
    # 3 documents of 10, 3 and 6 elements in rows of 8, 2 rows a window
    source = PackedSource.from_documents(docs_of([10, 3, 6]), 2, 8)
    s = source.stats()
    assert (s.tokens, s.targets, s.rows, s.windows, s.positions) == (19, 16, 4, 2, 32)
    assert s.efficiency == 16 / 32 and s.split == 2  # the 10 (rows 0-1) and the 6 (rows 1-2)
    # padding baseline: rows 2 + 1 + 1 = 4 -> 2 batches of 2 rows of 8
    assert padded_positions([10, 3, 6], 8, 2) == 32 == s.padded_positions
    assert padded_positions([10, 3, 6, 1], 8, 2) == 48  # 5 rows -> 3 batches
    # many short documents: packing wins
    short = PackedSource.from_documents(docs_of([5] * 40), 4, 32)
    assert short.stats().efficiency == pytest.approx(160 / 256)
    assert short.stats().padded_efficiency == pytest.approx(160 / (40 * 32))
    d = short.stats().to_dict()
    assert d["efficiency"] > 4 * d["padded_efficiency"] and d["documents"] == 40


def test_packed_source_reads_only_its_span_of_a_memmap(tmp_path):
    ids = np.arange(1, 1001, dtype=np.uint16) % VOCAB
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    mapped = np.load(path, mmap_mode="r")
    source = PackedSource(mapped, [400, 600], 2, 64)
    inputs, targets = source.window(3)
    assert inputs.reshape(-1).tolist() == (ids[384:512].astype(np.int64)).tolist()
    assert targets.reshape(-1)[15] == IGNORE  # position 399: the first document's last element


def test_bad_input_is_named():
    with pytest.raises(InputError, match="add up to 5 elements, the data holds 6"):
        PackedSource(np.arange(6), [2, 3], 1, 4)
    with pytest.raises(InputError, match="integer token ids"):
        PackedSource.from_documents([torch.zeros(4)], 1, 4)
    with pytest.raises(ConfigError, match="window must be a positive int"):
        PackedSource.from_documents([[1, 2]], 1, 0)
    with pytest.raises(InputError, match="no document holds any element"):
        PackedSource.from_documents([[], []], 1, 4)
    with pytest.raises(IndexError, match=r"window 1 is outside \[0, 1\)"):
        PackedSource.from_documents([[1, 2]], 1, 4).window(1)


# ------------------------------------------------------------------------------------------------------
# the trainer


class OneByOne(torch.nn.Module):
    """A LanguageModel whose packed forward runs every sequence of the row alone (the reference of packing)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, ids, state=None, return_state=True, states_at=None, *, cu_seqlens=None):
        assert state is None and ids.shape[0] == 1 and not return_state
        cu = cu_seqlens.tolist()
        logits = [self.inner(ids[:, a:b], None, return_state=False).logits for a, b in zip(cu[:-1], cu[1:])]
        out = torch.cat(logits, 1)
        return ModelOutput(out, None, out)


def tiny_model(seed=0, ssm="mamba1"):
    torch.manual_seed(seed)
    extra = {"headdim": 8, "chunk_size": 8} if ssm == "mamba2" else {}
    return LanguageModel(BackboneConfig(ssm=ssm, d_model=16, n_layer=1, d_state=4, **extra), vocab_size=VOCAB)


def reference_loss(model, docs):
    """Token-weighted mean next-token loss of every document run alone (nats)."""
    nats, count = 0.0, 0
    for d in docs:
        if len(d) < 2:
            continue
        ids = torch.as_tensor(d, dtype=torch.int64).unsqueeze(0)
        logits = model(ids[:, :-1], None, return_state=False).logits
        nats = nats + F.cross_entropy(logits.reshape(-1, VOCAB), ids[0, 1:], reduction="sum")
        count += len(d) - 1
    return nats / count


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_packed_step_is_the_mean_over_documents_run_alone(grad_accum):
    # every document fits a row (else the split continuation is a fresh sequence, not the document alone)
    docs = docs_of([7, 2, 9, 1, 5, 12, 3])
    config = TrainConfig(
        batch_size=2, window=16, carry_state=False, pack=True, grad_accum=grad_accum, progress=False, grad_clip=None
    )
    source = PackedSource.from_documents(docs, 2, 16)
    # the 2 windows hold 39 elements in 64 positions; the step trains window 0: rows [7, 2, 7 of the 9] and
    # [2 of the 9, 1, 5, 8 of the 12]
    model = OneByOne(tiny_model())
    trainer = Trainer(model, config, source)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    loss, _, n = trainer._packed_step()
    got = grads(model)
    inputs, targets = source.window(0)
    assert n == int((targets != IGNORE).sum())
    model.zero_grad(set_to_none=True)
    flat_in = inputs.reshape(1, -1)
    pieces = source.cu_seqlens(0).tolist()
    nats, count = 0.0, 0
    for a, b in zip(pieces[:-1], pieces[1:]):
        logits = model.inner(flat_in[:, a:b], None, return_state=False).logits
        t = targets.reshape(-1)[a:b]
        nats = nats + F.cross_entropy(logits.reshape(-1, VOCAB), t, reduction="sum", ignore_index=IGNORE)
        count += int((t != IGNORE).sum())
    (nats / count).backward()
    assert count == n and loss == pytest.approx(float(nats.detach() / count), rel=1e-5)
    want = grads(model)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_packed_training_runs_logs_efficiency_and_evaluates(tmp_path):
    docs = docs_of([30, 4, 17, 60, 2, 9, 25, 11])
    source = PackedSource.from_documents(docs, 2, 16)
    held = PackedSource.from_documents(docs_of([12, 4, 16], seed=5), 1, 16)
    config = TrainConfig(
        batch_size=2, window=16, carry_state=False, pack=True, max_steps=6, eval_every=3, progress=False, lr=3e-3
    )
    trainer = Trainer(OneByOne(tiny_model()), config, source, held)
    records = trainer.fit()
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    for step, r in enumerate(records):
        _, targets = source.window(step % source.num_windows)
        assert r["targets"] == int((targets != IGNORE).sum())
        assert r["packing_efficiency"] == pytest.approx(r["targets"] / 32)
        assert r["targets_per_s"] == pytest.approx(r["tokens_per_s"] * r["packing_efficiency"])
    assert "eval_loss" in records[2] and "eval_loss" in records[5]
    assert trainer.packing == source.stats().to_dict()
    # the evaluation is the token-weighted mean over the held-out documents run alone (none split: 12+4, 16)
    ev = trainer.evaluate()
    with torch.no_grad():
        want = reference_loss(trainer.model.inner, docs_of([12, 4, 16], seed=5))
    assert ev["eval_loss"] == pytest.approx(float(want) / math.log(2), rel=1e-5)


def test_packing_refusals(tmp_path):
    source = PackedSource.from_documents(docs_of([9, 9, 9]), 2, 8)
    model = OneByOne(tiny_model())
    with pytest.raises(ConfigError, match="TrainConfig.pack .* cannot carry the state"):
        TrainConfig(batch_size=2, window=8, pack=True)
    with pytest.raises(ConfigError, match="train_data is packed rows .* set TrainConfig.carry_state=False"):
        Trainer(model, TrainConfig(batch_size=2, window=8, progress=False), source)
    with pytest.raises(ConfigError, match="TrainConfig.pack is set, but train_data is a SequenceSource"):
        Trainer(model, TrainConfig(batch_size=2, window=8, pack=True, carry_state=False), torch.arange(100) % VOCAB)
    with pytest.raises(ConfigError, match="TrainConfig.window is 4, train_data packs rows of 8"):
        Trainer(model, TrainConfig(batch_size=2, window=4, carry_state=False), source)

    class NoPacking(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

        def forward(self, ids, state=None, return_state=True):
            raise AssertionError

    with pytest.raises(ConfigError, match="NoPacking.forward takes no cu_seqlens"):
        Trainer(NoPacking(), TrainConfig(batch_size=2, window=8, carry_state=False), source)
    # a checkpoint of a packed run does not resume an unpacked one (the data position would not match)
    config = TrainConfig(
        batch_size=2, window=8, carry_state=False, pack=True, max_steps=1, checkpoint_every=1,
        checkpoint_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    Trainer(model, config, source).fit()
    plain = TrainConfig(batch_size=2, window=8, carry_state=False, max_steps=2, progress=False)
    with pytest.raises(ConfigError, match="TrainConfig.pack is False, the checkpoint .* pack=True"):
        Trainer.resume(tmp_path, model, plain, torch.arange(200) % VOCAB)


_HAS_CU = "cu_seqlens" in inspect.signature(LanguageModel.forward).parameters


@pytest.mark.skipif(not _HAS_CU, reason="LanguageModel.forward takes no cu_seqlens yet (the model-level API)")
@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_the_models_packed_rows_train_like_documents_run_alone(ssm):
    """The real model's cu_seqlens against the one-by-one reference on the same weights: one packed step's loss
    and gradients, with documents split across rows."""
    docs = docs_of([11, 3, 20, 1, 7, 14])
    source = PackedSource.from_documents(docs, 2, 16)
    config = TrainConfig(batch_size=2, window=16, carry_state=False, pack=True, progress=False, grad_clip=None)
    results = []
    for wrap in (False, True):
        model = tiny_model(seed=3, ssm=ssm)
        trainer = Trainer(OneByOne(model) if wrap else model, config, source)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = trainer._packed_step()
        results.append((loss, {n.removeprefix("inner."): g for n, g in grads(trainer.model).items()}))
    (loss, got), (want_loss, want) = results
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_packing_bench_runs_quick():
    """bench/packing.py --quick prints its table (no timing assertions)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    proc = subprocess.run(
        [sys.executable, str(bench / "packing.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=bench,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("machine:") and "corpus: 60 documents" in proc.stdout
    assert "| Mamba-1 | pad to L |" in proc.stdout and "| Mamba-1 | packed |" in proc.stdout


def test_the_token_adapters_losses_ignore_the_ends_of_documents():
    """What the Trainer relies on: every token adapter's loss is the mean over the targets that are not -100, so a
    document's last element (and the padding) trains nothing; its per-position metric leaves them out (NaN)."""
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.dna import DNAAdapter

    for adapter, docs in (
        (ByteAdapter(), [np.frombuffer(b"short one", np.uint8), np.frombuffer(b"a longer second document", np.uint8)]),
        (DNAAdapter(), [DNAAdapter().encode("ACGTTGCA"), DNAAdapter().encode("GATTACAGATTACA")]),
    ):
        source = PackedSource.from_documents(docs, 2, 16)
        _, targets = source.window(0)
        vocab = adapter.input_spec.vocab_size
        logits = torch.randn(*targets.shape, vocab, generator=torch.Generator().manual_seed(1))
        keep = targets != IGNORE
        want = F.cross_entropy(logits[keep], targets[keep])
        torch.testing.assert_close(adapter.loss(logits, targets), want)
        bits = adapter.position_metric(logits, targets)
        assert bool(torch.isnan(bits[~keep]).all()) and not bool(torch.isnan(bits[keep]).any())
