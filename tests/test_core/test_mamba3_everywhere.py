"""Mamba-3 models in the rest of the house: generation (greedy, sampling, speculative drafting through states_at),
the Trainer, checkpoints, adapters (bytes; continuous audio frames), a memory session, AQLM
quantization, LASER, and GGUF export's refusal. Tiny models; the mixer itself is tested in test_mamba3_mixer.py,
the state contract in test_state_contract.py, a Ray score job in
tests/test_pipelines/test_ray_mamba3.py."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.checkpoint import load_model, save_model
from seqlab.config import BackboneConfig
from seqlab.domains import get_adapter, model_from_checkpoint
from seqlab.domains.bytes import ByteAdapter
from seqlab.errors import ConfigError
from seqlab.testing import rel_err, run_chunked, tiny_lm

M3 = dict(ssm="mamba3", headdim=8, chunk_size=8)
MIMO = dict(M3, mamba3_mimo_rank=2, mamba3_outproj_norm=True)
TEXT = (
    b"The state of a recurrent model is a fixed-size summary of everything it has read; Mamba-3 keeps a rotary, "
    b"complex-valued state updated with the trapezoid rule. " * 8
)


def lm(seed: int = 0, vocab: int = 32, **kw):
    return tiny_lm(**{**M3, **kw}, vocab=vocab, seed=seed)


def assert_same_logits_after_chunking(model, vocab: int = 32) -> None:
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole = model(ids)
        pieces, state = run_chunked(model, ids, [1, 8])
    assert torch.isfinite(whole.logits).all()
    assert rel_err(pieces, whole.logits) <= 1e-5
    for key, value in whole.state.tensors().items():
        assert rel_err(state.tensors()[key], value) <= 1e-5, key


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("options", [M3, MIMO], ids=["siso", "mimo"])
def test_greedy_generation_is_the_step_by_step_argmax(options):
    model = lm(seed=1, **options)
    prompt = [3, 1, 4, 1, 5]
    out = model.generate([prompt], 9)
    with torch.no_grad():
        step = model(torch.tensor([prompt]))
        logits, state, tokens = step.logits[:, -1], step.state, []
        for _ in range(9):
            token = int(logits.argmax(-1))
            tokens.append(token)
            step = model.step(torch.tensor([token]), state)
            logits, state = step.logits, step.state
    assert out.tokens == [tokens]
    for key, value in state.tensors().items():
        assert rel_err(out.state.tensors()[key], value) <= 1e-5, key


def test_sampled_rows_are_the_same_in_a_batch_and_alone():
    model = lm(seed=2)
    prompts = [[1, 2, 3], [7], [9, 9, 9, 9, 9]]
    batch = model.generate(prompts, 8, do_sample=True, temperature=1.3, top_k=20, seed=11)
    for i, prompt in enumerate(prompts):
        alone = model.generate([prompt], 8, do_sample=True, temperature=1.3, top_k=20, seed=11 + i)
        assert alone.tokens[0] == batch.tokens[i]
    assert len({tuple(t) for t in batch.tokens}) > 1


def test_speculative_drafting_keeps_greedy_outputs_and_states():
    """The verifier's rollback uses the Mamba-3 mixer's states_at; an n-gram drafter on a repetitive prompt gets
    some tokens accepted and some rejected, and the result must be plain decoding's."""
    from seqlab.decoding import MaxGramDrafter

    target = lm(seed=3, **MIMO)
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 5, 6, 5]]
    plain = target.generate(prompts, 12)
    fast = target.generate(prompts, 12, draft=MaxGramDrafter(32), speculate=3)
    assert fast.tokens == plain.tokens
    assert 0 < fast.stats.accepted
    for got, want in zip(fast.states, plain.states):
        for key, value in want.tensors().items():
            assert rel_err(got.tensors()[key], value) <= 1e-5, key


