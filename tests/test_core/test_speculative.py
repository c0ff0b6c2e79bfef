"""Exact speculative decoding (issue 19): the acceptance law on enumerated distributions, chi-square fits of
sampled outputs against the target's law computed by enumeration (with a negative control that must fail the
same test), greedy outputs identical to plain decoding, final states equal to the plain run's, batches whose rows
accept different numbers of tokens, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from seqlab.decoding import MaxGramDrafter, ModelDrafter, Sampling, accept_draft, output_law
from seqlab.decoding.speculative import speculative_decode
from seqlab.errors import InputError
from seqlab.testing import chi_square_pvalue, rel_err, tiny_hybrid_options, tiny_lm

ATTN_HYBRID = tiny_hybrid_options()


def make(kind: str, vocab: int = 32, seed: int = 0, spread: float = 1.0):
    model = tiny_lm(**ATTN_HYBRID, vocab=vocab, seed=seed) if kind == "hybrid" else tiny_lm(kind, vocab, seed)
    if spread != 1.0:
        with torch.no_grad():
            model.embeddings.weight.mul_(spread)  # tied head: sharper, more varied next-token laws
    return model


# ------------------------------------------------------------------------------------------------------------
# The rule itself


def _laws(seed: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    p, q = (torch.distributions.Dirichlet(torch.full((vocab,), 0.5)).sample().double() for _ in range(2))
    p, q = p / p.sum(), q / q.sum()
    onehot = torch.zeros(vocab, dtype=torch.float64)
    onehot[int(torch.randint(vocab, (1,), generator=g))] = 1
    disjoint_p = torch.zeros(vocab, dtype=torch.float64)
    disjoint_p[: vocab // 2] = 1.0 / (vocab // 2)
    disjoint_q = torch.zeros(vocab, dtype=torch.float64)
    disjoint_q[vocab // 2 :] = 1.0 / (vocab - vocab // 2)
    return [(p, q), (p, onehot), (onehot, q), (p, p), (onehot, onehot), (disjoint_p, disjoint_q)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("vocab", [2, 5, 64])
def test_acceptance_law_equals_the_target_law(seed, vocab):
    """q(x) min(1, p(x)/q(x)) + rejection mass * residual(x) == p(x), to float precision."""
    for p, q in _laws(seed, vocab):
        assert torch.allclose(output_law(p, q), p.double(), atol=1e-12, rtol=0)


def test_accept_draft_samples_the_target_law_and_the_negative_control_does_not():
    """Monte Carlo of accept_draft itself on a two-token draft: the first output token follows p[0]; keeping
    every draft token (the wrong rule) follows q[0] and fails the same chi-square test."""
    vocab, n = 6, 20000
    torch.manual_seed(3)
    p = torch.distributions.Dirichlet(torch.full((vocab,), 0.7)).sample((3,)).double()
    q = torch.distributions.Dirichlet(torch.full((vocab,), 0.7)).sample((2,)).double()
    gen = torch.Generator().manual_seed(0)
    for rule, want_fit in (("exact", True), ("always", False)):
        counts = torch.zeros(vocab)
        for _ in range(n):
            draft = [int(torch.multinomial(q[j].float(), 1, generator=gen)) for j in range(2)]
            kept, extra = accept_draft(p, q, draft, gen, rule=rule)
            counts[(draft[:kept] + [extra])[0]] += 1
        pvalue = chi_square_pvalue(counts, p[0])
        assert (pvalue > 1e-3) if want_fit else (pvalue < 1e-6), (rule, pvalue)


def test_point_mass_rule_matches_the_closed_form():
    """q one-hot at b: keep b with probability p(b), else draw from p without b, renormalised."""
    p = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    law = output_law(p, q)
    assert torch.allclose(law, p)
    residual = (p - q).clamp_min(0)
    assert torch.allclose(residual / residual.sum(), torch.tensor([0.1, 0.6, 0.0], dtype=torch.float64) / 0.7)


# ------------------------------------------------------------------------------------------------------------
# Sampling exactness against enumeration (a tiny vocabulary)

VOCAB = 6
PROMPT = [2, 4, 1]


def enumerated_law(model, sampling: Sampling, prompt: list[int], new: int) -> torch.Tensor:
    """The target's law of its first ``new`` sampled tokens, by enumeration: (V,) * new float64."""
    law = torch.zeros((VOCAB,) * new, dtype=torch.float64)
    with torch.no_grad():
        for prefix in itertools.product(range(VOCAB), repeat=new - 1):
            logits = model(torch.tensor([prompt + list(prefix)])).logits[0, len(prompt) - 1 :]
            probs = sampling.probs(logits)
            mass = torch.ones((), dtype=torch.float64)
            for j, token in enumerate(prefix):
                mass = mass * probs[j, token]
            law[prefix] = mass * probs[len(prefix)]
    return law


