"""The seven rungs of ``seqlab ladder``, each a composition of the library's public pieces (the same functions
the ``train``, ``self-reward``, ``laser``, ``quantize``, ``generate`` and ``distill`` commands call). Each takes
the run's context, its own folder and the records of the rungs before it, writes its models into its folder and
returns its record: ``rows`` (table rows, ``seqlab.ladder.measure.row``), ``files`` (what must exist for the
rung to count as done) and what later rungs read (``final``: the model file the ladder goes on with)."""

from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from seqlab.ladder.measure import decode, heldout_bpb, row


def _load(path):
    from seqlab.domains.registry import model_from_checkpoint

    model, _ = model_from_checkpoint(path)
    return model.eval()


def _train(
    ladder, model, folder: Path, steps: int, *, store=None, sequence="train", adapter=None, carry_state: bool = True
) -> dict:
    """Train ``model`` on a stored sequence with the ladder's batch, window and learning rate (checkpoints in
    ``folder``; an interrupted run continues from the latest with ``--resume``)."""
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines.store import StoreSource
    from seqlab.train import TrainConfig, Trainer

    s = ladder.settings
    folder.mkdir(parents=True, exist_ok=True)
    adapter = adapter or ByteAdapter()
    store = store if store is not None else ladder.store()
    config = TrainConfig(
        max_steps=steps,
        batch_size=s.batch_size,
        window=s.window,
        lr=s.lr,
        warmup_steps=min(20, steps),
        carry_state=carry_state,
        seed=ladder.seed,
        checkpoint_dir=str(folder),
        checkpoint_every=max(25, steps // 4),
        keep_checkpoints=1,
        log_path=str(folder / "train-log.jsonl"),
        progress=ladder.progress,
    )
    source = StoreSource(store, sequence, s.batch_size, s.window, model=model)
    trainer = Trainer(model, config, source, loss_fn=adapter.loss, metric_fn=adapter.metric)
    started = time.perf_counter()
    records = trainer.fit(resume=ladder.resume)
    seconds = time.perf_counter() - started
    model.eval()
    last = records[-min(20, len(records)) :]
    return {
        "steps": steps,
        "train_seconds": seconds,
        "train_bytes_per_s": len(records) * s.batch_size * s.window / seconds if records and seconds > 0 else None,
        "train_loss_last20": sum(r["loss"] for r in last) / len(last) if last else None,
    }


def _splits(ladder):
    from seqlab.posttrain import tasks

    s = ladder.settings
    return tasks.make_splits(s.task_train, s.task_prompts, s.task_test, seed=ladder.seed)


def _accuracy(ladder, model) -> float:
    from seqlab.posttrain import tasks

    return tasks.evaluate_task(model, _splits(ladder).test)["accuracy"]


def _prompt(ladder) -> torch.Tensor:
    """The decoding prompt: the first 32 bytes of the held-out text."""
    return torch.tensor(list(ladder.parts["heldout"][:32]), dtype=torch.long)


def _measured(ladder, model, path, rung, label, name, seconds, *, accuracy=None, task=True, notes="", **extra):
    """A row for ``model`` saved at ``path``: every number measured here (accuracy too unless given or ``task``
    is False)."""
    from seqlab.ffn import parameter_counts

    s = ladder.settings
    with ladder.stage(f"measure {label}"):
        if accuracy is None and task:
            accuracy = _accuracy(ladder, model)
        rate = decode(model, _prompt(ladder), s.decode_tokens, s.decode_repeats)["bytes_per_s"]
        bpb = heldout_bpb(model, ladder.store())
    return row(
        rung,
        label,
        name,
        bpb=bpb,
        accuracy=accuracy,
        params=parameter_counts(model),
        path=path,
        rate=rate,
        seconds=seconds,
        notes=notes,
        **extra,
    )


def _final(records: dict) -> tuple[str, dict]:
    """The model file the ladder goes on with after rung 4, and its row (the model numbers rungs 5 and 6 show)."""
    final = records[4]["final"]
    return final, next(r for r in records[4]["rows"] if r["file"] == final)


def _decoder_row(base: dict, rung, label, name, rate: float, seconds: float, notes: str, **extra) -> dict:
    """A row of one way to decode the model of ``base`` (its row): its model numbers, this decoder's speed."""
    params = {"total": base["params_total"], "active": base["params_active"]}
    return row(rung, label, name, bpb=base["heldout_bpb"], accuracy=base["task_accuracy"], params=params,
               path=base["file"], rate=rate, seconds=seconds, notes=notes, **extra)  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# 1. MambaByte and MambaByte-MoE


def rung_moe(ladder, folder: Path, records: dict) -> dict:
    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter

    s = ladder.settings
    base = {"d_model": s.d_model, "n_layer": s.n_layer, "d_state": s.d_state}
    variants = [
        ("1a", "dense", "MambaByte, dense MLP", BackboneConfig(**base, ffn="mlp", d_ffn=s.d_ffn)),
        (
            "1b",
            "moe",
            f"MambaByte-MoE, {s.experts} experts top-1",
            BackboneConfig(**base, ffn="moe", moe_experts=s.experts, moe_top_k=1, moe_d_expert=s.d_ffn),
        ),
    ]
    out: dict = {"rows": [], "files": []}
    ladder.begin(1, 2 * len(variants))
    for rung, key, name, config in variants:
        started = time.perf_counter()
        torch.manual_seed(ladder.seed)
        model = ByteAdapter().build_model(config)
        with ladder.stage(f"train {key}"):
            trained = _train(ladder, model, folder / f"{key}-run", s.steps)
        path = save_model(folder / f"{key}.safetensors", model)
        seconds = time.perf_counter() - started
        note = f"{s.steps} steps of {s.batch_size}x{s.window} bytes, train loss {trained['train_loss_last20']:.3f}"
        out["rows"].append(_measured(ladder, model, path, rung, key, name, seconds, notes=note, train=trained))
        out[key] = os.fspath(path)
        out["files"].append(os.fspath(path))
    out["final"] = out["moe"]
    return out


# ------------------------------------------------------------------------------------------------------
# 2. self-rewarding fine-tuning


def _sft_docs(ladder, splits) -> list[tuple[bytes, bytes]]:
    """M0's documents: the task's instructions with answers and judge examples with scores, plus pieces of the
    training text (so M0 stays a model of the text it is also measured on)."""
    from seqlab.posttrain import tasks

    s = ladder.settings
    docs = tasks.seed_corpus(splits.train, tasks.judge_examples(splits.train, seed=ladder.seed), seed=ladder.seed)
    rng = random.Random(f"seqlab.ladder.sft:{ladder.seed}")
    text = ladder.parts["train"]
    for _ in range(s.text_docs):
        start = rng.randrange(max(1, len(text) - 160))
        piece = text[start : start + 160]
        docs.append((piece[:32], piece[32:]))
    rng.shuffle(docs)
    return docs


def rung_self_reward(ladder, folder: Path, records: dict) -> dict:
    from seqlab.checkpoint import save_model
    from seqlab.posttrain import self_reward, tasks
    from seqlab.posttrain.dpo import DPOConfig

    s = ladder.settings
    splits = _splits(ladder)
    ladder.begin(2, 4)
    started = time.perf_counter()
    m0_path = folder / "m0.safetensors"
    with ladder.stage("SFT of M0"):
        if ladder.resume and m0_path.is_file():
            m0 = _load(m0_path)
        else:
            m0 = _load(records[1]["final"])
            docs = _sft_docs(ladder, splits)
            m0.train()
            tasks.sft(m0, docs, steps=s.sft_steps, batch_size=s.sft_batch, lr=s.sft_lr, seed=ladder.seed)
            m0.eval()
            save_model(m0_path, m0)
    m0_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with ladder.stage("self-rewarding iterations"):
        report = self_reward(
            m0,
            [i.prompt for i in splits.prompts],
            iterations=s.sr_iterations,
            candidates=s.sr_candidates,
            judge_samples=s.sr_judge_samples,
            max_new_tokens=s.sr_new_tokens,
            dpo=DPOConfig(batch_size=s.dpo_batch, lr=s.dpo_lr, epochs=s.dpo_epochs, seed=ladder.seed),
            out=folder / "self-reward",
            seed=ladder.seed,
            measure=lambda m: tasks.evaluate_task(m, splits.test),
            resume=ladder.resume,
            progress=ladder.progress,
        )
    mt_path = save_model(folder / "self-reward.safetensors", report.model)
    sr_seconds = time.perf_counter() - started
    pairs = [r.pairs for r in report.iterations]
    unparseable = sum(r.unparseable for r in report.iterations)
    judgements = sum(r.judgements for r in report.iterations)
    accuracies = [m.get("accuracy") for m in report.measures]
    rows = [
        _measured(
            ladder,
            m0,
            m0_path,
            "2a",
            "sft (M0)",
            "M0: MoE + SFT on the task and text",
            m0_seconds,
            accuracy=accuracies[0],
            notes=f"{s.sft_steps} SFT steps (lr {s.sft_lr:g}) on {len(splits.train)} task instances, their judge "
            f"examples and {s.text_docs} pieces of training text",
        ),
        _measured(
            ladder,
            report.model,
            mt_path,
            "2b",
            f"self-reward (M{s.sr_iterations})",
            f"M{s.sr_iterations}: {s.sr_iterations} self-rewarding iterations",
            sr_seconds,
            accuracy=accuracies[-1],
            notes=f"DPO pairs per iteration {pairs}, {unparseable}/{judgements} judgements unparseable, "
            f"accuracy per iteration {[round(a, 3) for a in accuracies if a is not None]}",
            accuracy_per_iteration=accuracies,
        ),
    ]
    return {
        "rows": rows,
        "files": [os.fspath(m0_path), os.fspath(mt_path)],
        "final": os.fspath(mt_path),
        "m0": os.fspath(m0_path),
        "test_instances": len(splits.test),
    }


# ------------------------------------------------------------------------------------------------------
# 3. LASER


def _laser(ladder, source, out: Path) -> dict:
    """``seqlab laser``'s run on ``source``, scored on the ``valid`` sequence, written to ``out``: the best scored
    intervention (or composition) is always written, also when it does not beat the unreduced model (its row
    says so), so the rung's cost is measured too."""
    from seqlab.pipelines.posttrain import laser_run

    s = ladder.settings
    return laser_run(source, store=str(ladder.store_path), sequences=["valid"], rhos=list(s.laser_rhos),
                     compose=s.laser_compose, seed=ladder.seed, out=out, overwrite=True, keep_best=True,
                     progress=ladder.progress)  # fmt: skip


def rung_laser(ladder, folder: Path, records: dict) -> dict:
    ladder.begin(3, 2)
    started = time.perf_counter()
    path = folder / "laser.safetensors"
    with ladder.stage("LASER search"):
        result = _laser(ladder, records[2]["final"], path)
    model = _load(path)
    chosen = ", ".join(f"layer {c['layer']} {c['kind']} rho {c['rho']:g}" for c in result["chosen"])
    beat = result["metric"] is not None and result["metric"] < result["baseline"]
    note = (
        f"{result['cells_scored']} cells scored on valid; chosen: {chosen}; valid bpb {result['baseline']:.4f} -> "
        f"{result['metric']:.4f}" + ("" if beat else " (no cell beat the unreduced model; the best one is kept)")
    )
    rows = [
        _measured(
            ladder,
            model,
            path,
            "3",
            "laser",
            "M_T + LASER (best on valid)",
            time.perf_counter() - started,
            notes=note,
            laser=result,
        )
    ]
    return {"rows": rows, "files": [os.fspath(path)], "final": os.fspath(path)}


# ------------------------------------------------------------------------------------------------------
# 4. AQLM


def rung_aqlm(ladder, folder: Path, records: dict) -> dict:
    from tqdm.auto import tqdm

    from seqlab.checkpoint import save_model
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.pipelines.calibration import calibration_windows
    from seqlab.posttrain.laser import densify
    from seqlab.quant import quantize_model

    s = ladder.settings
    source, adapter = model_from_checkpoint(records[3]["final"])
    ladder.begin(4, 1 + 2 * len(s.aqlm))
    with ladder.stage("calibration windows"):
        windows = calibration_windows(
            source,
            adapter,
            store=ladder.store(),
            sequences=["train"],
            count=s.calib_windows,
            window=s.calib_window,
            seed=ladder.seed,
        )
    out: dict = {"rows": [], "files": []}
    for j, config in enumerate(s.aqlm):
        started = time.perf_counter()
        model = densify(copy.deepcopy(source))
        with ladder.stage(f"AQLM {config}"), tqdm(desc=f"AQLM {config}", unit="layer", leave=False,
                                                   disable=not ladder.progress) as bar:  # fmt: skip

            def progress(name: str, done: int, total: int, bar=bar) -> None:  # quantize_model's callback
                bar.total = total
                bar.set_postfix_str(name.removeprefix("backbone."), refresh=False)
                bar.update(done - bar.n)

            options = {"max_rounds": s.aqlm_rounds}
            report = quantize_model(model, windows, config, seed=ladder.seed, aqlm_options=options, progress=progress)
        path = save_model(folder / f"aqlm-{config}.safetensors", model)
        reloaded = _load(path)  # every number is of the model as its file gives it back
        bits = report.bits_per_parameter()
        out["rows"].append(
            _measured(
                ladder,
                reloaded,
                path,
                f"4{'abcdefgh'[j]}",
                f"aqlm {config}",
                f"LASER'd M_T, AQLM {config}",
                time.perf_counter() - started,
                notes=f"{bits:.2f} bits per quantized parameter",
                bits_per_parameter=bits,
            )
        )
        out["files"].append(os.fspath(path))
        out["final"] = os.fspath(path)
    return out


# ------------------------------------------------------------------------------------------------------
# 5. decoding


def rung_decoding(ladder, folder: Path, records: dict) -> dict:
    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.decoding import cascade
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.drafting import load_drafter
    from seqlab.domains.subword import SubwordAdapter
    from seqlab.ffn import parameter_counts
    from seqlab.pipelines.store import SequenceStore, ingest

    s = ladder.settings
    final, base = _final(records)
    target = _load(final)
    prompt = _prompt(ladder)
    n, repeats = s.decode_tokens, s.decode_repeats
    ladder.begin(5, 4)

    started = time.perf_counter()
    with ladder.stage("plain greedy"):
        plain = decode(target, prompt, n, repeats)
    plain_seconds = time.perf_counter() - started

    # the subword drafter: a BPE learned on the training text, a small subword Mamba trained on it
    started = time.perf_counter()
    with ladder.stage("train the subword drafter"):
        sub = SubwordAdapter(vocab_size=s.subword_vocab).fitted([ladder.parts["train"]])
        store = SequenceStore(folder / "subword.zarr", "a")
        train_file = ladder.out / "data" / "train.bin"
        ingest(store, train_file, sub, names="train", overwrite=True, progress=ladder.progress)
        torch.manual_seed(ladder.seed)
        small = sub.build_model(BackboneConfig(d_model=s.drafter_d_model, n_layer=s.drafter_n_layer))
        trained = _train(ladder, small, folder / "drafter-run", s.drafter_steps, store=store, adapter=sub)
        drafter_path = save_model(folder / "drafter-subword.safetensors", small)
    drafter_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with ladder.stage("speculative, subword drafter"):
        drafter = load_drafter(drafter_path, target, ByteAdapter())  # what `seqlab generate --draft FILE` loads
        spec = decode(target, prompt, n, repeats, draft=drafter, speculate=s.speculate)
    spec_seconds = time.perf_counter() - started

    # the cascade: rung 1's dense model drafts for the final model, Max-Gram at the bottom
    started = time.perf_counter()
    with ladder.stage("cascade"):
        dense = _load(records[1]["dense"])
        cas = decode(target, prompt, n, repeats, draft=cascade([dense]), speculate=s.speculate)
    cas_seconds = time.perf_counter() - started

    def spec_notes(result) -> dict:
        stats = result["stats"]
        return {
            "acceptance_rate": stats.acceptance_rate,
            "tokens_per_round": stats.tokens_per_round,
            "identical_to_plain": result["tokens"] == plain["tokens"],
            "speedup_vs_plain": result["bytes_per_s"] / plain["bytes_per_s"],
        }

    spec_info, cas_info = spec_notes(spec), spec_notes(cas)

    def note(info, what):
        return (
            f"{what}; acceptance {info['acceptance_rate']:.2f}, {info['tokens_per_round']:.2f} bytes per "
            f"verification, {info['speedup_vs_plain']:.2f}x plain, output identical to plain greedy: "
            f"{info['identical_to_plain']}"
        )

    params = parameter_counts(small)["total"]
    rows = [
        _decoder_row(
            base,
            "5a",
            "plain greedy",
            "final model, plain greedy decoding",
            plain["bytes_per_s"],
            plain_seconds,
            f"{n} bytes, median of {repeats}",
        ),
        _decoder_row(
            base,
            "5b",
            "speculative (subword)",
            "final model + subword drafter",
            spec["bytes_per_s"],
            spec_seconds,
            note(
                spec_info,
                f"drafter: BPE {sub.vocab_size} tokens, {params:,} params, "
                f"{os.path.getsize(drafter_path):,} B, trained {drafter_seconds:.0f} s",
            ),
            drafter=os.fspath(drafter_path),
            drafter_train=trained,
            **spec_info,
        ),
        _decoder_row(
            base,
            "5c",
            "cascade (dense+maxgram)",
            "final model + cascade: rung 1a, then Max-Gram",
            cas["bytes_per_s"],
            cas_seconds,
            note(cas_info, "vertical cascade, default allocation"),
            **cas_info,
        ),
    ]
    return {"rows": rows, "files": [os.fspath(drafter_path)], "final": final}


# ------------------------------------------------------------------------------------------------------
# 6. DRµGS


def _bits_under(judge, prompt: torch.Tensor, continuations: list[list[int]]) -> float:
    """Bits per byte of the continuations after ``prompt`` under ``judge`` (a model that did not write them)."""
    from seqlab.domains.base import token_bits

    total, count = 0.0, 0
    with torch.no_grad():
        for tokens in continuations:
            if not tokens:
                continue
            ids = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
            targets = ids[:, 1:].clone()
            targets[:, : len(prompt) - 1] = -100  # only the continuation is scored
            total += token_bits(judge(ids[:, :-1]), targets).nansum().item()
            count += len(tokens)
    return total / count if count else float("nan")


def _diversity(continuations: list[list[int]]) -> dict:
    grams = [tuple(t[i : i + 4]) for t in continuations for i in range(len(t) - 3)]
    return {
        "distinct_samples": len({tuple(t) for t in continuations}),
        "distinct_4grams": len(set(grams)) / len(grams) if grams else 0.0,
    }


def rung_drugs(ladder, folder: Path, records: dict) -> dict:
    from seqlab.decoding import Drugs
    from seqlab.generate import generate
    from seqlab.io import atomic_write_bytes

    s = ladder.settings
    final, base = _final(records)
    target = _load(final)
    judge = _load(records[1]["dense"])
    prompt = _prompt(ladder)
    runs = {
        "temperature": ("6a", f"temperature {s.temperature:g}", {"do_sample": True, "temperature": s.temperature}),
        "drugs": ("6b", f"DRµGS theta {s.drugs_theta:g}", {"drugs": Drugs(theta=s.drugs_theta)}),
    }
    rows = []
    samples = {}
    ladder.begin(6, len(runs))
    for key, (rung, label, options) in runs.items():
        with ladder.stage(label):
            started = time.perf_counter()
            out = generate(target, [prompt] * s.samples, s.sample_tokens, seed=ladder.seed, **options)
            seconds = time.perf_counter() - started
            tokens = [list(map(int, t)) for t in out.tokens]
            samples[key] = [bytes(t).decode("utf-8", errors="replace") for t in tokens]
            info = {**_diversity(tokens), "judge_bpb": _bits_under(judge, prompt, tokens)}
        rows.append(
            _decoder_row(
                base,
                rung,
                label,
                f"final model, {label}" + (" (greedy on a perturbed state)" if key == "drugs" else " sampling"),
                sum(map(len, tokens)) / seconds,
                seconds,
                f"{s.samples} samples of {s.sample_tokens} bytes: {info['distinct_samples']} distinct, "
                f"distinct 4-grams {info['distinct_4grams']:.2f}, bits/byte under rung 1a "
                f"{info['judge_bpb']:.3f}",
                **info,
            )
        )
    atomic_write_bytes(folder / "samples.json", json.dumps(samples, indent=1, ensure_ascii=False).encode())
    return {"rows": rows, "files": [os.fspath(folder / "samples.json")], "final": final}


# ------------------------------------------------------------------------------------------------------
# 7. distillation beside the ladder


def rung_distill(ladder, folder: Path, records: dict) -> dict:
    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.distill import distill
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines.store import StoreSource

    s = ladder.settings
    started = time.perf_counter()
    config = BackboneConfig(
        d_model=s.teacher_d_model,
        n_layer=s.teacher_layers,
        ssm="attention",
        attn_heads=s.teacher_heads,
        attn_kv_heads=s.teacher_kv_heads,
        attn_window=s.window,  # a sliding window as long as the training windows: streamed text stays in range
        ffn="mlp",
        d_ffn=2 * s.teacher_d_model,
    )
    torch.manual_seed(ladder.seed)
    teacher = ByteAdapter().build_model(config)
    ladder.begin(7, 6)
    # trained on independent windows (no carried state), as a Transformer is; its sliding window is that long, so
    # held-out text streamed through it (the table's bits per byte) never asks for a distance it was not trained on
    with ladder.stage("train the teacher"):
        trained = _train(ladder, teacher, folder / "teacher-run", s.teacher_steps, carry_state=False)
        teacher_path = save_model(folder / "teacher.safetensors", teacher)
    teacher_seconds = time.perf_counter() - started

    started = time.perf_counter()
    run = folder / "distill"
    heldout = torch.tensor(list(ladder.parts["heldout"]), dtype=torch.long)
    with ladder.stage("distil the hybrid"):
        summary = distill(
            teacher,
            StoreSource(ladder.store(), "train", s.batch_size, s.window, model=teacher),
            run,
            replace=0.5,
            stages=2,
            steps=s.distill_steps,
            e2e_steps=s.distill_e2e_steps,
            train_options={"batch_size": s.batch_size, "window": s.window, "lr": s.lr, "seed": ladder.seed},
            eval_data=heldout,
            progress=ladder.progress,
            resume=ladder.resume and run.exists(),
            teacher_source=os.fspath(teacher_path),
        )
    student = _load(summary["student"])
    student_seconds = time.perf_counter() - started

    started = time.perf_counter()
    laser_path = folder / "student-laser.safetensors"
    with ladder.stage("LASER the hybrid"):
        reduced = _laser(ladder, summary["student"], laser_path)
    student_laser = _load(laser_path)
    laser_seconds = time.perf_counter() - started
    kinds = sorted({c["kind"] for c in reduced["chosen"]})
    rows = [
        _measured(
            ladder,
            teacher,
            teacher_path,
            "7a",
            "teacher (attention)",
            f"Llama-style teacher: {s.teacher_layers} GQA attention layers (sliding window {s.window}), d_model "
            f"{s.teacher_d_model}",
            teacher_seconds,
            task=False,
            notes=f"{s.teacher_steps} steps, independent windows",
            train=trained,
        ),
        _measured(
            ladder,
            student,
            summary["student"],
            "7b",
            "hybrid student (50%)",
            f"student: layers {summary['layers']} as Mamba-2, the rest attention",
            student_seconds,
            task=False,
            notes=f"2 alignment stages x {s.distill_steps} + {s.distill_e2e_steps} end-to-end "
            f"steps; held-out KL(teacher||student) {summary['eval_kl']:.4f} nats/byte",
            eval_kl=summary["eval_kl"],
            stages=summary["stages"],
        ),
        _measured(
            ladder,
            student_laser,
            laser_path,
            "7c",
            "hybrid + LASER",
            "the hybrid student, LASER'd",
            laser_seconds,
            task=False,
            notes=f"chosen {kinds}; valid bpb {reduced['baseline']:.4f} -> {reduced['metric']:.4f}",
            laser=reduced,
        ),
    ]
    return {
        "rows": rows,
        "files": [os.fspath(teacher_path), summary["student"], os.fspath(laser_path)],
        "final": os.fspath(laser_path),
    }


RUN = {1: rung_moe, 2: rung_self_reward, 3: rung_laser, 4: rung_aqlm, 5: rung_decoding, 6: rung_drugs, 7: rung_distill}
