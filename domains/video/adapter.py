"""Video frames: uint8 ``(T, H, W, C)`` clips <-> tubelet patches, a Conv3d tubelet embedding in front of the
continuous-input backbone, and heads for next-frame prediction and clip classification.

Token layout (why streaming is exact and causal in time)
--------------------------------------------------------
A tubelet is ``t`` consecutive frames times a ``ph x pw`` pixel patch. The frames are cut into *time slabs*
of ``t`` frames; each slab holds ``N = (H / ph) * (W / pw)`` tubelets. **One model step is one whole slab**:
its ``N`` tubelets in raster order (row of the patch grid, then column), each flattened in ``(t, ph, pw, C)``
order, side by side, so the encoded sequence is ``(S, width)`` with ``S = T / t`` and
``width = N * t * ph * pw * C``. Because a step never mixes two slabs, step ``s`` sees slabs ``0..s`` only: the
model is causal in time at slab granularity, and cutting a video at any slab boundary and threading the
``RecurrentState`` gives the same outputs as one pass (the backbone's state contract).

Inside the model a ``Conv3d`` with kernel = stride = ``(t, ph, pw)`` (and a GELU) embeds every tubelet to
``embed_dim`` features; a slab's ``N`` embeddings, in raster order, are one ``N * embed_dim`` input vector of a
``seqlab.models.SequenceModel`` (input projection -> backbone). Heads on its hidden states:

- ``task="next_frame"``: per step, the predicted patches of the *next* slab (same layout as the input), made
  by a linear layer to ``N * embed_dim`` and a ``ConvTranspose3d`` (the embedding's transpose) back to pixels.
- ``task="classify"``: per step, ``num_classes`` logits of the clip's class given the slabs so far; the clip's
  prediction is the last step's logits (with a bidirectional backbone every step has seen the whole clip).

Values: uint8 pixels are scaled to ``[0, 1]`` (``x / 255``, float32); float frames handed in must already be
on that scale. ``decode`` clips to ``[0, 1]``, multiplies by 255 and rounds half to even (``torch.round``), so
``decode(encode(frames))`` returns the uint8 frames exactly.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, InputError, StateError
from seqlab.io import atomic_write_bytes
from seqlab.train import ArraySource

from .base import Adapter, InputSpec, register_adapter

__all__ = ["IMAGE_SUFFIXES", "PatchHead", "TubeletEmbedding", "VideoAdapter", "VideoModel", "VideoSource",
           "moving_square_clips", "natural_key"]

TASKS = ("next_frame", "classify")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_PIL_MODE = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_EIGHT_BIT_MODES = {"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}


def natural_key(name: str) -> list:
    """Sort key that orders ``frame2.png`` before ``frame10.png`` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------------------------
# frame sources: numpy arrays, .npy files (memory-mapped), folders of images (one file per frame)


