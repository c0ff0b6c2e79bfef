"""seqlab.domains.video: uint8 ``(T, H, W, C)`` clips <-> tubelet patches, a Conv3d tubelet embedding in front of
the continuous-input backbone, and heads for next-frame prediction and clip classification.

Package layout: ``adapter.py`` (``VideoAdapter``), ``files.py`` (.npy files and image folders), ``model.py``
(``VideoModel`` and its pieces), ``sources.py`` (``VideoSource``, synthetic ``moving_square_clips``).

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

from .adapter import VideoAdapter
from .files import IMAGE_SUFFIXES, natural_key
from .model import PatchHead, TubeletEmbedding, VideoModel
from .sources import VideoSource, moving_square_clips

__all__ = [
    "IMAGE_SUFFIXES",
    "PatchHead",
    "TubeletEmbedding",
    "VideoAdapter",
    "VideoModel",
    "VideoSource",
    "moving_square_clips",
    "natural_key",
]
