"""MambaByte with a subword drafter (issue 19): the byte-level BPE learned on real text gives any bytes back
exactly, travels inside the model file (a damaged or edited one is refused by name, nothing is unpickled), and
``SubwordDrafter`` makes speculative decoding of a byte model exact: greedy output and final states equal plain
decoding's (Mamba-1 and Mamba-2 targets, ragged batches, bytes that are not UTF-8), sampled output follows the
target's law computed by enumeration (chi-square, with a negative control that must fail the same test)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.testing import chi_square_pvalue, rel_err, tiny_config, tiny_lm

pytest.importorskip("tokenizers")

from seqlab.byte_bpe import ByteBPE  # noqa: E402
from seqlab.decoding import Sampling, SubwordDrafter  # noqa: E402
from seqlab.decoding.speculative import speculative_decode  # noqa: E402
from seqlab.domains.subword import SubwordAdapter  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def real_text() -> bytes:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics))[:8000].encode()


@pytest.fixture(scope="module")
def adapter() -> SubwordAdapter:
    return SubwordAdapter(320).fitted([real_text()])


# ------------------------------------------------------------------------------------------------------------
# The tokenizer


def test_tokenizer_learned_on_real_text_round_trips_any_bytes(adapter):
    bpe = adapter.bpe
    assert adapter.vocab_size == bpe.vocab_size == 320
    text = real_text()
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and len(ids) < 0.7 * len(text)  # 64 merges learned: fewer tokens than bytes
    rng = random.Random(0)
    samples = [b"", bytes(range(256)), b"\xff\xfe\x80 caf\xc3\xa9 \xc3", "naïve 日本語 ☃".encode()]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(50)]
    samples += [
        text[rng.randrange(len(text)) :][: rng.randrange(1, 200)] + bytes([rng.randrange(256)]) for _ in range(50)
    ]
    for data in samples:
        assert bpe.decode(bpe.encode(data)) == data
        assert adapter.decode(adapter.encode(data)) == data
        ids, starts = bpe.encode_spans(data)
        assert [bpe.token_bytes[i] for i in ids] == [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)])]
    assert all(len(bpe.token_bytes[i]) >= 1 for i in range(bpe.vocab_size))
    assert sorted(t for t in bpe.token_bytes if len(t) == 1) == [bytes([b]) for b in range(256)]


def test_learning_is_deterministic_and_bounded(adapter):
    again = SubwordAdapter(320).fitted([real_text()])
    assert again == adapter and again.settings()["tokenizer"] == adapter.settings()["tokenizer"]
    assert adapter.fitted([b"other text"]) is adapter  # a fitted adapter keeps its tokenizer
    for bad in (255, 70000, True, "512"):
        with pytest.raises(ConfigError, match="vocab_size"):
            SubwordAdapter(bad)
    with pytest.raises(ConfigError, match="no tokenizer yet"):
        SubwordAdapter().encode(b"abc")


def test_iter_windows_equals_encoding_the_whole_file(adapter, tmp_path, monkeypatch):
    import seqlab.domains.subword as subword

    monkeypatch.setattr(subword, "_READ", 97)  # many reads, cut inside words, multi-byte characters, spaces
    data = real_text()[:3000] + b"\x85 \xa0 x \n \n  \xff\xfe" * 20 + "naïve  café ".encode() * 30
    path = tmp_path / "t.bin"
    path.write_bytes(data)
    for window in (1, 7, 64, 10_000):
        pieces = list(adapter.iter_windows(path, window))
        assert all(len(p) == window for p in pieces[:-1])
        assert torch.cat(pieces).tolist() == adapter.encode(adapter.read(path)).tolist()
    nospace = tmp_path / "n.bin"
    nospace.write_bytes(b"x" * 500)
    assert torch.cat(list(adapter.iter_windows(nospace, 5))).tolist() == adapter.encode(b"x" * 500).tolist()


def test_the_tokenizer_travels_in_the_model_file_and_loads_without_pickle(adapter, tmp_path, monkeypatch):
    import pickle

    from seqlab.checkpoint import save_model
    from seqlab.domains import model_from_checkpoint

    model = adapter.build_model(tiny_config("mamba1"))
    path = save_model(tmp_path / "sub.safetensors", model)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header < 100_000  # the tokenizer JSON is a few tens of KB, far below safetensors' 100 MB header limit

    def refuse(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded, again = model_from_checkpoint(path)
    assert isinstance(again, SubwordAdapter) and again == adapter and loaded.vocab_size == 320
    assert again.bpe.token_bytes == adapter.bpe.token_bytes
    data = b"\x00 any \xff bytes"
    assert again.decode(again.encode(data)) == data


def _rewrite_tokenizer(path, change) -> None:
    """Edit the tokenizer recorded in a model file and write the file back with a valid checksum (an edited
    file, not a damaged one)."""
    from seqlab.checkpoint import FORMAT_VERSION, MODEL_FORMAT, read_model_file
    from seqlab.safetensors_io import write_tensors

    tensors, meta = read_model_file(path)
    spec = json.loads(meta["adapter"]["settings"]["tokenizer"])
    change(spec)
    meta["adapter"]["settings"]["tokenizer"] = json.dumps(spec)
    write_tensors(path, tensors, kind=MODEL_FORMAT, version=FORMAT_VERSION, meta=meta)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda s: s.__setitem__("normalizer", {"type": "Lowercase"}), "a normalizer"),
        (lambda s: s["model"].__setitem__("dropout", 0.5), "dropout"),
        (lambda s: s["model"]["vocab"].__setitem__("\x00" * 9, s["model"]["vocab"].pop("A")), "(0x41 has no|not load)"),
        (lambda s: s["model"]["vocab"].pop("A"), "out of range or used twice"),
        (lambda s: s["model"].__setitem__("type", "WordPiece"), "model type 'WordPiece'"),
        (lambda s: s.__setitem__("pre_tokenizer", {"type": "ByteLevel"}), "not a Split"),
        (lambda s: s["model"]["vocab"].__setitem__("\u2603", 5), "'☃' \\(id 5\\) is not a byte string"),
    ],
)
def test_an_edited_tokenizer_is_refused_naming_the_file(adapter, tmp_path, change, words):
    from seqlab.checkpoint import save_model
    from seqlab.domains import model_from_checkpoint

    path = save_model(tmp_path / "sub.safetensors", adapter.build_model(tiny_config("mamba1")))
    _rewrite_tokenizer(path, change)
    with pytest.raises(CorruptFileError) as info:
        model_from_checkpoint(path)
    assert str(path) in str(info.value) and "byte-level BPE" in str(info.value)
    assert re.search(words, str(info.value)), str(info.value)


def test_a_damaged_model_file_is_refused(adapter, tmp_path):
    from seqlab.checkpoint import save_model
    from seqlab.domains import model_from_checkpoint

    path = save_model(tmp_path / "sub.safetensors", adapter.build_model(tiny_config("mamba1")))
    data = bytearray(path.read_bytes())
    at = data.index(b"merges") + 20  # inside the tokenizer JSON of the header
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="altered or damaged|damaged"):
        model_from_checkpoint(path)


def test_tokenizer_json_refusals():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ByteBPE.from_json("{")
    with pytest.raises(ConfigError, match="no model"):
        ByteBPE.from_json("{}")


# ------------------------------------------------------------------------------------------------------------
# Greedy: identical bytes and states


def assert_same_states(got, want, tol: float = 1e-5) -> None:
    assert got.position == want.position
    a, b = got.tensors(), want.tensors()
    assert a.keys() == b.keys()
    for key in a:
        assert rel_err(a[key], b[key]) <= tol, key


PROMPTS = [list(b"The function "), list(b"\xff\xfe\x80 x"), list(b"a"), list("naïve café, the ".encode())]


@pytest.mark.parametrize("target_kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("draft_kind", ["mamba1", "mamba2"])
def test_greedy_output_and_states_equal_plain_decoding(adapter, target_kind, draft_kind):
    target = tiny_lm(target_kind, 256, seed=1)
    drafter = SubwordDrafter(tiny_lm(draft_kind, adapter.vocab_size, seed=2), adapter)
    for prompts in (PROMPTS, [PROMPTS[0]], [PROMPTS[2]]):
        plain = target.generate(prompts, 19)
        for k in (1, 2, 5):
            fast = target.generate(prompts, 19, draft=drafter, speculate=k)
            assert fast.tokens == plain.tokens, (k, prompts)
            assert fast.stats.drafted > 0
            for got, want in zip(fast.states, plain.states):
                assert_same_states(got, want)


def _train(vocab: int, ids, ssm: str, steps: int = 60):
    """A one-layer model fitted for ``steps`` steps on ``ids`` (seconds on a CPU)."""
    from seqlab.models import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(tiny_config(ssm, n_layer=1), vocab)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    ids = torch.as_tensor(ids)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (4,), generator=g)
        x = torch.stack([ids[a : a + 33] for a in starts])
        loss = F.cross_entropy(model(x[:, :-1]).logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_drafter_is_accepted_and_stays_exact_over_long_outputs():
    """A subword model and a byte model fitted on the same text agree often: many drafted bytes are kept, and
    over 150 bytes the frozen prefix, the re-encoded tail and token healing keep the output exact."""
    text = b"the cat sat on the mat. " * 40
    sub = SubwordAdapter(300).fitted([text])
    drafter = SubwordDrafter(_train(sub.vocab_size, sub.encode(text), "mamba1"), sub)
    target = _train(256, list(text), "mamba2")
    prompts = [list(b"the cat"), list(b"on the m"), list(b"sat")]
    plain = target.generate(prompts, 150)
    for k in (2, 4, 8):
        fast = target.generate(prompts, 150, draft=drafter, speculate=k)
        assert fast.tokens == plain.tokens, k
        assert fast.stats.acceptance_rate > 0.2, (k, fast.stats)
        assert fast.stats.tokens_per_round > 1.5, (k, fast.stats)
        for got, want in zip(fast.states, plain.states):
            assert_same_states(got, want)
    # the drafter's checkpoints stay bounded: only the tail of each row is kept
    assert all(len(points) < 40 for points in drafter.cursor.checkpoints)


def test_drafts_are_point_masses_over_bytes(adapter):
    drafter = SubwordDrafter(tiny_lm("mamba1", adapter.vocab_size, seed=3), adapter)
    drafter.reset()
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    tokens, q = drafter.draft([list(b"The "), list(b"\xff")], [0, 1], 6, [4, 1], Sampling(), gens)
    assert tokens.shape == (2, 6) and tokens.dtype == torch.long and q.shape == (2, 6, 256)
    assert q.dtype == torch.float64 and torch.equal(q.argmax(-1), tokens) and torch.all(q.sum(-1) == 1)


def test_bad_drafter_arguments(adapter):
    with pytest.raises(InputError, match="has 32 ids, its tokenizer 320"):
        SubwordDrafter(tiny_lm("mamba1", 32), adapter)
    with pytest.raises(InputError, match="no tokenizer yet"):
        SubwordDrafter(tiny_lm("mamba1", 512), SubwordAdapter())
    with pytest.raises(InputError, match="LanguageModel"):
        SubwordDrafter(object(), adapter)
    with pytest.raises(InputError, match="margin"):
        SubwordDrafter(tiny_lm("mamba1", 320), adapter, margin=0)
    with pytest.raises(InputError, match="tokenizer must be"):
        SubwordDrafter(tiny_lm("mamba1", 320), 42)
    # the drafter proposes bytes: a byte target only
    with pytest.raises(InputError, match="vocabulary has 256 ids, the target's 32"):
        tiny_lm("mamba1", 32).generate([[1, 2]], 3, draft=SubwordDrafter(tiny_lm("mamba1", 320), adapter))
    # a tokenizers.Tokenizer or the JSON work as well as the adapter
    assert SubwordDrafter(tiny_lm("mamba1", 320), adapter.bpe.to_json()).bpe.token_bytes == adapter.bpe.token_bytes


# ------------------------------------------------------------------------------------------------------------
# Sampling exactness against enumeration (a handful of allowed bytes)

ALLOWED = list(b"ab c")
BANNED = tuple(sorted(set(range(256)) - set(ALLOWED)))
PROMPT = list(b"ab ca b")


def enumerated_law(model, sampling: Sampling) -> torch.Tensor:
    """The target's law of its first two sampled bytes over ALLOWED x ALLOWED, by enumeration."""
    law = torch.zeros(len(ALLOWED), len(ALLOWED), dtype=torch.float64)
    with torch.no_grad():
        for a, first in enumerate(ALLOWED):
            probs = sampling.probs(model(torch.tensor([PROMPT + [first]])).logits[0, -2:])
            law[a] = probs[0, first] * probs[1, ALLOWED]
    return law


