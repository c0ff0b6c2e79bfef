"""The program-checkable byte task of issue 21: instances, splits, the checker, the judge format, seed data, SFT
and the measurements."""

from __future__ import annotations

import random

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.posttrain import tasks as T
from seqlab.testing import tiny_lm


def test_prompts_and_answers_by_hand():
    cases = {
        ("reverse", b"abc"): (b"reverse abc=", b"cba\n"),
        ("sort", b"dcab"): (b"sort dcab=", b"abcd\n"),
        ("vowels", b"hello"): (b"vowels hello=", b"2\n"),
        ("vowels", b"xyz"): (b"vowels xyz=", b"0\n"),
        ("add", b"12+7"): (b"add 12+7=", b"19\n"),
        ("add", b"49+49"): (b"add 49+49=", b"98\n"),
    }
    for (kind, text), (prompt, answer) in cases.items():
        inst = T.TaskInstance(kind, text)
        assert (inst.prompt, inst.answer) == (prompt, answer)


def test_checker_each_kind():
    rev = T.TaskInstance("reverse", b"abcd")
    assert rev.check(b"dcba\n") and rev.check(b"dcba")
    assert not rev.check(b"dcab\n") and not rev.check(b"abcd") and not rev.check(b"dcba\n\n") and not rev.check(b"")
    srt = T.TaskInstance("sort", b"banana")
    assert srt.check(b"aaabnn\n") and not srt.check(b"aabnn\n") and not srt.check(b"banana\n")
    vow = T.TaskInstance("vowels", b"queue")
    assert vow.check(b"4\n") and not vow.check(b"3\n") and not vow.check(b"04\n") and not vow.check(b" 4\n")
    add = T.TaskInstance("add", b"25+17")
    assert add.check(b"42\n") and not add.check(b"43\n") and not add.check(b"41") and not add.check(b"4\n")
    with pytest.raises(InputError):
        rev.check("dcba")  # a str, not bytes
    with pytest.raises(InputError):
        T.TaskInstance("shout", b"abc")
    with pytest.raises(InputError):
        T.TaskInstance("reverse", b"")


def test_instances_deterministic_distinct_and_in_range():
    a = T.make_instances(200, seed=3)
    assert a == T.make_instances(200, seed=3)
    assert a != T.make_instances(200, seed=4)
    assert len({i.prompt for i in a}) == 200
    assert [i.kind for i in a[:8]] == list(T.KINDS) * 2
    for inst in a:
        if inst.kind == "add":
            x, y = inst.text.split(b"+")
            assert 0 <= int(x) <= 49 and 0 <= int(y) <= 49
        else:
            assert 3 <= len(inst.text) <= 6 and inst.text.isalpha() and inst.text.islower()
    only = T.make_instances(10, kinds=("reverse",), seed=0, min_len=2, max_len=2)
    assert all(i.kind == "reverse" and len(i.text) == 2 for i in only)
    with pytest.raises(ConfigError):
        T.make_instances(5, kinds=("shout",))
    with pytest.raises(ConfigError):
        T.make_instances(5, min_len=4, max_len=3)
    with pytest.raises(ConfigError):  # 26 one-letter strings cannot make 40 distinct prompts
        T.make_instances(40, kinds=("reverse",), min_len=1, max_len=1)


def test_splits_are_disjoint():
    sp = T.make_splits(300, 50, 60, seed=1)
    assert (len(sp.train), len(sp.prompts), len(sp.test)) == (300, 50, 60)
    train, prompts, test = ({i.prompt for i in s} for s in (sp.train, sp.prompts, sp.test))
    assert not train & test and not prompts & test and not train & prompts
    # the seed corpus holds no test prompt, as an instruction or inside a judge prompt
    docs = T.seed_corpus(sp.train, T.judge_examples(sp.train))
    text = b"\n".join(p + t for p, t in docs)
    assert not any(b" " + i.prompt in text or text.startswith(i.prompt) for i in sp.test)
    assert sp == T.make_splits(300, 50, 60, seed=1)


def test_parse_score():
    good = {b"5\n": 5, b"0\n": 0, b"3": 3, b"  4\n": 4, "5\n": 5, b"5x": 5, b"2 out of 5": 2}
    for text, want in good.items():
        assert T.parse_score(text) == want, text
    for text in (b"", b"\n", b"x5", b"score 5", b"6\n", b"55\n", b"-1\n", b"\xff\n"):
        assert T.parse_score(text) is None, text


def test_judge_prompt_and_examples_labels():
    inst = T.TaskInstance("reverse", b"abc")
    assert T.judge_prompt(inst.prompt, b"cba\n") == b"judge reverse abc=cba score="
    assert T.judge_prompt(inst.prompt, b"cb") == b"judge reverse abc=cb score="
    instances = T.make_instances(400, seed=2)
    examples = T.judge_examples(instances, seed=0, wrong_per_right=2)
    assert len(examples) == 3 * len(instances)
    for ex in examples:
        assert ex.score == (5 if ex.instance.check(ex.answer) else 0)
        assert ex.target == str(ex.score).encode() + b"\n"
    assert sum(ex.score == 5 for ex in examples) == len(instances)  # exactly the correct answer scores 5
    assert T.judge_examples(instances, seed=0, wrong_per_right=2) == examples


def test_corruptions_are_wrong_and_realistic():
    rng = random.Random(0)
    for inst in T.make_instances(400, seed=5):
        bad = T.corrupt(inst, rng)
        assert not inst.check(bad)
        if inst.kind in ("vowels", "add"):
            assert bad.isdigit() and abs(int(bad) - int(inst.expected)) <= 10 or len(bad) == len(inst.expected)
        else:
            assert abs(len(bad) - len(inst.text)) <= 1 and set(bad) <= set(inst.text)
    # a palindrome's reverse is itself: the corruption still finds a wrong answer
    pal = T.TaskInstance("reverse", b"aaa")
    assert not pal.check(T.corrupt(pal, random.Random(1)))


def test_sft_learns_and_measurements():
    torch.manual_seed(0)
    model = tiny_lm(vocab=256)
    inst = [T.TaskInstance("vowels", b"ab"), T.TaskInstance("vowels", b"ee")]
    docs = T.seed_corpus(inst, T.judge_examples(inst))
    losses = T.sft(model, docs, steps=120, batch_size=6, lr=2e-2, warmup=5)
    assert losses[-1] < 0.5 * losses[0]
    got = T.evaluate_task(model, inst)
    assert got["n"] == 2 and got["accuracy"] == got["accuracy_vowels"] == 1.0
    agreement = T.judge_agreement(model, T.judge_examples(inst))
    assert agreement["n"] == 4 and agreement["unparseable"] == 0 and agreement["agreement"] == 1.0
    sampled = T.judge_agreement(model, T.judge_examples(inst), samples=3, seed=1)
    assert sampled["n"] == 12
    with pytest.raises(InputError):
        T.sft(model, [], steps=1)
    with pytest.raises(InputError):
        T.evaluate_task(model, [])


def test_untrained_judge_is_unparseable_not_a_crash():
    model = tiny_lm(vocab=256)
    inst = T.make_instances(4, seed=0)
    out = T.judge_agreement(model, T.judge_examples(inst))
    assert out["n"] == 8 and out["unparseable"] > 0
    assert out["agreement_all"] <= out["agreement"] or out["unparseable"] == out["n"]
    assert 0 <= T.evaluate_task(model, inst)["accuracy"] <= 1
