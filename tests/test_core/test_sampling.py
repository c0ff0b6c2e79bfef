"""seqlab.sampling: the compiled sampler against its PyTorch twin, the rule's filters and exact inverse CDF, the
uniforms' layout, and generate's sampled tokens against a step-by-step loop built from the public pieces (the
compiled many-steps call, the eager step and one token at a time all draw the same tokens)."""

import pytest
import torch

from seqlab.errors import InputError
from seqlab.fused_step import _library, fused_lm_greedy
from seqlab.generate import _filter_logits
from seqlab.sampling import SamplingOptions, Uniforms, probabilities, sample, sample_reference
from seqlab.testing import tiny_lm

OPTIONS = [
    SamplingOptions(),
    SamplingOptions(temperature=0.7),
    SamplingOptions(temperature=1.3, top_k=5),
    SamplingOptions(top_p=0.9),
    SamplingOptions(temperature=0.8, top_k=50, top_p=0.95),
    SamplingOptions(min_p=0.05),
    SamplingOptions(temperature=2.0, top_k=40, top_p=0.5, min_p=0.01),
]
needs_library = pytest.mark.skipif(_library() is None, reason="the native kernels do not build here")


def _logits(rows: int, vocab: int, seed: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _boundary_gap(logits, uniforms, options) -> torch.Tensor:
    """Per row, how far u * Z lies from the nearest running sum of the rule's weights, relative to Z."""
    p = probabilities(logits, options)
    running = p.cumsum(-1)
    target = uniforms.double()[:, None] * running[:, -1:]
    return (running - target).abs().min(-1).values / running[:, -1]


@needs_library
@pytest.mark.parametrize("vocab", [7, 256, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_compiled_sampler_equals_its_pytorch_twin(vocab, dtype):
    """The C sampler and sample_reference pick the same token for the same logits and uniform, for every option
    set, on flat and on peaked logits (top-p's candidate bands); where they differ (different exp roundings),
    u * Z lies within rounding of a boundary."""
    rows = 200
    for k, (options, scale) in enumerate((o, scale) for o in OPTIONS for scale in (1.0, 30.0)):
        logits = _logits(rows, vocab, seed=k, dtype=dtype, scale=scale)
        uniforms = torch.rand(rows, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
        compiled, reference = sample(logits, uniforms, options), sample_reference(logits, uniforms, options)
        differ = compiled != reference
        assert int(differ.sum()) <= 2, (options, int(differ.sum()))
        if differ.any():
            assert float(_boundary_gap(logits[differ], uniforms[differ], options).max()) < 1e-12
        assert bool((probabilities(logits, options).gather(-1, compiled[:, None]) > 0).all())  # never a dropped id


@pytest.mark.parametrize("sampler", ["compiled", "reference"])
def test_sampling_is_an_exact_inverse_cdf(sampler):
    """Uniforms on an even grid of N points give each token N p(token) draws, within one: the sampler follows
    its law exactly (no statistics needed), for every option set."""
    if sampler == "compiled" and _library() is None:
        pytest.skip("the native kernels do not build here")
    draw = sample if sampler == "compiled" else sample_reference
    n = 4000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for k, options in enumerate(OPTIONS):
        logits = _logits(1, 64, seed=20 + k)
        law = probabilities(logits, options)[0]
        counts = torch.bincount(draw(logits.expand(n, -1), grid, options), minlength=64).double()
        assert float((counts - n * law).abs().max()) <= 1.0 + 1e-9, options
        assert bool((counts[law == 0] == 0).all())


def test_the_rule_is_generates_previous_filters():
    """probabilities() is, to rounding, the distribution of the float32 filters generate applied before
    (temperature, top-k, top-p, min-p, then softmax), and speculative decoding's target law is exactly it."""
    from seqlab.decoding.acceptance import Sampling

    logits = _logits(50, 300, seed=5)
    for options in OPTIONS:
        old = torch.softmax(
            _filter_logits(logits, None, options.temperature, options.top_k, options.top_p, options.min_p, 1.0)
            .double(), dim=-1,
        )  # fmt: skip
        assert float((probabilities(logits, options) - old).abs().max()) < 1e-5, options
        law = Sampling(False, options.temperature, options.top_k, options.top_p, options.min_p).probs(logits)
        assert torch.equal(law, probabilities(logits, options))


def test_filters_at_their_limits_and_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # top_p ranks ties by id: ids 0 and 1 hold 1 / (3 + e^-1) each, so id 2's mass above (2 of 3.37) passes 0.5
    assert probabilities(logits, SamplingOptions(top_p=0.5))[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert probabilities(logits, SamplingOptions(top_k=2))[0].tolist() == pytest.approx([1 / 3] * 3 + [0.0])
    x = _logits(30, 100, seed=9)
    top = x.argmax(-1)
    u = torch.rand(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for options in (
        SamplingOptions(top_k=1),
        SamplingOptions(top_p=1e-9),
        SamplingOptions(min_p=0.999),
        SamplingOptions(temperature=1e-300),
    ):
        assert torch.equal(sample(x, u, options), top) and torch.equal(sample_reference(x, u, options), top)
    banned = x.clone()
    banned[:, ::2] = float("-inf")
    for draw in (sample, sample_reference):
        assert bool((draw(banned, u, SamplingOptions(temperature=5.0)) % 2 == 1).all())


def test_unsampleable_logits_name_the_row():
    x = _logits(3, 10, seed=2)
    u = torch.full((3,), 0.5, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 4] = bad
        for draw in (sample, sample_reference):
            with pytest.raises(InputError, match="row 2"):
                draw(y, u, SamplingOptions())
    y = x.clone()
    y[1] = float("-inf")
    with pytest.raises(InputError, match="row 1"):
        sample(y, u, SamplingOptions())
    for draw in (sample, sample_reference):
        with pytest.raises(InputError, match="uniforms must hold one value per row"):
            draw(x, u[:2], SamplingOptions())
        with pytest.raises(InputError, match=r"logits must be \(rows, vocab\)"):
            draw(x[0], u[:1], SamplingOptions())
    with pytest.raises(InputError, match="top_k"):
        SamplingOptions(top_k=0)
    with pytest.raises(InputError, match="min_p"):
        SamplingOptions(min_p=1.0)
    with pytest.raises(InputError, match="temperature"):
        SamplingOptions(temperature=0)
    with pytest.raises(InputError, match="top_p"):
        SamplingOptions(top_p=1.5)


def test_uniforms_do_not_depend_on_how_they_are_taken():
    """Row i's t-th value is the t-th of its generator's float64 draws in blocks of 256, whatever the chunks."""
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8, 9)]  # noqa: E731
    want = torch.stack(
        [torch.cat([torch.rand(256, generator=g, dtype=torch.float64) for _ in range(3)]) for g in gens()]
    )
    a = Uniforms(gens())
    got = [a.take([0, 1, 2], t, 1) for t in range(5)]
    got.append(a.take([0, 1, 2], 5, 300))
    got.append(a.take([0, 2], 305, 1))  # row 1 stopped
    got.append(a.take([0, 2], 700, 68))  # a jump over unused values
    assert torch.equal(torch.cat(got[:6], dim=1), want[:, :305])
    assert torch.equal(got[6], want[[0, 2], 305:306])
    assert torch.equal(got[7], want[[0, 2], 700:768])
    assert torch.equal(Uniforms(gens()).take([1], 0, 768), want[1:2])


def _sampled_step_by_step(model, prompts, n, options: SamplingOptions, seed: int):
    """generate's contract from the public pieces: prefill each prompt, then per token model.step and sample
    with row i's t-th uniform of a generator seeded seed + i."""
    rows = []
    for i, prompt in enumerate(prompts):
        uniforms = Uniforms([torch.Generator().manual_seed(seed + i)])
        with torch.no_grad():
            out = model(torch.tensor([prompt]))
            state, logits, tokens = out.state, out.logits[:, -1], []
            for t in range(n):
                token = sample(logits, uniforms.take([0], t, 1)[:, 0], options)
                tokens.append(int(token[0]))
                step = model.step(token, state)
                state, logits = step.state, step.logits
        rows.append(tokens)
    return rows


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_generate_samples_as_the_step_by_step_contract_says(ssm, monkeypatch):
    """Sampled generate (the compiled many-steps call, several steps per call) draws the tokens of a plain loop
    of model.step + sample with each row's t-th uniform; so does the eager step, and a batch equals one by one."""
    import seqlab.generate as generate_module

    model = tiny_lm(ssm, seed=4)
    prompts = [[1, 2, 3, 4], [9, 8], [5]]
    kw = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=31)
    options = SamplingOptions(0.9, 20, 0.9, 0.01)
    calls: list = []
    many = generate_module.fused_lm_greedy
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: calls.append(many(*a, **k)) or calls[-1])
    out = model.generate(prompts, 40, **kw)
    if _library() is not None:
        assert max(run[0] for run in calls if run is not None) >= 20  # many steps per compiled call
    assert out.tokens == _sampled_step_by_step(model, prompts, 40, options, seed=31)
    model.fused_step = False
    try:
        assert model.generate(prompts, 40, **kw).tokens == out.tokens
    finally:
        model.fused_step = True
    alone = [model.generate(p, 40, **{**kw, "seed": 31 + i}).tokens[0] for i, p in enumerate(prompts)]
    assert alone == out.tokens


@needs_library
def test_compiled_sampling_call_raises_on_broken_logits():
    model = tiny_lm("mamba1", seed=2)
    with torch.no_grad():
        state = model(torch.tensor([[1, 2, 3], [4, 5, 6]])).state
        state = model.step(torch.tensor([1, 2]), state).state  # a state the fused step returned
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
        model.lm_head.bias[3] = float("nan")
        u = torch.rand(2, 5, dtype=torch.float64)
        with pytest.raises(InputError, match="row 0"):
            fused_lm_greedy(model, torch.tensor([1, 2]), state, 5, sampling=SamplingOptions(), uniforms=u)
        with pytest.raises(ValueError, match="uniforms"):
            fused_lm_greedy(model, torch.tensor([1, 2]), state, 5, sampling=SamplingOptions(), uniforms=u[:, :3])


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_suppressed_tokens_run_in_the_compiled_loop(do_sample, monkeypatch):
    """suppress_tokens (what an adapter's generation_options gives) no longer sends generate to its step-by-step
    loop: the many-steps call never chooses a suppressed id, and its tokens equal the step-by-step loop's and the
    eager step's."""
    import seqlab.generate as generate_module

    model = tiny_lm("mamba2", seed=6)
    prompts = [[1, 2, 3], [7]]
    top = model.generate(prompts, 30, do_sample=do_sample, seed=2).tokens
    banned = sorted({t for row in top for t in row})[:6]  # ids it would choose
    kw = dict(do_sample=do_sample, seed=2, suppress_tokens=banned, **({"temperature": 1.2} if do_sample else {}))
    calls: list = []
    many = generate_module.fused_lm_greedy
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: calls.append(many(*a, **k)) or calls[-1])
    out = model.generate(prompts, 30, **kw)
    if _library() is not None:
        assert max(run[0] for run in calls if run is not None) >= 20
    assert not {t for row in out.tokens for t in row} & set(banned)
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: None)  # the step-by-step loop
    assert model.generate(prompts, 30, **kw).tokens == out.tokens
    monkeypatch.setattr(generate_module, "fused_lm_greedy", many)
    model.fused_step = False
    try:
        assert model.generate(prompts, 30, **kw).tokens == out.tokens
    finally:
        model.fused_step = True
    if _library() is not None:
        with torch.no_grad():
            state = model.step(torch.tensor([1]), model(torch.tensor([[1, 2]])).state).state
            assert many(model, torch.tensor([3]), state, 4, banned=banned) is not None
            with pytest.raises(ValueError, match="banned ids"):
                many(model, torch.tensor([3]), state, 4, banned=[model.lm_head.out_features])
            seen = torch.zeros(1, model.lm_head.out_features, dtype=torch.bool)
            with pytest.raises(ValueError, match="seen must be"):
                many(model, torch.tensor([3]), state, 4, penalty=1.3, seen=seen[:, :5])
            bad = torch.tensor([model.lm_head.out_features])  # the usual step names it
            assert many(model, bad, state, 4, penalty=1.3, seen=seen) is None


