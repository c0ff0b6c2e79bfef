"""seqlab.distill: the attention -> Mamba-2 mapping equals (normalised, SiLU-feature) causal linear attention in
float64; the student's config and copied weights; the staged run, its log, and exact resume; DDP over the
distillation module (the precondition of the Ray Train path). Tiny models: the file runs in seconds."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from seqlab.checkpoint import read_model_file, set_latest
from seqlab.config import BackboneConfig
from seqlab.distill import (
    DistillModel,
    build_student,
    calibrate_norms,
    choose_layers,
    distill,
    distill_loss,
    plan_stages,
    stage_groups,
)
from seqlab.distill.mapping import GATE_BIAS
from seqlab.errors import ConfigError, InputError
from seqlab.mixers import AttentionMixer, Mamba2Mixer
from seqlab.models import LanguageModel

ATTN = {"ssm": "attention", "attn_heads": 4, "attn_kv_heads": 2, "ffn": "mlp", "d_ffn": 64}


def teacher(n_layer: int = 4, vocab: int = 64, **extra) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(BackboneConfig(d_model=32, n_layer=n_layer, **{**ATTN, **extra}), vocab).eval()


def linear_attention(attn: AttentionMixer, h: torch.Tensor) -> torch.Tensor:
    """Causal linear attention, no softmax, feature map SiLU on q, k, v, score q.k / sqrt(P); (b, l, heads, P)."""
    b, length, _ = h.shape
    heads, kv, p = attn.heads, attn.kv_heads, attn.head_dim
    q = F.silu(attn.q_proj(h)).view(b, length, heads, p)
    k = F.silu(attn.k_proj(h)).view(b, length, kv, p).repeat_interleave(heads // kv, 2)
    v = F.silu(attn.v_proj(h)).view(b, length, kv, p).repeat_interleave(heads // kv, 2)
    scores = torch.einsum("blhp,bshp->bhls", q, k) / math.sqrt(p)
    scores = scores * torch.tril(torch.ones(length, length, dtype=h.dtype))
    return torch.einsum("bhls,bshp->blhp", scores, v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_mamba2_from_attention_equals_causal_linear_attention_in_float64(kv_heads):
    model = teacher(n_layer=1, attn_kv_heads=kv_heads, attn_bias=True)
    student = build_student(model, [0], decay=1.0)  # decay 1: no forgetting
    attn = model.backbone.layers[0].mixer.double()
    mixer = student.backbone.layers[0].mixer.double()
    assert isinstance(mixer, Mamba2Mixer)
    assert (mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups) == (4, 8, 8, 4)
    # conv = identity (last tap), D = 0, z constant: "no conv" and the gate reduce to SiLU features and a constant
    assert torch.equal(mixer.conv1d.weight[:, 0, -1], torch.ones(mixer.conv_dim, dtype=torch.float64))
    assert float(mixer.conv1d.weight[:, 0, :-1].detach().abs().sum()) == 0 and float(mixer.D.detach().abs().sum()) == 0
    mixer.backend = "ref"
    torch.manual_seed(1)
    h = torch.randn(2, 19, 32, dtype=torch.float64)
    seen = {}
    hook = mixer.norm.register_forward_hook(lambda module, args, out: seen.update(y=args[0]))
    with torch.no_grad():
        out, _ = mixer(h, None, False)
        want = linear_attention(attn, h)
    hook.remove()
    y = seen["y"].view_as(want)
    assert float((y - want).norm() / want.norm()) <= 1e-5  # the scan is linear attention exactly
    # the gated norm: a constant gate silu(GATE_BIAS), then RMS per head (group size = head_dim), weight 1
    gated = want * F.silu(torch.tensor(GATE_BIAS, dtype=torch.float64))
    normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)
    with torch.no_grad():
        full = attn.o_proj(normed.reshape(2, 19, -1))
    assert float((out - full).norm() / full.norm()) <= 1e-5


def test_mapping_starts_closer_to_the_teacher_than_random_init():
    model = teacher(n_layer=2)
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 48))
    with torch.no_grad():
        want = F.log_softmax(model(ids).logits, -1)

        def kl(student):
            got = F.log_softmax(student(ids).logits, -1)
            return float((want.exp() * (want - got)).sum(-1).mean())

        mapped, random = kl(build_student(model, [0, 1])), kl(build_student(model, [0, 1], init="random"))
    assert mapped < random


def test_student_config_and_copied_weights():
    model = teacher(n_layer=4)
    student = build_student(model, [1, 3])
    spec = [student.config.layer_spec(i)[0] for i in range(4)]
    assert spec == ["attention", "mamba2", "attention", "mamba2"]
    assert student.config.layer_spec(1)[1] == "mlp"  # the feed-forward stays
    teacher_state, student_state = model.state_dict(), student.state_dict()
    for name, tensor in student_state.items():
        if name.startswith(("backbone.layers.1.mixer.", "backbone.layers.3.mixer.")):
            continue
        assert torch.equal(tensor, teacher_state[name]), name
    full = build_student(model, [0, 1, 2, 3])  # no attention layer left: the attn_* fields drop out
    assert full.config.attn_heads is None and all(full.config.layer_spec(i)[0] == "mamba2" for i in range(4))
    # a later stage keeps the earlier stage's trained layers and maps only the new ones
    with torch.no_grad():
        student.backbone.layers[1].mixer.D.fill_(0.5)
    later = build_student(model, [0, 1, 3], base=student)
    assert float(later.backbone.layers[1].mixer.D.detach()[0]) == 0.5
    assert float(later.backbone.layers[0].mixer.D.detach().abs().sum()) == 0


def test_layer_choice_stages_and_refusals():
    config = teacher(n_layer=8).config
    assert choose_layers(config, 0.5) == [1, 3, 5, 7]
    assert choose_layers(config, 1.0) == list(range(8))
    assert choose_layers(config, [6, 2]) == [2, 6]
    assert stage_groups([1, 3, 5, 7], 2) == [[1, 5], [3, 7]]
    plan = plan_stages([1, 3, 5, 7], 2, 10, 5)
    assert [(s["name"], s["layers"]) for s in plan] == [
        ("align1", [1, 5]),
        ("align2", [1, 3, 5, 7]),
        ("e2e", [1, 3, 5, 7]),
    ]
    for bad in (0.0, 1.5, [9], [1, 1], "half"):
        with pytest.raises(ConfigError):
            choose_layers(config, bad)
    hybrid = BackboneConfig(
        d_model=32, n_layer=2, ssm="mamba2", d_state=8, headdim=8, layer_overrides={1: {"mixer": "attention"}}
    )
    assert choose_layers(hybrid, 1.0) == [1]
    with pytest.raises(ConfigError, match="not an attention layer"):
        choose_layers(hybrid, [0])
    odd = LanguageModel(BackboneConfig(d_model=32, n_layer=1, ssm="attention", attn_heads=3, attn_head_dim=8), 16)
    with pytest.raises(ConfigError, match="multiple of d_model"):
        build_student(odd, [0])


def test_distill_model_trains_only_what_each_stage_trains():
    model = teacher(n_layer=2)
    student = build_student(model, [1])
    align = DistillModel(model, student, [1], "align")
    trainable = {n for n, p in align.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("student.backbone.layers.1.mixer.") for n in trainable)
    assert not any(k.startswith("teacher") for k in align.state_dict())  # checkpoints hold the student only
    ids = torch.randint(0, 64, (2, 16))
    out = align(ids)
    loss = distill_loss(out, ids)
    loss.backward()
    assert float(loss.detach()) > 0 and set(out.align) == {1}
    e2e = DistillModel(model, build_student(model, [1]), [1], "e2e", freeze_mlp=True, ce_weight=0.5)
    frozen = {n for n, p in e2e.named_parameters() if not p.requires_grad}
    assert frozen and all(".ffn" in n for n in frozen)
    assert not any(p.requires_grad for p in model.parameters())
    out = e2e(ids)
    assert out.logits is not None and out.teacher_logits is not None


def run(tmp_path, name, **kw):
    model = teacher(n_layer=4)
    data = torch.randint(0, 64, (6000,), generator=torch.Generator().manual_seed(5))
    options = {"batch_size": 2, "window": 32, "lr": 3e-3, "checkpoint_every": 1}
    return distill(
        model,
        data,
        tmp_path / name,
        replace=0.5,
        stages=2,
        steps=3,
        e2e_steps=6,
        train_options=options,
        eval_data=data[:1000],
        progress=False,
        **kw,
    )


def test_distill_run_log_and_exact_resume(tmp_path):
    summary = run(tmp_path, "a")
    out = tmp_path / "a"
    assert [s["name"] for s in summary["stages"]] == ["align1", "align2", "e2e"]
    assert [s["layers"] for s in summary["stages"]] == [[1], [1, 3], [1, 3]]
    assert summary["stages"][0]["last_loss"] < summary["stages"][0]["first_loss"]
    assert summary["eval_kl"] >= 0 and math.isfinite(summary["eval_bits_per_token"])
    lines = [json.loads(line) for line in (out / "distill.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["align1"] * 3 + ["align2"] * 3 + ["e2e"] * 6
    assert {"kl", "ce"} <= set(lines[-1]) and "align_mse_layer3" in lines[5]
    final, meta = read_model_file(out / "student.safetensors")
    student = LanguageModel(BackboneConfig.from_dict(meta["config"]), 64)
    student.load_state_dict(final)
    # an interrupted run: the e2e stage stopped after step 4, then --resume
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    e2e = copy / "stage-3-e2e"
    for step in (5, 6):
        shutil.rmtree(e2e / f"step-{step:08d}")
    set_latest(e2e, e2e / "step-00000004")
    (e2e / "student.safetensors").unlink()
    (copy / "student.safetensors").unlink()
    with pytest.raises(InputError, match="--resume or --overwrite"):
        run(tmp_path, "b")
    with pytest.raises(ConfigError, match="planned with"):
        run(tmp_path, "b", resume=True, init="random")
    notes = []
    resumed = run(tmp_path, "b", resume=True, notify=notes.append)
    assert any("resuming at step 4" in note for note in notes)
    assert [s["name"] for s in resumed["stages"]] == ["e2e"]
    again, _ = read_model_file(copy / "student.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)  # bit for bit: the resume is exact


def test_ddp_trains_the_distillation_module(tmp_path):
    """The Ray Train path runs the Trainer on a DDP-wrapped DistillModel: in-process, one rank, both modes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = teacher(n_layer=2)
        ids = torch.randint(0, 64, (2, 16))
        for mode in ("align", "e2e"):
            ddp = DistributedDataParallel(DistillModel(model, build_student(model, [0]), [0], mode))
            for _ in range(2):
                ddp.zero_grad(set_to_none=True)
                distill_loss(ddp(ids, None, return_state=False), ids).backward()
            grads = [p.grad for p in ddp.parameters() if p.requires_grad]
            assert grads and all(g is not None for g in grads)
    finally:
        dist.destroy_process_group()


def test_calibrate_norms_sets_the_teachers_output_scale():
    model = teacher(n_layer=2)
    student = build_student(model, [0, 1])
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = model.backbone.layers[1].mixer.o_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    calibrate_norms(model, student, [0, 1], ids)
    want = seen["x"].pow(2).mean(dim=(0, 1)).sqrt()
    assert torch.allclose(student.backbone.layers[1].mixer.norm.weight.detach(), want, rtol=1e-5)


def test_load_teacher_from_an_hf_llama_directory_a_model_file_and_a_run_folder(tmp_path):
    from seqlab.checkpoint import save_model
    from seqlab.distill.teacher import load_teacher
    from seqlab.interop.hf import save

    model = teacher(n_layer=2)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
    save(model, tmp_path / "hf")
    (tmp_path / "run").mkdir()
    save_model(tmp_path / "run" / "model.safetensors", model)
    for where in (tmp_path / "hf", tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = load_teacher(where)
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, want, atol=1e-5), where
    with pytest.raises(InputError):
        load_teacher(tmp_path / "missing.safetensors")
