"""``AudioAdapter``: audio waveforms <-> 8-bit mu-law token ids or continuous float frames, its models' losses and
metrics, and its training source. File reading and writing live in ``files.py``, resampling in ``resample.py``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from seqlab.errors import ConfigError, InputError

from ..base import Adapter, InputSpec, register_adapter, token_bits
from .files import AudioFiles, Waveform
from .resample import StreamingResampler, _torchaudio_functional

__all__ = ["PCM16_STEP", "AudioAdapter"]

#: width of one 16-bit PCM level on the [-1, 1) scale: the bin the continuous metric is measured on
PCM16_STEP = 2.0**-15


# ------------------------------------------------------------------------------------------------------
# the adapter


@register_adapter
class AudioAdapter(AudioFiles, Adapter):
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

    def __init__(
        self,
        sample_rate: int = 16000,
        mode: str = "mulaw",
        channels: str | int = "mix",
        num_channels: int | None = None,
        mu: int = 256,
        resample: bool = True,
    ) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ConfigError(f"AudioAdapter.sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if mode not in self.MODES:
            raise ConfigError(f"AudioAdapter.mode must be one of {self.MODES}, got {mode!r}")
        if isinstance(channels, bool) or not (
            channels in ("mix", "keep") or (isinstance(channels, int) and channels >= 0)
        ):
            raise ConfigError(f"AudioAdapter.channels must be 'mix', 'keep' or a channel index >= 0, got {channels!r}")
        if channels == "keep":
            if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
                raise ConfigError(
                    "AudioAdapter(channels='keep') needs num_channels, the channel count every file "
                    f"must have (it fixes the model's input), got {num_channels!r}"
                )
        elif num_channels is not None:
            raise ConfigError(
                f"AudioAdapter.num_channels only applies to channels='keep' (channels={channels!r} "
                f"gives one channel), got {num_channels!r}"
            )
        if isinstance(mu, bool) or not isinstance(mu, int) or not 2 <= mu <= 65536:
            raise ConfigError(f"AudioAdapter.mu (quantisation levels) must be an int in [2, 65536], got {mu!r}")
        if not isinstance(resample, bool):
            raise ConfigError(f"AudioAdapter.resample must be True or False, got {resample!r}")
        self.sample_rate, self.mode, self.channels = sample_rate, mode, channels
        self.num_channels, self.mu, self.resample = num_channels, mu, resample

    # -- identity --------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "mode": self.mode,
            "channels": self.channels,
            "num_channels": self.num_channels,
            "mu": self.mu,
            "resample": self.resample,
        }

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
            raise InputError(
                f"sample-rate mismatch: the model was trained on audio at {theirs.get('sample_rate')} "
                f"Hz, this adapter encodes at {self.sample_rate} Hz; use AudioAdapter.from_model(model)"
            )
        # ``resample`` only decides which files are accepted; every other setting changes what an input means
        differ = {k: (theirs.get(k), v) for k, v in self.settings().items() if k != "resample" and theirs.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: model {a!r} vs adapter {b!r}" for k, (a, b) in differ.items())
            raise InputError(
                f"the model was trained with other audio settings ({listed}); use AudioAdapter.from_model(model)"
            )

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        """(file channels, frames) -> (out_channels, frames)."""
        if self.channels == "mix":
            return x.mean(0, keepdim=True) if x.shape[0] > 1 else x
        if self.channels == "keep":
            return x
        return x[self.channels : self.channels + 1]

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
            raise InputError(
                f"sample-rate mismatch: these samples were encoded at {self.sample_rate} Hz, "
                f"decode was asked for {sample_rate} Hz; decode, then resample the Waveform"
            )
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"decode takes a torch tensor, got {type(tensor).__name__}")
        channels = self.out_channels
        if self.mode == "continuous":
            if not tensor.is_floating_point() or tensor.dim() != 2 or tensor.shape[1] != channels:
                raise InputError(
                    f"continuous-mode decode takes float frames (frames, {channels}), got "
                    f"{tensor.dtype} {tuple(tensor.shape)}"
                )
            samples = rearrange(tensor.detach().cpu().float(), "t c -> c t").contiguous()
            self._check_finite(samples, "frames")
            return Waveform(samples, self.sample_rate)
        ids = tensor.detach().cpu()
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
            raise InputError(f"mu-law decode takes 1-D integer ids, got {ids.dtype} {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.mu)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise InputError(
                f"ids: id {int(ids[first])} at position {first} (frame {first // channels}, channel "
                f"{first % channels}) is outside [0, {self.mu})"
            )
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
            raise InputError(
                f"continuous audio head output must be (..., {2 * channels}) with targets (..., "
                f"{channels}) of the same leading shape, got {tuple(out.shape)} and "
                f"{tuple(targets.shape)}"
            )
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
        return out[..., : self.out_channels].float()

    def source(self, data: torch.Tensor, batch_size: int, window: int, **options):
        """A ``Trainer`` data source over an encoded signal: ``SequenceSource`` for ids (trimmed so every stream
        starts on a frame boundary when channels are interleaved), ``FrameSource`` for frames."""
        if self.mode == "continuous" or options:
            return super().source(data, batch_size, window, **options)
        step = batch_size * self.out_channels
        return super().source(data[: data.shape[0] - data.shape[0] % step], batch_size, window)