def sampled_counts(model, drafter, k: int, sampling: Sampling, n: int, rule: str = "exact") -> torch.Tensor:
    """``n`` samples of the first two tokens, one batch: the prompt is consumed into a state first so that each
    row starts from one pending token (no per-row prefill)."""
    start = model(torch.tensor([PROMPT[:-1]])).state
    rows = [torch.tensor([PROMPT[-1]])] * n
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    if hasattr(drafter, "prefix"):
        drafter.prefix = PROMPT[:-1]
    tokens, _, _, _ = speculative_decode(model, rows, [start] * n, drafter, k, 2, sampling, generators, [], rule=rule)
    counts = torch.zeros(VOCAB, VOCAB)
    for row in tokens:
        counts[row[0], row[1]] += 1
    return counts


class _PrefixedDrafter(ModelDrafter):
    """A model drafter that also sees the prompt's earlier tokens (the target's start state has consumed them,
    so the rows' sequences begin at the prompt's last token)."""

    prefix: list[int] = []

    def draft(self, sequences, rows, k, stable, sampling, generators):
        shift = len(self.prefix)
        return super().draft(
            [self.prefix + s for s in sequences], rows, k, [s + shift for s in stable], sampling, generators
        )


@pytest.mark.parametrize(
    ("drafter_kind", "k", "temperature", "top_k", "control"),
    [("model", 3, 1.0, None, True), ("model", 1, 0.7, 4, False), ("maxgram", 2, 1.0, None, True)],
)
def test_sampled_outputs_follow_the_target_law(drafter_kind, k, temperature, top_k, control):
    target = make("mamba2", VOCAB, seed=1, spread=40.0)
    sampling = Sampling(False, temperature, top_k)
    law = enumerated_law(target, sampling, PROMPT, 2)
    drafter = _PrefixedDrafter(make("mamba1", VOCAB, seed=2, spread=40.0)) if drafter_kind == "model" else None
    drafter = drafter or MaxGramDrafter(VOCAB)
    counts = sampled_counts(target, drafter, k, sampling, 20000)
    assert chi_square_pvalue(counts, law) > 1e-3
    if control:  # negative control: keeping every draft token must fail the same test
        wrong = sampled_counts(target, drafter, k, sampling, 20000, rule="always")
        assert chi_square_pvalue(wrong, law) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Greedy: identical tokens and states


def assert_same_states(got, want, tol: float = 1e-5) -> None:
    assert got.position == want.position
    a, b = got.tensors(), want.tensors()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert rel_err(a[key], b[key]) <= tol, key


@pytest.mark.parametrize("target_kind", ["mamba1", "mamba2", "hybrid"])
@pytest.mark.parametrize("draft_kind", ["mamba1", "mamba2", "hybrid", "maxgram"])
def test_greedy_output_and_states_equal_plain_decoding(target_kind, draft_kind):
    target = make(target_kind, seed=1)
    draft = MaxGramDrafter(32) if draft_kind == "maxgram" else make(draft_kind, seed=2)
    prompts = [[1, 2, 3, 4, 5, 1, 2], [7, 8], [9]]
    plain = target.generate(prompts, 17)
    for k in (1, 2, 5):
        fast = target.generate(prompts, 17, draft=draft, speculate=k)
        assert fast.tokens == plain.tokens, k
        assert fast.stop_reasons == plain.stop_reasons
        for got, want in zip(fast.states, plain.states):
            assert_same_states(got, want)