def sampled_counts(model, drafter, k: int, sampling: Sampling, n: int, rule: str = "exact"):
    start = model(torch.tensor([PROMPT[:-1]])).state
    rows = [torch.tensor([PROMPT[-1]])] * n
    generators = [torch.Generator().manual_seed(5000 + i) for i in range(n)]
    tokens, _, _, stats = speculative_decode(
        model, rows, [start] * n, drafter, k, 2, sampling, generators, [], rule=rule
    )
    counts = torch.zeros(len(ALLOWED), len(ALLOWED))
    for row in tokens:
        counts[ALLOWED.index(row[0]), ALLOWED.index(row[1])] += 1
    return counts, stats


def test_sampled_bytes_follow_the_target_law_and_the_negative_control_does_not(adapter):
    target = tiny_lm("mamba2", 256, seed=1)
    with torch.no_grad():
        target.embeddings.weight.mul_(8.0)  # tied head: sharper, more varied laws over the allowed bytes
    sampling = Sampling(False, 1.0, banned=BANNED)
    law = enumerated_law(target, sampling)
    assert float(law.sum()) == pytest.approx(1.0)
    # the drafter samples subword tokens spelled with allowed bytes only, so its drafts are often kept
    outside = tuple(i for i, t in enumerate(adapter.bpe.token_bytes) if set(t) - set(ALLOWED))
    draft_model = tiny_lm("mamba1", adapter.vocab_size, seed=2)
    with torch.no_grad():
        draft_model.embeddings.weight.mul_(30.0)
    drafter = SubwordDrafter(draft_model, adapter, sampling=Sampling(False, 1.0, banned=outside))
    counts, stats = sampled_counts(target, drafter, 2, sampling, 20000)
    assert chi_square_pvalue(counts, law) > 1e-3
    assert 0.1 < stats.acceptance_rate < 0.9, stats.acceptance_rate  # both branches of the rule are exercised
    wrong, _ = sampled_counts(target, drafter, 2, sampling, 20000, rule="always")
    assert chi_square_pvalue(wrong, law) < 1e-6
