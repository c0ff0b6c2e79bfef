"""What a memory session answers without changing: ``ask`` (generate the next event) and ``score`` (bits of a
continuation), each on a copy of the session's state, and their results ``Answer`` and ``Score``."""

from __future__ import annotations

import time as _time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from seqlab.state import RecurrentState

from .memory import Event, MemoryStreamAdapter
from .session_snapshots import _model_device


@dataclass
class Answer:
    """What ``ask`` generated: the reply ``event``, its raw ``tokens`` and ``stop_reason`` ("stop" or "length")."""

    event: Event
    tokens: list[int]
    stop_reason: str

    @property
    def text(self) -> str:
        return self.event.content


@dataclass
class Score:
    """``bits``: -log2 p of the scored bytes given the memory; ``bytes``: how many were scored."""

    bits: float
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes if self.bytes else float("nan")


def _reply(
    model,
    adapter: MemoryStreamAdapter,
    state: RecurrentState,
    prompt,
    max_new_tokens: int,
    *,
    role: str,
    prompt_role: str,
    time,
    metadata: dict | None,
    allow_specials: bool,
    **sampling,
) -> Answer:
    """``MemorySession.ask`` on ``state`` (a copy the caller gives away): the prompt's events and the reply
    header read first, then the reply sampled (greedy when ``temperature == 0``) up to the end-of-event byte."""
    stamp = _time.time() if time is None else time
    if prompt is None:
        context: list[Event] = []
    elif isinstance(prompt, str):
        context = [Event(prompt_role, prompt, stamp)]
    elif isinstance(prompt, Event):
        context = [prompt]
    else:
        context = list(prompt)
    header = adapter.prompt_for(role, time=stamp, metadata=metadata)
    ids = torch.cat([adapter.encode(context), header]) if context else header
    # sampling; temperature=0 picks the argmax (generate's rule), so the other sampling options never warn
    out = model.generate(
        ids,
        max_new_tokens,
        do_sample=True,
        **sampling,
        stop=adapter.stop_tokens,
        state=state,
        **adapter.generation_options(allow_specials=bool(allow_specials)),
    )
    tokens = out.tokens[0]
    return Answer(adapter.reply_event(header, tokens), tokens, out.stop_reasons[0])


@torch.no_grad()
def _score(
    model,
    adapter: MemoryStreamAdapter,
    state: RecurrentState,
    logits: torch.Tensor | None,
    text: str | bytes | Event | Sequence[Event],
) -> Score:
    """``MemorySession.score`` from ``state`` (a copy the caller gives away) and the next-byte ``logits`` after
    the last observed event (None: nothing observed, the first byte is not scored)."""
    if isinstance(text, str):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    elif isinstance(text, (bytes, bytearray)):
        ids = torch.tensor(list(text), dtype=torch.long)
    else:
        ids = adapter.encode(text)
    if ids.numel() == 0:
        return Score(0.0, 0)
    ids = ids.to(_model_device(model))
    out = model(ids[None], state)
    predicted = out.logits[0, :-1].float()
    targets = ids[1:]
    if logits is not None:
        predicted = torch.cat([logits.reshape(1, -1), predicted])
        targets = ids
    if targets.numel() == 0:
        return Score(0.0, 0)
    nats = torch.nn.functional.cross_entropy(predicted, targets, reduction="sum")
    return Score(float(nats) / float(torch.log(torch.tensor(2.0))), int(targets.numel()))