def test_target_as_its_own_drafter_accepts_everything_without_rerunning():
    """A draft equal to the target is always right: every round keeps k tokens plus the bonus, so the target
    runs once per k+1 tokens plus the final state's forward, and no catch-up forward (nothing is re-run)."""
    target = make("mamba2", seed=1)
    twin = make("mamba2", seed=1)
    out = target.generate([[3, 1, 4, 1, 5]], 20, draft=twin, speculate=4)
    assert out.tokens == target.generate([[3, 1, 4, 1, 5]], 20).tokens
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.rounds == 4  # 20 tokens in rounds of 5
    assert out.stats.target_calls == out.stats.rounds + 1


def test_stops_and_eos_end_rows_inside_a_round():
    target = make("mamba1", seed=1)
    prompts = [[1, 2, 3], [4, 5]]
    plain = target.generate(prompts, 30)
    stop_seq = tuple(plain.tokens[0][5:7])
    eos = plain.tokens[1][3]
    want = target.generate(prompts, 30, stop=[stop_seq], eos_token_id=eos)
    got = target.generate(prompts, 30, stop=[stop_seq], eos_token_id=eos, draft=make("mamba1", seed=1), speculate=6)
    assert got.tokens == want.tokens and got.stop_reasons == want.stop_reasons == ["stop", "stop"]
    for a, b in zip(got.states, want.states):
        assert_same_states(a, b)
    seen = []
    target.generate(prompts, 9, draft=MaxGramDrafter(32), speculate=3, callback=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 0] == plain.tokens[0][:9]


def test_continue_from_a_state_and_suppressed_tokens():
    target, draft = make("hybrid", seed=1), make("mamba2", seed=2)
    start = target(torch.tensor([[5, 6, 7, 8]])).state
    banned = [0, 1, 2]
    plain = target.generate([[9, 10]], 12, state=start, suppress_tokens=banned)
    fast = target.generate([[9, 10]], 12, state=start, suppress_tokens=banned, draft=draft, speculate=3)
    assert fast.tokens == plain.tokens
    assert not set(fast.tokens[0]) & set(banned)
    assert_same_states(fast.state, plain.state)
    assert fast.state.position == 4 + 2 + 12


@pytest.mark.parametrize("kind", ["mamba1", "hybrid"])
def test_batched_rows_sample_as_they_would_alone(kind):
    """Each row accepts its own number of tokens per round and draws from its own generators: row i of a batch
    seeded s samples exactly what that prompt alone seeded s + i samples."""
    target, draft = make(kind, seed=1, spread=4.0), make("mamba1", seed=2, spread=4.0)
    prompts = [[1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11]]
    together = target.generate(prompts, 15, do_sample=True, seed=11, draft=draft, speculate=3)
    accepted = together.stats.accepted_per_round
    assert len({tuple(a) for a in accepted}) > 1  # the rows did accept different numbers of tokens
    for i, prompt in enumerate(prompts):
        alone = target.generate([prompt], 15, do_sample=True, seed=11 + i, draft=draft, speculate=3)
        assert alone.tokens[0] == together.tokens[i]
        assert_same_states(alone.state, together.states[i])


# ------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(speculate=0), "speculate"),
        (dict(speculate=-2), "speculate"),
        (dict(speculate=2.5), "speculate"),
        (dict(speculate=True), "speculate"),
        (dict(repetition_penalty=1.2), "repetition_penalty"),
    ],
)
def test_bad_speculation_options(options, words):
    target = make("mamba1")
    with pytest.raises(InputError, match=words):
        target.generate([1, 2], 4, draft=make("mamba1", seed=2), **options)


