"""The video model: a ``Conv3d`` tubelet embedding in front of a continuous-input ``SequenceModel``, and the
next-slab patch head (see the package docstring for the token layout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError, StateError

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import VideoAdapter

__all__ = ["PatchHead", "TubeletEmbedding", "VideoModel"]


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

    def __init__(
        self, d_model: int, channels: int, frame_size: tuple[int, int], tubelet: tuple[int, int, int], embed_dim: int
    ) -> None:
        super().__init__()
        _, ph, pw = tubelet
        self.grid = (frame_size[0] // ph, frame_size[1] // pw)
        self.codes = nn.Linear(d_model, self.grid[0] * self.grid[1] * embed_dim)
        self.pixels = nn.ConvTranspose3d(embed_dim, channels, kernel_size=tubelet, stride=tubelet)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b = hidden.shape[0]
        codes = rearrange(self.codes(hidden), "b s (gh gw e) -> (b s) e 1 gh gw", gh=self.grid[0], gw=self.grid[1])
        pixels = self.pixels(F.gelu(codes))
        return rearrange(
            pixels, "(b s) c t (gh ph) (gw pw) -> b s (gh gw t ph pw c)", b=b, gh=self.grid[0], gw=self.grid[1]
        )


class VideoModel(nn.Module):
    """Tubelet embedding -> ``SequenceModel`` (input projection + backbone) -> video head.

    ``model(x, state=None, return_state=True)`` takes frames ``(b, T, H, W, C)`` (uint8, or float in [0, 1]) or
    encoded patches ``(b, S, width)`` (what ``VideoAdapter.encode`` returns) and returns a ``ModelOutput``:
    ``.output`` next-slab patches ``(b, S, width)`` or class logits ``(b, S, num_classes)``, ``.state`` the new
    ``RecurrentState`` (None for a bidirectional backbone), ``.hidden`` the backbone's features.
    ``model.step(x, state)`` takes one slab: patches ``(b, width)`` or frames ``(b, t, H, W, C)``.
    """

    def __init__(self, adapter: VideoAdapter, config: BackboneConfig) -> None:
        super().__init__()
        from seqlab.models import SequenceModel

        if not isinstance(config, BackboneConfig):
            raise ConfigError(f"VideoModel needs a BackboneConfig, got {type(config).__name__}")
        if config.bidirectional and adapter.task != "classify":
            raise ConfigError(
                "BackboneConfig(bidirectional=True) is for task='classify' only: next-frame "
                "prediction must be causal in time (a bidirectional model would see the answer)"
            )
        self.adapter = adapter
        self.embed = TubeletEmbedding(adapter.channels, adapter.tubelet, adapter.embed_dim)
        self.core = SequenceModel(config, d_input=adapter.tubelets_per_slab * adapter.embed_dim, d_output=None)
        if adapter.task == "next_frame":
            self.head = PatchHead(
                config.d_model, adapter.channels, adapter.frame_size, adapter.tubelet, adapter.embed_dim
            )
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

    def set_backend(self, backend: str) -> VideoModel:
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
                raise InputError(
                    f"video patches must be a float tensor {layout} with width={a.width}, got "
                    f"{x.dtype} {tuple(x.shape)}"
                )
            if step:
                x = x[:, None]
            frames = a.unpatchify(x)
        elif x.dim() == 5:
            frames = x
        else:
            what = (
                "(batch, width) patches or (batch, t, H, W, C) frames"
                if step
                else "(batch, steps, width) patches or (batch, T, H, W, C) frames"
            )
            raise InputError(f"video model input must be {what}, got shape {tuple(x.shape)}")
        frames = a._frames_to_float(frames, "input", batched=True)
        if step and frames.shape[1] != a.tubelet[0]:
            raise InputError(f"model.step takes one slab of {a.tubelet[0]} frame(s), got {frames.shape[1]}")
        return frames

    def forward(self, x: torch.Tensor, state=None, return_state: bool = True):
        from seqlab.models import ModelOutput

        if state is not None and self.config.bidirectional:
            raise StateError(
                "a bidirectional video model cannot stream with a carried state: give it the whole "
                "clip at once with state=None"
            )
        out = self.core(self.embed(self._frames(x, step=False)), state, return_state)
        return ModelOutput(self.head(out.hidden), out.state, out.hidden)

    def step(self, x: torch.Tensor, state=None):
        """One slab per sequence; returns ``.output`` of shape (b, width) or (b, num_classes)."""
        from seqlab.models import ModelOutput

        if self.config.bidirectional:
            raise StateError("a bidirectional video model cannot step: give it the whole clip at once")
        out = self.core.step(self.embed(self._frames(x, step=True))[:, 0], state)
        return ModelOutput(self.head(out.hidden[:, None])[:, 0], out.state, out.hidden)
