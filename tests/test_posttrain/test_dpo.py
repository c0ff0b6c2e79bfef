"""DPO (seqlab.posttrain.dpo): sequence log-probs against token-by-token stepping for every mixer kind and MoE,
batch independence, the loss and its gradient by hand, a behavioural run, the frozen reference, bad input, and
checkpoint/resume equal to an uninterrupted run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.posttrain.dpo import DPOConfig, PreferencePair, dpo_loss, sequence_logprobs, train_dpo
from seqlab.testing import tiny_hybrid_options, tiny_lm

VOCAB = 32
MOE = dict(ffn="moe", d_ffn=24, moe_experts=4, moe_top_k=2)
KINDS = {
    "mamba1": lambda: tiny_lm("mamba1", vocab=VOCAB),
    "mamba2": lambda: tiny_lm("mamba2", vocab=VOCAB),
    "hybrid": lambda: tiny_lm(vocab=VOCAB, **tiny_hybrid_options()),
    "moe": lambda: tiny_lm("mamba1", vocab=VOCAB, **MOE),
}


def random_rows(n: int, seed: int, longest: int = 9) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def seq():
        return torch.randint(0, VOCAB, (int(torch.randint(1, longest + 1, (1,), generator=g)),), generator=g)

    return [seq() for _ in range(n)], [seq() for _ in range(n)]


def stepped_logprob(model, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """The truth: (prompt, response) alone, one token at a time through model.step, in float64 sums."""
    seq = torch.cat([prompt, response])
    state, total = None, 0.0
    with torch.no_grad():
        for t in range(seq.numel() - 1):
            out = model.step(seq[t : t + 1], state)
            state = out.state
            if t + 1 >= prompt.numel():
                total += float(out.logits.double().log_softmax(-1)[0, seq[t + 1]])
    return total


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sequence_logprobs_equal_stepping_each_row_alone(kind):
    model = KINDS[kind]()
    prompts, responses = random_rows(7, seed=1)
    prompts[0], responses[0] = torch.tensor([3]), torch.tensor([5])  # the shortest row: one prompt, one response
    got = sequence_logprobs(model, prompts, responses, batch_size=3)  # padded batches of mixed lengths
    want = torch.tensor(
        [stepped_logprob(model, p, r) for p, r in zip(prompts, responses, strict=True)], dtype=torch.float64
    )
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_prompt_tokens_are_not_scored():
    model = KINDS["mamba1"]()
    prompt, response = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])
    seq = torch.cat([prompt, response])
    with torch.no_grad():
        logp = model(seq[None]).logits[0].log_softmax(-1)
    want = logp[3, 5] + logp[4, 6]  # only the response tokens, each given everything before it
    torch.testing.assert_close(sequence_logprobs(model, [prompt], [response])[0], want)


@pytest.mark.parametrize("kind", ["hybrid", "moe"])
def test_a_rows_logprob_does_not_depend_on_its_batch_neighbours(kind):
    model = KINDS[kind]()
    prompt, response = torch.tensor([4, 9, 1]), torch.tensor([7, 7, 2, 30])
    alone = sequence_logprobs(model, [prompt], [response])
    others_p, others_r = random_rows(5, seed=3, longest=20)  # longer rows: the row is padded far to the right
    with_neighbours = sequence_logprobs(model, [*others_p, prompt], [*others_r, response], batch_size=6)[-1]
    torch.testing.assert_close(with_neighbours, alone[0], rtol=1e-6, atol=1e-6)


def test_moe_scoring_ignores_training_capacity_and_restores_the_mode():
    """In training mode an MoE layer drops tokens over a per-batch capacity: a naive batched forward gives a row
    another log-prob next to other rows. sequence_logprobs routes drop-free, and leaves the model training."""
    model = tiny_lm("mamba1", vocab=VOCAB, **MOE, moe_capacity_factor=0.5).train()
    prompt, response = torch.tensor([4, 9, 1]), torch.tensor([7, 7, 2, 30])
    others_p, others_r = random_rows(5, seed=4, longest=12)

    def naive(rows_p, rows_r, at):  # a training-mode forward of the padded batch
        width = max(p.numel() + r.numel() for p, r in zip(rows_p, rows_r, strict=True))
        ids = torch.zeros(len(rows_p), width, dtype=torch.long)
        for b, (p, r) in enumerate(zip(rows_p, rows_r, strict=True)):
            ids[b, : p.numel() + r.numel()] = torch.cat([p, r])
        logp = model(ids).logits.detach().log_softmax(-1)[at]
        seq = ids[at]
        return sum(float(logp[t - 1, seq[t]]) for t in range(rows_p[at].numel(), rows_p[at].numel() + response.numel()))

    with torch.enable_grad():  # MoE capacity acts only in training mode with autograd on, as in a training step
        drift = abs(naive([prompt], [response], 0) - naive([*others_p, prompt], [*others_r, response], 5))
    assert drift > 1e-3  # the failure mode is real for this model
    alone = sequence_logprobs(model, [prompt], [response])[0]
    batched = sequence_logprobs(model, [*others_p, prompt], [*others_r, response], batch_size=6)[-1]
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    torch.testing.assert_close(
        alone.double(), torch.tensor(stepped_logprob(model, prompt, response), dtype=torch.float64)
    )


def test_sequence_logprobs_gradient_equals_the_sum_of_each_rows_gradient():
    model = KINDS["mamba2"]()
    prompts, responses = random_rows(4, seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    batched = torch.autograd.grad(sequence_logprobs(model, prompts, responses, batch_size=4).sum(), params)
    alone = [torch.zeros_like(p) for p in params]
    for p, r in zip(prompts, responses, strict=True):
        for acc, g in zip(alone, torch.autograd.grad(sequence_logprobs(model, [p], [r])[0], params), strict=True):
            acc += g
    for got, want in zip(batched, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in batched)


# ------------------------------------------------------------------------------------------------------
def test_dpo_loss_and_gradient_match_a_hand_computation():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.5])
    beta = 0.5
    # pair 0: beta * ((-1 + 1.5) - (-2 + 1.5)) = 0.5 * 1.0 = 0.5; pair 1: 0.5 * ((-3 + 2) - (-1 + 2.5)) = -1.25
    z = [0.5, -1.25]
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    want = sum(math.log1p(math.exp(-v)) for v in z) / 2  # -log sigmoid(v) = log(1 + e^-v)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/dpc_i = -beta * sigmoid(-z_i) / n and d/dpr_i = +beta * sigmoid(-z_i) / n
    sig = [1 / (1 + math.exp(v)) for v in z]
    assert pc.grad.tolist() == pytest.approx([-beta * s / 2 for s in sig], rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([beta * s / 2 for s in sig], rel=1e-6)
    assert stats["reward_accuracy"] == 0.5
    assert stats["reward_margin"] == pytest.approx(sum(z) / 2)
    assert stats["chosen_reward"] == pytest.approx(beta * (0.5 - 1.0) / 2)  # (0.5 + -1.0) * beta / 2
    assert stats["rejected_reward"] == pytest.approx(beta * (-0.5 + 1.5) / 2)


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf")])
def test_beta_must_be_positive(beta):
    x = torch.zeros(2)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(x, x, x, x, beta)
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=beta)


@pytest.mark.parametrize(
    "field, value", [("lr", 0.0), ("batch_size", 0), ("steps", 0), ("epochs", 0), ("grad_clip", -1.0), ("seed", -1)]
)
def test_bad_settings_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"DPOConfig.{field}"):
        DPOConfig(**{field: value})


# ------------------------------------------------------------------------------------------------------
def copy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Prompts of 3 random tokens; the chosen response repeats the prompt, the rejected one is random."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, VOCAB, (3,), generator=g)
        pairs.append(PreferencePair(prompt, prompt.clone(), torch.randint(0, VOCAB, (3,), generator=g)))
    return pairs


def margins(model, pairs) -> torch.Tensor:
    with torch.no_grad():
        prompts = [p.prompt for p in pairs]
        chosen = sequence_logprobs(model, prompts, [p.chosen for p in pairs])
        return chosen - sequence_logprobs(model, prompts, [p.rejected for p in pairs])


def test_dpo_raises_the_policys_preference_margin_over_the_reference():
    torch.manual_seed(0)
    reference = KINDS["mamba1"]()
    policy = copy.deepcopy(reference)
    train, held_out = copy_pairs(16, seed=10), copy_pairs(16, seed=11)
    before = weights(reference)
    report = train_dpo(policy, reference, train, DPOConfig(beta=0.5, lr=3e-3, epochs=6, batch_size=8, seed=0))
    assert report.steps == 12 and len(report.losses) == 12
    assert report.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    gain = (margins(policy, train) - margins(reference, train)).mean()
    assert float(gain) > 1.0, gain
    assert report.losses[-1] < 0.7 * report.losses[0]
    assert report.reward_accuracy[-1] == 1.0
    # unseen pairs move the same way (weakly: 16 training pairs): it learned "copy the prompt", not the pairs
    assert float((margins(policy, held_out) - margins(reference, held_out)).mean()) > 0.1
    # the reference is frozen: same weights bit for bit, no gradients, still in eval mode
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in reference.parameters())
    assert not reference.training


def test_a_reference_of_another_architecture_or_vocabulary_is_refused():
    policy, pairs = KINDS["mamba1"](), copy_pairs(2, seed=0)
    other = KINDS["mamba2"]()
    with pytest.raises(ConfigError, match=f"{policy.fingerprint}.*{other.fingerprint}"):
        train_dpo(policy, other, pairs)
    with pytest.raises(ConfigError, match="vocabulary 32.*vocabulary 40"):
        train_dpo(policy, tiny_lm("mamba1", vocab=40), pairs)
    with pytest.raises(ConfigError, match="same model"):
        train_dpo(policy, policy, pairs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ok: [], "pairs is empty"),
        (
            lambda ok: [ok, PreferencePair(ok.prompt, torch.tensor([], dtype=torch.long), ok.rejected)],
            r"pairs\[1\]\.chosen",
        ),
        (lambda ok: [PreferencePair(ok.prompt, ok.chosen, torch.tensor([1, 32]))], r"pairs\[0\]\.rejected\[1\] = 32"),
        (
            lambda ok: [ok, ok, PreferencePair(ok.prompt[None], ok.chosen, ok.rejected)],
            r"pairs\[2\]\.prompt must be 1-D",
        ),
        (
            lambda ok: [PreferencePair(torch.tensor([], dtype=torch.long), ok.chosen, ok.rejected)],
            r"pairs\[0\]\.prompt",
        ),
        (
            lambda ok: [PreferencePair(ok.prompt, ok.chosen.float(), ok.rejected)],
            r"pairs\[0\]\.chosen must hold integer",
        ),
    ],
)
def test_bad_pairs_are_input_errors_naming_the_pair_and_field(make, match):
    reference = KINDS["mamba1"]()
    policy = copy.deepcopy(reference)
    with pytest.raises(InputError, match=match):
        train_dpo(policy, reference, make(copy_pairs(1, seed=0)[0]))


def test_sequence_logprobs_bad_input_names_the_row():
    model = KINDS["mamba1"]()
    with pytest.raises(InputError, match=r"responses\[1\] is empty"):
        sequence_logprobs(
            model, [torch.tensor([1]), torch.tensor([2])], [torch.tensor([3]), torch.tensor([], dtype=torch.long)]
        )
    with pytest.raises(InputError, match="2 prompts but 1 responses"):
        sequence_logprobs(model, [torch.tensor([1]), torch.tensor([2])], [torch.tensor([3])])


# ------------------------------------------------------------------------------------------------------
def weights(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items()}


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    torch.manual_seed(0)
    reference = KINDS["moe"]()  # MoE: its router and experts train too
    pairs = copy_pairs(5, seed=2)  # 3 steps per epoch at batch 2 (the last batch has one pair)
    config = DPOConfig(beta=0.3, lr=5e-3, steps=8, batch_size=2, seed=7, checkpoint_every=2, keep_checkpoints=2)
    whole = copy.deepcopy(reference)
    seen: list[int] = []
    report = train_dpo(whole, reference, pairs, config, out=tmp_path / "whole", callback=lambda s, r: seen.append(s))
    assert seen == list(range(1, 9)) and report.steps == 8

    class Stop(Exception):
        pass

    def stop_at_5(step, record):
        if step == 5:
            raise Stop  # after step 5; the latest checkpoint is step 4, mid epoch 1

    cut = copy.deepcopy(reference)
    with pytest.raises(Stop):
        train_dpo(cut, reference, pairs, config, out=tmp_path / "cut", callback=stop_at_5)
    fresh = copy.deepcopy(reference)  # a new process: the policy starts from the reference's weights again
    resumed = train_dpo(fresh, reference, pairs, config, out=tmp_path / "cut", resume=True)
    assert resumed.start_step == 4 and resumed.steps == 8 and len(resumed.losses) == 4
    assert resumed.losses == report.losses[4:]
    for name, tensor in weights(whole).items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith("step-")) == [
        "step-00000006",
        "step-00000008",
    ]


def test_resume_refuses_other_pairs_other_settings_and_an_unasked_overwrite(tmp_path):
    reference = KINDS["mamba1"]()
    pairs = copy_pairs(4, seed=3)
    config = DPOConfig(steps=2, batch_size=2, checkpoint_every=1)
    train_dpo(copy.deepcopy(reference), reference, pairs, config, out=tmp_path)
    with pytest.raises(ConfigError, match="other preference pairs"):
        train_dpo(copy.deepcopy(reference), reference, copy_pairs(4, seed=4), config, out=tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"DPOConfig.beta is 0.2.*made with 0.1"):
        changed = DPOConfig(beta=0.2, steps=2, batch_size=2, checkpoint_every=1)
        train_dpo(copy.deepcopy(reference), reference, pairs, changed, out=tmp_path, resume=True)
    other_reference = KINDS["mamba1"]()
    with torch.no_grad():
        next(other_reference.parameters()).add_(1.0)
    with pytest.raises(ConfigError, match="another reference"):
        train_dpo(copy.deepcopy(reference), other_reference, pairs, config, out=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="resume=True"):
        train_dpo(copy.deepcopy(reference), reference, pairs, config, out=tmp_path)
    more = DPOConfig(steps=3, batch_size=2, checkpoint_every=1)  # more steps: allowed, continues from step 2
    assert train_dpo(copy.deepcopy(reference), reference, pairs, more, out=tmp_path, resume=True).start_step == 2


def test_progress_bar_and_callback(capsys):
    reference = KINDS["hybrid"]()
    records = []
    train_dpo(
        copy.deepcopy(reference),
        reference,
        copy_pairs(3, seed=5),
        DPOConfig(steps=2, batch_size=2),
        progress=True,
        callback=lambda step, stats: records.append((step, stats)),
    )
    assert [s for s, _ in records] == [1, 2]
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(records[0][1])
    assert "dpo" in capsys.readouterr().err


def test_each_epoch_visits_every_pair_once_in_a_seeded_shuffle():
    reference = KINDS["mamba1"]()
    pairs = copy_pairs(5, seed=6)

    def orders(seed):
        config = DPOConfig(epochs=3, batch_size=2, seed=seed, lr=1e-3)
        report = train_dpo(copy.deepcopy(reference), reference, pairs, config)
        assert report.steps == 9  # ceil(5 / 2) steps per epoch, the last batch of an epoch holds one pair
        per_epoch = [sum((r["pairs"] for r in report.records if r["epoch"] == e), []) for e in range(3)]
        assert [len(r["pairs"]) for r in report.records] == [2, 2, 1] * 3
        return per_epoch

    first = orders(seed=1)
    assert all(sorted(order) == list(range(5)) for order in first)
    assert len({tuple(order) for order in first}) > 1  # reshuffled between epochs
    assert orders(seed=1) == first and orders(seed=2) != first


def test_checkpoint_settings_need_a_folder():
    reference = KINDS["mamba1"]()
    with pytest.raises(ConfigError, match="out="):
        train_dpo(copy.deepcopy(reference), reference, copy_pairs(2, seed=0), DPOConfig(checkpoint_every=1))
    with pytest.raises(ConfigError, match="out="):
        train_dpo(copy.deepcopy(reference), reference, copy_pairs(2, seed=0), resume=True)
