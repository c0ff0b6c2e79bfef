"""Audio waveforms: WAV / FLAC / OGG files <-> 8-bit mu-law token ids or continuous float frames.

Reading goes through soundfile (libsndfile), block by block; resampling to the model rate uses
``torchaudio.functional.resample`` on fixed-size overlapping segments (``StreamingResampler``), so a file read
window by window gives bit for bit the ids (or frames) of a whole-file read; quantisation uses torchaudio's
``mu_law_encoding`` / ``mu_law_decoding``. torchaudio's own ``load`` is not used (in torchaudio >= 2.9 it needs
TorchCodec). soundfile and torchaudio are imported when first needed (``pip install seqlab[audio]``).

See docs/domains/audio.md for the formats, options, metric and a runnable example.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_bytes

from .base import Adapter, InputSpec, register_adapter, token_bits

__all__ = ["PCM16_STEP", "AudioAdapter", "FrameSource", "StreamingResampler", "Waveform"]

#: width of one 16-bit PCM level on the [-1, 1) scale: the bin the continuous metric is measured on
PCM16_STEP = 2.0 ** -15

_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
_DEFAULT_BLOCK_FRAMES = 65536
# A polyphase filter bank larger than this (rates with a small common divisor, e.g. 44100 -> 16001) would
# allocate gigabytes inside torchaudio; refuse it with a clear message instead.
_MAX_FILTER_TAPS = 50_000_000


def _soundfile():
    try:
        import soundfile
    except ImportError as exc:  # pragma: no cover - the audio extra is installed in every test environment
        raise ImportError("seqlab.domains.audio needs soundfile: pip install 'seqlab[audio]'") from exc
    return soundfile


def _torchaudio_functional():
    try:
        import torchaudio.functional as taf
    except ImportError as exc:  # pragma: no cover
        raise ImportError("seqlab.domains.audio needs torchaudio: pip install 'seqlab[audio]'") from exc
    return taf


# ------------------------------------------------------------------------------------------------------
# the modality's value


@dataclass(eq=False)
class Waveform:
    """Audio samples ``(channels, frames)`` (float, nominally in [-1, 1]) at ``sample_rate`` Hz.

    A 1-D tensor or array is one channel. ``source`` names where the samples came from (a file path), so
    errors found later can name it.
    """

    samples: torch.Tensor
    sample_rate: int
    source: str | None = None

    def __post_init__(self) -> None:
        where = self.source or "waveform"
        samples = self.samples
        if isinstance(samples, np.ndarray):
            samples = torch.from_numpy(np.ascontiguousarray(samples))
        if not isinstance(samples, torch.Tensor):
            raise InputError(f"{where}: samples must be a torch tensor or numpy array, got {type(samples).__name__}")
        if not samples.is_floating_point():
            raise InputError(f"{where}: samples must be floating point (-1..1), got dtype {samples.dtype}")
        if samples.dim() == 1:
            samples = samples[None]
        if samples.dim() != 2:
            raise InputError(f"{where}: samples must have shape (channels, frames) or (frames,), "
                             f"got {tuple(samples.shape)}")
        self.samples = samples
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise InputError(f"{where}: sample_rate must be a positive int (Hz), got {rate!r}")
        self.sample_rate = int(rate)

    @property
    def num_channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_frames / self.sample_rate


# ------------------------------------------------------------------------------------------------------
# streaming resampling


class StreamingResampler:
    """``torchaudio.functional.resample`` fed piece by piece, with the whole-signal result.

    torchaudio's resampler is polyphase: after dividing both rates by their gcd (``orig = o*g``,
    ``new = n*g``), output samples ``[k*n, (k+1)*n)`` are a fixed filter applied to input samples
    ``[k*o - w, k*o + o + w)`` (``w`` = the filter half-width, zeros outside the signal). This class keeps the
    last ``w`` + a few blocks of input, and every time enough input has arrived it calls ``resample`` on one
    segment of always the same length, ``ceil(w/o)`` blocks of left context + ``group`` blocks + ``w`` samples
    of right context, and keeps the ``group*n`` outputs whose filter support lies inside the segment.

    Because every segment has the same shape and content whatever sizes the input came in, the output does not
    depend on how the signal was split: ``push`` in any pieces + ``finish`` gives identical bits. It equals
    ``torchaudio.functional.resample`` on the whole signal up to float rounding (in practice bit for bit; the
    tests check both). ``finish`` pads with zeros (as the whole-signal resampler does) and trims the output to
    ``ceil(n_in * new / orig)`` samples. Memory is O(group + w) samples per channel.
    """

    def __init__(self, orig_rate: int, new_rate: int, channels: int, group_frames: int = 32768,
                 lowpass_filter_width: int = 6, rolloff: float = 0.99) -> None:
        for name, value in (("orig_rate", orig_rate), ("new_rate", new_rate), ("channels", channels),
                            ("group_frames", group_frames), ("lowpass_filter_width", lowpass_filter_width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"StreamingResampler: {name} must be a positive int, got {value!r}")
        if not 0 < rolloff <= 1:
            raise ConfigError(f"StreamingResampler: rolloff must be in (0, 1], got {rolloff!r}")
        self.orig_rate, self.new_rate, self.channels = int(orig_rate), int(new_rate), int(channels)
        self.lowpass_filter_width, self.rolloff = int(lowpass_filter_width), float(rolloff)
        gcd = math.gcd(self.orig_rate, self.new_rate)
        self.o, self.n = self.orig_rate // gcd, self.new_rate // gcd
        # torchaudio's half-width is ceil(width * o / (min(o, n) * rolloff)); one more sample of context than
        # that costs nothing and guards against rounding in the ceil (more context never changes an output).
        self.width = math.ceil(self.lowpass_filter_width * self.o / (min(self.o, self.n) * self.rolloff)) + 1
        taps = self.n * (2 * self.width + self.o)
        if self.o != self.n and taps > _MAX_FILTER_TAPS:
            raise ConfigError(f"resampling {self.orig_rate} Hz -> {self.new_rate} Hz: the rates' gcd is {gcd}, "
                              f"so the polyphase filter would need {taps:,} taps; resample to a rate with a larger "
                              "common divisor first")
        self.left_blocks = -(-self.width // self.o)  # blocks of left context, so context >= width samples
        self.group = max(1, -(-int(group_frames) // self.o))
        self.segment_len = (self.left_blocks + self.group) * self.o + self.width
        # input samples from x-index -left_blocks*o on (the zeros before the signal are real zeros)
        self._buffer = torch.zeros(self.channels, self.left_blocks * self.o)
        self.frames_in = 0
        self.frames_out = 0
        self._finished = False

    @property
    def passthrough(self) -> bool:
        return self.o == self.n

    def output_length(self, frames_in: int) -> int:
        """Samples the whole-signal resampler makes from ``frames_in`` input samples."""
        return frames_in if self.passthrough else -(-frames_in * self.n // self.o)

    def _segment(self) -> torch.Tensor:
        seg = self._buffer[:, :self.segment_len]
        if seg.shape[1] < self.segment_len:  # the end of the signal: zeros, as the whole-signal padding
            seg = torch.cat([seg, seg.new_zeros(self.channels, self.segment_len - seg.shape[1])], 1)
        out = _torchaudio_functional().resample(seg, self.orig_rate, self.new_rate, self.lowpass_filter_width,
                                                self.rolloff)
        self._buffer = self._buffer[:, self.group * self.o:]
        return out[:, self.left_blocks * self.n:(self.left_blocks + self.group) * self.n]

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """Take the next ``(channels, frames)`` input samples; return the outputs that are now final."""
        if self._finished:
            raise InputError("StreamingResampler.push after finish(): make a new resampler for a new signal")
        if x.dim() != 2 or x.shape[0] != self.channels or not x.is_floating_point():
            raise InputError(f"StreamingResampler expects float ({self.channels}, frames) input, got "
                             f"{tuple(x.shape)} {x.dtype}")
        self.frames_in += int(x.shape[1])
        if self.passthrough:
            self.frames_out += int(x.shape[1])
            return x
        self._buffer = torch.cat([self._buffer, x.to(self._buffer.dtype)], 1)
        outs = []
        while self._buffer.shape[1] >= self.segment_len:
            outs.append(self._segment())
        out = torch.cat(outs, 1) if outs else self._buffer.new_zeros(self.channels, 0)
        self.frames_out += int(out.shape[1])
        return out

    def finish(self) -> torch.Tensor:
        """The remaining outputs after the last input (the signal is taken to be zero beyond its end)."""
        if self._finished:
            raise InputError("StreamingResampler.finish called twice")
        self._finished = True
        total = self.output_length(self.frames_in)
        outs = []
        while self.frames_out < total:
            out = self._segment()
            keep = min(out.shape[1], total - self.frames_out)
            outs.append(out[:, :keep])
            self.frames_out += keep
        return torch.cat(outs, 1) if outs else self._buffer.new_zeros(self.channels, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole signal at once (the same bits as pushing it in pieces)."""
        head = self.push(x)
        return torch.cat([head, self.finish()], 1)


