"""A model's recurrent state kept in step with growing token sequences, with rollback for free.

Speculative decoding feeds tokens that may later be thrown away. ``ModelCursor`` remembers a checkpoint (the
state after every token it fed, from ``states_at`` of one forward, or from each step of a short feed when the
model's decode step is compiled), and ``sync(sequences)`` moves each row to
the furthest checkpoint whose tokens are a prefix of the row's sequence, then consumes whatever is new. The prefix
is never run again: a rejected draft costs nothing but the forward that verified it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqlab.state import RecurrentState, concat_rows


@dataclass
class _Checkpoint:
    length: int  # tokens of the row's sequence this state has consumed
    state: RecurrentState  # a batch; the row is `row`
    row: int


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on prefix equality (C-speed slices)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


#: the longest feed (pending token + draft) run as steps rather than one forward, for a model whose every block
#: runs the compiled decode step (seqlab.fused_step): see _steps_fused. Measured (bench/decoding.py's target, a
#: 4-layer d_model 192 MambaByte trained on the CPython docs, 2 threads): L steps cost 0.21-0.40x one forward of
#: L tokens with their states at every L from 2 to 33; a forward's cost per token keeps falling with L (prefill
#: runs at 10k+ tokens/s), so long feeds (a catch-up, a very long draft) stay on the forward.
STEP_FEED_MAX = 32


def _steps_fused(model, ids: torch.Tensor) -> bool:
    """Whether ``model.step`` runs every block of ``model`` in the compiled decode step for CPU ids: then a short
    feed is cheaper as steps (about 0.1-0.5 ms each at the widths measured) than as one forward (milliseconds of
    per-layer cost whatever the length), and its logits are the ones plain decoding computes."""
    if ids.device.type != "cpu" or not getattr(model, "fused_step", False) or getattr(model, "backbone", None) is None:
        return False
    from seqlab.fused_step import fused_layers

    return all(reason is None for reason in fused_layers(model))


class ModelCursor:
    """Rows of token sequences and a model's state over them.

    ``sync(sequences, rows, stable)`` leaves, for each listed row, a state that has consumed all of its
    sequence but the last token (which is pending); ``feed(tokens)`` consumes the pending token and ``tokens``
    (b, e) in one forward and returns the logits after each ((b, 1 + e, V)). ``stable[i]``: a length of row i's
    sequence that will never be rolled back (checkpoints before it are dropped, so memory stays bounded).
    """

    def __init__(self, model, sequences: list[list[int]], starts: list[RecurrentState | None]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokens: list[list[int]] = [list(seq[:-1]) for seq in sequences]  # what each row's newest line consumed
        self.start_positions = [0 if start is None else start.position for start in starts]
        # Rows that share a start (None, or the same state object) and a head length start together: one
        # init_state and one forward per group, not one per row (a batch of drafts starts from None).
        groups: dict[tuple[int | None, int], list[int]] = {}
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            groups.setdefault((None if start is None else id(start), len(seq) - 1), []).append(i)
        self.checkpoints: list[list[_Checkpoint]] = [[] for _ in sequences]
        for (_, head), members in groups.items():
            shared = starts[members[0]]
            if shared is not None and shared.batch_size != 1:
                raise ValueError(f"ModelCursor: each row's start must be a batch of one, got {shared.batch_size}")
            if shared is None:
                start = model.init_state(len(members), self.device)
            elif len(members) > 1 and head:
                rows = self._gather([_Checkpoint(0, shared, 0)] * len(members))
                start = RecurrentState(rows, shared.position, model.fingerprint)
            else:
                start = shared
            if head:
                ids = torch.tensor([self.tokens[i] for i in members], dtype=torch.long, device=self.device)
                start = model(ids, start).state
            for m, i in enumerate(members):
                self.checkpoints[i].append(_Checkpoint(head, start, m if start.batch_size > 1 else 0))
        self.rows: list[int] = []
        self.pending: torch.Tensor | None = None
        self.state: RecurrentState | None = None
        self.calls = 0  # model forwards made by sync and feed

    def sync(self, sequences: list[list[int]], rows: list[int], stable: list[int] | None = None) -> None:
        """``sequences[j]`` is the whole sequence of row ``rows[j]`` (at least one token longer than what was
        consumed at the cursor's creation)."""
        chosen: list[_Checkpoint] = []
        catch_up: dict[int, list[int]] = {}  # number of tokens to consume -> positions j
        for j, (i, seq) in enumerate(zip(rows, sequences)):
            usable = min(_common_prefix(self.tokens[i], seq), len(seq) - 1)
            best = None
            for point in self.checkpoints[i]:
                if point.length <= usable and (best is None or point.length > best.length):
                    best = point
            if best is None:
                raise RuntimeError(f"row {i}: no checkpoint is a prefix of its sequence (rolled back past stable)")
            floor = min(stable[j], best.length) if stable is not None else best.length
            keep = [c for c in self.checkpoints[i] if c.length >= floor and c.length <= usable]
            floor_point = max((c for c in self.checkpoints[i] if c.length <= floor), key=lambda c: c.length)
            self.checkpoints[i] = sorted({id(c): c for c in [floor_point, *keep]}.values(), key=lambda c: c.length)
            self.tokens[i] = seq[: best.length]
            chosen.append(best)
            missing = len(seq) - 1 - best.length
            if missing:
                catch_up.setdefault(missing, []).append(j)
        for count, members in catch_up.items():
            batch = RecurrentState(
                self._gather([chosen[j] for j in members]),
                tuple(self.start_positions[rows[j]] + chosen[j].length for j in members),  # type: ignore[arg-type]
                self.model.fingerprint,
            )
            ids = torch.tensor(
                [sequences[j][chosen[j].length : chosen[j].length + count] for j in members],
                dtype=torch.long,
                device=self.device,
            )
            state = self.model(ids, batch).state
            self.calls += 1
            for m, j in enumerate(members):
                i = rows[j]
                point = _Checkpoint(chosen[j].length + count, state, m)
                self.checkpoints[i].append(point)
                self.tokens[i] = list(sequences[j][: point.length])
                chosen[j] = point
        self.rows = list(rows)
        positions = tuple(self.start_positions[i] + point.length for i, point in zip(rows, chosen))
        self.state = RecurrentState(self._gather(chosen), positions, self.model.fingerprint)  # type: ignore[arg-type]
        self.pending = torch.tensor([[seq[-1]] for seq in sequences], dtype=torch.long, device=self.device)
        self._pending_tokens = [seq[-1] for seq in sequences]

    @staticmethod
    def _gather(points: list[_Checkpoint]) -> list[dict[str, torch.Tensor]]:
        """One batch of the checkpoints' rows, in order: one index_select per source state (a round has k + 2 of
        them at most, whatever the batch size), then one reordering."""
        groups: dict[int, list[int]] = {}
        for j, point in enumerate(points):
            groups.setdefault(id(point.state), []).append(j)
        parts, order = [], []
        for members in groups.values():
            source = points[members[0]].state
            rows = [points[j].row for j in members]
            if rows == list(range(source.batch_size)):
                parts.append(source.layers)
            else:
                index = torch.tensor(rows, dtype=torch.long)
                parts.append(
                    [{k: t.index_select(0, index.to(t.device)) for k, t in layer.items()} for layer in source.layers]
                )
            order.extend(members)
        merged = parts[0] if len(parts) == 1 else concat_rows(parts)
        if order == list(range(len(points))):
            return merged
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return [{k: t.index_select(0, inverse.to(t.device)) for k, t in layer.items()} for layer in merged]

    def feed(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Consume the pending token (if any) and ``tokens`` (b, e); logits after each consumed token."""
        parts = [] if self.pending is None else [self.pending]
        if tokens is not None and tokens.numel():
            parts.append(tokens.to(self.device).long())
        ids = torch.cat(parts, dim=1)
        length = ids.shape[1]
        if length == 1 or (length <= STEP_FEED_MAX and _steps_fused(self.model, ids)):
            # one token, or a short draft for a model whose every block runs the compiled decode step: step by
            # step (each step's state is the checkpoint), cheaper than a forward's per-layer cost
            logits, states, state = [], [], self.state
            for m in range(length):
                out = self.model.step(ids[:, m], state)
                logits.append(out.output)
                state = out.state
                states.append(state)
            out.output = torch.stack(logits, dim=1)
        else:
            out = self.model(ids, self.state, states_at=list(range(1, length + 1)))
            states = out.states_at
        self.calls += 1
        fed = ids.tolist()
        for j, i in enumerate(self.rows):
            for m in range(length):
                self.tokens[i].append(fed[j][m])
                self.checkpoints[i].append(_Checkpoint(len(self.tokens[i]), states[m], j))
        self.state, self.pending = out.state, None
        return out.logits

    def final_state(self, row: int) -> RecurrentState:
        """Row ``row``'s state after every token it has consumed (call after ``sync`` + ``feed()``), at its
        true position, a KV cache's batch padding dropped."""
        from seqlab.generate import _row_state

        point = max(self.checkpoints[row], key=lambda c: c.length)
        if point.length != len(self.tokens[row]):
            raise RuntimeError("final_state: the row's newest checkpoint is not its newest token")
        return _row_state(self.model, point.state, point.row, self.start_positions[row] + point.length)