def _first_end(tokens: list, pair: list) -> int:
    return next(i + 1 for i in range(len(tokens) - 1) if tokens[i : i + 2] == pair)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_a_streaming_callback_runs_in_the_compiled_loop(do_sample, monkeypatch):
    """With a callback (the CLI streams one prompt's text through one) generate still runs many steps per
    compiled call: the first call 8 steps, then as many as take about _STREAM_SECONDS; the callback sees every
    token, row by row and step by step, in the order and with the tokens of the step-by-step loop, stops
    included."""
    import seqlab.generate as generate_module

    model = tiny_lm("mamba2", seed=0)  # its greedy rows do not settle into one repeated token
    prompts = [[5, 6, 7], [1], [2, 2]]
    plain = model.generate(prompts, 60, do_sample=do_sample, seed=1)
    # a stop: the first pair of tokens, in some row, whose first occurrence ends at its 12th token or later
    ends = [(e, row) for row in plain.tokens for e in range(11, 60) if _first_end(row, row[e - 1 : e + 1]) == e]
    assert ends, plain.tokens
    end, row = ends[0]
    stop, stopping = [row[end - 1 : end + 1]], plain.tokens.index(row)
    calls: list = []
    many = generate_module.fused_lm_greedy
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: calls.append(a[3]) or many(*a, **k))
    seen: list = []
    out = model.generate(prompts, 60, do_sample=do_sample, seed=1, stop=stop, callback=lambda r, t: seen.append((r, t)))
    assert out.stop_reasons[stopping] == "stop" and out.tokens[stopping] == row[: end + 1]
    if _library() is not None:
        assert calls[0] == 8 and max(calls) > 8  # the steps asked of each call
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: None)  # the step-by-step loop
    one: list = []
    alone = model.generate(
        prompts, 60, do_sample=do_sample, seed=1, stop=stop, callback=lambda r, t: one.append((r, t))
    )
    assert out.tokens == alone.tokens and seen == one
    assert [t for r, t in seen if r == 0] == out.tokens[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_a_repetition_penalty_runs_in_the_compiled_loop(do_sample, dtype, monkeypatch):
    """The repetition penalty (float32, on the ids of the prompt and of every token so far) is applied in the
    many-steps call too: the tokens equal the step-by-step loop's and the eager step's, and the penalty changes
    them (it is not ignored)."""
    import seqlab.generate as generate_module

    model = tiny_lm("mamba2", seed=0).to(dtype)
    prompts = [[5, 6, 7, 5], [1], [2, 2, 9]]
    kw = dict(do_sample=do_sample, seed=5, suppress_tokens=[3], **({"temperature": 0.7} if do_sample else {}))
    calls: list = []
    many = generate_module.fused_lm_greedy
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: calls.append(many(*a, **k)) or calls[-1])
    plain = model.generate(prompts, 40, **kw).tokens
    out = model.generate(prompts, 40, repetition_penalty=1.8, **kw).tokens
    assert out != plain
    if _library() is not None:
        assert max(run[0] for run in calls if run is not None) >= 20
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: None)  # the step-by-step loop
    assert model.generate(prompts, 40, repetition_penalty=1.8, **kw).tokens == out
    monkeypatch.setattr(generate_module, "fused_lm_greedy", many)
    model.fused_step = False
    try:
        assert model.generate(prompts, 40, repetition_penalty=1.8, **kw).tokens == out
    finally:
        model.fused_step = True
