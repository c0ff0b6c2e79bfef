"""Generation: greedy equals step-by-step argmax, seeded sampling is reproducible, ragged batches equal one
by one, continuing from a saved state equals continuing the original run, stops, filters, bad input."""

import warnings

import pytest
import torch

from seqlab import RecurrentState
from seqlab.errors import InputError, StateError, StateMismatchError
from seqlab.generate import _filter_logits, generate
from seqlab.testing import rel_err, tiny_lm


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model(request):
    return tiny_lm(request.param, seed=11)


def manual_greedy(model, prompt, n):
    with torch.no_grad():
        out = model(torch.tensor([prompt]))
        state, logits, tokens = out.state, out.logits[0, -1], []
        for _ in range(n):
            token = int(logits.argmax())
            tokens.append(token)
            step = model.step(torch.tensor([token]), state)
            state, logits = step.state, step.logits[0]
    return tokens, state


def test_greedy_equals_step_by_step_argmax(model):
    prompt = [1, 5, 9, 2, 30, 7]
    want_tokens, want_state = manual_greedy(model, prompt, 12)
    out = model.generate(prompt, 12, temperature=0)
    assert out.tokens == [want_tokens] and out.stop_reasons == ["length"]
    assert out.state.position == len(prompt) + 12 == want_state.position
    for key, tensor in want_state.tensors().items():
        assert torch.equal(out.state.tensors()[key], tensor), key


def test_seeded_sampling_is_reproducible(model):
    kw = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.95, seed=123)
    a = model.generate([3, 4, 5], 15, **kw)
    b = model.generate([3, 4, 5], 15, **kw)
    c = model.generate([3, 4, 5], 15, **{**kw, "seed": 124})
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_ragged_batch_equals_one_by_one(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    batch = model.generate(prompts, 9, do_sample=True, temperature=0.9, seed=40)
    greedy = model.generate(prompts, 9, temperature=0)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt, 9, do_sample=True, temperature=0.9, seed=40 + i)
        assert batch.tokens[i] == alone.tokens[0]
        assert batch.states[i].position == len(prompt) + 9
        for key, tensor in alone.state.tensors().items():
            assert rel_err(batch.states[i].tensors()[key], tensor) <= 1e-5, key
        assert greedy.tokens[i] == model.generate(prompt, 9, temperature=0).tokens[0]


def test_continuing_from_a_saved_state_equals_the_original_run(model, tmp_path):
    first = model.generate([4, 8, 15], 6, temperature=0)
    first.state.save(tmp_path / "agent.safetensors")
    restored = RecurrentState.load(tmp_path / "agent.safetensors", model)
    resumed = model.generate([16, 23], 8, temperature=0, state=restored)
    straight = model.generate([4, 8, 15, *first.tokens[0], 16, 23], 8, temperature=0)
    assert resumed.tokens == straight.tokens
    assert resumed.state.position == straight.state.position == 3 + 6 + 2 + 8
    for key, tensor in straight.state.tensors().items():
        assert rel_err(resumed.state.tensors()[key], tensor) <= 1e-5, key


def test_stop_sequences_and_streaming_callback(model):
    free = model.generate([2, 3], 10, temperature=0).tokens[0]
    stop_token = free[3]
    seen = []
    out = model.generate(
        [[2, 3], [2, 3]],
        10,
        temperature=0,
        stop=[stop_token, [31, 31, 31]],
        callback=lambda row, token: seen.append((row, token)),
    )
    cut = free.index(stop_token) + 1
    assert out.tokens == [free[:cut]] * 2 and out.stop_reasons == ["stop", "stop"]
    assert [t for r, t in seen if r == 0] == free[:cut]
    assert out.states[0].position == 2 + cut
    want = manual_greedy(model, [2, 3], cut)[1]  # batch of 1 vs batch of 2: equal up to GEMM rounding
    for key, tensor in want.tensors().items():
        assert rel_err(out.states[1].tensors()[key], tensor) <= 1e-5, key


def test_filters_reduce_to_greedy_at_their_limits(model):
    greedy = model.generate([7, 7, 1], 8, temperature=0).tokens
    assert model.generate([7, 7, 1], 8, do_sample=True, top_k=1, seed=0).tokens == greedy
    assert model.generate([7, 7, 1], 8, do_sample=True, top_p=1e-6, seed=0).tokens == greedy
    assert model.generate([7, 7, 1], 8, do_sample=True, min_p=0.999, seed=0).tokens == greedy
    assert model.generate([7, 7, 1], 0).tokens == [[]]


def test_greedy_is_the_default_and_do_sample_false_ignores_the_sampling_options(model):
    greedy = model.generate([7, 7, 1], 8, temperature=0).tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a neutral temperature nor a seed warns
        assert model.generate([7, 7, 1], 8, seed=1).tokens == greedy
        assert model.generate([7, 7, 1], 8, do_sample=False, temperature=1.0, seed=1).tokens == greedy
    with pytest.warns(UserWarning, match="temperature, top_k set, but sampling options apply only with do_sa") as rec:
        assert model.generate([7, 7, 1], 8, do_sample=False, temperature=1.7, top_k=5, seed=1).tokens == greedy
    assert rec[0].filename == __file__
    with pytest.warns(UserWarning, match="top_p set") as record:
        assert generate(model, [7, 7, 1], 8, top_p=0.5).tokens == greedy
    assert record[0].filename == __file__
    assert model.generate([7, 7, 1], 8, do_sample=True, temperature=0).tokens == greedy
    sampled = model.generate([7, 7, 1], 8, do_sample=True, temperature=1.7, seed=1).tokens
    assert sampled != greedy
    assert model.generate([7, 7, 1], 8, do_sample=True, temperature=1.7, seed=1).tokens == sampled