def test_bad_drafts():
    target = make("mamba1")
    with pytest.raises(InputError, match="vocabulary has 16 ids, the target's 32"):
        target.generate([1, 2], 4, draft=make("mamba1", vocab=16))
    with pytest.raises(InputError, match="vocabulary has 64 ids"):
        target.generate([1, 2], 4, draft=MaxGramDrafter(64))
    with pytest.raises(InputError, match="draft must be a seqlab LanguageModel or a Drafter"):
        target.generate([1, 2], 4, draft="draft.safetensors")
    with pytest.raises(InputError, match="speculate is set but draft is None"):
        target.generate([1, 2], 4, speculate=3)
    with pytest.raises(InputError, match="max_n"):
        MaxGramDrafter(32, max_n=0)


# ------------------------------------------------------------------------------------------------------------
# Cascade Speculative Drafting


def test_cascade_greedy_equals_plain_decoding():
    """A vertical + horizontal cascade (two draft models and Max-Gram) gives the target's greedy tokens and
    states; each model level really speculates (its own rounds run)."""
    from seqlab.decoding import SpeculativeDrafter, cascade

    target = make("hybrid", seed=1)
    small, tiny = make("mamba2", seed=2), make("mamba1", seed=3)
    prompts = [[1, 2, 3, 1, 2, 3, 1], [4, 5]]
    plain = target.generate(prompts, 14)
    drafter = cascade([small, tiny], [[2, 1, 1], [2, 1], [2]])
    fast = target.generate(prompts, 14, draft=drafter, speculate=4)
    assert fast.tokens == plain.tokens
    for a, b in zip(fast.states, plain.states):
        assert_same_states(a, b)
    levels = [d for d, _ in drafter.parts if isinstance(d, SpeculativeDrafter)]
    assert len(levels) == 2 and all(level.rounds > 0 for level in levels)


def test_cascade_lossy_leniency_keeps_the_greedy_output_and_more_inner_drafts():
    """CS Drafting's leniency at the inner level: it keeps more of Max-Gram's tokens (all of them at a huge
    leniency), and the target's exact check still gives its own greedy tokens and states."""
    from seqlab.decoding import SpeculativeDrafter, cascade

    target = make("hybrid", seed=1)
    small = make("mamba2", seed=2)
    prompts = [[1, 2, 3, 1, 2, 3, 1], [4, 5]]
    plain = target.generate(prompts, 16)
    rates = {}
    for leniency in (None, 1e9):
        drafter = cascade([small], [[3, 1], [3]], lossy_leniency=leniency)
        fast = target.generate(prompts, 16, draft=drafter, speculate=4)
        assert fast.tokens == plain.tokens
        for a, b in zip(fast.states, plain.states):
            assert_same_states(a, b)
        level = next(d for d, _ in drafter.parts if isinstance(d, SpeculativeDrafter))
        rates[leniency] = level.accepted / level.drafted
    assert rates[1e9] == 1.0 and rates[None] < 1.0, rates


def test_cascade_sampling_follows_the_target_law():
    from seqlab.decoding import cascade

    target = make("mamba2", VOCAB, seed=1, spread=40.0)
    sampling = Sampling(False, 1.0)
    law = enumerated_law(target, sampling, PROMPT, 2)
    drafter = cascade([make("mamba1", VOCAB, seed=2, spread=40.0)], [[1, 2], [2]])
    assert chi_square_pvalue(sampled_counts(target, drafter, 3, sampling, 20000), law) > 1e-3
    control = sampled_counts(target, drafter, 3, sampling, 20000, rule="always")
    assert chi_square_pvalue(control, law) < 1e-6


