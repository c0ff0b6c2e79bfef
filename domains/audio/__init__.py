"""seqlab.domains.audio: audio waveforms: WAV / FLAC / OGG files <-> 8-bit mu-law token ids or continuous float frames.

Reading goes through soundfile (libsndfile), block by block; resampling to the model rate uses
``torchaudio.functional.resample`` on fixed-size overlapping segments (``StreamingResampler``), so a file read
window by window gives bit for bit the ids (or frames) of a whole-file read; quantisation uses torchaudio's
``mu_law_encoding`` / ``mu_law_decoding``. torchaudio's own ``load`` is not used (in torchaudio >= 2.9 it needs
TorchCodec). soundfile and torchaudio are imported when first needed (``pip install seqlab[audio]``).

See docs/domains/audio.md for the formats, options, metric and a runnable example.
"""

from seqlab.windows import FrameSource

from .adapter import PCM16_STEP, AudioAdapter
from .files import Waveform
from .resample import StreamingResampler

__all__ = ["PCM16_STEP", "AudioAdapter", "FrameSource", "StreamingResampler", "Waveform"]
