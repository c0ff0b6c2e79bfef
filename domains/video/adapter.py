"""``VideoAdapter``: video clips <-> tubelet patches (layout, checks, encode/decode), its model, losses and metrics,
streaming and training source. Files live in ``files.py``, the model in ``model.py``."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError, StateError

from ..base import Adapter, InputSpec, register_adapter
from .files import _PIL_MODE, VideoFiles, _Frames
from .model import VideoModel
from .sources import VideoSource

__all__ = ["VideoAdapter"]

TASKS = ("next_frame", "classify")


def _int_tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n:
        raise ConfigError(f"VideoAdapter.{name} must be a sequence of {n} positive ints, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in value):
        raise ConfigError(f"VideoAdapter.{name} must hold positive ints, got {value!r}")
    return tuple(int(v) for v in value)


@register_adapter
class VideoAdapter(VideoFiles, Adapter):
    """Video clips of ``frame_size`` (H, W) and ``channels`` (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA), embedded
    by tubelets of ``tubelet`` (t, ph, pw) frames x pixels into ``embed_dim`` features each.

    ``task="next_frame"``: predict the next slab's patches (MSE loss; metric per-pixel MSE on the [0, 1] scale;
    ``psnr`` gives dB). ``task="classify"``: one of ``num_classes`` labels per clip (cross-entropy over every
    step; metric the last step's cross-entropy in bits; ``accuracy`` gives the fraction right).
    """

    name: ClassVar[str] = "video"

    def __init__(
        self,
        frame_size: Sequence[int] = (64, 64),
        channels: int = 3,
        tubelet: Sequence[int] = (1, 8, 8),
        task: str = "next_frame",
        num_classes: int | None = None,
        embed_dim: int = 32,
    ) -> None:
        self.frame_size = _int_tuple(frame_size, 2, "frame_size")
        self.tubelet = _int_tuple(tubelet, 3, "tubelet")
        if channels not in _PIL_MODE or isinstance(channels, bool):
            raise ConfigError(f"VideoAdapter.channels must be 1, 2, 3 or 4, got {channels!r}")
        self.channels = int(channels)
        if task not in TASKS:
            raise ConfigError(f"VideoAdapter.task must be one of {TASKS}, got {task!r}")
        self.task = task
        if task == "classify":
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ConfigError(f"VideoAdapter(task='classify') needs num_classes >= 2, got {num_classes!r}")
        elif num_classes is not None:
            raise ConfigError(
                f"VideoAdapter.num_classes is for task='classify', got {num_classes!r} with task={task!r}"
            )
        self.num_classes = num_classes
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ConfigError(f"VideoAdapter.embed_dim must be a positive int, got {embed_dim!r}")
        self.embed_dim = embed_dim
        (h, w), (_, ph, pw) = self.frame_size, self.tubelet
        if h % ph or w % pw:
            raise ConfigError(f"VideoAdapter.frame_size {h}x{w} must be divisible by the tubelet's patch {ph}x{pw}")

    # -- identity --------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "frame_size": list(self.frame_size),
            "channels": self.channels,
            "tubelet": list(self.tubelet),
            "task": self.task,
            "num_classes": self.num_classes,
            "embed_dim": self.embed_dim,
        }

    @property
    def metric_name(self) -> str:  # type: ignore[override]
        return "mse" if self.task == "next_frame" else "bits_per_clip"

    @property
    def loss_unit(self) -> str:  # type: ignore[override]
        """next_frame: the loss is a mean squared error ("mse"); classify: a cross-entropy, reported in bits."""
        return "mse" if self.task == "next_frame" else "bits"

    # -- layout ----------------------------------------------------------------------------------------
    @property
    def tubelets_per_slab(self) -> int:
        (h, w), (_, ph, pw) = self.frame_size, self.tubelet
        return (h // ph) * (w // pw)

    @property
    def patch_dim(self) -> int:
        t, ph, pw = self.tubelet
        return t * ph * pw * self.channels

    @property
    def width(self) -> int:
        """Features per model step: the whole slab's patches."""
        return self.tubelets_per_slab * self.patch_dim

    @property
    def input_spec(self) -> InputSpec:
        out = self.width if self.task == "next_frame" else self.num_classes
        return InputSpec("continuous", width=self.width, output_width=out)

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (T, H, W, C) or (b, T, H, W, C) -> patches (S, width) or (b, S, width); exact inverse of
        ``unpatchify``. ``T`` must be a multiple of the tubelet's ``t``."""
        t, ph, pw = self.tubelet
        if frames.shape[-4] % t:
            raise InputError(
                f"the video has {frames.shape[-4]} frames, not a multiple of the tubelet's t={t}: "
                f"trim it to {frames.shape[-4] - frames.shape[-4] % t} frames"
            )
        return rearrange(frames, "... (s t) (gh ph) (gw pw) c -> ... s (gh gw t ph pw c)", t=t, ph=ph, pw=pw)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (S, width) or (b, S, width) -> frames (S*t, H, W, C) or (b, S*t, H, W, C)."""
        if patches.shape[-1] != self.width:
            raise InputError(f"patches have width {patches.shape[-1]}, this adapter's is {self.width}")
        t, ph, pw = self.tubelet
        gh, gw = self.frame_size[0] // ph, self.frame_size[1] // pw
        return rearrange(
            patches, "... s (gh gw t ph pw c) -> ... (s t) (gh ph) (gw pw) c", gh=gh, gw=gw, t=t, ph=ph, pw=pw
        )

    def _frames_to_float(self, frames: torch.Tensor, where: str, batched: bool = False) -> torch.Tensor:
        h, w = self.frame_size
        dims = 5 if batched else 4
        if frames.dim() != dims or tuple(frames.shape[-3:]) != (h, w, self.channels):
            layout = "(batch, T, H, W, C)" if batched else "(T, H, W, C)"
            raise InputError(
                f"{where}: frames must be {layout} with H, W, C = {h}, {w}, {self.channels}, got "
                f"shape {tuple(frames.shape)}"
            )
        if frames.dtype == torch.uint8:
            return frames.float() / 255.0
        if not frames.is_floating_point():
            raise InputError(f"{where}: frames have dtype {frames.dtype}; give uint8 pixels or float pixels in [0, 1]")
        bad = ~torch.isfinite(frames)
        kind = "not finite"
        if not bool(bad.any()):
            bad = (frames < 0) | (frames > 1)
            kind = "outside [0, 1] (float frames must be pixels / 255)"
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            prefix = f"clip {idx[0]}, " if batched else ""
            f, y, x, c = idx[-4:]
            raise InputError(
                f"{where}: {prefix}frame {f} has value {float(frames[idx])} at (row {y}, column {x}, "
                f"channel {c}): {kind}"
            )
        return frames

    # -- the modality ----------------------------------------------------------------------------------
    def encode(self, raw) -> torch.Tensor:
        """Frames (T, H, W, C) (numpy or torch; uint8, or float in [0, 1]; (T, H, W) when channels=1) ->
        patches (S, width) float32 on the [0, 1] scale."""
        if isinstance(raw, (str, os.PathLike)):
            raise InputError(
                f"encode takes frames, got the path {os.fspath(raw)!r}: read a file with "
                "adapter.read(path) or stream it with adapter.iter_windows(path, window)"
            )
        if isinstance(raw, (list, tuple)):
            raw = self._stack(raw)
        frames = _Frames(self, raw)
        return self._encode_chunk(frames.get(0, len(frames)))

    def _stack(self, frames: Sequence) -> np.ndarray:
        if not frames:
            raise InputError("frames: the video has no frames")
        arrays = [f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f) for f in frames]
        for i, a in enumerate(arrays):
            if a.shape != arrays[0].shape or a.dtype != arrays[0].dtype:
                raise InputError(
                    f"frames[{i}] has shape {a.shape} and dtype {a.dtype}, frames[0] has "
                    f"{arrays[0].shape} and {arrays[0].dtype}"
                )
        return np.stack(arrays)

    def _encode_chunk(self, chunk: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(chunk))
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        return self.patchify(tensor)

    def decode(self, tensor) -> np.ndarray:
        """Patches (S, width) or (b, S, width) (inputs, or a next-frame model's predictions / ``ModelOutput``)
        -> uint8 frames (T, H, W, C) or (b, T, H, W, C): clip to [0, 1], times 255, round half to even."""
        if hasattr(tensor, "output"):
            tensor = tensor.output
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (2, 3):
            what = (
                f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            )
            raise InputError(f"decode takes float patches (S, width) or (b, S, width), got {what}")
        if torch.isnan(tensor).any():
            idx = tuple(int(i) for i in torch.isnan(tensor).nonzero()[0])
            raise InputError(f"decode: patches{list(idx)} is NaN")
        frames = self.unpatchify(tensor.detach().float().cpu())
        return torch.round(frames.clamp(0.0, 1.0) * 255.0).to(torch.uint8).numpy()

    # -- models, losses, metrics -----------------------------------------------------------------------
    def build_model(self, config: BackboneConfig, **options) -> VideoModel:
        """A ``VideoModel`` (Conv3d tubelet embedding -> SequenceModel -> head) stamped with ``adapter_info``."""
        if options:
            raise ConfigError(f"VideoAdapter.build_model takes no options, got {sorted(options)}")
        model = VideoModel(self, config)
        model.adapter_info = self.info()
        return model

    def stream(self, model: VideoModel, source, window: int, state=None) -> Iterator[Any]:
        """Run a causal ``model`` over a long video ``window`` steps at a time with the state carried; yields one
        ``ModelOutput`` per window (its ``.state`` continues the video). Equal to one pass over the whole video."""
        if model.config.bidirectional:
            raise StateError(
                "a bidirectional video model cannot stream a video window by window: it needs the "
                "whole clip at once (model(clip) with state=None)"
            )
        from seqlab.streaming import stream_pieces

        # the one streaming routine; gradients as the caller has them (a training loop may stream too)
        steps = stream_pieces(
            model, self.iter_windows(source, window), state=state, adapter=self, grad=torch.is_grad_enabled()
        )
        for step in steps:
            yield step.output

    @staticmethod
    def _output(output) -> torch.Tensor:
        return output.output if hasattr(output, "output") else output

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """next_frame: mean squared error of predicted vs. next-slab patches ([0, 1] scale). classify:
        cross-entropy of every step's logits against the clip's label ``targets`` (b,)."""
        pred = self._output(output).float()
        if self.task == "next_frame":
            if pred.shape != targets.shape:
                raise InputError(f"predicted patches {tuple(pred.shape)} and targets {tuple(targets.shape)} differ")
            return F.mse_loss(pred, targets.float())
        labels = self._labels(pred, targets)
        return F.cross_entropy(
            rearrange(pred, "b s k -> (b s) k"), labels[:, None].expand(-1, pred.shape[1]).reshape(-1)
        )

    def _labels(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise InputError(
                f"classify needs logits (b, steps, {self.num_classes}) and labels (b,), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        bad = (targets < 0) | (targets >= self.num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise InputError(f"label {int(targets[i])} of clip {i} is outside [0, {self.num_classes})")
        return targets.long()

    def metric(self, output, targets: torch.Tensor) -> float:
        """next_frame: per-pixel MSE on the [0, 1] scale. classify: cross-entropy (bits) of the last step's
        logits, i.e. the clip's prediction after the model has seen all of it."""
        pred = self._output(output).float()
        if self.task == "next_frame":
            return float(self.loss(pred, targets))
        labels = self._labels(pred, targets)
        return float(F.cross_entropy(pred[:, -1], labels)) / math.log(2)

    def position_metric(self, output, targets: torch.Tensor) -> torch.Tensor:
        """next_frame: the MSE of every predicted step (b, s). classify: the clip's prediction is its last
        step, so one value per clip (b, 1): the cross-entropy in bits of the last step's logits."""
        with torch.no_grad():
            pred = self._output(output).float()
            if self.task == "next_frame":
                if pred.shape != targets.shape:
                    raise InputError(f"predicted patches {tuple(pred.shape)} and targets {tuple(targets.shape)} differ")
                return ((pred - targets.float()) ** 2).mean(-1)
            labels = self._labels(pred, targets)
            return (F.cross_entropy(pred[:, -1], labels, reduction="none") / math.log(2))[:, None]

    def metric_weight(self, targets: torch.Tensor) -> int:
        """next_frame: every predicted step; classify: every clip (``targets`` are its labels (b,))."""
        return int(targets.shape[0]) if self.task == "classify" else super().metric_weight(targets)

    def source(self, data, batch_size: int, window: int | None, labels=None, **options):
        """A ``Trainer`` source. ``data``: clips (n, T, H, W, C) -> ``VideoSource`` (``window`` steps per window,
        None: whole clips; ``labels`` (n,) for classify); encoded patches (S, width) of one long video ->
        next-slab windows over ``batch_size`` streams of it (``FrameSource``)."""
        clips = isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 5
        if clips:
            if options:
                raise InputError(f"VideoAdapter.source takes no options besides labels, got {sorted(options)}")
            return VideoSource(self, data, batch_size, window, labels=labels)
        if self.task == "classify" or labels is not None:
            raise InputError("VideoAdapter.source for task='classify' needs clips (n, T, H, W, C) and their labels")
        return super().source(data, batch_size, window, **options)

    def accuracy(self, output, labels: torch.Tensor) -> float:
        """classify: fraction of clips whose last-step argmax is the label."""
        pred = self._output(output)
        return float((pred[:, -1].argmax(-1) == self._labels(pred, labels)).float().mean())

    @staticmethod
    def psnr(mse: float) -> float:
        """Peak signal-to-noise ratio in dB for an MSE on the [0, 1] scale (peak 1.0 = pixel 255)."""
        return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)

    def copy_baseline(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """next_frame: the MSE of predicting that nothing moves: every frame of the next slab equals the last
        frame of the current one. A model must beat this to have learned motion."""
        frames = self.unpatchify(inputs.float())
        t = self.tubelet[0]
        last = frames[..., t - 1 :: t, :, :, :]
        guess = self.patchify(torch.repeat_interleave(last, t, dim=-4))
        return float(F.mse_loss(guess, targets.float()))

    def uniform_baseline(self) -> float | None:
        """classify: log2(num_classes) bits (a guess). next_frame: None, the reference depends on the video;
        use ``copy_baseline``."""
        return math.log2(self.num_classes) if self.task == "classify" else None
