"""Generation for any LanguageModel: greedy or sampled decoding on the recurrent state.

Each new token costs one ``model.step``, constant in the context length. Prompts of different lengths are
prefilled together as one packed row (``prefill``: the prompts end to end, their boundaries as ``cu_seqlens``,
so no padding ever enters a state and each prompt's state equals the one it gets alone), then decoded together
as one batch whose rows sit at different positions; each prompt gets its own exact final state, which has
consumed the prompt and every generated token, so a later call can continue from it (agent sessions).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import torch

from seqlab.errors import InputError, StateError, StateMismatchError
from seqlab.fused_step import KVRoom, fused_lm_greedy, fused_lm_step
from seqlab.models import LanguageModel, ModelOutput
from seqlab.sampling import SamplingOptions, Uniforms, check_filters, sample
from seqlab.state import RecurrentState, state_layout


@dataclass(eq=False)
class GenerationOutput:
    """``tokens[i]``: the ids generated for prompt i (a matched stop sequence included);
    ``states[i]``: its state after the prompt and every generated token; ``stop_reasons[i]``: "stop" or
    "length"."""

    tokens: list[list[int]]
    states: list[RecurrentState]
    stop_reasons: list[str]
    stats: object | None = None  # a SpeculativeStats when generate ran with a draft

    @property
    def state(self) -> RecurrentState:
        """The final state when there was one prompt."""
        if len(self.states) != 1:
            raise InputError(f"there are {len(self.states)} prompts: use .states[i]")
        return self.states[0]


def _as_prompts(prompts) -> list[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            rows = [prompts]
        elif prompts.dim() == 2:
            rows = list(prompts)
        else:
            raise InputError(f"prompt tensor must have shape (length,) or (batch, length), got {tuple(prompts.shape)}")
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(t, numbers.Integral) for t in prompts):
        rows = [torch.tensor(list(prompts), dtype=torch.long)]
    elif isinstance(prompts, Sequence) and prompts:
        rows = [p if isinstance(p, torch.Tensor) else torch.tensor(list(p), dtype=torch.long) for p in prompts]
    else:
        raise InputError("prompts must be token ids: a tensor, a list of ints, or a list of such lists")
    for i, row in enumerate(rows):
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise InputError(f"prompt {i}: token ids must be integers, got dtype {row.dtype}")
        if row.dim() != 1 or row.numel() == 0:
            raise InputError(f"prompt {i} is empty or not 1-D (shape {tuple(row.shape)}): give at least one token")
    return [row.long() for row in rows]


def _as_stops(stop) -> list[tuple[int, ...]]:
    if stop is None:
        return []
    out = []
    for item in stop:
        seq = (int(item),) if isinstance(item, numbers.Integral) else tuple(int(t) for t in item)
        if not seq:
            raise InputError("stop sequences must not be empty")
        out.append(seq)
    return out


def _as_ids(value, name: str, vocab: int) -> list[int]:
    """An int or a sequence of ints, each in [0, vocab) (``suppress_tokens``, ``eos_token_id``)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor) and not (value.dtype.is_floating_point or value.dtype == torch.bool):
        items = value.reshape(-1).tolist()
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (list, tuple, range)):
        items = list(value)
    else:
        raise InputError(f"{name} must be a token id or a list of token ids, got {value!r}")
    ids = [int(i) for i in items if isinstance(i, numbers.Integral) and not isinstance(i, bool)]
    if len(ids) != len(items):
        raise InputError(f"{name} must be a token id or a list of token ids, got {value!r}")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InputError(f"{name}: id {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids


def _check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not 0 <= temperature < math.inf:
        raise InputError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    check_filters(top_k, top_p, min_p)
    if not 1e-6 <= repetition_penalty <= 1e6:  # beyond these a float32 logit overflows to inf, or all go to -inf
        raise InputError(f"repetition_penalty must be in [1e-6, 1e6] (1 = none), got {repetition_penalty!r}")


def _filter_logits(
    logits: torch.Tensor, seen: torch.Tensor | None, temperature: float, top_k, top_p, min_p, repetition_penalty: float
) -> torch.Tensor:
    """Apply, in this order: repetition penalty, temperature, top-k, top-p, min-p. Rows are sequences."""
    logits = logits.float().clone()
    if seen is not None and repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits
    scaled = logits / temperature
    if (scaled.isnan() | (scaled.isinf() & logits.isfinite())).any():
        # A tiny temperature (1e-300 is 0 in float32) overflows: shift each row's maximum to 0 and divide in float64,
        # so the others go to -inf, not inf - inf = NaN, and sampling becomes greedy as it should.
        scaled = ((logits - logits.max(dim=-1, keepdim=True).values).double() / temperature).float()
    logits = scaled
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False  # the top token always stays (top_p=1e-300 is 0 in float32)
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    if min_p is not None and min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def _initial_states(model, state, n_prompts: int) -> list[RecurrentState | None]:
    if state is None:
        return [None] * n_prompts
    if not isinstance(state, RecurrentState):
        raise InputError(f"state must be a RecurrentState or None, got {type(state).__name__}")
    if state.batch_size == 1:
        return [state] * n_prompts
    if state.batch_size != n_prompts:
        raise StateMismatchError(
            f"state holds a batch of {state.batch_size}; give one row per prompt ({n_prompts}) or a batch of 1"
        )
    return [state.select(i) for i in range(n_prompts)]


def _packing_unsupported(exc: TypeError) -> bool:
    """A kernel backend (or a registered mixer) that does not take packed rows yet: its TypeError names
    ``cu_seqlens``."""
    return "cu_seqlens" in str(exc)


def prefill(model, prompts, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
    """Consume ``prompts`` (token ids of any lengths: a list of 1-D tensors or id lists, or a (batch, length)
    tensor) in ONE forward: the prompts end to end in one packed row (``model(ids, state, cu_seqlens=...)``).
    Prompts of one token each go through one ``model.step`` instead (the same result to rounding, by the state
    contract; a forward's per-layer cost was most of a short ``generate`` call).

    Returns ``(last_logits, state)``: the logits after each prompt's last token, (N, vocab), and a
    ``RecurrentState`` with one row per prompt, row i at its start position + len(prompt i)
    (``state.positions``); each row equals the state prompt i gets alone (a KV cache is right-aligned, padded
    on the left to the longest row). ``state``: continue from it (a batch of 1 for every prompt, or one row per
    prompt, at any positions). Runs under the caller's grad mode (``generate`` runs it without autograd). A model
    whose kernels cannot take packed rows yet (a TypeError naming ``cu_seqlens``) is prefilled prompt by prompt,
    with the same result."""
    rows = _as_prompts(prompts)
    if model.config.bidirectional:
        raise StateError("bidirectional models see the whole sequence at once and have no state to prefill")
    device = next(model.parameters()).device
    start = _packed_start(state, len(rows))
    if isinstance(model, LanguageModel) and all(row.numel() == 1 for row in rows):
        # one token per prompt (a chat turn's or an agent's next event, a decode resumed): one decode step for all
        # rows, which equals the forward to rounding and costs a fraction of its per-layer overhead
        out = model.step(torch.cat(rows).to(device), start)
        assert out.state is not None  # a step always returns its state (bidirectional models were refused above)
        return out.logits, out.state
    if len(rows) == 1:  # one prompt: the plain forward
        out = model(rows[0].to(device)[None], start)
        return out.logits[:, -1], out.state
    lengths = torch.tensor([row.numel() for row in rows])
    cu = torch.cat((torch.zeros(1, dtype=torch.long), lengths.cumsum(0))).to(device)
    try:
        out = model(torch.cat(rows).to(device)[None], start, cu_seqlens=cu)
    except TypeError as exc:
        if not _packing_unsupported(exc):
            raise
        logits, states = _prefill_each(model, rows, _initial_states(model, state, len(rows)), device)
        return logits, RecurrentState.stack(states)
    return out.logits[0, cu[1:] - 1], out.state


def _packed_start(state, n_prompts: int) -> RecurrentState | None:
    """The starting state of a packed prefill: None, or one row per prompt."""
    if state is None:
        return None
    if not isinstance(state, RecurrentState):
        raise InputError(f"state must be a RecurrentState or None, got {type(state).__name__}")
    if state.batch_size == 1 and n_prompts > 1:
        return RecurrentState.stack([state] * n_prompts)
    if state.batch_size != n_prompts:
        raise StateMismatchError(
            f"state holds a batch of {state.batch_size}; give one row per prompt ({n_prompts}) or a batch of 1"
        )
    return state


def _prefill_each(model, rows, starts, device) -> tuple[torch.Tensor, list[RecurrentState]]:
    """Each prompt alone (the fallback of ``prefill``)."""
    last_logits, states = [], []
    for row, start in zip(rows, starts):
        out = model(row[None].to(device), start)
        last_logits.append(out.logits[:, -1])
        states.append(out.state)
    return torch.cat(last_logits), states


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, from ``generate``, of the first frame outside this module,
    ``LanguageModel.generate`` and torch's ``no_grad`` wrapper: the user's call."""
    skip = (os.path.abspath(__file__), os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.py"))
    level = 1  # the frame of generate itself is stacklevel 1
    frame: FrameType | None = sys._getframe(1)
    wrapper = os.path.join("torch", "utils", "_contextlib.py")
    while frame is not None and (
        os.path.abspath(frame.f_code.co_filename) in skip or frame.f_code.co_filename.endswith(wrapper)
    ):
        level, frame = level + 1, frame.f_back
    return level


@torch.no_grad()
def generate(
    model,
    input_ids=None,
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop=None,
    state: RecurrentState | None = None,
    suppress_tokens=None,
    eos_token_id=None,
    callback: Callable[[int, int], None] | None = None,
    prompts=None,
    draft=None,
    speculate: int | None = None,
    drugs=None,
) -> GenerationOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens (Hugging Face's argument names).

    ``input_ids``: a (batch, length) or (length,) id tensor, a list of ids, or a list of id lists/tensors of
    any lengths (``prompts=`` is its deprecated old name). ``do_sample=False`` (the default, as in Hugging Face)
    is greedy decoding: the argmax after ``repetition_penalty`` and ``suppress_tokens``; the sampling options
    ``temperature``, ``top_k``, ``top_p``, ``min_p`` then do not apply (a UserWarning says so when one is set).
    ``do_sample=True`` samples with them (``temperature=0`` still picks the argmax). Sampling row i draws from
    its own generator seeded ``seed + i`` (its t-th token with the generator's t-th uniform, by the rule of
    ``seqlab.sampling``), so a batch samples exactly what the prompts would one by one with those seeds
    (``seed=None``: seeds drawn from torch's global generator, so ``torch.manual_seed`` makes the run
    reproducible; greedy decoding draws none). ``stop``: token ids or id sequences; a row stops after generating
    one. ``state``: continue from it (a batch of 1 for every prompt, or one row per prompt). ``suppress_tokens``:
    ids that are never generated (their logits are set to -inf before any other filter). ``eos_token_id``: an id
    (or ids) that ends a row, like a one-token stop sequence (kept in the output, stop reason "stop"). An adapter
    gives both for its vocabulary: ``generate(model, ids, **adapter.generation_options())`` generates only what
    the adapter can decode and stops at its end token. ``callback(row, token)`` is called for every token as it
    is generated.

    ``draft``: speculative decoding (docs/generation.md): a smaller LanguageModel of the same vocabulary, or a
    ``seqlab.decoding`` drafter (``MaxGramDrafter``, ``SubwordDrafter``, a ``cascade``), proposes ``speculate``
    tokens (default 4) per round and the model verifies them in one forward. The output has exactly the
    distribution of plain decoding (greedy: the same tokens); ``out.stats`` counts rounds and accepted tokens.

    ``drugs``: DRµGS (``seqlab.decoding.Drugs(theta=...)``): hidden vectors are turned by a small random angle
    at the chosen sites during the decode steps (the prompt is never perturbed), then the token is chosen as set
    above (greedy argmax or sampling). Row i's rotations come from its own generator seeded from ``seed``, so a
    row gets the same rotations alone or in a batch; ``theta=0`` is plain decoding, bit for bit.
    """
    if prompts is not None:
        if input_ids is not None:
            raise InputError("give input_ids or its deprecated old name prompts, not both")
        warnings.warn(
            "generate(prompts=...) is deprecated: pass input_ids=... (or the ids as first argument)",
            FutureWarning,
            stacklevel=_user_stacklevel(),
        )
        input_ids = prompts
    if input_ids is None:
        raise InputError("input_ids is missing: give the prompt token ids")
    if not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if model.config.bidirectional:
        raise StateError("bidirectional models see the whole sequence at once and cannot generate token by token")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    if not do_sample:
        unused = [
            name
            for name, value, neutral in (
                ("temperature", temperature, (0, 1.0)),
                ("top_k", top_k, (None,)),
                ("top_p", top_p, (None,)),
                ("min_p", min_p, (None,)),
            )
            if value not in neutral
        ]
        if unused:
            warnings.warn(
                f"generate: {', '.join(unused)} set, but sampling options apply only with do_sample=True; "
                "do_sample=False (the default) decodes greedily",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
    greedy = not do_sample or temperature == 0
    rows = _as_prompts(input_ids)
    stops = _as_stops(stop)
    device = next(model.parameters()).device
    starts = _initial_states(model, state, len(rows))
    if seed is not None:
        base_seed = int(seed)
    elif greedy and drugs is None:  # nothing is drawn: leave torch's global generator alone
        base_seed = 0
    else:  # drawn from torch's global generator, which torch.manual_seed makes reproducible (torch.seed() here
        # reseeded that generator for the caller, and cost a millisecond a call)
        base_seed = int(torch.randint(0, 2**62, (1,)))
    generators = [torch.Generator().manual_seed(base_seed + i) for i in range(len(rows))]
    if drugs is not None:
        from seqlab.decoding.drugs import Drugs

        if not isinstance(drugs, Drugs):
            raise InputError(f"drugs must be a seqlab.decoding.Drugs(theta=...), got {type(drugs).__name__}")
        if draft is not None or speculate is not None:
            raise InputError(
                "drugs cannot be combined with draft: DRµGS perturbs the model, so there is no fixed target "
                "distribution for speculative decoding to reproduce"
            )
    if draft is not None or speculate is not None:
        return _speculative(
            model, rows, starts, draft, speculate, max_new_tokens, greedy, temperature, top_k, top_p, min_p,
            repetition_penalty, generators, stops, suppress_tokens, eos_token_id, callback,
        )  # fmt: skip

    # Prefill every prompt in one packed forward (each exactly as alone; no padding ever enters a state): one
    # decoding batch whose rows sit at their own positions.
    logits, batch = prefill(model, rows, state)
    positions = list(batch.positions)
    vocab = logits.shape[-1]
    suppressed = _as_ids(suppress_tokens, "suppress_tokens", vocab)
    stops += [(i,) for i in _as_ids(eos_token_id, "eos_token_id", vocab)]
    if len(set(suppressed)) >= vocab:
        raise InputError(f"suppress_tokens covers the whole vocabulary ({vocab} ids): nothing is left to generate")
    banned = torch.tensor(sorted(set(suppressed)), dtype=torch.long, device=logits.device) if suppressed else None
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=logits.device)
        for i, row in enumerate(rows):
            seen[i, row.clamp(0, vocab - 1).to(seen.device)] = True

    tokens: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    finals: list[RecurrentState | None] = [None] * len(rows)
    active = list(range(len(rows)))
    with contextlib.ExitStack() as stack:
        handle = None
        if drugs is not None:
            from seqlab.decoding.drugs import apply_drugs

            rotations = [torch.Generator().manual_seed(base_seed + i + 104729) for i in range(len(rows))]
            handle = stack.enter_context(apply_drugs(model, drugs, rotations))
        batch, logits = _decode_loop(
            model, batch, logits, rows, active, tokens, positions, finals, reasons, max_new_tokens, greedy,
            temperature, top_k, top_p, min_p, repetition_penalty, seen, banned, generators, stops, callback,
            device, handle,
        )  # fmt: skip
    for j, i in enumerate(active):  # rows that ran to max_new_tokens (or all rows, when it is 0)
        finals[i] = _row_state(model, batch, j, positions[i])
    states = [s for s in finals if s is not None]
    assert len(states) == len(rows)  # every row ended (stop or length) and recorded its state
    return GenerationOutput(tokens, states, reasons)


#: the most steps one compiled sampling call runs (its uniforms are drawn ahead: 8 bytes a step and row)
_SAMPLED_STEPS = 4096
#: with a callback, compiled calls are sized to take about this long (seconds), so tokens stream in small bursts
_STREAM_SECONDS = 0.05


def _decode_loop(
    model, batch, logits, rows, active, tokens, positions, finals, reasons, max_new_tokens, greedy, temperature,
    top_k, top_p, min_p, repetition_penalty, seen, banned, generators, stops, callback, device, handle,
):  # fmt: skip
    """The token-by-token loop of ``generate``; ``active`` shrinks in place as rows stop. Returns the final
    (batch, logits) of the rows still active.

    Greedy or sampled decoding of a LanguageModel on the compiled step (suppressed tokens, a repetition penalty
    and a callback included; not DRµGS) runs many steps per call (``seqlab.fused_step.fused_lm_greedy``): the
    call returns after a step that fed the last token of a stop sequence, so stops are checked exactly where this
    loop checks them. With a callback, a call runs as many steps as take about ``_STREAM_SECONDS`` (8 at first),
    and the callback then sees its tokens in the order the step-by-step loop would call it.
    Sampling draws by ``seqlab.sampling``'s rule with row i's t-th uniform for its t-th token, here and in the
    compiled call alike, so how many steps a call runs never changes a token."""
    spare, stepped, room = None, False, KVRoom()
    many = handle is None and isinstance(model, LanguageModel) and bool(model.fused_step)
    chunk = 8  # with a callback: steps per compiled call, then sized by the calls' speed (_STREAM_SECONDS)
    suppressed = () if banned is None else banned.tolist()
    options = None if greedy else SamplingOptions(temperature, top_k, top_p, min_p)
    uniforms = None if greedy else Uniforms(generators)  # row i's t-th token: its generator's t-th uniform
    watch = sorted({s[-1] for s in stops})
    remaining = max_new_tokens
    while remaining > 0:
        if not active:
            break
        done = max_new_tokens - remaining  # tokens every active row has generated
        if banned is not None:
            logits = logits.index_fill(-1, banned, float("-inf"))
        if seen is not None:  # the repetition penalty (float32, as before any other filter)
            logits = _filter_logits(logits, seen[active], 0, None, None, None, repetition_penalty)
        if greedy:
            chosen = logits.float().argmax(dim=-1)
        else:  # seqlab.sampling's rule, the same C code the many-steps call below samples with
            chosen = sample(logits, uniforms.take(active, done, 1)[:, 0], options)
        chosen = chosen.to(device)
        run = None
        if many:
            steps = remaining if greedy else min(remaining, _SAMPLED_STEPS)
            if callback is not None:
                steps = min(steps, chunk)
            draws = None if greedy else uniforms.take(active, done + 1, steps)
            began = time.perf_counter()
            marks = None if seen is None else seen[active]
            run = fused_lm_greedy(
                model, chosen, batch, steps, watch, options, draws, suppressed, repetition_penalty, marks
            )
            if run is not None and callback is not None:
                per_step = max(time.perf_counter() - began, 1e-9) / run[0]
                chunk = max(1, min(_SAMPLED_STEPS, int(_STREAM_SECONDS / per_step)))
        if run is not None:
            steps, after, new_state, new_logits, new_hidden = run
            fed = [chosen.tolist()] + after[: steps - 1].tolist()  # the token each step fed, per row
            for ids in fed[:-1]:  # none of these is a stop sequence's last token: the call would have returned
                for j, i in enumerate(active):
                    tokens[i].append(ids[j])
                    positions[i] += 1
                    if seen is not None:
                        seen[i, ids[j]] = True
                    if callback is not None:
                        callback(i, ids[j])
            chosen_ids = fed[-1]
            out = ModelOutput(new_logits, new_state, new_hidden)
            remaining -= steps
        else:
            out = _decode_step(model, chosen, batch, spare, room)  # every generated token enters its row's state
            chosen_ids = chosen.tolist()  # one conversion, not one int(chosen[j]) per row
            remaining -= 1
        keep = []
        for j, i in enumerate(active):
            token = chosen_ids[j]
            tokens[i].append(token)
            positions[i] += 1
            if seen is not None:
                seen[i, token] = True
            if callback is not None:
                callback(i, token)
            if any(tuple(tokens[i][-len(s) :]) == s for s in stops):
                reasons[i] = "stop"
                finals[i] = _row_state(model, out.state, j, positions[i])
            else:
                keep.append(j)
        if not keep:  # every row stopped
            active[:] = []
            return out.state, out.logits
        spare = None
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            batch = RecurrentState(
                [{k: t.index_select(0, index) for k, t in layer.items()} for layer in out.state.layers],
                tuple(positions[active[j]] for j in keep),
                out.state.fingerprint,
            )
            logits = out.logits.index_select(0, index)
            active[:] = [active[j] for j in keep]
            if handle is not None:
                handle.rows = list(active)  # DRµGS: row i keeps drawing from its own generator
        else:
            # the state a step just consumed, when a step of this loop made it (a state handed out is a copy:
            # _row_state clones), is read by nobody again: the next step may write into it (never the prefill's)
            spare = batch if stepped and run is None else None
            batch, logits = out.state, out.logits
        stepped = run is None
    return batch, logits


def _decode_step(model, ids: torch.Tensor, state: RecurrentState, spare: RecurrentState | None, room: KVRoom):
    """``model.step(ids, state)``; for a LanguageModel on the fused step, the new state goes into ``spare``'s
    memory (a state of this loop nobody reads again) instead of new memory (seqlab.fused_step._state_io), and
    attention caches are appended to in place in ``room``'s buffers (this loop's states are its own: every state
    it hands out is a copy)."""
    if isinstance(model, LanguageModel) and model.fused_step:
        done = fused_lm_step(model, ids, state, reuse=spare, room=room)
        if done is not None:
            return ModelOutput(*done)
    return model.step(ids, state)


def _speculative(
    model, rows, starts, draft, speculate, max_new_tokens, greedy, temperature, top_k, top_p, min_p,
    repetition_penalty, generators, stops, suppress_tokens, eos_token_id, callback,
) -> GenerationOutput:  # fmt: skip
    """``generate`` with a drafter (seqlab.decoding.speculative)."""
    from seqlab.decoding.acceptance import Sampling
    from seqlab.decoding.speculative import as_drafter, check_speculate, speculative_decode

    if draft is None:
        raise InputError("speculate is set but draft is None: give draft=<a smaller model or a drafter>")
    k = check_speculate(4 if speculate is None else speculate)
    if repetition_penalty != 1.0:
        raise InputError(
            "repetition_penalty is not supported with a draft: the penalty changes inside a draft, so the "
            "verified distribution would not be the one plain decoding samples"
        )
    drafter = as_drafter(draft, model)
    vocab = model.vocab_size
    suppressed = _as_ids(suppress_tokens, "suppress_tokens", vocab)
    if len(set(suppressed)) >= vocab:
        raise InputError(f"suppress_tokens covers the whole vocabulary ({vocab} ids): nothing is left to generate")
    stops = stops + [(i,) for i in _as_ids(eos_token_id, "eos_token_id", vocab)]
    sampling = Sampling(greedy, temperature, top_k, top_p, min_p, tuple(sorted(set(suppressed))))
    tokens, states, reasons, stats = speculative_decode(
        model, rows, starts, drafter, k, max_new_tokens, sampling, generators, stops, callback
    )
    return GenerationOutput(tokens, states, reasons, stats)


def _row_state(model, batch: RecurrentState, row: int, position: int) -> RecurrentState:
    """Row ``row`` of the decoding batch as its own state. A growing tensor (a KV cache) was left-padded to the
    batch's longest row; the padding is dropped, so the state equals the one the prompt would get alone."""
    picked = batch.select(row)
    picked.position = position
    for layer, layout in zip(picked.layers, state_layout(model)):
        if "seen" not in layer:
            continue
        real = int(layer["seen"].max())  # a right-aligned cache's real entries are its last `seen` slots
        for name, (shape, _) in layout.items():
            for dim, size in enumerate(shape, start=1):
                if size is None and layer[name].shape[dim] > real:
                    layer[name] = layer[name].narrow(dim, layer[name].shape[dim] - real, real).contiguous()
    return picked
