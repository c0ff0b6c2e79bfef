"""A subword drafter for a byte-level target (MambaByte with a subword drafter, issue 19).

``SubwordDrafter(model, tokenizer)``: ``model`` is a small LanguageModel over the ids of a byte-level BPE
(``seqlab.byte_bpe.ByteBPE``; the subword domain adapter holds one and saves it in its model file); the target's
sequences are bytes (vocabulary 256). Each round the drafter brings its own recurrent state up to the target's
bytes, drafts subword tokens (greedy, or sampled from the subword model when the target samples) until they
spell at least k bytes, and proposes those first k bytes as point-mass drafts (q one-hot). The acceptance rule
keeps byte b with probability p(b) and on rejection draws from p without b, renormalised, which is exact
whatever chose b: greedy output is the target's greedy output, sampled output has the target's distribution.

The BPE boundary. The tokenization of a growing byte string changes at its end ("th" is one token until an "e"
arrives and " the" is another), so the drafter never commits to the last tokens:

- per row, a frozen list of subword ids covers the bytes up to an anchor; each round the bytes after the anchor
  (only those: the cost does not grow with the text) are encoded again, and every token of that tail but the
  last ``margin`` (default 2), and only tokens inside the stable bytes, joins the frozen list. The model's state
  over frozen tokens is never recomputed, and the state over the tail comes from the checkpoints of
  ``ModelCursor`` (tokens drafted last round that the new tokenization repeats are not run again);
- token healing: the model's context stops before the tail's last token, and the first drafted token must
  start with that token's bytes (the ids whose bytes start with them form one run of the sorted vocabulary), so
  "th" may become " the" as the subword model would have spelled it. Only the bytes after the healed prefix
  are proposed. A row whose whole sequence is one token drafts after it, unhealed.

None of this affects exactness, only how many drafted bytes are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqlab.byte_bpe import ByteBPE
from seqlab.decoding.acceptance import Sampling
from seqlab.decoding.cursor import ModelCursor
from seqlab.decoding.drafters import one_hot
from seqlab.errors import ConfigError, InputError

__all__ = ["SubwordDrafter", "as_byte_bpe"]

BYTE_VOCAB = 256


def as_byte_bpe(tokenizer) -> ByteBPE:
    """A ``ByteBPE`` from what the user gave: a ByteBPE, an object holding one as ``.bpe`` (the subword domain
    adapter), its JSON text, or a Hugging Face ``tokenizers.Tokenizer`` of that kind (checked)."""
    if isinstance(tokenizer, ByteBPE):
        return tokenizer
    held = getattr(tokenizer, "bpe", None)
    if isinstance(held, ByteBPE):
        return held
    if hasattr(tokenizer, "bpe"):
        raise InputError("the subword adapter has no tokenizer yet (fit it on training text first)")
    try:
        if isinstance(tokenizer, str):
            return ByteBPE.from_json(tokenizer)
        if hasattr(tokenizer, "to_str"):
            return ByteBPE.from_json(tokenizer.to_str())
    except ConfigError as exc:
        raise InputError(f"the drafter's tokenizer: {exc}") from None
    raise InputError(
        "tokenizer must be a seqlab.byte_bpe.ByteBPE, a subword adapter, or a byte-level BPE tokenizers.Tokenizer,"
        f" got {type(tokenizer).__name__}"
    )


@dataclass
class _Row:
    frozen: list[int] = field(default_factory=list)  # subword ids of the bytes [0, anchor), never re-encoded
    anchor: int = 0


def _choose(own: Sampling, probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """One subword token per row: the argmax when greedy, else a draw from the row's (V,) law with one uniform
    number from the row's own generator (inverse CDF over all rows at once: a batch of thousands of rows)."""
    if own.greedy:
        return probs.argmax(-1).tolist()
    cdf = probs.double().cpu().cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]) * cdf[:, -1]
    index = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    index = torch.minimum(index, (probs > 0).cumsum(-1).argmax(-1))  # never past the last token of mass > 0
    return index.tolist()


