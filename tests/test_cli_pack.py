"""``seqlab train --pack`` end to end, in process: text files (each one document), a FASTQ file (each read one
document) and a store (each stored sequence one document) packed into full rows; the packing efficiency the
command prints and records equals ``PackedSource`` over the same documents computed here; the log's per-step
targets; resume keeps the packing and refuses to change it; refusals (--carry-state, continuous frames)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from seqlab.packing import PackedSource

TINY = "--d-model 16 --n-layer 1 --d-state 4 --batch-size 2 --window 64 --threads 1 --quiet".split()
DATA = os.path.join(os.path.dirname(__file__), "data", "dna")


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seqlab(capsys, *args) -> tuple[int, str, str]:
    from seqlab.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Twelve real documents of very different lengths (CPython's pydoc topics), one file each."""
    from pydoc_data import topics

    root = tmp_path_factory.mktemp("pack")
    keys = sorted(topics.topics, key=lambda k: len(topics.topics[k]))
    chosen = keys[70:72] + keys[40:42] + keys[:8]  # a few longer, then short ones: the held-out 10% spans several
    files = []
    for k in chosen:
        path = root / f"{k}.txt"
        path.write_bytes(topics.topics[k][:3000].encode())
        files.append(path)
    return root, files


def test_pack_refusals(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("some text to train on")
    code, _, err = seqlab(capsys, "train", tmp_path / "a.txt", "--adapter", "bytes", "--pack", "--carry-state",
                          "--out", tmp_path / "r")  # fmt: skip
    assert code == 2 and "--pack packs documents into rows that each start from a fresh state" in err
    assert "--carry-state" in err and not (tmp_path / "r").exists()


def test_pack_files_prints_and_records_the_efficiency(texts, capsys):
    root, files = texts
    out = root / "run"
    run_args = ("--out", out, "--steps", 4, "--checkpoint-every", 2, "--eval-every", 2, *TINY)
    code, stdout, err = seqlab(
        capsys, "train", *files, "--adapter", "bytes", "--pack", "--eval-fraction", 0.1, *run_args
    )
    assert code == 0, err
    # what the command reports is PackedSource over the same documents (the files' bytes, the last 10% held out)
    docs = [np.frombuffer(f.read_bytes(), np.uint8) for f in files]
    data = np.concatenate(docs)
    split = len(data) - int(len(data) * 0.1)
    while 0x80 <= data[split] < 0xC0:  # the bytes adapter never cuts a UTF-8 character
        split -= 1
    lengths, seen = [], 0
    for d in docs:
        lengths.append(max(0, min(len(d), split - seen)))
        seen += len(d)
    want = PackedSource(data[:split], lengths, 2, 64).stats()
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["pack"] is True and run["train"]["carry_state"] is False
    # the final held-out metric: each held-out document (the cut one's tail, then whole files) from a fresh state
    import torch

    from seqlab.domains.base import model_from_checkpoint

    model, adapter = model_from_checkpoint(out / "model.safetensors")
    bits, count, seen = 0.0, 0, 0
    with torch.no_grad():
        for d in docs:
            held = torch.from_numpy(d[max(0, split - seen) :].astype(np.int64))
            seen += len(d)
            if len(held) > 1:
                values = adapter.position_metric(model(held[None, :-1]).logits, held[None, 1:]).double()
                bits, count = bits + float(values.sum()), count + len(held) - 1
    assert run["summary"]["held_out_targets"] == count
    assert run["summary"]["held_out"] == pytest.approx(bits / count, rel=1e-5)
    assert run["packing"] == run["summary"]["packing"] == want.to_dict()
    assert want.documents == 10 and want.efficiency > want.padded_efficiency  # 2 short files wholly held out
    assert f"{100 * want.efficiency:.1f}% of positions trained" in stdout
    assert f"whole rows: {100 * want.padded_efficiency:.1f}%" in stdout
    source = PackedSource(data[:split], lengths, 2, 64)
    log = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["targets"] for r in log] == [int((source.window(i)[1] != -100).sum()) for i in range(4)]
    assert all("eval_loss" in r for r in log[1::2])
    # resume keeps the packing; changing it is refused
    code, _, err = seqlab(capsys, "train", "--out", out, "--resume", "--steps", 5, "--quiet", "--threads", 1)
    assert code == 0, err
    assert json.loads((out / "train.jsonl").read_text().splitlines()[-1])["targets"] == int(
        (source.window(4)[1] != -100).sum()
    )
    code, _, err = seqlab(capsys, "train", "--out", out, "--resume", "--steps", 6, "--no-pack", "--quiet")
    assert code == 2 and "--pack is False, the checkpoint" in err and "pack=True" in err