def test_drugs_rotates_a_mamba3_models_block_and_mixer_sites():
    """DRµGS on a Mamba-3 model: theta 0 is plain decoding bit for bit; the block sites and the mixer's x, B, C
    sites (its hook calls) change what is generated."""
    from seqlab.decoding import Drugs

    model = lm(seed=6)
    prompts = [[1, 2, 3], [4, 5]]
    plain = model.generate(prompts, 8)
    assert model.generate(prompts, 8, drugs=Drugs(theta=0.0), seed=1).tokens == plain.tokens
    turned = model.generate(prompts, 8, drugs=Drugs(theta=1.2, sites=("residual", "mixer_out")), seed=1)
    assert turned.tokens != plain.tokens
    x_turned = model.generate(prompts, 8, drugs=Drugs(theta=1.2, sites=("x", "B", "C")), seed=1)
    assert x_turned.tokens != plain.tokens
    assert model.generate(prompts, 8, drugs=Drugs(theta=0.0, sites=("x", "B", "C")), seed=1).tokens == plain.tokens


# --------------------------------------------------------------------------------------- training, files
def test_trainer_lowers_the_loss_and_the_checkpoint_round_trips(tmp_path):
    from seqlab.train import TrainConfig, Trainer

    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=16, n_layer=1, **MIMO, d_state=8))
    source = adapter.source(TEXT, batch_size=4, window=32)
    config = TrainConfig(lr=2e-2, warmup_steps=1, max_steps=10, batch_size=4, window=32, progress=False)
    records = Trainer(model, config, source, loss_fn=adapter.loss).fit()
    losses = [r["loss"] for r in records]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    grads = [p.grad for p in model.backbone.layers[0].mixer.parameters()]
    assert all(g is not None for g in grads)
    # a model file: the same logits and states after loading, the adapter rebuilt from it
    model.eval()
    path = save_model(tmp_path / "m3.safetensors", model)
    loaded, loaded_adapter = model_from_checkpoint(path)
    assert loaded.config == model.config and loaded_adapter == adapter
    ids = torch.tensor([list(TEXT[:40])])
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(a.state.tensors()[k], v) for k, v in b.state.tensors().items())
    # save_pretrained / from_pretrained (seqlab's directory format); transformers has no Mamba-3: refused
    from seqlab.interop import hf
    from seqlab.models import LanguageModel

    model.save_pretrained(tmp_path / "pretrained")
    again = LanguageModel.from_pretrained(tmp_path / "pretrained")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, a.logits)
    with pytest.raises(ConfigError, match="transformers has no Mamba-3 model.*save_pretrained"):
        hf.save(model, tmp_path / "hf")
    other = adapter.build_model(BackboneConfig(d_model=16, n_layer=1, **M3, d_state=8))
    with pytest.raises(Exception, match="mimo|shape|config|fingerprint"):
        load_model(path, other)


def test_a_continuous_adapter_trains_a_mamba3_sequence_model():
    """Audio frames (continuous, 2 channels) through the registry's adapter: a SequenceModel on Mamba-3 streams
    exactly (chunks == one pass, step == forward) and its loss goes down."""
    from seqlab.train import TrainConfig, Trainer

    adapter = get_adapter("audio")(mode="continuous", channels="keep", num_channels=2)
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=16, n_layer=1, **M3, d_state=8))
    t = torch.arange(2048, dtype=torch.float32)
    frames = torch.stack([torch.sin(t / 7.0), torch.sin(t / 3.0 + 1.0)], -1) * 0.5
    model.eval()
    x = frames[None, :25]
    with torch.no_grad():
        whole = model(x)
        pieces, state = run_chunked(model, x, [3, 11])
        assert rel_err(pieces, whole.output) <= 1e-5
        stepped = model(x[:, :1]).state
        outs = []
        for i in range(1, 25):
            out = model.step(x[:, i], stepped)
            outs.append(out.output)
            stepped = out.state
        assert rel_err(torch.stack(outs, 1), whole.output[:, 1:]) <= 1e-5
    model.train()
    source = adapter.source(frames, batch_size=4, window=32)
    config = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=8, batch_size=4, window=32, progress=False)
    losses = [r["loss"] for r in Trainer(model, config, source, loss_fn=adapter.loss).fit()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


# ----------------------------------------------------------------------------------------- memory session
def test_memory_session_with_a_mamba3_model(tmp_path):
    from seqlab.domains.memory import Event, MemoryStreamAdapter
    from seqlab.domains.session import MemorySession, replay_state

    torch.manual_seed(0)
    model = MemoryStreamAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, **M3, d_state=8)).eval()
    path = save_model(tmp_path / "memory.safetensors", model)
    model, _ = model_from_checkpoint(path)
    events = [Event("user" if i % 2 else "assistant", f"event {i} " + "xyz" * (i % 4), float(i)) for i in range(6)]
    with MemorySession.open(tmp_path / "s", model, create=True, model_file=path) as s:
        s.observe(events[:4])
        s.save()
    with MemorySession.open(tmp_path / "s", model) as s:
        s.observe(events[4:])
        state = s.state
    want = replay_state(model, events)
    assert state.position == want.position
    for key, value in want.tensors().items():
        assert torch.equal(state.tensors()[key], value), key