class SubwordDrafter:
    """Draft bytes for a byte-level target with a subword model (see the module docstring). ``margin``: tail
    tokens re-encoded every round (>= 1). ``sampling``: the drafter's own choice of subword tokens; None (the
    default): greedy when the target is greedy, else sampling from the subword model at the target's
    temperature (no top-k/top-p in the subword space: they filter bytes, which the acceptance rule applies)."""

    vocab_size = BYTE_VOCAB

    def __init__(self, model, tokenizer, *, margin: int = 2, sampling: Sampling | None = None) -> None:
        from seqlab.models import LanguageModel

        if not isinstance(model, LanguageModel):
            raise InputError(f"a subword draft model must be a seqlab LanguageModel, got {type(model).__name__}")
        if model.config.bidirectional:
            raise InputError("a bidirectional model cannot draft: it has no recurrent state")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
            raise InputError(f"margin must be an int >= 1, got {margin!r}")
        self.bpe = as_byte_bpe(tokenizer)
        if model.vocab_size != self.bpe.vocab_size:
            raise InputError(
                f"the subword draft model has {model.vocab_size} ids, its tokenizer {self.bpe.vocab_size}: "
                "give the tokenizer the model was trained with"
            )
        self.model = model.eval()
        self.margin = margin
        self.sampling = sampling
        self._healing = [torch.tensor(self.bpe.starting_with(t), dtype=torch.long) for t in self.bpe.token_bytes]
        self.reset()

    def reset(self) -> None:
        self.cursor: ModelCursor | None = None
        self._rows: dict[int, _Row] = {}
        self.steps = 0  # drafter forwards

    def _context(self, row: _Row, seq: list[int], keep: int) -> tuple[list[int], int | None]:
        """Advance the row's frozen part; return the subword context for the model and the id of the token
        backed off for healing (None: none)."""
        bpe = self.bpe
        tail = bytes(seq[row.anchor :])
        ids, starts = bpe.encode_spans(tail)
        ends = [*starts[1:], len(tail)]
        freeze = max(0, len(ids) - self.margin)
        while freeze > 0 and row.anchor + ends[freeze - 1] > keep:
            freeze -= 1
        if freeze:
            row.frozen.extend(ids[:freeze])
            row.anchor += ends[freeze - 1]
            ids = ids[freeze:]
        whole = row.frozen + ids
        if len(whole) >= 2:
            return whole[:-1], whole[-1]
        return whole, None

    def draft(self, sequences, rows, k, stable, sampling, generators):
        own = self.sampling or Sampling(greedy=sampling.greedy, temperature=sampling.temperature)
        contexts, healed = [], []
        for seq, i, keep in zip(sequences, rows, stable):
            context, backed_off = self._context(self._rows.setdefault(i, _Row()), seq, keep)
            contexts.append(context)
            healed.append(backed_off)
        skip = [0 if t is None else len(self.bpe.token_bytes[t]) for t in healed]
        with torch.no_grad():
            if self.cursor is None:
                by_row = dict(zip(rows, contexts))
                firsts = [by_row[i][:1] if i in by_row else [0] for i in range(max(rows) + 1)]
                self.cursor = ModelCursor(self.model, firsts, [None] * len(firsts))
            # the cursor keeps the state before a context's last token: checkpoints from the last frozen one on
            self.cursor.sync(contexts, rows, [max(0, len(self._rows[i].frozen) - 1) for i in rows])
            logits = self.cursor.feed()[:, -1]
            drafted = [bytearray() for _ in rows]
            for step in range(k + 1):  # the healed token may add no byte; every other one adds at least one
                if step == 0:
                    logits = self._healed(logits, healed)
                chosen = _choose(own, own.probs(logits), [generators[i] for i in rows])
                for j, token in enumerate(chosen):
                    spelled = self.bpe.token_bytes[token]
                    drafted[j] += spelled[skip[j] :] if step == 0 else spelled
                if all(len(d) >= k for d in drafted):
                    break
                logits = self.cursor.feed(torch.tensor(chosen, dtype=torch.long)[:, None])[:, -1]
        self.steps = self.cursor.calls
        tokens = torch.tensor([list(d[:k]) for d in drafted], dtype=torch.long)
        return tokens, one_hot(tokens, BYTE_VOCAB)

    def _healed(self, logits: torch.Tensor, healed: list[int | None]) -> torch.Tensor:
        """Logits with every token that does not start with the bytes of the row's backed-off token at -inf."""
        if all(t is None for t in healed):
            return logits
        out = logits.float().clone()
        for j, backed_off in enumerate(healed):
            if backed_off is not None:
                allowed = self._healing[backed_off].to(out.device)
                row = torch.full_like(out[j], float("-inf"))
                row[allowed] = out[j, allowed]
                out[j] = row
        return out
