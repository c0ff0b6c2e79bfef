"""``DNAAdapter``: nucleotide sequences <-> ids over ``VOCAB``, the letter policy, decoding, models (plain or
reverse-complement equivariant), loss and bits per base. Files live in ``files.py``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError

from ..base import InputSpec, TokenAdapter, register_adapter, token_bits
from .files import DnaFiles
from .model import RCEquivariantLM
from .vocab import BOS, EOS, IUPAC_AMBIGUOUS, PAD, SPECIALS, TEXT_ENCODING, UNK, VOCAB, A, C, G, N, T

__all__ = ["DNAAdapter"]

_BAD_LETTER = -1  # lookup-table codes that stop encoding with an error
_BAD_IUPAC = -2


@register_adapter
class DNAAdapter(DnaFiles, TokenAdapter):
    """Nucleotide sequences as ids over ``VOCAB`` (``<pad> <mask> <unk> <bos> <eos> A C G T N``).

    Settings (all JSON-able, recorded in checkpoints):

    - ``iupac``: ``"n"`` maps ambiguity codes R Y S W K M B D H V to N; ``"error"`` refuses them.
    - ``invalid``: letters outside IUPAC: ``"error"`` (InputError naming file, record, position), ``"n"`` or
      ``"unk"``.
    - ``lowercase``: soft-masked (lower-case) bases: ``"upper"`` keeps the base (``encode(...,
      return_soft_mask=True)`` returns the mask too) or ``"n"`` hard-masks them to N.
    - ``add_bos_eos``: wrap every record in ``<bos> ... <eos>`` (recommended for files of many short reads).
    """

    name: ClassVar[str] = "dna"
    metric_name: ClassVar[str] = "bits_per_base"
    vocab: ClassVar[tuple[str, ...]] = VOCAB
    # generation samples bases only (decode drops the specials) and stops at <eos>
    special_ids: ClassVar[tuple[int, ...]] = SPECIALS
    eos_id: ClassVar[int | None] = EOS

    def __init__(
        self, iupac: str = "n", invalid: str = "error", lowercase: str = "upper", add_bos_eos: bool = False
    ) -> None:
        for field, value, allowed in (
            ("iupac", iupac, ("n", "error")),
            ("invalid", invalid, ("error", "n", "unk")),
            ("lowercase", lowercase, ("upper", "n")),
        ):
            if value not in allowed:
                raise ConfigError(f"DNAAdapter.{field} must be one of {allowed}, got {value!r}")
        if not isinstance(add_bos_eos, bool):
            raise ConfigError(f"DNAAdapter.add_bos_eos must be True or False, got {add_bos_eos!r}")
        self.iupac, self.invalid, self.lowercase, self.add_bos_eos = iupac, invalid, lowercase, add_bos_eos
        self._lut = self._lookup_table()

    def settings(self) -> dict[str, Any]:
        return {
            "iupac": self.iupac,
            "invalid": self.invalid,
            "lowercase": self.lowercase,
            "add_bos_eos": self.add_bos_eos,
        }

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=len(VOCAB))

    # -- letters -> ids --------------------------------------------------------------------------------
    def _lookup_table(self) -> np.ndarray:
        """byte -> id, or a negative code that makes encoding raise."""
        fallback = {"error": _BAD_LETTER, "n": N, "unk": UNK}[self.invalid]
        lut = np.full(256, fallback, dtype=np.int16)
        upper = {"A": A, "C": C, "G": G, "T": T, "U": T, "N": N}
        upper.update({code: (N if self.iupac == "n" else _BAD_IUPAC) for code in IUPAC_AMBIGUOUS})
        for letter, value in upper.items():
            lut[ord(letter)] = value
            lower = value if self.lowercase == "upper" or value < 0 else N
            lut[ord(letter.lower())] = lower
        return lut

    def _encode_text(self, text: str, record: str, where: str, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Bases of one record (or a piece of one, starting at base ``offset``) -> (ids uint8, soft-mask bool)."""
        raw = np.frombuffer(text.encode(TEXT_ENCODING, errors="replace"), dtype=np.uint8)
        ids = self._lut[raw]
        if ids.size and int(ids.min()) < 0:
            pos = int(np.argmax(ids < 0))
            letter = text[pos]
            if ids[pos] == _BAD_IUPAC:
                why = f"ambiguous IUPAC code {letter!r} (iupac='error'; DNAAdapter(iupac='n') reads it as N)"
            else:
                why = (
                    f"invalid letter {letter!r} (not a nucleotide or IUPAC code; DNAAdapter(invalid='n' or "
                    "'unk') maps such letters instead of raising)"
                )
            raise InputError(f"{where}: record {record}, position {offset + pos + 1} (1-based): {why}")
        soft = (raw >= ord("a")) & (raw <= ord("z"))
        return ids.astype(np.uint8), soft

    def _wrap(self, ids: np.ndarray, soft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.add_bos_eos:
            return ids, soft
        return (
            np.concatenate([np.array([BOS], np.uint8), ids, np.array([EOS], np.uint8)]),
            np.concatenate([[False], soft, [False]]),
        )

    @staticmethod
    def _as_records(raw) -> list[tuple[str, str]]:
        """A str, an (id, sequence) pair, a SeqRecord, or an iterable of those -> [(id, sequence), ...]."""

        def one(item, index):
            if isinstance(item, str):
                return f"#{index + 1}", item
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
                return str(item[0]), item[1]
            if hasattr(item, "seq") and hasattr(item, "id"):  # a Bio.SeqRecord
                return str(item.id), str(item.seq)
            raise InputError(
                f"DNA record {index + 1}: expected a str, an (id, sequence) pair or a SeqRecord, "
                f"got {type(item).__name__}"
            )

        if (
            isinstance(raw, str)
            or (isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], str))
            or hasattr(raw, "seq")
        ):
            return [one(raw, 0)]
        try:
            items = list(raw)
        except TypeError:
            raise InputError(
                f"DNA input must be a str, an (id, sequence) pair, a SeqRecord or an iterable of "
                f"them, got {type(raw).__name__}"
            ) from None
        return [one(item, i) for i, item in enumerate(items)]

    def encode(self, raw, return_soft_mask: bool = False):
        """Sequence(s) -> 1-D int64 ids; records are concatenated (each wrapped in bos/eos if ``add_bos_eos``).

        ``return_soft_mask=True`` also returns a bool tensor, True where the input letter was lower case."""
        ids, soft = [], []
        for rid, seq in self._as_records(raw):
            i, s = self._wrap(*self._encode_text(seq, repr(rid), "sequence"))
            ids.append(i)
            soft.append(s)
        out = torch.from_numpy(np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64))
        if return_soft_mask:
            return out, torch.from_numpy(np.concatenate(soft) if soft else np.zeros(0, bool))
        return out

    def decode(self, tensor: torch.Tensor, soft_mask: torch.Tensor | None = None, specials: bool = False) -> str:
        """ids -> letters. Specials are dropped (``specials=True`` writes them as ``<pad>``, ``<bos>``, ...);
        ``soft_mask`` (from ``encode(..., return_soft_mask=True)``) restores lower case."""
        ids = self.check_ids(torch.as_tensor(tensor).reshape(-1), "DNAAdapter.decode")
        table = np.array(VOCAB if specials else ("",) * len(SPECIALS) + VOCAB[len(SPECIALS) :], dtype=object)
        letters = table[ids.numpy()]
        if soft_mask is not None:
            soft_mask = torch.as_tensor(soft_mask).reshape(-1)
            if soft_mask.shape != ids.shape:
                raise InputError(f"DNAAdapter.decode: soft_mask has {soft_mask.numel()} entries, ids {ids.numel()}")
            lower = soft_mask.numpy().astype(bool) & (ids.numpy() >= A)
            letters[lower] = [c.lower() for c in letters[lower]]
        return "".join(letters.tolist())

    def decode_records(self, tensor: torch.Tensor) -> list[str]:
        """ids of ``<bos> seq <eos>`` records (``add_bos_eos=True``) -> one string per record."""
        ids = self.check_ids(torch.as_tensor(tensor).reshape(-1), "DNAAdapter.decode_records").tolist()
        out, current, open_ = [], [], False
        for i in ids:
            if i == BOS:
                current, open_ = [], True
            elif i == EOS:
                out.append("".join(current))
                current, open_ = [], False
            elif i >= A:
                current.append(VOCAB[i])
        if open_ or current:
            out.append("".join(current))
        return out

    # -- models ----------------------------------------------------------------------------------------
    def build_model(self, config: BackboneConfig, rc_equivariant: bool | str = False, **options) -> nn.Module:
        """A ``LanguageModel`` over ``VOCAB``; ``rc_equivariant`` wraps it so that ``f(rc(x)) == rc(f(x))``.

        ``rc_equivariant``: False; True or ``"ps"`` (parameter sharing in every layer, as Caduceus-PS);
        ``"conjoin"`` (one shared model run on x and rc(x), outputs combined, as post-hoc conjoining). Both
        see the whole sequence at once (the rc pass runs backwards), so they need
        ``BackboneConfig(bidirectional=True)`` and a masked-LM objective (``mask_bases``), never next-base
        prediction."""
        model = super().build_model(config, **options)
        if rc_equivariant is False:
            return model
        mode = "ps" if rc_equivariant is True else rc_equivariant
        if mode not in ("ps", "conjoin"):
            raise ConfigError(f"rc_equivariant must be False, True, 'ps' or 'conjoin', got {rc_equivariant!r}")
        if not config.bidirectional:
            raise ConfigError(
                "rc_equivariant needs BackboneConfig(bidirectional=True): an RC-equivariant model "
                "sees both strands, hence the whole sequence, so it is trained as a masked LM; "
                "a causal next-base model cannot be RC-equivariant"
            )
        wrapped = RCEquivariantLM(model, mode)
        wrapped.adapter_info = {**self.info(), "model": {"rc_equivariant": mode}}
        return wrapped

    # -- objective and metric --------------------------------------------------------------------------
    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (nats) over every target that is not ``<pad>`` or -100 (masked-LM "not asked")."""
        logits = output.logits if hasattr(output, "logits") else output
        targets = targets.masked_fill(targets == PAD, -100)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def bits_per_base(self, output, targets: torch.Tensor) -> float:
        """Mean -log2 p(target) over targets that are bases (A C G T N); specials and -100 are not counted."""
        logits = output.logits if hasattr(output, "logits") else output
        keep = targets >= A
        if not bool(keep.any()):
            raise InputError("bits_per_base: no base among the targets (only specials or -100)")
        logp = torch.log_softmax(logits.float(), -1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return float(-picked[keep].mean()) / math.log(2)

    def metric(self, output, targets: torch.Tensor) -> float:
        """Bits per base (uniform over A/C/G/T: 2.0; lower is better)."""
        return self.bits_per_base(output, targets)

    def position_metric(self, output, targets: torch.Tensor) -> torch.Tensor:
        """-log2 p(target) of every target (b, t); targets that are not bases (specials, -100) are NaN."""
        return token_bits(output, targets.masked_fill(targets < A, -100))

    def metric_weight(self, targets: torch.Tensor) -> int:
        """Bits per base count bases only, not specials or -100."""
        return int((targets >= A).sum())

    def perplexity(self, output, targets: torch.Tensor) -> float:
        """Per-base perplexity, ``2 ** bits_per_base`` (uniform over A/C/G/T: 4.0)."""
        return 2.0 ** self.bits_per_base(output, targets)

    def uniform_baseline(self) -> float:
        return 2.0
