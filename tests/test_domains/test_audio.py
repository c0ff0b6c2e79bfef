"""AudioAdapter: real WAV/FLAC/OGG files (copies of real speech in tests/data/audio, and files the tests write at
several rates), streaming == whole-file reading bit for bit, resampling == torchaudio's whole-signal resample,
mu-law and file round trips within their quantisation bounds, channel options, bad input naming file and sample,
sample-rate mismatches, checkpoints that remember the adapter, and short trainings that beat real baselines."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.checkpoint import save_model
from seqlab.config import BackboneConfig
from seqlab.domains import adapter_from_checkpoint, get_adapter
from seqlab.domains.audio import PCM16_STEP, AudioAdapter, FrameSource, StreamingResampler, Waveform
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.models import LanguageModel, SequenceModel
from seqlab.train import SequenceSource, TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[1] / "data" / "audio"
EN_22K = DATA / "speech_en_22k.wav"
DIGITS_16K = DATA / "speech_digits_16k.flac"
STEREO_44K = DATA / "speech_stereo_44k_1.5s.wav"
REAL_FILES = [EN_22K, DIGITS_16K, STEREO_44K]
RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000]
MU = 255  # the mu of the companding law for 256 levels


def tone(rate: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A band-limited test tone (frames, channels): harmonics under 4 kHz with a slow amplitude envelope and a
    little noise; each channel has its own pitch, so channel handling is visible."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    out = []
    for c in range(channels):
        f0 = 220.0 * (1 + 0.5 * c)
        x = sum(np.sin(2 * np.pi * f0 * k * t + k) / k for k in range(1, 6))
        x = 0.35 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t)) + 0.01 * rng.standard_normal(t.size)
        out.append(x)
    return np.stack(out, 1).astype(np.float32)


def mu_law_bound(x: torch.Tensor) -> torch.Tensor:
    """Largest |decode(encode(x)) - x| for mu-law with 256 levels: the companded value moves by at most 1/mu, so
    the sample by at most ((1+mu)^(1/mu) - 1) * (|x| + 1/mu)."""
    return ((1 + MU) ** (1 / MU) - 1) * (x.abs() + 1 / MU) + 1e-6


def compand(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(MU * x.abs()) / math.log1p(MU)


# ------------------------------------------------------------------------------------------------------
# identity, registry, models, checkpoints


def test_settings_registry_and_models(tmp_path):
    assert get_adapter("audio") is AudioAdapter
    for adapter in (
        AudioAdapter(),
        AudioAdapter(sample_rate=8000, mode="continuous", channels="keep", num_channels=2, resample=False),
        AudioAdapter(channels=1, mu=16),
    ):
        assert AudioAdapter(**adapter.settings()) == adapter
    assert AudioAdapter() != AudioAdapter(sample_rate=22050)

    mulaw = AudioAdapter()
    assert mulaw.input_spec.kind == "tokens" and mulaw.input_spec.vocab_size == 256
    assert mulaw.uniform_baseline() == 8.0 and mulaw.metric_name == "bits_per_sample"
    stereo = AudioAdapter(mode="continuous", channels="keep", num_channels=2)
    assert (stereo.input_spec.width, stereo.input_spec.output_width) == (2, 4)
    assert stereo.uniform_baseline() == 16.0

    config = BackboneConfig(d_model=16, n_layer=1, d_state=4)
    lm = mulaw.build_model(config)
    seq = stereo.build_model(config)
    assert isinstance(lm, LanguageModel) and lm.vocab_size == 256
    assert isinstance(seq, SequenceModel) and (seq.d_input, seq.d_output) == (2, 4)

    # a checkpoint remembers the adapter and its settings
    save_model(tmp_path / "seq.safetensors", seq)
    assert adapter_from_checkpoint(tmp_path / "seq.safetensors") == stereo
    assert AudioAdapter.from_model(seq) == stereo


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sample_rate": 0}, "sample_rate"),
        ({"sample_rate": 16000.0}, "sample_rate"),
        ({"mode": "pcm"}, "mode"),
        ({"channels": "left"}, "channels"),
        ({"channels": -1}, "channels"),
        ({"channels": True}, "channels"),
        ({"channels": "keep"}, "num_channels"),
        ({"num_channels": 2}, "num_channels"),
        ({"mu": 1}, "mu"),
        ({"resample": "yes"}, "resample"),
    ],
)
def test_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AudioAdapter(**kwargs)


# ------------------------------------------------------------------------------------------------------
# streaming resampling


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    orig=st.sampled_from(RATES),
    new=st.sampled_from(RATES),
    length=st.integers(1, 6000),
    cuts=st.lists(st.integers(1, 6000), max_size=6),
    group=st.sampled_from([500, 4096]),
)
def test_streaming_resampler_equals_whole_signal(orig, new, length, cuts, group):
    x = torch.from_numpy(tone(orig, length / orig, channels=2, seed=length).T.copy())[:, :length]
    if x.shape[1] < length:
        x = torch.cat([x, torch.zeros(2, length - x.shape[1])], 1)
    whole = taf.resample(x, orig, new)
    resampler = StreamingResampler(orig, new, 2, group_frames=group)
    points = sorted({0, length, *(c for c in cuts if c < length)})
    pieces = [resampler.push(x[:, a:b]) for a, b in itertools.pairwise(points)]
    streamed = torch.cat([*pieces, resampler.finish()], 1)
    assert streamed.shape == whole.shape == (2, resampler.output_length(length))
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-6)
    # the split points never change a bit
    assert torch.equal(streamed, StreamingResampler(orig, new, 2, group_frames=group)(x))


def test_resampler_refuses_rates_without_a_common_divisor_and_misuse():
    with pytest.raises(ConfigError, match="gcd is 1"):
        StreamingResampler(44100, 16001, 1)
    resampler = StreamingResampler(44100, 16000, 1)
    with pytest.raises(InputError, match=r"\(1, frames\)"):
        resampler.push(torch.zeros(2, 10))
    resampler.finish()
    with pytest.raises(InputError, match="after finish"):
        resampler.push(torch.zeros(1, 10))


# ------------------------------------------------------------------------------------------------------
# real files: streaming == whole file == torchaudio on the whole signal


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_files_stream_exactly_as_whole_file(path):
    info = sf.info(str(path))
    adapter = AudioAdapter()
    wave = adapter.read(path)
    assert (wave.sample_rate, wave.num_channels, wave.num_frames) == (info.samplerate, info.channels, info.frames)
    ids = adapter.encode(wave)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.numel() == math.ceil(info.frames * 16000 / info.samplerate)
    for window, block in ((1000, 4096), (4096, 1000), (77777, 65536)):
        windows = list(adapter.iter_windows(path, window, block_frames=block))
        assert all(w.numel() == window for w in windows[:-1]) and 0 < windows[-1].numel() <= window
        assert torch.equal(torch.cat(windows), ids), (window, block)

    # the same samples as torchaudio resampling the whole mixed-down file at once
    frames = AudioAdapter(mode="continuous").encode(wave)
    whole = taf.resample(wave.samples.mean(0, keepdim=True), info.samplerate, 16000)
    torch.testing.assert_close(frames[:, 0], whole[0], rtol=0, atol=1e-6)
    assert torch.equal(ids, taf.mu_law_encoding(frames[:, 0].clamp(-1, 1), 256))
    # real speech uses the mu-law range: many levels, both signs
    assert torch.unique(ids).numel() > 100 and ids.min() < 100 and ids.max() > 156


def test_streaming_reads_a_bounded_amount(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(str(path), tone(44100, 6.0), 44100, subtype="PCM_16")
    windows = AudioAdapter().iter_windows(path, 1600, block_frames=4096)
    first = next(windows)
    handle = windows.gi_frame.f_locals["handle"]
    resampler = windows.gi_frame.f_locals["resampler"]
    # the first window needs one resampling segment (~33k frames at 44.1 kHz) and at most one block more,
    # not the 264,600-frame file; later, the read-ahead past what was yielded stays within two such spans
    limit = resampler.segment_len + 4096
    assert first.numel() == 1600 and handle.tell() <= limit < 264600 // 4
    count = 1
    for _ in windows:
        consumed = count * 1600 * 44100 / 16000  # input frames behind the windows yielded so far
        assert resampler._buffer.shape[1] <= limit and handle.tell() - consumed <= 2 * limit
        count += 1
    assert handle.closed and count == math.ceil(6.0 * 16000 / 1600)
    # giving up early closes the file
    windows = AudioAdapter().iter_windows(path, 1600, block_frames=4096)
    next(windows)
    handle = windows.gi_frame.f_locals["handle"]
    windows.close()
    assert handle.closed


# ------------------------------------------------------------------------------------------------------
# files the test writes: several formats and rates, round trips within their bounds


FORMATS = [("wav", "PCM_16", PCM16_STEP), ("flac", "PCM_24", 2.0**-22), ("wav", "FLOAT", 0.0)]


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("ext, subtype, step", FORMATS, ids=[f"{e}-{s}" for e, s, _ in FORMATS])
def test_written_files_round_trip(tmp_path, rate, ext, subtype, step):
    adapter = AudioAdapter()
    signal = tone(rate, 0.4, channels=2, seed=rate)
    path = tmp_path / f"tone_{rate}.{ext}"
    sf.write(str(path), signal, rate, subtype=subtype)  # written by soundfile itself, not by the adapter
    wave = adapter.read(path)
    assert wave.sample_rate == rate and wave.samples.shape == (2, signal.shape[0])
    torch.testing.assert_close(wave.samples, torch.from_numpy(signal.T.copy()), rtol=0, atol=step)

    # encode -> decode is within the mu-law bound of the resampled, mixed signal
    ids = adapter.encode(wave)
    assert torch.equal(torch.cat(list(adapter.iter_windows(path, 999, block_frames=2048))), ids)
    target = AudioAdapter(mode="continuous").encode(wave)[:, 0].clamp(-1, 1)
    decoded = adapter.decode(ids)
    assert decoded.sample_rate == 16000 and decoded.samples.shape == (1, ids.numel())
    error = (decoded.samples[0] - target).abs()
    assert bool((error <= mu_law_bound(target)).all()), float((error - mu_law_bound(target)).max())
    assert float((compand(decoded.samples[0]) - compand(target)).abs().max()) <= 1 / MU + 1e-6
    assert error.max() > 1e-4  # the quantisation is real (8 bits), so the bound above is doing the work


def test_mu_law_code_book_is_exact():
    adapter = AudioAdapter()
    ids = torch.arange(256)
    decoded = adapter.decode(ids)
    assert torch.equal(adapter.encode(decoded.samples), ids)  # every level decodes to the middle of its bin
    assert decoded.samples.min() == -1.0 and decoded.samples.max() == 1.0
    assert bool((decoded.samples[0, 1:] > decoded.samples[0, :-1]).all())


@pytest.mark.parametrize(
    "ext, subtype, bound", [("wav", None, PCM16_STEP), ("flac", None, PCM16_STEP), ("wav", "FLOAT", 0.0)]
)
def test_decode_then_write_round_trips(tmp_path, ext, subtype, bound):
    adapter = AudioAdapter(channels="keep", num_channels=2)
    ids = adapter.encode(Waveform(torch.from_numpy(tone(22050, 0.3, channels=2).T.copy()), 22050))
    decoded = adapter.decode(ids)
    path = tmp_path / f"decoded.{ext}"
    adapter.write(path, decoded, subtype=subtype)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.frames) == (16000, 2, ids.numel() // 2)
    back = adapter.read(path)
    torch.testing.assert_close(back.samples, decoded.samples, rtol=0, atol=bound)
    # float WAV keeps the decoded levels exactly; 16-bit PCM moves a sample by under 2^-15 (plus 2^-15 of its
    # size), less than half of the narrowest mu-law bin (about 8.6e-5 around zero), so the ids survive too
    assert torch.equal(adapter.encode(back), ids)


def test_ogg_vorbis_round_trip_is_lossy_but_faithful(tmp_path):
    adapter = AudioAdapter()
    signal = torch.from_numpy(tone(16000, 1.0)[:, 0].copy())
    adapter.write(tmp_path / "tone.ogg", signal)
    assert sf.info(str(tmp_path / "tone.ogg")).format == "OGG"
    back = adapter.read(tmp_path / "tone.ogg")
    assert back.sample_rate == 16000 and back.num_channels == 1 and back.num_frames == signal.numel()
    snr = 10 * math.log10(float((signal**2).sum() / ((back.samples[0] - signal) ** 2).sum()))
    assert snr > 15, snr  # Vorbis is lossy: no quantisation bound, but the tone survives
    # and the stream reads exactly as whole-file reading
    assert torch.equal(
        torch.cat(list(adapter.iter_windows(tmp_path / "tone.ogg", 500, block_frames=1024))), adapter.encode(back)
    )


def test_write_is_atomic_and_checks_its_input(tmp_path):
    adapter = AudioAdapter()
    path = tmp_path / "out.wav"
    adapter.write(path, torch.zeros(1600))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"out\.mp3.*extension"):
        adapter.write(tmp_path / "out.mp3", torch.zeros(10))
    with pytest.raises(InputError, match=r"out\.wav.*sample 7 \(channel 0\) is nan"):
        adapter.write(path, torch.tensor([0.0] * 7 + [float("nan")]))
    with pytest.raises(InputError, match="decode token ids"):
        adapter.write(path, torch.arange(10))
    with pytest.raises(ConfigError, match="cannot hold subtype"):
        adapter.write(path, torch.zeros(10), subtype="VORBIS")
    assert path.read_bytes() == before  # a failed write leaves the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # and no temporary files behind
    # out-of-range samples are clipped for PCM, kept for float WAV
    adapter.write(path, torch.tensor([1.5, -2.0, 0.25]))
    assert adapter.read(path).samples.abs().max() <= 1.0
    adapter.write(path, torch.tensor([1.5, -2.0, 0.25]), subtype="FLOAT")
    assert adapter.read(path).samples.tolist() == [[1.5, -2.0, 0.25]]


# ------------------------------------------------------------------------------------------------------
# channels


def test_channel_options(tmp_path):
    signal = tone(16000, 0.25, channels=2)
    path = tmp_path / "stereo.flac"
    sf.write(str(path), signal, 16000, subtype="PCM_24")
    wave = AudioAdapter().read(path)
    left, right = wave.samples

    mix = AudioAdapter(mode="continuous").encode(wave)
    torch.testing.assert_close(mix[:, 0], (left + right) / 2)
    assert torch.equal(AudioAdapter(mode="continuous", channels=1).encode(wave)[:, 0], right)
    keep = AudioAdapter(mode="continuous", channels="keep", num_channels=2)
    frames = keep.encode(wave)
    assert frames.shape == (signal.shape[0], 2) and torch.equal(frames.T, wave.samples)
    assert torch.equal(keep.decode(frames).samples, wave.samples)

    # mu-law keeps channels interleaved frame by frame: ids[2t] is left, ids[2t + 1] right
    interleaved = AudioAdapter(channels="keep", num_channels=2)
    ids = interleaved.encode(wave)
    assert torch.equal(ids[0::2], AudioAdapter(channels=0).encode(wave))
    assert torch.equal(ids[1::2], AudioAdapter(channels=1).encode(wave))
    assert torch.equal(torch.cat(list(interleaved.iter_windows(path, 333, block_frames=1000))), ids)
    assert interleaved.decode(ids).samples.shape == (2, signal.shape[0])
    with pytest.raises(InputError, match="whole frames of 2"):
        interleaved.decode(ids[:-1])
    # a training source never starts a stream in the middle of a frame
    source = interleaved.source(ids[:-2], batch_size=3, window=16)
    assert isinstance(source, SequenceSource) and source.stream_len % 2 == 0

    # the real stereo file: its channels are the same speech (they differ by at most one 16-bit level)
    real = AudioAdapter(channels="keep", num_channels=2).encode(AudioAdapter().read(STEREO_44K))
    assert (real[0::2] - real[1::2]).abs().max() <= 1

    with pytest.raises(InputError, match=rf"{DIGITS_16K.name}: has 1 channel\(s\), the adapter keeps 2"):
        AudioAdapter(channels="keep", num_channels=2).iter_windows(DIGITS_16K, 100)
    with pytest.raises(InputError, match=rf"{DIGITS_16K.name}: has 1 channel\(s\), the adapter takes channel 1"):
        AudioAdapter(channels=1).encode(AudioAdapter().read(DIGITS_16K))


# ------------------------------------------------------------------------------------------------------
# bad input


def float_wav_with(tmp_path, value: float, frame: int, channel: int) -> Path:
    signal = tone(16000, 0.5, channels=2)
    signal[frame, channel] = value
    path = tmp_path / "bad_samples.wav"
    sf.write(str(path), signal, 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_samples_are_named_by_file_sample_and_channel(tmp_path, value):
    path = float_wav_with(tmp_path, value, frame=5001, channel=1)
    pattern = rf"bad_samples\.wav: sample 5001 \(channel 1\) is {value}"
    with pytest.raises(InputError, match=pattern):
        AudioAdapter().read(path)
    # streaming finds it in its third block, with the file position, after yielding the windows before it
    windows = AudioAdapter().iter_windows(path, 1000, block_frames=2000)
    got = []
    with pytest.raises(InputError, match=pattern):
        for w in windows:
            got.append(w)
    assert len(got) >= 3
    with pytest.raises(InputError, match=r"waveform: sample 3 \(channel 0\) is nan"):
        AudioAdapter().encode(torch.tensor([0.1, 0.2, 0.3, float("nan"), float("inf")]))


def test_empty_and_wrong_format_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"empty\.wav: the file is empty \(0 bytes\)"):
        AudioAdapter().read(empty)
    no_samples = tmp_path / "no_samples.wav"
    sf.write(str(no_samples), np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(InputError, match=r"no_samples\.wav: holds no audio samples \(0 frames"):
        AudioAdapter().iter_windows(no_samples, 100)
    with pytest.raises(InputError, match="waveform: holds no audio samples"):
        AudioAdapter().encode(torch.zeros(1, 0))

    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(CorruptFileError, match=r"notes\.wav: not a readable audio file .*Format not recognised"):
        AudioAdapter().read(text)
    png = tmp_path / "picture.flac"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(CorruptFileError, match=r"picture\.flac: not a readable audio file"):
        AudioAdapter().iter_windows(png, 100)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        AudioAdapter().read(tmp_path / "missing.wav")


@pytest.mark.parametrize("ext, subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_truncated_files(tmp_path, ext, subtype):
    whole = tmp_path / f"whole.{ext}"
    sf.write(str(whole), tone(16000, 2.0), 16000, subtype=subtype)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cut_off = rf"cut\.{ext}: (truncated|corrupt or truncated: decoding failed within samples)"
    with pytest.raises(CorruptFileError, match=cut_off):
        AudioAdapter().read(cut)
    with pytest.raises(CorruptFileError, match=rf"cut\.{ext}"):
        list(AudioAdapter().iter_windows(cut, 1000, block_frames=1000))


def test_sample_rate_mismatches(tmp_path):
    strict = AudioAdapter(resample=False)
    with pytest.raises(
        InputError,
        match=rf"{EN_22K.name}: sample-rate mismatch: the audio is at 22050 Hz, "
        r"the adapter's rate is 16000 Hz",
    ):
        strict.iter_windows(EN_22K, 100)
    assert strict.encode(strict.read(DIGITS_16K)).numel() == sf.info(str(DIGITS_16K)).frames
    with pytest.raises(InputError, match="sample-rate mismatch"):
        strict.encode(Waveform(torch.zeros(1, 100), 8000))

    adapter = AudioAdapter()
    ids = adapter.encode(torch.zeros(100))
    with pytest.raises(InputError, match="encoded at 16000 Hz, decode was asked for 22050 Hz"):
        adapter.decode(ids, sample_rate=22050)
    assert adapter.decode(ids, sample_rate=16000).sample_rate == 16000
    with pytest.raises(InputError, match=r"x\.wav: sample-rate mismatch: these samples are at the adapter's rate"):
        adapter.write(tmp_path / "x.wav", torch.zeros(100), sample_rate=44100)
    with pytest.raises(InputError, match=r"y\.wav: sample-rate mismatch: the waveform is at 22050 Hz"):
        adapter.write(tmp_path / "y.wav", Waveform(torch.zeros(100), 22050), sample_rate=16000)
    adapter.write(tmp_path / "z.wav", Waveform(torch.zeros(100), 22050))  # a waveform keeps its own rate
    assert sf.info(str(tmp_path / "z.wav")).samplerate == 22050

    # a model trained at 8 kHz refuses to be fed by a 16 kHz adapter, also after a checkpoint round trip
    model = AudioAdapter(sample_rate=8000).build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4))
    with pytest.raises(InputError, match="trained on audio at 8000 Hz, this adapter encodes at 16000 Hz"):
        adapter.check_model(model)
    save_model(tmp_path / "m.safetensors", model)
    restored = adapter_from_checkpoint(tmp_path / "m.safetensors")
    assert restored.sample_rate == 8000
    restored.check_model(model)
    AudioAdapter(sample_rate=8000, resample=False).check_model(model)  # which files it takes is no mismatch
    with pytest.raises(InputError, match="mu: model 256 vs adapter 16"):
        AudioAdapter(sample_rate=8000, mu=16).check_model(model)


def test_bad_tensors():
    adapter = AudioAdapter()
    with pytest.raises(InputError, match=r"id 256 at position 2 \(frame 2, channel 0\) is outside \[0, 256\)"):
        adapter.decode(torch.tensor([0, 5, 256]))
    with pytest.raises(InputError, match="1-D integer ids"):
        adapter.decode(torch.zeros(3))
    with pytest.raises(InputError, match=r"float frames \(frames, 1\)"):
        AudioAdapter(mode="continuous").decode(torch.zeros(5, 2))
    with pytest.raises(InputError, match="must be floating point"):
        adapter.encode(torch.zeros(10, dtype=torch.int16))
    with pytest.raises(InputError, match=r"shape \(channels, frames\)"):
        adapter.encode(torch.zeros(1, 2, 3))
    with pytest.raises(InputError, match="expected a Waveform"):
        adapter.encode([0.0, 0.1])
    with pytest.raises(InputError, match="head output must be"):
        AudioAdapter(mode="continuous").loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 1))
    with pytest.raises(InputError, match="too few"):
        FrameSource(torch.zeros(10, 1), batch_size=4, window=8)


# ------------------------------------------------------------------------------------------------------
# training: a tiny model learns real speech well below the uniform baseline and below simple baselines


def _fit(adapter, train, held, steps, d_model, lr):
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=d_model, n_layer=2, d_state=16))
    config = TrainConfig(
        lr=lr, warmup_steps=10, max_steps=steps, batch_size=4, window=128, weight_decay=0.0, progress=False
    )
    trainer = Trainer(
        model,
        config,
        adapter.source(train, 4, 128),
        adapter.source(held, 1, held.shape[0] - 1),
        loss_fn=adapter.loss,
        metric_fn=adapter.metric,
    )
    trainer.fit()
    return trainer.evaluate(1)["eval_metric"]


def test_mulaw_training_beats_uniform_and_unigram_on_real_speech():
    adapter = AudioAdapter()
    ids = adapter.encode(adapter.read(DIGITS_16K))
    split = int(0.8 * ids.numel())
    train, held = ids[:split], ids[split:]
    # a model that knows only the training set's level histogram (no context)
    p = torch.bincount(held, minlength=256).double() / held.numel()
    q = (torch.bincount(train, minlength=256).double() + 0.5) / (train.numel() + 128)
    unigram = float(-(p * q.log2()).sum())
    bits = _fit(adapter, train, held, steps=150, d_model=16, lr=1e-2)
    assert bits < 5.0 and bits < unigram - 1.0, (bits, unigram)  # uniform: 8 bits, unigram: ~6.5 bits


def test_continuous_training_beats_uniform_and_iid_gaussian_on_real_speech():
    adapter = AudioAdapter(mode="continuous")
    frames = adapter.encode(adapter.read(DIGITS_16K))
    split = int(0.8 * frames.shape[0])
    train, held = frames[:split], frames[split:]
    # an i.i.d. Gaussian fitted to the training samples, measured the same way (bits on the 16-bit grid)
    mean, std = train.mean(), train.std()
    iid = float((0.5 * ((held - mean) / std) ** 2 + torch.log(std) + 0.5 * math.log(2 * math.pi)).mean()) / math.log(
        2
    ) - math.log2(PCM16_STEP)
    bits = _fit(adapter, train, held, steps=150, d_model=16, lr=1e-2)
    assert bits < 13.0 and bits < iid - 1.0, (bits, iid)  # uniform: 16 bits, iid Gaussian: ~13.5 bits
    assert adapter.point_prediction(torch.zeros(2, 5, 2)).shape == (2, 5, 1)