class _Frames:
    """Random access to the frames of one video, reading only what is asked for."""

    def __init__(self, adapter: "VideoAdapter", source) -> None:
        self.adapter = adapter
        self.files: list[Path] | None = None
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            self.where = str(path)
            if path.is_dir():
                self.files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                                     and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))
                if not self.files:
                    raise InputError(f"{path}: the folder holds no image frames (looked for "
                                     f"{', '.join(IMAGE_SUFFIXES)})")
                self.length = len(self.files)
                self.array = None
                return
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file or folder")
            if path.suffix.lower() != ".npy":
                raise InputError(f"{path}: unknown video format {path.suffix!r}: give a .npy file or a folder of "
                                 f"image frames ({', '.join(IMAGE_SUFFIXES)})")
            if path.stat().st_size == 0:
                raise CorruptFileError(f"{path}: the file is empty (0 bytes), not a .npy array")
            try:
                # mmap: a long video is paged in window by window, never loaded whole; no pickles, ever
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise CorruptFileError(f"{path}: not a readable .npy array: {exc}") from None
        elif isinstance(source, torch.Tensor):
            self.where = "frames"
            array = source.detach().cpu().numpy()
        elif isinstance(source, np.ndarray):
            self.where = "frames"
            array = source
        else:
            raise InputError(f"a video must be a numpy array, a torch tensor, a .npy path or a folder of images, "
                             f"got {type(source).__name__}")
        self.array = adapter._check_layout(array, self.where)
        self.length = self.array.shape[0]

    def __len__(self) -> int:
        return self.length

    def get(self, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` as a checked array (uint8, or float32 already on the [0, 1] scale)."""
        if self.files is None:
            chunk = np.array(self.array[start:stop])  # a copy: only this window leaves the memory map
            return self.adapter._check_values(chunk, self.where, start)
        return np.stack([self._image(i) for i in range(start, stop)])

    def _image(self, index: int) -> np.ndarray:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                mode = image.mode
                if mode not in _EIGHT_BIT_MODES:
                    raise InputError(f"{path}: frame {index} has image mode {mode!r}; video frames must be 8-bit "
                                     "images (L, RGB, RGBA, P, ...)")
                array = np.asarray(image.convert(_PIL_MODE[self.adapter.channels]))
        except InputError:
            raise
        except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
            raise CorruptFileError(f"{path}: frame {index} cannot be read as an image: {exc}") from None
        if array.ndim == 2:
            array = array[:, :, None]
        h, w = self.adapter.frame_size
        if array.shape[:2] != (h, w):
            first = ""
            if index > 0:
                with Image.open(self.files[0]) as image0:
                    first = f"; the first frame {self.files[0].name} is {image0.height}x{image0.width}"
            raise InputError(f"{path}: frame {index} is {array.shape[0]}x{array.shape[1]} (HxW), the adapter's "
                             f"frame_size is {h}x{w}{first}")
        return array


# ------------------------------------------------------------------------------------------------------
# the model


class TubeletEmbedding(nn.Module):
    """``Conv3d`` with kernel = stride = the tubelet, then GELU: frames (b, T, H, W, C) in [0, 1] ->
    (b, S, N * embed_dim), each step the slab's tubelet embeddings in raster order.

    The GELU makes each tubelet's features nonlinear (e.g. "an edge moving right here"), so the backbone's input
    projection can add such local detectors over all positions; with a purely linear embedding a tiny model
    learns position-independent motion far less reliably."""

    def __init__(self, channels: int, tubelet: tuple[int, int, int], embed_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, embed_dim, kernel_size=tubelet, stride=tubelet)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = rearrange(frames, "b t h w c -> b c t h w").to(self.conv.weight.dtype)
        return rearrange(F.gelu(self.conv(x)), "b e s gh gw -> b s (gh gw e)")


class PatchHead(nn.Module):
    """Hidden (b, S, d_model) -> patches of the next slab (b, S, width): a linear map to one ``embed_dim`` code
    per tubelet, then ``ConvTranspose3d`` (the embedding's shape, transposed) from codes to pixels."""

    def __init__(self, d_model: int, channels: int, frame_size: tuple[int, int], tubelet: tuple[int, int, int],
                 embed_dim: int) -> None:
        super().__init__()
        _, ph, pw = tubelet
        self.grid = (frame_size[0] // ph, frame_size[1] // pw)
        self.codes = nn.Linear(d_model, self.grid[0] * self.grid[1] * embed_dim)
        self.pixels = nn.ConvTranspose3d(embed_dim, channels, kernel_size=tubelet, stride=tubelet)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b = hidden.shape[0]
        codes = rearrange(self.codes(hidden), "b s (gh gw e) -> (b s) e 1 gh gw", gh=self.grid[0], gw=self.grid[1])
        pixels = self.pixels(F.gelu(codes))
        return rearrange(pixels, "(b s) c t (gh ph) (gw pw) -> b s (gh gw t ph pw c)", b=b,
                         gh=self.grid[0], gw=self.grid[1])


class VideoModel(nn.Module):
    """Tubelet embedding -> ``SequenceModel`` (input projection + backbone) -> video head.

    ``model(x, state=None, return_state=True)`` takes frames ``(b, T, H, W, C)`` (uint8, or float in [0, 1]) or
    encoded patches ``(b, S, width)`` (what ``VideoAdapter.encode`` returns) and returns a ``ModelOutput``:
    ``.output`` next-slab patches ``(b, S, width)`` or class logits ``(b, S, num_classes)``, ``.state`` the new
    ``RecurrentState`` (None for a bidirectional backbone), ``.hidden`` the backbone's features.
    ``model.step(x, state)`` takes one slab: patches ``(b, width)`` or frames ``(b, t, H, W, C)``.
    """

    def __init__(self, adapter: "VideoAdapter", config: BackboneConfig) -> None:
        super().__init__()
        from seqlab.models import SequenceModel

        if not isinstance(config, BackboneConfig):
            raise ConfigError(f"VideoModel needs a BackboneConfig, got {type(config).__name__}")
        if config.bidirectional and adapter.task != "classify":
            raise ConfigError("BackboneConfig(bidirectional=True) is for task='classify' only: next-frame "
                              "prediction must be causal in time (a bidirectional model would see the answer)")
        self.adapter = adapter
        self.embed = TubeletEmbedding(adapter.channels, adapter.tubelet, adapter.embed_dim)
        self.core = SequenceModel(config, d_input=adapter.tubelets_per_slab * adapter.embed_dim, d_output=None)
        if adapter.task == "next_frame":
            self.head = PatchHead(config.d_model, adapter.channels, adapter.frame_size, adapter.tubelet,
                                  adapter.embed_dim)
        else:
            self.head = nn.Linear(config.d_model, adapter.num_classes)

    # the seqlab model surface: config, fingerprint, states, backends
    @property
    def config(self) -> BackboneConfig:
        return self.core.config

    @property
    def fingerprint(self) -> str:
        return self.core.fingerprint

    def init_state(self, batch_size: int, device=None):
        return self.core.init_state(batch_size, device)

    def set_backend(self, backend: str) -> "VideoModel":
        self.core.set_backend(backend)
        return self

    def _frames(self, x, step: bool) -> torch.Tensor:
        a = self.adapter
        if not isinstance(x, torch.Tensor):
            raise InputError(f"video model input must be a torch.Tensor, got {type(x).__name__}")
        patch_dim = 2 if step else 3
        if x.dim() == patch_dim:  # encoded patches
            if not x.is_floating_point() or x.shape[-1] != a.width:
                layout = "(batch, width)" if step else "(batch, steps, width)"
                raise InputError(f"video patches must be a float tensor {layout} with width={a.width}, got "
                                 f"{x.dtype} {tuple(x.shape)}")
            if step:
                x = x[:, None]
            frames = a.unpatchify(x)
        elif x.dim() == 5:
            frames = x
        else:
            what = "(batch, width) patches or (batch, t, H, W, C) frames" if step else \
                "(batch, steps, width) patches or (batch, T, H, W, C) frames"
            raise InputError(f"video model input must be {what}, got shape {tuple(x.shape)}")
        frames = a._frames_to_float(frames, "input", batched=True)
        if step and frames.shape[1] != a.tubelet[0]:
            raise InputError(f"model.step takes one slab of {a.tubelet[0]} frame(s), got {frames.shape[1]}")
        return frames

    def forward(self, x: torch.Tensor, state=None, return_state: bool = True):
        from seqlab.models import ModelOutput

        if state is not None and self.config.bidirectional:
            raise StateError("a bidirectional video model cannot stream with a carried state: give it the whole "
                             "clip at once with state=None")
        out = self.core(self.embed(self._frames(x, step=False)), state, return_state)
        return ModelOutput(self.head(out.hidden), out.state, out.hidden)

    def step(self, x: torch.Tensor, state=None):
        """One slab per sequence; returns ``.output`` of shape (b, width) or (b, num_classes)."""
        from seqlab.models import ModelOutput

        if self.config.bidirectional:
            raise StateError("a bidirectional video model cannot step: give it the whole clip at once")
        out = self.core.step(self.embed(self._frames(x, step=True))[:, 0], state)
        return ModelOutput(self.head(out.hidden[:, None])[:, 0], out.state, out.hidden)


# ------------------------------------------------------------------------------------------------------
# the adapter


def _int_tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n:
        raise ConfigError(f"VideoAdapter.{name} must be a sequence of {n} positive ints, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in value):
        raise ConfigError(f"VideoAdapter.{name} must hold positive ints, got {value!r}")
    return tuple(int(v) for v in value)


@register_adapter
class VideoAdapter(Adapter):
    """Video clips of ``frame_size`` (H, W) and ``channels`` (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA), embedded
    by tubelets of ``tubelet`` (t, ph, pw) frames x pixels into ``embed_dim`` features each.

    ``task="next_frame"``: predict the next slab's patches (MSE loss; metric per-pixel MSE on the [0, 1] scale;
    ``psnr`` gives dB). ``task="classify"``: one of ``num_classes`` labels per clip (cross-entropy over every
    step; metric the last step's cross-entropy in bits; ``accuracy`` gives the fraction right).
    """

    name: ClassVar[str] = "video"

    def __init__(self, frame_size: Sequence[int] = (64, 64), channels: int = 3,
                 tubelet: Sequence[int] = (1, 8, 8), task: str = "next_frame", num_classes: int | None = None,
                 embed_dim: int = 32) -> None:
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
            raise ConfigError(f"VideoAdapter.num_classes is for task='classify', got {num_classes!r} with "
                              f"task={task!r}")
        self.num_classes = num_classes
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ConfigError(f"VideoAdapter.embed_dim must be a positive int, got {embed_dim!r}")
        self.embed_dim = embed_dim
        (h, w), (_, ph, pw) = self.frame_size, self.tubelet
        if h % ph or w % pw:
            raise ConfigError(f"VideoAdapter.frame_size {h}x{w} must be divisible by the tubelet's patch {ph}x{pw}")

    # -- identity --------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"frame_size": list(self.frame_size), "channels": self.channels, "tubelet": list(self.tubelet),
                "task": self.task, "num_classes": self.num_classes, "embed_dim": self.embed_dim}

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
            raise InputError(f"the video has {frames.shape[-4]} frames, not a multiple of the tubelet's t={t}: "
                             f"trim it to {frames.shape[-4] - frames.shape[-4] % t} frames")
        return rearrange(frames, "... (s t) (gh ph) (gw pw) c -> ... s (gh gw t ph pw c)", t=t, ph=ph, pw=pw)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (S, width) or (b, S, width) -> frames (S*t, H, W, C) or (b, S*t, H, W, C)."""
        if patches.shape[-1] != self.width:
            raise InputError(f"patches have width {patches.shape[-1]}, this adapter's is {self.width}")
        t, ph, pw = self.tubelet
        gh, gw = self.frame_size[0] // ph, self.frame_size[1] // pw
        return rearrange(patches, "... s (gh gw t ph pw c) -> ... (s t) (gh ph) (gw pw) c",
                         gh=gh, gw=gw, t=t, ph=ph, pw=pw)

    # -- checks ----------------------------------------------------------------------------------------
    def _check_layout(self, array: np.ndarray, where: str) -> np.ndarray:
        """Shape and dtype of a whole video (T, H, W, C) (or (T, H, W) for one channel); values are checked
        per window in ``_check_values``."""
        if array.ndim == 3 and self.channels == 1:
            array = array[..., None]
        h, w = self.frame_size
        expect = (h, w, self.channels)
        if array.ndim != 4 or tuple(array.shape[1:]) != expect:
            raise InputError(f"{where}: frames have shape {tuple(array.shape)}, expected (T, {h}, {w}, "
                             f"{self.channels}) for frame_size={list(self.frame_size)}, channels={self.channels}")
        if not (array.dtype == np.uint8 or array.dtype.kind == "f"):
            raise InputError(f"{where}: frames have dtype {array.dtype}; give uint8 pixels (0..255) or float "
                             "pixels already scaled to [0, 1]")
        if array.shape[0] == 0:
            raise InputError(f"{where}: the video has no frames")
        return array

    def _check_values(self, chunk: np.ndarray, where: str, first_frame: int) -> np.ndarray:
        if chunk.dtype == np.uint8:
            return chunk
        bad = ~np.isfinite(chunk)
        kind = "not finite"
        if not bad.any():
            bad = (chunk < 0) | (chunk > 1)
            kind = "outside [0, 1] (float frames must be pixels / 255)"
        if bad.any():
            f, y, x, c = (int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"{where}: frame {first_frame + f} has value {chunk[f, y, x, c]} at (row {y}, column "
                             f"{x}, channel {c}): {kind}")
        return chunk.astype(np.float32, copy=False)

    def _frames_to_float(self, frames: torch.Tensor, where: str, batched: bool = False) -> torch.Tensor:
        h, w = self.frame_size
        dims = 5 if batched else 4
        if frames.dim() != dims or tuple(frames.shape[-3:]) != (h, w, self.channels):
            layout = "(batch, T, H, W, C)" if batched else "(T, H, W, C)"
            raise InputError(f"{where}: frames must be {layout} with H, W, C = {h}, {w}, {self.channels}, got "
                             f"shape {tuple(frames.shape)}")
        if frames.dtype == torch.uint8:
            return frames.float() / 255.0
        if not frames.is_floating_point():
            raise InputError(f"{where}: frames have dtype {frames.dtype}; give uint8 pixels or float pixels in "
                             "[0, 1]")
        bad = ~torch.isfinite(frames)
        kind = "not finite"
        if not bool(bad.any()):
            bad = (frames < 0) | (frames > 1)
            kind = "outside [0, 1] (float frames must be pixels / 255)"
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            prefix = f"clip {idx[0]}, " if batched else ""
            f, y, x, c = idx[-4:]
            raise InputError(f"{where}: {prefix}frame {f} has value {float(frames[idx])} at (row {y}, column {x}, "
                             f"channel {c}): {kind}")
        return frames

    # -- the modality ----------------------------------------------------------------------------------
    def encode(self, raw) -> torch.Tensor:
        """Frames (T, H, W, C) (numpy or torch; uint8, or float in [0, 1]; (T, H, W) when channels=1) ->
        patches (S, width) float32 on the [0, 1] scale."""
        if isinstance(raw, (str, os.PathLike)):
            raise InputError(f"encode takes frames, got the path {os.fspath(raw)!r}: read a file with "
                             "adapter.read(path) or stream it with adapter.iter_windows(path, window)")
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
                raise InputError(f"frames[{i}] has shape {a.shape} and dtype {a.dtype}, frames[0] has "
                                 f"{arrays[0].shape} and {arrays[0].dtype}")
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
            what = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                    else type(tensor).__name__)
            raise InputError(f"decode takes float patches (S, width) or (b, S, width), got {what}")
        if torch.isnan(tensor).any():
            idx = tuple(int(i) for i in torch.isnan(tensor).nonzero()[0])
            raise InputError(f"decode: patches{list(idx)} is NaN")
        frames = self.unpatchify(tensor.detach().float().cpu())
        return torch.round(frames.clamp(0.0, 1.0) * 255.0).to(torch.uint8).numpy()

    # -- files -----------------------------------------------------------------------------------------
    def num_frames(self, path: str | os.PathLike) -> int:
        """Frames in a .npy file or image folder (reads the header / lists the folder only)."""
        return len(_Frames(self, path))

    def read(self, path: str | os.PathLike, **options) -> np.ndarray:
        """The whole video as frames (T, H, W, C): uint8, or float32 in [0, 1] for a float .npy."""
        frames = _Frames(self, path)
        return np.array(frames.get(0, len(frames)))

    def iter_frames(self, source, window: int) -> Iterator[np.ndarray]:
        """Frames (T_w, H, W, C) ``window`` at a time (the last may be shorter) from a .npy file (memory-mapped),
        an image folder (one file per frame) or an array; only one window is in memory at a time."""
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ConfigError(f"window must be a positive int (frames), got {window!r}")
        frames = _Frames(self, source)
        for start in range(0, len(frames), window):
            yield frames.get(start, min(start + window, len(frames)))

    def iter_windows(self, path: str | os.PathLike, window: int, **options) -> Iterator[torch.Tensor]:
        """Encoded patches (S_w, width), ``window`` model steps (slabs of ``t`` frames) at a time, streaming;
        ``torch.cat(list(iter_windows(path, w)))`` equals ``encode(read(path))``."""
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ConfigError(f"window must be a positive int (model steps), got {window!r}")
        t = self.tubelet[0]
        frames = _Frames(self, path)
        if len(frames) % t:
            raise InputError(f"{frames.where}: the video has {len(frames)} frames, not a multiple of the tubelet's "
                             f"t={t}")
        for start in range(0, len(frames), window * t):
            yield self._encode_chunk(frames.get(start, min(start + window * t, len(frames))))

    def write(self, path: str | os.PathLike, raw) -> None:
        """``*.npy``: one array file. Any other path: a folder of PNG frames ``frame_000000.png``, ... (created;
        it must not already hold image files). Every file is written atomically."""
        from PIL import Image

        frames = self.read(raw) if isinstance(raw, (str, os.PathLike)) else _Frames(self, raw)
        if isinstance(frames, _Frames):
            frames = frames.get(0, len(frames))
        if frames.dtype != np.uint8:  # float frames in [0, 1] are stored as the pixels they round to
            frames = torch.round(torch.from_numpy(np.asarray(frames, dtype=np.float32)) * 255.0).to(torch.uint8)
            frames = frames.numpy()
        path = Path(path)
        if path.suffix.lower() == ".npy":
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
            atomic_write_bytes(path, buffer.getvalue())
            return
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{path}: a video is written as a .npy file or a folder of PNG frames, not as one "
                             "image file")
        path.mkdir(parents=True, exist_ok=True)
        old = [p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if old:
            raise InputError(f"{path}: the folder already holds image files ({min(old)}, ...); write a video "
                             "into a new or empty folder so that frames of two videos never mix")
        digits = max(6, len(str(len(frames) - 1)))
        for i, frame in enumerate(frames):
            image = Image.fromarray(frame[:, :, 0] if self.channels == 1 else frame, _PIL_MODE[self.channels])
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(path / f"frame_{i:0{digits}d}.png", buffer.getvalue())

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
            raise StateError("a bidirectional video model cannot stream a video window by window: it needs the "
                             "whole clip at once (model(clip) with state=None)")
        device = next(model.parameters()).device
        for patches in self.iter_windows(source, window):
            out = model(patches[None].to(device), state)
            state = out.state
            yield out

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
        return F.cross_entropy(rearrange(pred, "b s k -> (b s) k"),
                               labels[:, None].expand(-1, pred.shape[1]).reshape(-1))

    def _labels(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise InputError(f"classify needs logits (b, steps, {self.num_classes}) and labels (b,), got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
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
                    raise InputError(f"predicted patches {tuple(pred.shape)} and targets {tuple(targets.shape)} "
                                     "differ")
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
        last = frames[..., t - 1::t, :, :, :]
        guess = self.patchify(torch.repeat_interleave(last, t, dim=-4))
        return float(F.mse_loss(guess, targets.float()))

    def uniform_baseline(self) -> float | None:
        """classify: log2(num_classes) bits (a guess). next_frame: None, the reference depends on the video;
        use ``copy_baseline``."""
        return math.log2(self.num_classes) if self.task == "classify" else None


# ------------------------------------------------------------------------------------------------------
# training data


class VideoSource(ArraySource):
    """Trainer windows from a set of clips (n, T, H, W, C) (uint8 or float [0, 1]; numpy, memmap or torch).

    Clips go ``batch_size`` at a time. ``task="next_frame"``: each batch of clips is cut into windows of
    ``window`` steps (None: the whole clip), inputs the patches at steps ``[i*window, (i+1)*window)`` and targets
    the same shifted by one step; the windows of one batch come in time order, so ``carry_state=True`` threads
    the state through each clip (use ``n == batch_size`` for one long video cut into streams, or whole-clip
    windows with ``carry_state=False``). ``task="classify"``: inputs whole clips, targets ``labels`` (n,).
    Only the clips of the window asked for are read and encoded (``seqlab.train.ArraySource`` cuts the
    windows: the clips are its streams of slabs).
    """

    dtype = None  # spans stay raw frames; ``window`` encodes them

    def __init__(self, adapter: VideoAdapter, clips, batch_size: int, window: int | None = None,
                 labels=None) -> None:
        if isinstance(clips, torch.Tensor):
            clips = clips.detach().cpu().numpy()
        if not isinstance(clips, np.ndarray) or clips.ndim != 5:
            raise InputError(f"VideoSource clips must be an array (n, T, H, W, C), got "
                             f"{getattr(clips, 'shape', type(clips).__name__)}")
        self.adapter, self.clips, batch_size = adapter, clips, int(batch_size)
        if clips.shape[0] // batch_size == 0:
            raise InputError(f"VideoSource has {clips.shape[0]} clips, fewer than batch_size={batch_size}")
        t = adapter.tubelet[0]
        steps = clips.shape[1] // t
        if adapter.task == "classify":
            if labels is None:
                raise InputError("VideoSource for task='classify' needs labels (one per clip)")
            self.labels = torch.as_tensor(np.asarray(labels)).long()
            if self.labels.shape != (clips.shape[0],):
                raise InputError(f"VideoSource labels have shape {tuple(self.labels.shape)}, expected "
                                 f"({clips.shape[0]},)")
            if window is not None:
                raise ConfigError("VideoSource window is for task='next_frame'; classify windows are whole clips")
            self.overlap, window = 0, steps
        else:
            self.labels = None
            window = steps - 1 if window is None else int(window)
            if window <= 0:
                raise InputError(f"VideoSource clips of {clips.shape[1]} frames are too short: next-frame needs at "
                                 f"least two slabs of {t} frame(s)")
            if (steps - 1) // window == 0:
                raise InputError(f"VideoSource clips have {steps} steps, too few for one window of {window}+1")
        groups = clips.shape[0] // batch_size
        slabs = clips[:groups * batch_size, :steps * t]  # a view: nothing is read yet
        self._setup(clips, slabs.reshape(slabs.shape[0], steps, t, *slabs.shape[2:]), batch_size, window)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.span(index)  # (batch, steps, t, H, W, C) raw frames
        a = self.adapter
        patches = torch.stack([a.encode(clip.reshape(-1, *clip.shape[2:])) for clip in chunk])
        if a.task == "classify":
            group = index // self.per_group
            return patches, self.labels[group * self.batch_size:(group + 1) * self.batch_size]
        return patches[:, :-1], patches[:, 1:]


# ------------------------------------------------------------------------------------------------------
# synthetic data for tests, docs and examples


DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx): right, left, down, up


def moving_square_clips(n: int, frames: int, size: int = 16, square: int = 4, channels: int = 1,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 clips (n, frames, size, size, channels): a bright square on a dark, faintly textured
    background moving one pixel per frame in one of four directions (wrapping at the edges), and the direction
    labels (n,) (0 right, 1 left, 2 down, 3 up). Start positions and directions are drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DIRECTIONS), size=n)
    starts = rng.integers(0, size, size=(n, 2))
    clips = np.zeros((n, frames, size, size, channels), dtype=np.uint8)
    background = rng.integers(0, 40, size=(n, 1, size, size, channels), dtype=np.uint8)
    clips[:] = background
    yy, xx = np.arange(square)[:, None], np.arange(square)[None, :]
    for i in range(n):
        dy, dx = DIRECTIONS[labels[i]]
        for f in range(frames):
            y0, x0 = starts[i, 0] + dy * f, starts[i, 1] + dx * f
            clips[i, f, (y0 + yy) % size, (x0 + xx) % size, :] = 220
    return clips, labels
