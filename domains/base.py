"""The one small protocol every domain adapter follows (docs/architecture.md, "Data flow").

raw signal -> ``adapter.encode`` -> tensor (token ids, or continuous frames) -> ``model(x, state)`` ->
``(outputs, new_state)`` -> head -> ``adapter.decode`` / ``adapter.metric``.

An adapter knows its modality and nothing about pipelines:

- ``encode(raw)`` / ``decode(tensor)``: the modality's natural value <-> the model's input tensor.
- ``read(path)`` / ``iter_windows(path, window)`` / ``write(path, raw)``: its real file formats; ``iter_windows``
  streams, so a file larger than memory is read window by window, and concatenating its windows equals
  ``encode(read(path))`` (tested for every adapter).
- ``input_spec``: a vocabulary (token models) or a continuous width; ``build_model(config)`` builds the matching
  ``LanguageModel`` / ``SequenceModel`` and stamps it with the adapter's name and settings, which
  ``seqlab.checkpoint.save_model`` then records, so a checkpoint remembers how its inputs were encoded
  (``adapter_from_checkpoint`` rebuilds the adapter).
- ``loss(output, targets)`` (training objective: nats, or a mean squared error when ``loss_unit == "mse"``) and
  ``metric(output, targets)`` (the modality's number: bits per byte, bits per base, bits per sample, ...), both
  on the model output and the next-element targets; ``report_loss`` puts a loss in ``loss_unit`` (bits: nats /
  ln 2). ``position_metric(output, targets)`` is the metric per predicted position, (b, t) float32, so that
  streams of any length combine exactly: its mean is ``metric`` and its count of values ``metric_weight``;
  positions the metric does not count (DNA's special tokens, masked-LM ``-100`` targets) are NaN, so combine
  with ``torch.nansum`` / ``(~isnan).sum()`` (``metric_totals`` does).
- ``continuous``: whether inputs are float frames (``input_spec.kind == "continuous"``) rather than ids; generic
  code asks this (and the other members), never the adapter's name.
- ``source(data, batch_size, window, **options)``: the training source (a ``seqlab.train.WindowSource``) over
  encoded in-memory data (1-D ids or (T, *frame) frames); adapters with their own needs add options.
  ``map_file(path)``: the file's ids memory-mapped when its bytes are its ids (bytes: a file larger than memory
  trains without being read whole), else None; ``split_point(data, i)``: where encoded data may be cut into
  training and held-out parts (a UTF-8 bytes adapter never cuts a character).
- ``fitted(texts)``: the adapter ready for a training run's data (itself, or one that learned its encoding on
  the raw ``texts``: the subword adapter's BPE).
- ``settings()``: JSON-able constructor arguments; ``type(adapter)(**adapter.settings())`` is an equal adapter.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError

# the registry and checkpoint loading live in registry.py; their names stay importable from here
from .registry import (
    ADAPTERS,
    adapter_from_checkpoint,
    adapter_from_info,
    get_adapter,
    model_from_checkpoint,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "InputSpec",
    "TokenAdapter",
    "adapter_from_checkpoint",
    "adapter_from_info",
    "get_adapter",
    "model_from_checkpoint",
    "register_adapter",
    "token_bits",
]


@dataclass(frozen=True)
class InputSpec:
    """What the model eats and emits.

    ``kind="tokens"``: integer ids in ``[0, vocab_size)``, a ``LanguageModel`` with a ``vocab_size`` head.
    ``kind="continuous"``: float frames of ``width`` features, a ``SequenceModel`` with ``output_width`` outputs
    (``None``: the head is the identity and the model returns features).
    """

    kind: str
    vocab_size: int | None = None
    width: int | None = None
    output_width: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "tokens":
            if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
                raise ConfigError(f"InputSpec(kind='tokens') needs vocab_size >= 2, got {self.vocab_size!r}")
        elif self.kind == "continuous":
            if not isinstance(self.width, int) or self.width < 1:
                raise ConfigError(f"InputSpec(kind='continuous') needs width >= 1, got {self.width!r}")
        else:
            raise ConfigError(f"InputSpec.kind must be 'tokens' or 'continuous', got {self.kind!r}")


class Adapter(ABC):
    """Base class of every modality adapter (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    metric_name: ClassVar[str] = "bits_per_element"
    #: the unit the training loss is reported in: "bits" (``loss`` is a likelihood in nats, reported divided by
    #: ln 2) or "mse" (``loss`` is a mean squared error, reported as is)
    loss_unit: ClassVar[str] = "bits"

    # -- identity --------------------------------------------------------------------------------------
    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``type(self)(**self.settings())`` equals ``self``."""

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings()}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.settings() == self.settings()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.settings(), sort_keys=True, default=str)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    # -- the modality ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def input_spec(self) -> InputSpec:
        """Vocabulary or continuous width of the model input."""

    @abstractmethod
    def encode(self, raw) -> torch.Tensor:
        """The modality's value -> the model input tensor (1-D ids, or (T, width) float frames)."""

    @abstractmethod
    def decode(self, tensor: torch.Tensor):
        """Model input (or predicted) tensor -> the modality's value."""

    @abstractmethod
    def read(self, path: str | os.PathLike, **options):
        """The whole file as the modality's value (what ``encode`` takes)."""

    @abstractmethod
    def iter_windows(self, path: str | os.PathLike, window: int, **options) -> Iterator[torch.Tensor]:
        """Stream the encoded file in windows of ``window`` elements (the last may be shorter), reading only a
        bounded amount at a time. ``torch.cat(list(iter_windows(path, w)))`` equals ``encode(read(path))``."""

    @abstractmethod
    def write(self, path: str | os.PathLike, raw) -> None:
        """Write the modality's value to a file of the adapter's format (atomically)."""

    @property
    def continuous(self) -> bool:
        """True when the model input is float frames, False when it is token ids."""
        return self.input_spec.kind == "continuous"

    # -- training data ---------------------------------------------------------------------------------
    def source(self, data, batch_size: int, window: int, **options):
        """A ``seqlab.train.WindowSource`` for the ``Trainer`` over encoded in-memory ``data``: token ids (1-D)
        -> ``SequenceSource``; continuous frames (T, *frame) -> ``FrameSource`` over (T, features). Subclasses
        with special needs override it with this signature and their own ``options``."""
        from seqlab.windows import FrameSource, SequenceSource

        if options:
            raise InputError(f"{type(self).__name__}.source takes no options, got {sorted(options)}")
        if self.continuous:
            if not isinstance(data, torch.Tensor) or data.dim() < 2:
                what = f"shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
                raise InputError(f"{type(self).__name__}.source needs encoded frames (T, *frame), got {what}")
            return FrameSource(data.reshape(data.shape[0], -1).float(), batch_size, window)
        return SequenceSource(data, batch_size, window)

    def fitted(self, texts) -> Adapter:
        """This adapter, ready to encode a training run's data: itself (this default), or, for an adapter that
        learns its encoding from the training data (the subword adapter's BPE), a new adapter learned on
        ``texts`` (an iterable of raw values, what ``encode`` takes). A training run calls it once, before
        anything is encoded; an adapter that needs nothing learned never reads ``texts``."""
        return self

    def map_file(self, path: str | os.PathLike):
        """The file's encoded ids as a read-only numpy memory map when the file's bytes are its ids (then it
        trains and is held out without being read whole: ``source`` and ``split_point`` take the map), or None
        (this default): the file is encoded through ``iter_windows``."""
        return None

    def split_point(self, data, index: int) -> int:
        """Where encoded ``data`` may be cut into ``data[:point]`` (training) and ``data[point:]`` (held out):
        ``index`` (this default), or the nearest valid point before it."""
        return index

    # -- models, losses, metrics -----------------------------------------------------------------------
    def build_model(self, config: BackboneConfig, **options) -> torch.nn.Module:
        """A model whose input and head fit this adapter, stamped with ``adapter_info`` for checkpoints (the
        build ``options`` are recorded under ``adapter_info["model"]``, so ``model_from_checkpoint`` can rebuild
        the same model; they must be JSON-able)."""
        from seqlab.models import LanguageModel, SequenceModel

        spec = self.input_spec
        if spec.kind == "tokens":
            model = LanguageModel(config, vocab_size=spec.vocab_size, **options)
        else:
            model = SequenceModel(config, d_input=spec.width, d_output=spec.output_width, **options)
        model.adapter_info = {**self.info(), "model": dict(options)} if options else self.info()
        return model

    @abstractmethod
    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Training objective (a scalar tensor) of the model output against the next-element targets."""

    @abstractmethod
    def metric(self, output, targets: torch.Tensor) -> float:
        """The modality's number (named ``metric_name``), lower is better."""

    def position_metric(self, output, targets: torch.Tensor) -> torch.Tensor:
        """The metric of every predicted position, (b, t) float32: ``metric`` is its mean and ``metric_weight``
        its number of values; a position the metric does not count is NaN. Every built-in adapter gives the
        true per-position values; this default (for adapters of your own) spreads the window's ``metric``
        evenly over its positions, which keeps means over windows and streams exact."""
        shape = targets.shape[:-1] if self.continuous else targets.shape
        return torch.full(tuple(shape), float(self.metric(output, targets)), dtype=torch.float32, device=targets.device)

    def metric_weight(self, targets: torch.Tensor) -> int:
        """How many targets ``metric`` averages over, so that metrics of consecutive windows combine exactly
        (weighted by this): every target id, or every frame of continuous targets (b, t, width)."""
        return int(targets.shape[:-1].numel()) if self.continuous else int(targets.numel())

    def metric_totals(self, output, targets: torch.Tensor) -> tuple[float, int]:
        """(sum of ``position_metric`` over the positions it counts, their number): add these up over windows
        and divide to get the metric of a whole stream."""
        with torch.no_grad():
            values = self.position_metric(output, targets).double()
            counted = ~torch.isnan(values)
            return float(values[counted].sum()), int(counted.sum())

    def report_loss(self, loss: float) -> float:
        """A value of ``loss(...)`` in ``loss_unit``: nats / ln 2 for ``"bits"``, as is for ``"mse"``."""
        return float(loss) / math.log(2) if self.loss_unit == "bits" else float(loss)

    def uniform_baseline(self) -> float | None:
        """The metric of a model that knows nothing (e.g. 8 bits per byte), or None when it has no meaning."""
        return None


def token_bits(output, targets: torch.Tensor) -> torch.Tensor:
    """-log2 p(target) of every target id under the logits of ``output`` (a ``ModelOutput`` or the logits),
    float32 of the targets' shape; targets of -100 ("not asked") are NaN."""
    logits = output.logits if hasattr(output, "logits") else output
    with torch.no_grad():
        nats = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=-100
        )
        bits = (nats / math.log(2)).reshape(targets.shape)
        return bits.masked_fill(targets == -100, math.nan)


