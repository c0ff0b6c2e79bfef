"""Video files for ``VideoAdapter``: numpy arrays, ``.npy`` files (memory-mapped) and folders of image frames (one
file per frame), read a window of frames at a time (``_Frames``), checked, and written. ``VideoFiles`` is the
adapter's file side (a mixin: it checks frames against the adapter's frame size and channels)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import VideoAdapter

__all__ = ["IMAGE_SUFFIXES", "VideoFiles", "natural_key"]

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

    def __init__(self, adapter: VideoAdapter, source) -> None:
        self.adapter = adapter
        self.files: list[Path] | None = None
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            self.where = str(path)
            if path.is_dir():
                self.files = sorted(
                    (
                        p
                        for p in path.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
                    ),
                    key=lambda p: natural_key(p.name),
                )
                if not self.files:
                    raise InputError(
                        f"{path}: the folder holds no image frames (looked for {', '.join(IMAGE_SUFFIXES)})"
                    )
                self.length = len(self.files)
                self.array = None
                return
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file or folder")
            if path.suffix.lower() != ".npy":
                raise InputError(
                    f"{path}: unknown video format {path.suffix!r}: give a .npy file or a folder of "
                    f"image frames ({', '.join(IMAGE_SUFFIXES)})"
                )
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
            raise InputError(
                f"a video must be a numpy array, a torch tensor, a .npy path or a folder of images, "
                f"got {type(source).__name__}"
            )
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
                    raise InputError(
                        f"{path}: frame {index} has image mode {mode!r}; video frames must be 8-bit "
                        "images (L, RGB, RGBA, P, ...)"
                    )
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
            raise InputError(
                f"{path}: frame {index} is {array.shape[0]}x{array.shape[1]} (HxW), the adapter's "
                f"frame_size is {h}x{w}{first}"
            )
        return array


# ------------------------------------------------------------------------------------------------------
# the adapter's file side


class VideoFiles:
    """Frame checks and the file formats of ``VideoAdapter``."""

    # -- checks ----------------------------------------------------------------------------------------
    def _check_layout(self, array: np.ndarray, where: str) -> np.ndarray:
        """Shape and dtype of a whole video (T, H, W, C) (or (T, H, W) for one channel); values are checked
        per window in ``_check_values``."""
        if array.ndim == 3 and self.channels == 1:
            array = array[..., None]
        h, w = self.frame_size
        expect = (h, w, self.channels)
        if array.ndim != 4 or tuple(array.shape[1:]) != expect:
            raise InputError(
                f"{where}: frames have shape {tuple(array.shape)}, expected (T, {h}, {w}, "
                f"{self.channels}) for frame_size={list(self.frame_size)}, channels={self.channels}"
            )
        if not (array.dtype == np.uint8 or array.dtype.kind == "f"):
            raise InputError(
                f"{where}: frames have dtype {array.dtype}; give uint8 pixels (0..255) or float "
                "pixels already scaled to [0, 1]"
            )
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
            raise InputError(
                f"{where}: frame {first_frame + f} has value {chunk[f, y, x, c]} at (row {y}, column "
                f"{x}, channel {c}): {kind}"
            )
        return chunk.astype(np.float32, copy=False)

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
            raise InputError(
                f"{frames.where}: the video has {len(frames)} frames, not a multiple of the tubelet's t={t}"
            )
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
            raise InputError(
                f"{path}: a video is written as a .npy file or a folder of PNG frames, not as one image file"
            )
        path.mkdir(parents=True, exist_ok=True)
        old = [p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if old:
            raise InputError(
                f"{path}: the folder already holds image files ({min(old)}, ...); write a video "
                "into a new or empty folder so that frames of two videos never mix"
            )
        digits = max(6, len(str(len(frames) - 1)))
        for i, frame in enumerate(frames):
            image = Image.fromarray(frame[:, :, 0] if self.channels == 1 else frame, _PIL_MODE[self.channels])
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(path / f"frame_{i:0{digits}d}.png", buffer.getvalue())
