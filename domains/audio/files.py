"""Audio files: the ``Waveform`` value, and reading (block by block, checked), streaming and writing WAV / FLAC /
OGG through soundfile (libsndfile), imported when first needed (``pip install seqlab[audio]``).

``AudioFiles`` holds the file side of ``AudioAdapter`` (a mixin: it uses the adapter's settings and its
``_resampler`` / ``_select`` / ``_quantise``, so windows come out encoded).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_bytes

__all__ = ["AudioFiles", "Waveform"]

_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
_DEFAULT_BLOCK_FRAMES = 65536


def _soundfile():
    try:
        import soundfile
    except ImportError as exc:  # pragma: no cover - the audio extra is installed in every test environment
        raise ImportError("seqlab.domains.audio needs soundfile: pip install 'seqlab[audio]'") from exc
    return soundfile


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
            raise InputError(
                f"{where}: samples must have shape (channels, frames) or (frames,), got {tuple(samples.shape)}"
            )
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
# files


class AudioFiles:
    """The checks and file formats of ``AudioAdapter`` (see its docstring for the settings they use)."""

    # -- checks shared by files and in-memory waveforms ------------------------------------------------
    def _check_channel_count(self, count: int, where: str) -> None:
        if self.channels == "keep" and count != self.num_channels:
            raise InputError(
                f"{where}: has {count} channel(s), the adapter keeps {self.num_channels} "
                f"(channels='keep', num_channels={self.num_channels})"
            )
        if isinstance(self.channels, int) and not isinstance(self.channels, bool) and self.channels >= count:
            raise InputError(f"{where}: has {count} channel(s), the adapter takes channel {self.channels} (0-based)")

    def _check_rate(self, rate: int, where: str) -> None:
        if rate != self.sample_rate and not self.resample:
            raise InputError(
                f"{where}: sample-rate mismatch: the audio is at {rate} Hz, the adapter's rate is "
                f"{self.sample_rate} Hz and resample=False"
            )

    @staticmethod
    def _check_finite(x: torch.Tensor, where: str, offset: int = 0) -> None:
        """``x``: (channels, frames); name the first non-finite sample in time order."""
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            first = bad[torch.argmin(bad[:, 1] * x.shape[0] + bad[:, 0])]
            channel, sample = int(first[0]), int(first[1])
            raise InputError(
                f"{where}: sample {offset + sample} (channel {channel}) is {float(x[channel, sample])}: "
                "audio samples must be finite"
            )

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
            raise CorruptFileError(
                f"{path}: not a readable audio file (libsndfile: {reason}); expected WAV, FLAC or OGG"
            ) from None
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
            raise CorruptFileError(
                f"{path}: truncated: its header declares {int(cut.group(1)):,} bytes of samples, "
                f"the file holds {int(cut.group(2)):,}"
            )
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
                raise CorruptFileError(
                    f"{path}: corrupt or truncated: decoding failed within samples "
                    f"[{offset}, {stop}) of {handle.frames} (libsndfile: {reason})"
                ) from None
            if len(data) == 0:
                break
            block = torch.from_numpy(np.ascontiguousarray(data.T))
            self._check_finite(block, path, offset)
            offset += block.shape[1]
            yield block
        if offset < handle.frames:
            raise CorruptFileError(
                f"{path}: truncated: the header declares {handle.frames} frames, only {offset} could be read"
            )

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

    def iter_windows(
        self, path: str | os.PathLike, window: int, block_frames: int = _DEFAULT_BLOCK_FRAMES
    ) -> Iterator[torch.Tensor]:
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
                        yield joined[start : start + window]
                    pending = [joined[full:]] if full < count else []
                    count -= full

            for block in self._read_blocks(handle, path, block_frames):
                y = self._select(block)
                yield from pieces(resampler.push(y) if resampler else y, final=False)
            yield from pieces(resampler.finish() if resampler else torch.zeros(self.out_channels, 0), final=True)

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
            raise ConfigError(f"{path}: cannot tell the audio format from the extension; use one of {sorted(_FORMATS)}")
        if isinstance(raw, Waveform):
            wave = raw
            if sample_rate is not None and sample_rate != wave.sample_rate:
                raise InputError(
                    f"{path}: sample-rate mismatch: the waveform is at {wave.sample_rate} Hz, "
                    f"sample_rate={sample_rate} was asked; resample it first"
                )
        else:
            if isinstance(raw, torch.Tensor) and not raw.is_floating_point():
                raise InputError(
                    f"{path}: write takes float samples, got a {raw.dtype} tensor (decode token ids "
                    "with adapter.decode first)"
                )
            if sample_rate is not None and sample_rate != self.sample_rate:
                raise InputError(
                    f"{path}: sample-rate mismatch: these samples are at the adapter's rate "
                    f"{self.sample_rate} Hz, sample_rate={sample_rate} was asked; resample them or "
                    "pass a Waveform with its own rate"
                )
            wave = Waveform(raw, self.sample_rate, source=path)
        if wave.num_frames == 0:
            raise InputError(f"{path}: refusing to write a waveform with no samples")
        self._check_finite(wave.samples, f"{path} (writing)")
        subtype = subtype or ("VORBIS" if fmt == "OGG" else "PCM_16")
        if not sf.check_format(fmt, subtype):
            raise ConfigError(
                f"{path}: {fmt} files cannot hold subtype {subtype!r}; available: {sorted(sf.available_subtypes(fmt))}"
            )
        samples = wave.samples.detach().cpu()
        if subtype not in ("FLOAT", "DOUBLE"):
            samples = samples.clamp(-1.0, 1.0)
        dtype = torch.float64 if subtype == "DOUBLE" else torch.float32
        data = rearrange(samples.to(dtype), "c t -> t c").numpy()
        buffer = io.BytesIO()
        sf.write(buffer, data, wave.sample_rate, format=fmt, subtype=subtype)
        atomic_write_bytes(path, buffer.getvalue())