# ------------------------------------------------------------------------------------------ post-training
def test_aqlm_quantized_mamba3_keeps_the_state_contract():
    from seqlab.quant import AQLMLinear, quantize_model

    model = lm(seed=4, **MIMO)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 32, (2, 32), generator=g) for _ in range(2)]
    report = quantize_model(model, windows, "2x4g8", aqlm_options={"max_rounds": 1, "adam_steps": 3, "kmeans_iters": 5})
    names = {r.name for r in report.layers if r.skipped is None}
    assert "backbone.layers.0.mixer.in_proj" in names
    assert isinstance(model.backbone.layers[0].mixer.in_proj, AQLMLinear)
    assert_same_logits_after_chunking(model)


def test_laser_reduced_mamba3_keeps_the_state_contract():
    from seqlab.posttrain.laser import Intervention, LowRankLinear, apply_interventions

    model = lm(seed=5)
    with torch.no_grad():
        before = model(torch.tensor([[1, 2, 3]])).logits
    apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.25), Intervention(1, "mixer.out_proj", 0.5)])
    assert isinstance(model.backbone.layers[0].mixer.in_proj, LowRankLinear)
    with torch.no_grad():
        assert not torch.equal(model(torch.tensor([[1, 2, 3]])).logits, before)
    assert_same_logits_after_chunking(model)


def test_gguf_export_refuses_a_mamba3_model_in_one_line():
    from seqlab.interop.gguf import check_exportable

    model = ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, **M3, d_state=8))
    with pytest.raises(ConfigError, match=r"ssm='mamba3': GGUF export writes Mamba-1 \('mamba1'\) and Mamba-2"):
        check_exportable(model)


# --------------------------------------------------------------------------------------------- the example
def test_compare_mixers_quick_runs_and_reports_every_model(tmp_path, capsys, monkeypatch):
    """examples/compare_mixers.py --quick (the training comparison of docs/backbone.md, tiny): a table row and a
    curve per mixer kind, parameter counts within 15% of each other."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "compare_mixers.py"
    spec = importlib.util.spec_from_file_location("compare_mixers", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_mixers", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| model | parameters | seed 0 | mean | train tokens/s |" in out
    for label in ("| Mamba-1 |", "| Mamba-2 |", "| Mamba-3 (SISO) |"):
        assert label in out
    saved = json.loads((tmp_path / "compare_mixers.json").read_text())
    assert saved["table"].keys() == {"mamba1", "mamba2", "mamba3"} == result["table"].keys()
    counts = saved["parameters"]
    assert max(counts.values()) <= 1.15 * min(counts.values())
    for run in saved["runs"]:
        assert len(run["bpb"]) == len(run["steps"]) and all(math.isfinite(v) for v in run["bpb"])
        assert run["tokens_per_s"] > 0
