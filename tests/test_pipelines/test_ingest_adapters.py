"""Ingest through every real adapter: what lands in the store equals the adapter's whole-file encoding, for real
audio (resampled), video frames (.npy), text bytes, memory streams and FASTQ reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seqlab.pipelines import SequenceStore, ingest

DATA = Path(__file__).resolve().parents[1] / "data"


def _stored(store, name):
    return torch.as_tensor(np.asarray(store.read(name)))


def test_audio_file_resampled_mulaw(tmp_path):
    from seqlab.domains.audio import AudioAdapter

    adapter = AudioAdapter(sample_rate=16000)
    path = DATA / "audio" / "speech_en_22k.wav"  # 22.05 kHz: the ingest resamples while streaming
    [result] = ingest(tmp_path / "s.zarr", path, adapter, window=4000)
    store = SequenceStore(tmp_path / "s.zarr", "r")
    assert result.info.adapter["name"] == "audio" and result.info.kind == "tokens"
    assert torch.equal(_stored(store, result.name).long(), adapter.encode(adapter.read(path)))


def test_stereo_audio_continuous_frames(tmp_path):
    from seqlab.domains.audio import AudioAdapter

    adapter = AudioAdapter(sample_rate=16000, mode="continuous", channels="keep", num_channels=2)
    path = DATA / "audio" / "speech_stereo_44k_1.5s.wav"
    [result] = ingest(tmp_path / "s.zarr", path, adapter, window=3000)
    store = SequenceStore(tmp_path / "s.zarr", "r")
    whole = adapter.encode(adapter.read(path))
    assert result.info.frame_shape == (2,) and result.info.length == whole.shape[0]
    assert torch.equal(_stored(store, result.name).float(), whole)


def test_video_frames_npy(tmp_path):
    from seqlab.domains.video import VideoAdapter

    adapter = VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(2, 4, 4))
    frames = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "clip.npy", frames)
    [result] = ingest(tmp_path / "s.zarr", tmp_path / "clip.npy", adapter, window=2)
    store = SequenceStore(tmp_path / "s.zarr", "r")
    whole = adapter.encode(frames)
    assert result.info.length == whole.shape[0] == 6
    assert torch.equal(_stored(store, "clip").float(), whole.float())


def test_text_bytes_and_memory_stream(tmp_path):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.memory import Event, MemoryStreamAdapter

    text = tmp_path / "notes.txt"
    text.write_text("naïve café: state space models, one byte at a time.\n" * 50)
    memory = MemoryStreamAdapter()
    events = [Event("user", f"message {i} ✓", 1700000000.0 + i, {"i": i} if i % 2 else None) for i in range(20)]
    memory.write(tmp_path / "events.jsonl", events)
    store_path = tmp_path / "s.zarr"
    ingest(store_path, text, ByteAdapter(), window=100)
    ingest(store_path, tmp_path / "events.jsonl", memory, window=64)
    store = SequenceStore(store_path, "r")
    assert ByteAdapter().decode(store.read("notes")) == text.read_bytes()
    assert memory.decode(store.read("events")) == events


def test_fastq_reads_one_sequence_each(tmp_path):
    from seqlab.domains.dna import DNAAdapter

    adapter = DNAAdapter()
    path = DATA / "dna" / "example.fastq.gz"
    results = ingest(tmp_path / "s.zarr", path, adapter, window=50)
    records = adapter.read(path)
    assert [r.info.record for r in results] == [rid for rid, _ in records]
    store = SequenceStore(tmp_path / "s.zarr", "r")
    for result, record in zip(results, records):
        assert torch.equal(_stored(store, result.name).long(), adapter.encode([record]))
