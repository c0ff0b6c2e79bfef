"""Generation stays inside what the adapter can decode, stops at its end token, and token ids of every integer
dtype a store can hold are accepted (issue 15, points 6 and 11)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.domains import dna as dna_mod
from seqlab.domains import memory as mem_mod
from seqlab.domains.bytes import ByteAdapter
from seqlab.domains.dna import DNAAdapter
from seqlab.domains.memory import MemoryStreamAdapter
from seqlab.errors import InputError
from seqlab.testing import tiny_config, tiny_lm

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("mamba1", seed=3)


def _adapter_model(adapter, seed=0):
    torch.manual_seed(seed)
    return adapter.build_model(tiny_config("mamba1", n_layer=1)).eval()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), banned=st.sets(st.integers(0, 31), min_size=1, max_size=30))
def test_suppressed_tokens_are_never_sampled(lm, seed, banned):
    out = lm.generate([[1, 2, 3]], 12, do_sample=True, temperature=1.5, seed=seed, suppress_tokens=sorted(banned))
    assert not set(out.tokens[0]) & banned


@torch.no_grad()
def test_greedy_with_suppression_is_the_argmax_of_the_allowed_ids(lm):
    prefill = lm(torch.tensor([[4, 5]]))
    banned = [int(prefill.logits[0, -1].argmax())]  # the id greedy would pick first
    out = lm.generate([[4, 5]], 6, temperature=0, suppress_tokens=banned)
    logits, out_state, expect = prefill.logits[0, -1], prefill.state, []
    for _ in range(6):
        masked = logits.clone()
        masked[banned] = float("-inf")
        token = int(masked.argmax())
        expect.append(token)
        step = lm.step(torch.tensor([token]), out_state)
        out_state, logits = step.state, step.logits[0]
    assert out.tokens[0] == expect and banned[0] not in expect
    for key, tensor in out_state.tensors().items():
        assert torch.equal(out.state.tensors()[key], tensor), key


def test_eos_token_ends_a_row_and_is_kept(lm):
    first = int(lm(torch.tensor([[7]])).logits[0, -1].argmax())
    out = lm.generate([[7], [7, 8]], 10, temperature=0, eos_token_id=first)
    assert out.tokens[0] == [first] and out.stop_reasons[0] == "stop"
    assert out.states[0].position == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(suppress_tokens=[99]), "suppress_tokens: id 99 is outside"),
        (dict(suppress_tokens="ab"), "suppress_tokens must be"),
        (dict(suppress_tokens=[1.5]), "suppress_tokens must be"),
        (dict(eos_token_id=-1), "eos_token_id: id -1 is outside"),
        (dict(eos_token_id=True), "eos_token_id must be"),
        (dict(suppress_tokens=list(range(32))), "whole vocabulary"),
        (dict(input_ids=torch.tensor([1.7, 2.2])), "prompt 0: token ids must be integers"),
    ],
)
def test_bad_suppress_and_eos_arguments(lm, kwargs, message):
    kwargs.setdefault("input_ids", [[1]])
    with pytest.raises(InputError, match=message):
        lm.generate(max_new_tokens=2, **kwargs)


def test_dna_generation_samples_bases_only_and_stops_at_eos():
    adapter = DNAAdapter()
    model = _adapter_model(adapter, seed=1)
    prompt = adapter.encode("ACGTACGT")
    plain = model.generate(prompt, 40, do_sample=True, temperature=1.0, seed=0)
    # random weights: about half the mass is on the five specials, so the bare call samples them
    assert set(plain.tokens[0]) & set(dna_mod.SPECIALS)
    options = adapter.generation_options()
    assert options == {
        "suppress_tokens": [dna_mod.PAD, dna_mod.MASK, dna_mod.UNK, dna_mod.BOS],
        "eos_token_id": dna_mod.EOS,
    }
    for seed in range(8):
        out = model.generate(prompt, 40, do_sample=True, temperature=1.0, seed=seed, **options)
        tokens = out.tokens[0]
        body = tokens[:-1] if out.stop_reasons[0] == "stop" else tokens
        assert all(t >= dna_mod.A for t in body)
        if out.stop_reasons[0] == "stop":
            assert tokens[-1] == dna_mod.EOS
        else:
            assert len(adapter.decode(torch.tensor(tokens))) == 40  # every generated token is a letter
    every = adapter.generation_options(allow_specials=True)
    assert every == {"eos_token_id": dna_mod.EOS}


def test_memory_replies_never_hold_framing_bytes():
    adapter = MemoryStreamAdapter()
    model = _adapter_model(adapter, seed=2)
    header = adapter.prompt_for("assistant", time=0.0)
    for seed in range(4):
        out = model.generate(header, 30, do_sample=True, temperature=1.0, seed=seed, **adapter.generation_options())
        tokens = out.tokens[0]
        assert not [t for t in tokens[:-1] if t >= mem_mod.EVENT]
        if out.stop_reasons[0] == "stop":
            assert tokens[-1] == mem_mod.END
        assert adapter.reply_event(header, tokens).content.encode("utf-8", "replace")


def test_byte_adapter_has_nothing_to_suppress():
    assert ByteAdapter().generation_options() == {}


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(INT_DTYPES), ids=st.lists(st.integers(0, 31), min_size=1, max_size=12))
def test_every_integer_dtype_of_ids_gives_the_int64_result(lm, dtype, ids):
    x = torch.tensor([ids], dtype=torch.int64)
    ref = lm(x)
    out = lm(x.to(dtype))
    assert torch.equal(out.logits, ref.logits)
    step = lm.step(x[:, 0].to(dtype))
    assert torch.equal(step.logits, lm.step(x[:, 0]).logits)


def test_uint8_ids_of_a_256_vocabulary_are_not_refused():
    # 255 < 256, but 256 is 0 in uint8: a comparison in uint8 refuses every id
    adapter = ByteAdapter()
    model = _adapter_model(adapter)
    ids = torch.tensor([[0, 200, 255]], dtype=torch.uint8)
    assert torch.equal(model(ids).logits, model(ids.long()).logits)
    assert torch.equal(adapter.check_ids(ids), ids)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_ids_outside_the_vocabulary_are_refused_in_every_dtype(lm, dtype):
    bad = 100 if dtype != torch.int8 else 64
    with pytest.raises(InputError, match=f"= {bad} is outside the vocabulary"):
        lm(torch.tensor([[1, bad]], dtype=dtype))
    with pytest.raises(InputError, match=f"id {bad} at position"):
        DNAAdapter().check_ids(torch.tensor([1, bad], dtype=dtype))


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1e-300},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1e-300, "top_p": 1e-300, "repetition_penalty": 1e-6},
    ],
)
def test_vanishing_temperature_or_top_p_is_greedy_not_a_crash(settings):
    model = tiny_lm()
    prompt = torch.tensor([1, 2, 3])
    greedy = model.generate(prompt, 8, temperature=0, repetition_penalty=settings.get("repetition_penalty", 1.0))
    assert model.generate(prompt, 8, do_sample=True, seed=3, **settings).tokens == greedy.tokens


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 1e-300),
        ("top_p", float("nan")),
    ],
)
def test_non_finite_sampling_settings_are_refused(name, value):
    with pytest.raises(InputError, match=name):
        tiny_lm().generate(torch.tensor([1, 2]), 4, **{name: value})