class TokenAdapter(Adapter):
    """An adapter whose inputs are token ids: cross-entropy loss, metric in bits per token."""

    metric_name: ClassVar[str] = "bits_per_token"

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def metric(self, output, targets: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.loss(output, targets)) / math.log(2)

    def position_metric(self, output, targets: torch.Tensor) -> torch.Tensor:
        """-log2 p(target) of every target token, (b, t) float32."""
        return token_bits(output, targets)

    def uniform_baseline(self) -> float | None:
        return math.log2(self.input_spec.vocab_size)

    #: ids that ``decode`` drops or cannot show (padding, masks, framing); generation never samples them
    #: unless asked to (``generation_options(allow_specials=True)``)
    special_ids: ClassVar[tuple[int, ...]] = ()
    #: the id that ends a generated sequence (it is kept in the output and stops the row), or None
    eos_id: ClassVar[int | None] = None

    def generation_options(self, allow_specials: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``generate`` that keep its output decodable by this adapter:
        ``suppress_tokens`` (the special ids, never sampled) and ``eos_token_id`` (stops a row). With
        ``allow_specials=True`` every id may be sampled, and the end token still stops the row."""
        options: dict[str, Any] = {}
        suppressed = [i for i in self.special_ids if i != self.eos_id]
        if suppressed and not allow_specials:
            options["suppress_tokens"] = suppressed
        if self.eos_id is not None:
            options["eos_token_id"] = self.eos_id
        return options

    def check_ids(self, ids: torch.Tensor, where: str = "ids") -> torch.Tensor:
        """Refuse ids outside the vocabulary, naming the first bad position. Any integer dtype is accepted
        (stores hold bytes and bases as uint8); the check runs in int64, so it cannot overflow."""
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InputError(f"{where}: token ids must be an integer tensor, got dtype {ids.dtype}")
        vocab = self.input_spec.vocab_size
        wide = ids.to(torch.int64) if ids.dtype != torch.int64 else ids
        bad = (wide < 0) | (wide >= vocab)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise InputError(f"{where}: id {int(wide[first])} at position {first} is outside [0, {vocab})")
        return ids