def test_bad_cascades():
    from seqlab.decoding import HorizontalCascade, MaxGramDrafter, cascade

    model = make("mamba1")
    with pytest.raises(InputError, match="allocation needs 2 rows"):
        cascade([model], [[1, 1]])
    with pytest.raises(InputError, match=r"allocation\[1\] must be 1 ints"):
        cascade([model], [[1, 1], [1, 1]])
    with pytest.raises(InputError, match="sum to 0"):
        cascade([model], [[0, 0], [1]])
    with pytest.raises(InputError, match="at least one draft model"):
        cascade([])
    with pytest.raises(InputError, match="share one vocabulary"):
        HorizontalCascade([(MaxGramDrafter(32), 1), (MaxGramDrafter(64), 1)])
    for bad in (0.5, float("nan"), True, "2"):
        with pytest.raises(InputError, match="lossy_leniency must be a finite number >= 1"):
            cascade([model], lossy_leniency=bad)
    small_vocab = cascade([make("mamba1", vocab=16)])
    with pytest.raises(InputError, match="vocabulary has 16 ids"):
        model.generate([1], 3, draft=small_vocab)


@pytest.mark.parametrize("kind", ["mamba1", "hybrid"])
def test_cursor_starts_grouped_rows_as_it_would_start_each_alone(kind):
    """Rows sharing a start (None or one state object) and a head length start in one batch; each row's state
    equals a lone forward over its head from its own start."""
    from seqlab.decoding import ModelCursor

    model = make(kind, seed=3)
    shared = model(torch.tensor([[5, 6, 7]])).state
    sequences = [[1, 2, 3], [4, 5, 6], [9], [8, 8, 1, 2], [3, 3, 3, 4], [2, 7]]
    starts = [None, None, None, shared, shared, shared]
    cursor = ModelCursor(model, sequences, starts)
    with torch.no_grad():
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            want = start if start is not None else model.init_state(1)
            if len(seq) > 1:
                want = model(torch.tensor([seq[:-1]]), want).state
            point = cursor.checkpoints[i][-1]
            assert point.length == len(seq) - 1
            got = point.state.select(point.row)
            assert_same_states(got, want)
    with pytest.raises(ValueError, match="each row's start must be a batch of one, got 2"):
        ModelCursor(model, [[1, 2]], [model.init_state(2)])


@pytest.mark.parametrize("kind", ["mamba2", "hybrid", "hybrid with a hook"])
def test_cursor_feeds_a_short_draft_as_compiled_steps_and_otherwise_one_forward(kind, monkeypatch):
    """A model whose every block runs the compiled decode step (a hybrid's attention included) verifies a draft
    of up to STEP_FEED_MAX tokens step by step (the logits plain decoding computes); a longer draft, or a model
    with a block that steps eagerly (here: a forward hook on the attention), goes through one forward with
    states_at. Both give the same logits and checkpoints to rounding."""
    from seqlab.decoding import cursor as cursor_module
    from seqlab.mixers import AttentionMixer

    model = make(kind.split()[0], seed=3)
    if kind == "hybrid with a hook":
        for module in model.modules():
            if isinstance(module, AttentionMixer):
                module.register_forward_hook(lambda *args: None)
    sequences = [[1, 2, 3], [4, 5, 6, 7]]
    draft = torch.tensor([[9, 8, 7, 6], [5, 4, 3, 2]])
    steps: list[int] = []
    plain_step = model.step
    model.step = lambda *a, **kw: steps.append(1) or plain_step(*a, **kw)  # type: ignore[method-assign]

    def verify(max_steps: int):
        monkeypatch.setattr(cursor_module, "STEP_FEED_MAX", max_steps)
        cursor = cursor_module.ModelCursor(model, sequences, [None, None])
        cursor.sync(sequences, [0, 1])
        steps.clear()
        with torch.no_grad():
            logits = cursor.feed(draft)
        return logits, cursor, len(steps)

    stepped, by_steps, calls = verify(16)
    forward, by_forward, none = verify(4)  # the feed is 5 tokens: over the limit
    assert none == 0 and calls == (0 if kind == "hybrid with a hook" else 5)
    assert rel_err(stepped, forward) <= 1e-5
    for row in range(2):
        for a, b in zip(by_steps.checkpoints[row], by_forward.checkpoints[row]):
            assert a.length == b.length
            assert_same_states(a.state.select(a.row), b.state.select(b.row))
