"""``generate(..., drugs=Drugs(...))``: DRµGS through the front door (the rotations themselves are tested in
test_drugs.py): theta = 0 is plain decoding bit for bit, row i rotates the same alone or in a batch (also after
other rows stopped), and the combinations that cannot hold are refused."""

import pytest
import torch

from seqlab.decoding import Drugs
from seqlab.errors import InputError
from seqlab.testing import tiny_lm

PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8]]


@pytest.mark.parametrize("do_sample", [False, True])
def test_theta_zero_is_plain_decoding_bit_for_bit(do_sample):
    model = tiny_lm("mamba2", 32, seed=1)
    plain = model.generate(PROMPTS, 12, do_sample=do_sample, seed=4)
    zero = model.generate(PROMPTS, 12, do_sample=do_sample, seed=4, drugs=Drugs(theta=0.0, sites=("residual", "x")))
    assert zero.tokens == plain.tokens
    for a, b in zip(zero.states, plain.states):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_rows_rotate_the_same_alone_or_in_a_batch(kind):
    model = tiny_lm(kind, 32, seed=1)
    drugs = Drugs(theta=0.6, sites=("residual", "B"))
    plain = model.generate(PROMPTS, 10)
    eos = plain.tokens[1][2]  # row 1 likely stops early: the batch shrinks while the others go on
    together = model.generate(PROMPTS, 10, drugs=drugs, seed=3, eos_token_id=eos)
    assert together.tokens != model.generate(PROMPTS, 10, eos_token_id=eos).tokens  # it did perturb
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate([prompt], 10, drugs=drugs, seed=3 + i, eos_token_id=eos)
        assert alone.tokens[0] == together.tokens[i]
    again = model.generate(PROMPTS, 10, drugs=drugs, seed=3, eos_token_id=eos)
    assert again.tokens == together.tokens
    # the hooks are gone afterwards
    assert model.generate(PROMPTS, 10).tokens == plain.tokens


def test_drugs_refusals():
    model = tiny_lm("mamba1", 32)
    with pytest.raises(InputError, match="drugs must be a seqlab.decoding.Drugs"):
        model.generate([1, 2], 3, drugs=0.1)
    with pytest.raises(InputError, match="drugs cannot be combined with draft"):
        model.generate([1, 2], 3, drugs=Drugs(theta=0.1), draft=tiny_lm("mamba1", 32, seed=2))
    with pytest.raises(InputError, match="theta"):
        model.generate([1, 2], 3, drugs=Drugs(theta=4.0))