def test_pack_fastq_reads_and_a_store(capsys, tmp_path):
    fastq = os.path.join(DATA, "longreads_original_sanger.fastq")
    code, stdout, err = seqlab(capsys, "train", fastq, "--adapter", "dna", "--pack", "--out", tmp_path / "dna",
                               "--steps", 2, "--checkpoint-every", 2, "--json", *TINY)  # fmt: skip
    assert code == 0, err
    from seqlab.domains.dna import DNAAdapter

    reads = [DNAAdapter().encode(record) for record in DNAAdapter().read(fastq)]
    packing = json.loads(stdout)["packing"]
    assert packing == PackedSource.from_documents(reads, 2, 64).stats().to_dict()
    assert packing["documents"] == 10  # each read one document

    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines.store import ingest

    texts = [b"first stored document, short", b"a second one " * 9, b"third"]
    for k, text in enumerate(texts):
        (tmp_path / f"t{k}.txt").write_bytes(text)
    ingest(tmp_path / "s.zarr", [tmp_path / f"t{k}.txt" for k in range(3)], ByteAdapter())
    code, stdout, err = seqlab(capsys, "train", "--store", tmp_path / "s.zarr", "--pack", "--out", tmp_path / "st",
                               "--steps", 2, "--checkpoint-every", 2, "--json", *TINY)  # fmt: skip
    assert code == 0, err
    want = PackedSource.from_documents([np.frombuffer(t, np.uint8) for t in texts], 2, 64).stats()
    assert json.loads(stdout)["packing"] == want.to_dict() and want.documents == 3


def test_pack_refuses_continuous_frames(capsys, tmp_path):
    audio = os.path.join(os.path.dirname(__file__), "data", "audio", "speech_en_22k.wav")
    code, _, err = seqlab(capsys, "train", audio, "--adapter", "audio", "--adapter-settings",
                          '{"mode": "continuous"}', "--pack", "--out", tmp_path / "a", *TINY)  # fmt: skip
    assert code == 2 and "continuous frames: train it without --pack" in err


def test_mamba3_trains_packed_from_the_cli(texts, capsys, tmp_path):
    """``--ssm mamba3`` builds a Mamba-3 model and trains it on packed rows; the model file holds Mamba-3 layers
    and its held-out metric is the one the summary printed."""
    from seqlab.domains.registry import model_from_checkpoint

    _, files = texts
    out = tmp_path / "m3"
    shape = ("--ssm", "mamba3", "--headdim", 8)
    code, stdout, err = seqlab(capsys, "train", *files[:6], "--adapter", "bytes", "--pack", *shape,
                               "--out", out, "--steps", 3, "--json", *TINY)  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["packing"]["efficiency"] > summary["packing"]["padded_efficiency"]
    model = model_from_checkpoint(summary["model"])[0]
    assert model.config.ssm == "mamba3" and type(model.backbone.layers[0].mixer).__name__ == "Mamba3Mixer"
    code, described, err = seqlab(capsys, "describe", summary["model"])
    assert code == 0, err
    assert "mamba3, d_model 16, n_layer 1, d_state 4, expand 2, headdim 8, SISO" in described