def test_prompts_is_a_deprecated_name_of_input_ids(model):
    want = model.generate(input_ids=[3, 4], max_new_tokens=5, temperature=0).tokens
    with pytest.warns(FutureWarning, match="input_ids") as record:
        assert model.generate(prompts=[3, 4], max_new_tokens=5, temperature=0).tokens == want
    assert record[0].filename == __file__
    with pytest.raises(InputError, match="not both"):
        model.generate([3, 4], 5, prompts=[3, 4])


def test_filter_logits_semantics():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    inf = float("-inf")
    assert _filter_logits(logits, None, 1.0, 2, None, None, 1.0).tolist() == [[2.0, 1.0, inf, inf]]
    probs = torch.softmax(logits, -1)[0]
    top2 = float(probs[0] + probs[1])
    kept = _filter_logits(logits, None, 1.0, None, top2 - 1e-3, None, 1.0)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = _filter_logits(logits, None, 1.0, None, None, float(probs[1] / probs[0]) - 1e-3, 1.0)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    seen = torch.tensor([[True, False, False, True]])
    assert _filter_logits(logits, seen, 0, None, None, None, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    assert _filter_logits(logits, None, 0.5, None, None, None, 1.0).tolist() == [[4.0, 2.0, 0.0, -2.0]]


def test_repetition_penalty_discourages_repeats(model):
    plain = model.generate([5, 6], 20, temperature=0).tokens[0]
    penalised = model.generate([5, 6], 20, temperature=0, repetition_penalty=1e6).tokens[0]
    assert len(set(plain)) < len(plain)  # this tiny model repeats itself greedily
    assert len(set(penalised)) == len(penalised) and not {5, 6} & set(penalised)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_ids=[]), InputError, "token ids"),
        (dict(input_ids=[[1], []]), InputError, "prompt 1 is empty"),
        (dict(input_ids=[[1]], temperature=-1), InputError, "temperature"),
        (dict(input_ids=[[1]], top_p=0), InputError, "top_p"),
        (dict(input_ids=[[1]], top_k=0), InputError, "top_k"),
        (dict(input_ids=[[1]], min_p=1), InputError, "min_p"),
        (dict(input_ids=[[1]], repetition_penalty=0), InputError, "repetition_penalty"),
        (dict(input_ids=[[1]], max_new_tokens=-2), InputError, "max_new_tokens"),
        (dict(input_ids=[[1]], stop=[[]]), InputError, "stop sequences"),
        (dict(input_ids=[[1]], do_sample="yes"), InputError, "do_sample must be"),
        (dict(), InputError, "input_ids is missing"),
        (dict(input_ids=[[99]]), InputError, "outside the vocabulary"),
        (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), InputError, "shape"),
    ],
)
def test_bad_generation_input(model, kwargs, error, message):
    kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(error, match=message):
        model.generate(**kwargs)


def test_state_batch_must_match_prompts(model):
    state = model.init_state(3)
    with pytest.raises(StateMismatchError, match="batch of 3"):
        model.generate([[1], [2]], 2, state=state)
    two = model.generate([[1], [2], [3]], 2, temperature=0, state=state)
    assert [s.position for s in two.states] == [3, 3, 3]
    with pytest.raises(InputError, match="use .states"):
        _ = two.state


def test_bidirectional_models_cannot_generate():
    with pytest.raises(StateError, match="bidirectional"):
        tiny_lm("mamba1", bidirectional=True).generate([1, 2], 2)


def test_state_select_and_stack_round_trip(model):
    with torch.no_grad():
        state = model(torch.randint(0, 32, (3, 5))).state
    rows = [state.select(i) for i in range(3)]
    again = RecurrentState.stack(rows)
    for key, tensor in state.tensors().items():
        assert torch.equal(again.tensors()[key], tensor)
    rows[1].position += 1  # rows at different positions stack into one state (issue 23)
    assert RecurrentState.stack(rows).positions == (5, 6, 5)
    with pytest.raises(IndexError):
        state.select(3)


def test_seed_none_draws_from_torchs_global_generator_and_greedy_draws_nothing():
    model = tiny_lm("mamba1", seed=2)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    generate(model, [1, 2, 3], 4)  # greedy: the caller's random stream is untouched
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(7)
    first = generate(model, [1, 2, 3], 8, do_sample=True).tokens
    torch.manual_seed(7)
    again = generate(model, [1, 2, 3], 8, do_sample=True).tokens
    assert first == again  # torch.manual_seed makes seed=None sampling reproducible
    torch.manual_seed(7)
    untouched = torch.rand(3)
    torch.manual_seed(7)
    generate(model, [1, 2, 3], 8, do_sample=True)
    assert not torch.equal(torch.rand(3), untouched)  # sampling drew its seeds from that stream
