"""Streaming resampling: ``torchaudio.functional.resample`` fed piece by piece with the whole-signal result, so
an audio file read window by window gives bit for bit the samples of a whole-file read."""

from __future__ import annotations

import math

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError

__all__ = ["StreamingResampler"]

# A polyphase filter bank larger than this (rates with a small common divisor, e.g. 44100 -> 16001) would
# allocate gigabytes inside torchaudio; refuse it with a clear message instead.
_MAX_FILTER_TAPS = 50_000_000


def _torchaudio_functional():
    try:
        import torchaudio.functional as taf
    except ImportError as exc:  # pragma: no cover
        raise ImportError("seqlab.domains.audio needs torchaudio: pip install 'seqlab[audio]'") from exc
    return taf


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

    def __init__(
        self,
        orig_rate: int,
        new_rate: int,
        channels: int,
        group_frames: int = 32768,
        lowpass_filter_width: int = 6,
        rolloff: float = 0.99,
    ) -> None:
        for name, value in (
            ("orig_rate", orig_rate),
            ("new_rate", new_rate),
            ("channels", channels),
            ("group_frames", group_frames),
            ("lowpass_filter_width", lowpass_filter_width),
        ):
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
            raise ConfigError(
                f"resampling {self.orig_rate} Hz -> {self.new_rate} Hz: the rates' gcd is {gcd}, "
                f"so the polyphase filter would need {taps:,} taps; resample to a rate with a larger "
                "common divisor first"
            )
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
        seg = self._buffer[:, : self.segment_len]
        if seg.shape[1] < self.segment_len:  # the end of the signal: zeros, as the whole-signal padding
            seg = torch.cat([seg, seg.new_zeros(self.channels, self.segment_len - seg.shape[1])], 1)
        out = _torchaudio_functional().resample(
            seg, self.orig_rate, self.new_rate, self.lowpass_filter_width, self.rolloff
        )
        self._buffer = self._buffer[:, self.group * self.o :]
        return out[:, self.left_blocks * self.n : (self.left_blocks + self.group) * self.n]

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """Take the next ``(channels, frames)`` input samples; return the outputs that are now final."""
        if self._finished:
            raise InputError("StreamingResampler.push after finish(): make a new resampler for a new signal")
        if x.dim() != 2 or x.shape[0] != self.channels or not x.is_floating_point():
            raise InputError(
                f"StreamingResampler expects float ({self.channels}, frames) input, got {tuple(x.shape)} {x.dtype}"
            )
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