# ------------------------------------------------------------------------------------------------------
# training source for continuous frames


class FrameSource:
    """Windows of float frames for ``seqlab.train.Trainer`` (``SequenceSource`` takes integer ids only).

    ``frames``: ``(T, C)`` float. Cut into ``batch_size`` contiguous streams (the tail that does not divide is
    dropped), window ``i`` gives inputs ``(batch, window, C)`` = frames ``[i*window, (i+1)*window)`` of every
    stream and targets = the same shifted by one frame.
    """

    def __init__(self, frames: torch.Tensor, batch_size: int, window: int) -> None:
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point() or frames.dim() != 2:
            what = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames)
            raise InputError(f"FrameSource needs float frames of shape (T, C), got {what}")
        for name, value in (("batch_size", batch_size), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FrameSource.{name} must be a positive int, got {value!r}")
        self.batch_size, self.window_size = batch_size, window
        self.stream_len = frames.shape[0] // batch_size
        self.num_windows = max(0, (self.stream_len - 1) // window)
        if self.num_windows == 0:
            raise InputError(f"FrameSource: {frames.shape[0]} frames are too few for one window of {window}+1 "
                             f"frames in each of {batch_size} streams")
        self.streams = rearrange(frames[:batch_size * self.stream_len].detach().cpu().float(), "(b t) c -> b t c",
                                 b=batch_size)

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} is outside [0, {self.num_windows})")
        start = index * self.window_size
        chunk = self.streams[:, start:start + self.window_size + 1]
        return chunk[:, :-1], chunk[:, 1:]


# ------------------------------------------------------------------------------------------------------
# the adapter


@register_adapter
class AudioAdapter(Adapter):
    """Audio files <-> model inputs at ``sample_rate`` Hz.

    ``mode="mulaw"``: every sample becomes one of ``mu`` mu-law token ids (a ``LanguageModel``, cross-entropy,
    bits per sample, uniform baseline ``log2(mu)`` = 8). ``mode="continuous"``: float frames ``(T, C)`` (a
    ``SequenceModel`` whose head predicts a Gaussian per channel for the next frame; Gaussian NLL loss; the
    metric is bits per 16-bit sample, uniform baseline 16). ``channels``: ``"mix"`` (average to mono),
    ``"keep"`` (all ``num_channels`` channels; mu-law ids are interleaved frame by frame) or an int (that one
    channel, 0-based). ``resample=False`` refuses files at another rate instead of resampling them.
    """

    name: ClassVar[str] = "audio"
    metric_name: ClassVar[str] = "bits_per_sample"
    MODES: ClassVar[tuple[str, ...]] = ("mulaw", "continuous")

    def __init__(self, sample_rate: int = 16000, mode: str = "mulaw", channels: str | int = "mix",
                 num_channels: int | None = None, mu: int = 256, resample: bool = True) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ConfigError(f"AudioAdapter.sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if mode not in self.MODES:
            raise ConfigError(f"AudioAdapter.mode must be one of {self.MODES}, got {mode!r}")
        if isinstance(channels, bool) or not (channels in ("mix", "keep")
                                              or (isinstance(channels, int) and channels >= 0)):
            raise ConfigError(f"AudioAdapter.channels must be 'mix', 'keep' or a channel index >= 0, got {channels!r}")
        if channels == "keep":
            if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
                raise ConfigError("AudioAdapter(channels='keep') needs num_channels, the channel count every file "
                                  f"must have (it fixes the model's input), got {num_channels!r}")
        elif num_channels is not None:
            raise ConfigError(f"AudioAdapter.num_channels only applies to channels='keep' (channels={channels!r} "
                              f"gives one channel), got {num_channels!r}")
        if isinstance(mu, bool) or not isinstance(mu, int) or not 2 <= mu <= 65536:
            raise ConfigError(f"AudioAdapter.mu (quantisation levels) must be an int in [2, 65536], got {mu!r}")
        if not isinstance(resample, bool):
            raise ConfigError(f"AudioAdapter.resample must be True or False, got {resample!r}")
        self.sample_rate, self.mode, self.channels = sample_rate, mode, channels
        self.num_channels, self.mu, self.resample = num_channels, mu, resample

    # -- identity --------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "mode": self.mode, "channels": self.channels,
                "num_channels": self.num_channels, "mu": self.mu, "resample": self.resample}

    @property
    def out_channels(self) -> int:
        """Channels of the encoded signal: ``num_channels`` when keeping them all, else 1."""
        return self.num_channels if self.channels == "keep" else 1

    @property
    def input_spec(self) -> InputSpec:
        if self.mode == "mulaw":
            return InputSpec("tokens", vocab_size=self.mu)
        return InputSpec("continuous", width=self.out_channels, output_width=2 * self.out_channels)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> AudioAdapter:
        """The adapter a model was built with (``build_model`` stamps ``model.adapter_info``)."""
        info = getattr(model, "adapter_info", None)
        if not isinstance(info, dict) or info.get("name") != cls.name:
            raise ConfigError(f"this model was not built by an AudioAdapter (adapter_info={info!r})")
        return cls(**info.get("settings", {}))

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model trained with other audio settings (above all another sample rate): its inputs would
        mean something else. A model without ``adapter_info`` (not built by an adapter) is let through."""
        info = getattr(model, "adapter_info", None)
        if info is None:
            return
        if info.get("name") != self.name:
            raise ConfigError(f"the model was built for the {info.get('name')!r} adapter, not {self.name!r}")
        theirs = info.get("settings", {})
        if theirs.get("sample_rate") != self.sample_rate:
            raise InputError(f"sample-rate mismatch: the model was trained on audio at {theirs.get('sample_rate')} "
                             f"Hz, this adapter encodes at {self.sample_rate} Hz; use AudioAdapter.from_model(model)")
        # ``resample`` only decides which files are accepted; every other setting changes what an input means
        differ = {k: (theirs.get(k), v) for k, v in self.settings().items() if k != "resample" and theirs.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: model {a!r} vs adapter {b!r}" for k, (a, b) in differ.items())
            raise InputError(f"the model was trained with other audio settings ({listed}); "
                             "use AudioAdapter.from_model(model)")

    # -- checks shared by files and in-memory waveforms ------------------------------------------------
    def _check_channel_count(self, count: int, where: str) -> None:
        if self.channels == "keep" and count != self.num_channels:
            raise InputError(f"{where}: has {count} channel(s), the adapter keeps {self.num_channels} "
                             f"(channels='keep', num_channels={self.num_channels})")
        if isinstance(self.channels, int) and not isinstance(self.channels, bool) and self.channels >= count:
            raise InputError(f"{where}: has {count} channel(s), the adapter takes channel {self.channels} (0-based)")

    def _check_rate(self, rate: int, where: str) -> None:
        if rate != self.sample_rate and not self.resample:
            raise InputError(f"{where}: sample-rate mismatch: the audio is at {rate} Hz, the adapter's rate is "
                             f"{self.sample_rate} Hz and resample=False")

    @staticmethod
    def _check_finite(x: torch.Tensor, where: str, offset: int = 0) -> None:
        """``x``: (channels, frames); name the first non-finite sample in time order."""
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            first = bad[torch.argmin(bad[:, 1] * x.shape[0] + bad[:, 0])]
            channel, sample = int(first[0]), int(first[1])
            raise InputError(f"{where}: sample {offset + sample} (channel {channel}) is {float(x[channel, sample])}: "
                             "audio samples must be finite")

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        """(file channels, frames) -> (out_channels, frames)."""
        if self.channels == "mix":
            return x.mean(0, keepdim=True) if x.shape[0] > 1 else x
        if self.channels == "keep":
            return x
        return x[self.channels:self.channels + 1]

    def _resampler(self, rate: int, where: str) -> StreamingResampler | None:
        self._check_rate(rate, where)
        if rate == self.sample_rate:
            return None
        return StreamingResampler(rate, self.sample_rate, self.out_channels)

    def _quantise(self, y: torch.Tensor) -> torch.Tensor:
        """(out_channels, frames) float at the model rate -> the model input tensor."""
        if self.mode == "continuous":
            return rearrange(y, "c t -> t c").contiguous()
        # resampling can overshoot full scale slightly (Gibbs): clip to the mu-law range
        ids = _torchaudio_functional().mu_law_encoding(y.clamp(-1.0, 1.0), self.mu)
        return rearrange(ids, "c t -> (t c)")  # frame by frame: all channels of frame t, then frame t+1

    # -- files -----------------------------------------------------------------------------------------
    def _open(self, path: str | os.PathLike):
        """An open, checked ``soundfile.SoundFile`` for ``path``."""
        sf = _soundfile()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such audio file")
        if os.path.getsize(path) == 0:
            raise CorruptFileError(f"{path}: the file is empty (0 bytes), expected WAV, FLAC or OGG audio")
        try:
            handle = sf.SoundFile(path)
        except (RuntimeError, TypeError) as exc:
            reason = getattr(exc, "error_string", None) or str(exc)
            raise CorruptFileError(f"{path}: not a readable audio file (libsndfile: {reason}); "
                                   "expected WAV, FLAC or OGG") from None
        try:
            self._check_header(handle, path)
        except BaseException:
            handle.close()
            raise
        return handle

    def _check_header(self, handle, path: str) -> None:
        log = handle.extra_info or ""
        # libsndfile reads what is there of a cut-off file without complaint but logs the mismatch
        # ("data : 64000 (should be 31956)"); a data length of 0xFFFFFFFF is a streaming writer's placeholder.
        cut = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", log, flags=re.MULTILINE)
        if cut and int(cut.group(1)) > int(cut.group(2)) and int(cut.group(1)) < 0xFFFFFF00:
            raise CorruptFileError(f"{path}: truncated: its header declares {int(cut.group(1)):,} bytes of samples, "
                                   f"the file holds {int(cut.group(2)):,}")
        if "ended unexpectedly" in log:
            raise CorruptFileError(f"{path}: truncated: the {handle.format} stream ends without its end marker")
        if handle.frames == 0:
            raise InputError(f"{path}: holds no audio samples (0 frames of {handle.format}/{handle.subtype})")
        self._check_channel_count(handle.channels, path)
        self._check_rate(handle.samplerate, path)

    def _read_blocks(self, handle, path: str, block_frames: int) -> Iterator[torch.Tensor]:
        """The file's samples, ``(file channels, <= block_frames)`` float32 at a time, checked."""
        offset = 0
        while True:
            try:
                data = handle.read(block_frames, dtype="float32", always_2d=True)
            except RuntimeError as exc:
                reason = getattr(exc, "error_string", None) or str(exc)
                stop = min(offset + block_frames, handle.frames)
                raise CorruptFileError(f"{path}: corrupt or truncated: decoding failed within samples "
                                       f"[{offset}, {stop}) of {handle.frames} (libsndfile: {reason})") from None
            if len(data) == 0:
                break
            block = torch.from_numpy(np.ascontiguousarray(data.T))
            self._check_finite(block, path, offset)
            offset += block.shape[1]
            yield block
        if offset < handle.frames:
            raise CorruptFileError(f"{path}: truncated: the header declares {handle.frames} frames, only {offset} "
                                   "could be read")

    @staticmethod
    def _check_block_frames(block_frames) -> int:
        if isinstance(block_frames, bool) or not isinstance(block_frames, int) or block_frames < 1:
            raise ConfigError(f"block_frames must be a positive int, got {block_frames!r}")
        return block_frames

    def read(self, path: str | os.PathLike, block_frames: int = _DEFAULT_BLOCK_FRAMES) -> Waveform:
        """The whole file as a ``Waveform`` at the file's own rate, with all its channels (``encode`` then
        resamples and picks channels). Any format libsndfile reads is accepted (WAV, FLAC, OGG, ...)."""
        block_frames = self._check_block_frames(block_frames)
        path = os.fspath(path)
        with self._open(path) as handle:
            blocks = list(self._read_blocks(handle, path, block_frames))
            rate = handle.samplerate
        return Waveform(torch.cat(blocks, 1), rate, source=path)

    def iter_windows(self, path: str | os.PathLike, window: int,
                     block_frames: int = _DEFAULT_BLOCK_FRAMES) -> Iterator[torch.Tensor]:
        """Encoded windows of ``window`` elements (token ids, or frames for continuous mode), the last one
        shorter; the file is read ``block_frames`` frames at a time. The file is opened and checked now;
        sample errors (NaN/inf, a cut-off stream) are raised when the iteration reaches them."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a positive int, got {window!r}")
        block_frames = self._check_block_frames(block_frames)
        path = os.fspath(path)
        handle = self._open(path)
        return self._windows(handle, path, window, block_frames)

    def _windows(self, handle, path: str, window: int, block_frames: int) -> Iterator[torch.Tensor]:
        with handle:
            resampler = self._resampler(handle.samplerate, path)
            pending: list[torch.Tensor] = []
            count = 0

            def pieces(y: torch.Tensor, final: bool) -> Iterator[torch.Tensor]:
                nonlocal pending, count
                if y.shape[1]:
                    encoded = self._quantise(y)
                    pending.append(encoded)
                    count += encoded.shape[0]
                if count >= window or (final and count):
                    joined = torch.cat(pending, 0)
                    full = count - count % window if not final else count
                    for start in range(0, full, window):
                        yield joined[start:start + window]
                    pending = [joined[full:]] if full < count else []
                    count -= full

            for block in self._read_blocks(handle, path, block_frames):
                y = self._select(block)
                yield from pieces(resampler.push(y) if resampler else y, final=False)
            yield from pieces(resampler.finish() if resampler else torch.zeros(self.out_channels, 0),
                              final=True)

    def write(self, path: str | os.PathLike, raw, sample_rate: int | None = None, subtype: str | None = None) -> None:
        """Write a waveform to ``path`` atomically; the format follows the extension (.wav, .flac, .ogg).

        ``raw``: a ``Waveform`` (written at its own rate) or a float tensor/array ``(channels, frames)`` /
        ``(frames,)`` taken to be at the adapter's rate. ``sample_rate``, when given, must agree with that rate
        (relabelling samples with another rate would change their pitch and speed: resample instead).
        ``subtype``: a soundfile subtype (default: PCM_16 for WAV and FLAC, VORBIS for OGG); samples are clipped
        to [-1, 1] for every subtype except FLOAT/DOUBLE.
        """
        sf = _soundfile()
        path = os.fspath(path)
        fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
        if fmt is None:
            raise ConfigError(f"{path}: cannot tell the audio format from the extension; use one of "
                              f"{sorted(_FORMATS)}")
        if isinstance(raw, Waveform):
            wave = raw
            if sample_rate is not None and sample_rate != wave.sample_rate:
                raise InputError(f"{path}: sample-rate mismatch: the waveform is at {wave.sample_rate} Hz, "
                                 f"sample_rate={sample_rate} was asked; resample it first")
        else:
            if isinstance(raw, torch.Tensor) and not raw.is_floating_point():
                raise InputError(f"{path}: write takes float samples, got a {raw.dtype} tensor (decode token ids "
                                 "with adapter.decode first)")
            if sample_rate is not None and sample_rate != self.sample_rate:
                raise InputError(f"{path}: sample-rate mismatch: these samples are at the adapter's rate "
                                 f"{self.sample_rate} Hz, sample_rate={sample_rate} was asked; resample them or "
                                 "pass a Waveform with its own rate")
            wave = Waveform(raw, self.sample_rate, source=path)
        if wave.num_frames == 0:
            raise InputError(f"{path}: refusing to write a waveform with no samples")
        self._check_finite(wave.samples, f"{path} (writing)")
        subtype = subtype or ("VORBIS" if fmt == "OGG" else "PCM_16")
        if not sf.check_format(fmt, subtype):
            raise ConfigError(f"{path}: {fmt} files cannot hold subtype {subtype!r}; "
                              f"available: {sorted(sf.available_subtypes(fmt))}")
        samples = wave.samples.detach().cpu()
        if subtype not in ("FLOAT", "DOUBLE"):
            samples = samples.clamp(-1.0, 1.0)
        dtype = torch.float64 if subtype == "DOUBLE" else torch.float32
        data = rearrange(samples.to(dtype), "c t -> t c").numpy()
        buffer = io.BytesIO()
        sf.write(buffer, data, wave.sample_rate, format=fmt, subtype=subtype)
        atomic_write_bytes(path, buffer.getvalue())

    # -- encode / decode -------------------------------------------------------------------------------
    def _as_waveform(self, raw, where: str) -> Waveform:
        if isinstance(raw, Waveform):
            return raw
        if isinstance(raw, (torch.Tensor, np.ndarray)):
            return Waveform(raw, self.sample_rate, source=where)
        raise InputError(f"{where}: expected a Waveform or float samples (channels, frames), got {type(raw).__name__}")

    def encode(self, raw) -> torch.Tensor:
        """A ``Waveform`` (any rate; resampled to ``sample_rate``) or float samples ``(channels, frames)`` /
        ``(frames,)`` at the adapter's rate -> 1-D int64 mu-law ids (channels interleaved frame by frame) or
        ``(frames, channels)`` float32 frames."""
        wave = self._as_waveform(raw, "waveform")
        where = wave.source or "waveform"
        if wave.num_frames == 0:
            raise InputError(f"{where}: holds no audio samples")
        self._check_channel_count(wave.num_channels, where)
        samples = wave.samples.detach().cpu().float()
        self._check_finite(samples, where)
        resampler = self._resampler(wave.sample_rate, where)
        y = self._select(samples)
        return self._quantise(resampler(y) if resampler else y)

    def decode(self, tensor: torch.Tensor, sample_rate: int | None = None) -> Waveform:
        """Ids (mu-law mode) or ``(frames, channels)`` frames (continuous mode) -> a ``Waveform`` at the
        adapter's rate. ``sample_rate``, when given, must be that rate: encoded samples have no other."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise InputError(f"sample-rate mismatch: these samples were encoded at {self.sample_rate} Hz, "
                             f"decode was asked for {sample_rate} Hz; decode, then resample the Waveform")
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"decode takes a torch tensor, got {type(tensor).__name__}")
        channels = self.out_channels
        if self.mode == "continuous":
            if not tensor.is_floating_point() or tensor.dim() != 2 or tensor.shape[1] != channels:
                raise InputError(f"continuous-mode decode takes float frames (frames, {channels}), got "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
            samples = rearrange(tensor.detach().cpu().float(), "t c -> c t").contiguous()
            self._check_finite(samples, "frames")
            return Waveform(samples, self.sample_rate)
        ids = tensor.detach().cpu()
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
            raise InputError(f"mu-law decode takes 1-D integer ids, got {ids.dtype} {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.mu)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise InputError(f"ids: id {int(ids[first])} at position {first} (frame {first // channels}, channel "
                             f"{first % channels}) is outside [0, {self.mu})")
        if ids.numel() % channels:
            raise InputError(f"ids: {ids.numel()} ids do not make whole frames of {channels} interleaved channels")
        samples = _torchaudio_functional().mu_law_decoding(ids.long(), self.mu).float()
        return Waveform(rearrange(samples, "(t c) -> c t", c=channels).contiguous(), self.sample_rate)

    # -- models, losses, metrics -----------------------------------------------------------------------
    def _gaussian(self, output, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of the continuous head: the first C outputs are the mean, the next C give the scale
        ``PCM16_STEP + softplus(.)`` (floored at one 16-bit level, so the metric stays a probability)."""
        out = output.output if hasattr(output, "output") else output
        channels = self.out_channels
        if out.shape[-1] != 2 * channels or targets.shape[-1] != channels or out.shape[:-1] != targets.shape[:-1]:
            raise InputError(f"continuous audio head output must be (..., {2 * channels}) with targets (..., "
                             f"{channels}) of the same leading shape, got {tuple(out.shape)} and "
                             f"{tuple(targets.shape)}")
        mean = out[..., :channels].float()
        scale = PCM16_STEP + F.softplus(out[..., channels:].float())
        return mean, scale * scale

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Mu-law: next-sample cross-entropy (nats). Continuous: Gaussian negative log-likelihood (nats, with
        the 0.5*log(2*pi) constant) of the next frame."""
        if self.mode == "mulaw":
            logits = output.logits if hasattr(output, "logits") else output
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        mean, var = self._gaussian(output, targets)
        return F.gaussian_nll_loss(mean, targets.float(), var, full=True, eps=1e-12)

    def metric(self, output, targets: torch.Tensor) -> float:
        """Bits per sample. Mu-law: cross-entropy / ln 2 over the ``mu`` levels (baseline log2(mu) = 8).
        Continuous: ``-log2(p(x) * PCM16_STEP)``, the bits to code each sample on the 16-bit PCM grid under the
        predicted Gaussian (density times bin width; baseline 16)."""
        nats = float(self.loss(output, targets))
        if self.mode == "mulaw":
            return nats / math.log(2)
        return nats / math.log(2) - math.log2(PCM16_STEP)

    def position_metric(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Bits per sample of every predicted position (b, t): mu-law, -log2 p of each target id; continuous,
        the mean over the frame's channels of ``-log2(p(x) * PCM16_STEP)``."""
        if self.mode == "mulaw":
            return token_bits(output, targets)
        with torch.no_grad():
            mean, var = self._gaussian(output, targets)
            nats = F.gaussian_nll_loss(mean, targets.float(), var, full=True, eps=1e-12, reduction="none")
            return (nats.mean(-1) / math.log(2) - math.log2(PCM16_STEP)).float()

    def uniform_baseline(self) -> float:
        # continuous: a uniform density 1/2 on [-1, 1) puts 2**-16 on every 16-bit level: 16 bits
        return math.log2(self.mu) if self.mode == "mulaw" else math.log2(2.0 / PCM16_STEP)

    def point_prediction(self, output) -> torch.Tensor:
        """The most likely next element: argmax ids (mu-law) or the predicted mean frames (continuous)."""
        out = output.output if hasattr(output, "output") else output
        if self.mode == "mulaw":
            return out.argmax(-1)
        return out[..., :self.out_channels].float()

    def source(self, data: torch.Tensor, batch_size: int, window: int, **options):
        """A ``Trainer`` data source over an encoded signal: ``SequenceSource`` for ids (trimmed so every stream
        starts on a frame boundary when channels are interleaved), ``FrameSource`` for frames."""
        if self.mode == "continuous" or options:
            return super().source(data, batch_size, window, **options)
        step = batch_size * self.out_channels
        return super().source(data[:data.shape[0] - data.shape[0] % step], batch_size, window)
