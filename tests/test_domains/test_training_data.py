"""seqlab.domains.training_data: a run's training and held-out data from real files through any adapter (one bytes
file memory-mapped, others encoded in memory), the held-out split, and the exact streamed evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqlab.config import BackboneConfig
from seqlab.domains.training_data import (
    EVAL_WINDOW,
    HeldOut,
    adapter_for,
    check_trainable,
    encode_files,
    evaluate,
    file_inputs,
    files_data,
    tensor_pieces,
)
from seqlab.errors import ConfigError, InputError
from seqlab.train import FrameSource, WindowSource

TEXT = "Mamba streams with a state carried from window to window. " * 40


def spec(files, domain="bytes", **kw):
    return {
        "files": [str(f) for f in files],
        "domain": domain,
        "adapter_settings": kw.pop("settings", None),
        "eval": [str(f) for f in kw.pop("eval", [])],
        "eval_fraction": kw.pop("fraction", None),
    }


def test_one_bytes_file_is_memory_mapped_and_its_last_fraction_held_out(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    data = files_data(spec([path], fraction=0.25), batch_size=2, window=16)
    raw = path.read_bytes()
    split = len(raw) - int(len(raw) * 0.25)
    assert data.train_elements == split and isinstance(data.train, WindowSource)
    assert isinstance(data.train.data, np.memmap)  # never read whole
    ids = torch.tensor(list(raw), dtype=torch.int64)
    inputs, targets = data.train.window(1)
    stream = split // 2
    assert torch.equal(inputs[1], ids[stream + 16 : stream + 32]) and torch.equal(
        targets[1], ids[stream + 17 : stream + 33]
    )
    (held,) = data.held_out
    assert held.name == "last 0.25 of the data" and held.length == len(raw) - split
    assert torch.equal(torch.cat(list(held.pieces())), ids[split:])
    assert data.eval_source.batch_size == 1 and torch.equal(data.eval_source.window(0)[0][0], ids[split : split + 16])
    assert data.spec["eval_fraction"] == 0.25


def test_a_utf8_split_never_cuts_a_character(tmp_path):
    path = tmp_path / "u.txt"
    text = "é" * 100  # 200 bytes, every character two of them
    path.write_text(text, encoding="utf-8")
    data = files_data(spec([path], settings={"utf8": True}, fraction=0.255), batch_size=1, window=8)
    # 200 - int(51.0) = 149 is a continuation byte: the split moves back to 148
    assert data.train_elements == 148
    held = bytes(torch.cat(list(data.held_out[0].pieces())).tolist())
    assert held.decode("utf-8") == "é" * 26
    path.write_bytes(TEXT.encode()[:300] + b"\xff" + TEXT.encode()[:300])
    with pytest.raises(InputError, match="u.txt: invalid UTF-8 at byte offset 300"):
        files_data(spec([path], settings={"utf8": True}), batch_size=1, window=8)


def test_several_files_are_encoded_in_memory_with_held_out_files(tmp_path):
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    paths[0].write_text(TEXT[:700])
    paths[1].write_text(TEXT[700:1500])
    (tmp_path / "h.txt").write_text(TEXT[1500:1800])
    data = files_data(spec(paths, eval=[tmp_path / "h.txt"]), batch_size=2, window=16)
    assert data.train_elements == 1500 and isinstance(data.train.data, torch.Tensor)
    assert [h.name for h in data.held_out] == [str(tmp_path / "h.txt")]
    assert bytes(torch.cat(list(data.held_out[0].pieces())).tolist()) == TEXT[1500:1800].encode()
    assert data.eval_source.window(0)[0].shape == (1, 16)


def test_dna_data_through_its_adapter(tmp_path):
    path = tmp_path / "g.fa"
    path.write_text(">r1\n" + "ACGTTGCA" * 40 + "\n>r2\n" + "GGCCAATT" * 40 + "\n")
    data = files_data(spec([path], domain="dna", fraction=0.2), batch_size=2, window=16)
    adapter = data.adapter
    encoded = torch.cat(list(adapter.iter_windows(path, 1 << 20)))
    split = encoded.shape[0] - int(encoded.shape[0] * 0.2)
    assert data.train_elements == split
    assert torch.equal(torch.cat(list(data.held_out[0].pieces())), encoded[split:])


def test_continuous_frames_train_as_frames(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    t = np.arange(3000) / 8000
    soundfile.write(tmp_path / "s.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    data = files_data(
        spec(
            [tmp_path / "s.wav"], domain="audio", fraction=0.2, settings='{"sample_rate": 8000, "mode": "continuous"}'
        ),
        batch_size=2,
        window=32,
    )
    assert isinstance(data.train, FrameSource) and data.train.window(0)[0].dtype == torch.float32
    frames = encode_files(data.adapter, [str(tmp_path / "s.wav")])
    assert frames.dim() == 2 and data.train_elements == frames.shape[0] - int(frames.shape[0] * 0.2)


def test_bad_data_specs_are_refused_naming_the_setting(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT[:300])
    with pytest.raises(InputError, match="missing.txt: no such file"):
        files_data(spec([tmp_path / "missing.txt"]), 2, 16)
    with pytest.raises(ConfigError, match="either as --eval FILE... or as --eval-fraction"):
        files_data(spec([path], eval=[path], fraction=0.1), 2, 16)
    with pytest.raises(ConfigError, match=r"--eval-fraction must be a number in \(0, 1\)"):
        files_data(spec([path], fraction=1.5), 2, 16)
    with pytest.raises(InputError, match="--eval-fraction 0.001 leaves 0 elements of held-out data"):
        files_data(spec([path], fraction=0.001), 2, 16)
    with pytest.raises(InputError, match=r"c.txt: .*too short for one window.*use fewer --batch-size streams"):
        files_data(spec([path]), 2, 4096)
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(InputError, match="held-out data .*one.txt holds 1 elements: at least 2"):
        files_data(spec([path], eval=[tmp_path / "one.txt"]), 2, 16)
    with pytest.raises(ConfigError, match="do not fit the 'bytes' adapter"):
        adapter_for("bytes", '{"utf9": 1}')
    with pytest.raises(ConfigError, match="--adapter-settings must be a JSON object"):
        adapter_for("bytes", "[1]")
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        adapter_for("nope")
    video = adapter_for("video", {"task": "classify", "num_classes": 3, "frame_size": [8, 8]})
    with pytest.raises(ConfigError, match="task='classify'"):
        check_trainable(video)


def test_evaluate_streams_each_input_exactly_as_one_pass(tmp_path):
    adapter = adapter_for("bytes")
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4)).eval()
    (tmp_path / "h.txt").write_text(TEXT[:900])
    (tmp_path / "one.txt").write_text("x")
    ids = adapter.encode(TEXT[:900])
    inputs = file_inputs(adapter, [str(tmp_path / "h.txt"), str(tmp_path / "one.txt")], window=100)
    inputs.append(HeldOut("tensor", lambda: tensor_pieces(ids[:500], 64), 500))
    result = evaluate(model, adapter, inputs)
    with torch.no_grad():
        whole = adapter.metric(model(ids[None, :-1], return_state=False), ids[None, 1:])
        part = adapter.metric(model(ids[None, :499], return_state=False), ids[None, 1:500])
    held, one, tensor = result["inputs"]
    assert held == {"name": str(tmp_path / "h.txt"), "metric": pytest.approx(whole, abs=1e-5), "targets": 899}
    assert one == {"name": str(tmp_path / "one.txt"), "metric": None, "targets": 0}
    assert tensor["metric"] == pytest.approx(part, abs=1e-5) and tensor["targets"] == 499
    assert result["targets"] == 899 + 499
    assert result["metric"] == pytest.approx((held["metric"] * 899 + tensor["metric"] * 499) / 1398, abs=1e-9)
    assert result["metric_name"] == "bits_per_byte" and result["uniform_baseline"] == 8.0
    assert evaluate(model, adapter, [])["metric"] is None
    with pytest.raises(InputError, match="missing.txt: no such file"):
        file_inputs(adapter, [str(tmp_path / "missing.txt")], EVAL_WINDOW)
