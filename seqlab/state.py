"""RecurrentState: everything a causal model needs to continue a sequence exactly where it stopped.

Per layer a dict of named fp32 tensors (for the Mamba mixers: ``conv``, the last d_conv - 1 conv inputs,
and ``ssm``, the scan state), plus the absolute position of every row (elements consumed so far: ``positions``,
one int per row; ``position``, one int while all rows agree) and the fingerprint of the backbone config that
made it. The design's invariants (split anywhere and thread the state, step
equals forward, save/load/continue is bit-exact, refuse another config's state) are tested in
tests/test_core/test_state_contract.py.
"""

from __future__ import annotations

import numbers
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seqlab.errors import CorruptFileError, StateError, StateMismatchError
from seqlab.safetensors_io import read_tensors, write_tensors

STATE_FORMAT = "seqlab.recurrent_state"
#: 2: the checksum covers every byte of the file (position and fingerprint included); version 1 files (tensor
#: checksum only) still load
STATE_FORMAT_VERSION = 2
FULL_CHECKSUM_SINCE = 2

# model -> per layer {tensor name: (shape without the batch dim, dtype)}; configs are frozen, so this never changes.
# A dim that a fresh state holds at size 0 grows with the sequence (an attention layer's KV cache): its entry in
# the shape is None, any size is accepted there, and rows are right-aligned along it (padding on the left).
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state_layout(model) -> list[dict[str, tuple[tuple[int | None, ...], torch.dtype]]]:
    """What ``model``'s state holds per layer: ``{name: (shape without the batch dim, dtype)}``."""
    try:
        return _LAYOUTS[model]
    except (KeyError, TypeError):
        pass
    layout = [
        {name: (tuple(None if n == 0 else n for n in t.shape[1:]), t.dtype) for name, t in layer.items()}
        for layer in model.init_state(1, device="meta").layers
    ]
    try:
        _LAYOUTS[model] = layout
    except TypeError:  # pragma: no cover - an object that cannot be weakly referenced
        pass
    return layout


def check_state_tensors(layers, model, where: str = "state", error=StateMismatchError) -> None:
    """Raise ``error`` unless ``layers`` hold exactly the tensors ``model``'s state has: the same names per layer,
    one batch size, the model's shapes and state dtype. The message names the layer, tensor and expected shape."""
    layout = state_layout(model)
    # a float64 model (model.double()) carries its scan state in float64; every other model in float32
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    wide = first is not None and first.dtype == torch.float64
    if not isinstance(layers, (list, tuple)):
        raise error(f"{where}: layers must be a list of dicts of tensors, got {type(layers).__name__}")
    if len(layers) != len(layout):
        raise error(f"{where}: holds {len(layers)} layers, the model has {len(layout)}")
    checks = _layer_checks(model)
    batch = None
    for i, (have, want) in enumerate(zip(layers, layout)):
        if not isinstance(have, dict) or set(have) != set(want):
            names = sorted(have) if isinstance(have, dict) else type(have).__name__
            raise error(f"{where}: layers.{i} holds {names}, the model's state has {sorted(want)}")
        check = checks[i] if i < len(checks) else None
        if check is not None and all(isinstance(t, torch.Tensor) for t in have.values()):
            problem = check(have)  # what the layer's mixer knows beyond the layout (a KV cache's heads, slots)
            if problem:
                raise error(f"{where}: layers.{i}: {problem}")
        for name, (shape, dtype) in want.items():
            tensor = have[name]
            if not isinstance(tensor, torch.Tensor):
                raise error(f"{where}: layers.{i}.{name} is a {type(tensor).__name__}, not a tensor")
            if tensor.dtype != dtype and not (wide and tensor.dtype == torch.float64):
                raise error(f"{where}: layers.{i}.{name} has dtype {tensor.dtype}, the model's state dtype is {dtype}")
            if tensor.dim() != len(shape) + 1 or any(
                want_n is not None and n != want_n for n, want_n in zip(tensor.shape[1:], shape)
            ):
                raise error(
                    f"{where}: layers.{i}.{name} has shape {tuple(tensor.shape)}, the model's is "
                    f"(batch, {', '.join('any' if n is None else str(n) for n in shape)})"
                )
            if batch is None:
                batch = tensor.shape[0]
                if batch < 1:
                    raise error(f"{where}: layers.{i}.{name} holds a batch of 0 rows")
            elif tensor.shape[0] != batch:
                raise error(
                    f"{where}: layers.{i}.{name} holds a batch of {tensor.shape[0]}, layers.0 a batch of {batch}"
                )


def _layer_checks(model) -> list:
    """Per layer, its mixer's ``check_state(layer_state) -> problem or None``, where the mixer has one."""
    blocks = getattr(getattr(model, "backbone", model), "layers", None)
    if blocks is None:
        return []
    return [getattr(getattr(block, "mixer", None), "check_state", None) for block in blocks]


def require_fingerprint(found, model, what: str = "state", where: str = "") -> None:
    """Raise StateMismatchError unless ``found`` is ``model``'s config fingerprint. ``where`` names a file."""
    expected = getattr(model, "fingerprint", None)
    if found != expected:
        prefix = f"{where}: " if where else ""
        raise StateMismatchError(
            f"{prefix}{what} was made by a model with config fingerprint {found}, this model's is {expected}"
        )


def concat_rows(per_state_layers: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """The layers of several states as one batch (rows in the order given). Tensors whose non-batch dims differ
    (a KV cache's slots: states at different positions) are left-padded with zeros to the longest, which is
    the right-aligned layout such tensors use: the padding is never read."""
    first = per_state_layers[0]
    out = []
    for i, layer in enumerate(first):
        merged = {}
        for name in layer:
            parts = [layers[i][name] for layers in per_state_layers]
            sizes = [p.shape[1:] for p in parts]
            if any(size != sizes[0] for size in sizes):
                longest = [max(dims) for dims in zip(*sizes)]
                padded = []
                for p in parts:
                    pad: list[int] = []
                    for have, want in zip(reversed(p.shape[1:]), reversed(longest)):
                        pad += [want - have, 0]  # F.pad order: last dim first, (left, right)
                    padded.append(torch.nn.functional.pad(p, pad))
                parts = padded
            merged[name] = torch.cat(parts, dim=0)
        out.append(merged)
    return out


def _bad_position(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0


def _as_position(value):
    """What ``RecurrentState.position`` stores: an int (every row), or a tuple of ints (one per row). Values are
    not range-checked here (``check_compatible`` and ``save`` refuse a negative one with a clear message)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else int(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise StateError("positions must hold one int per row, got an empty sequence")
        return tuple(v if _bad_position(v) else int(v) for v in value)
    return value


@dataclass(eq=False)
class RecurrentState:
    """The state of a batch of rows. ``position`` (the constructor's second argument) is an int for every row,
    or a sequence of ints, one per row (rows at different positions: a ragged batch, a packed prefill).
    ``state.positions`` (a tuple, one int per row) always works; ``state.position`` is the int when every row
    is at the same position and raises StateError (naming ``positions``) when they differ."""

    layers: list[dict[str, torch.Tensor]]
    position: int  # an int, or a tuple of ints per row: read through the property set below the class
    fingerprint: str
    _position: int | tuple[int, ...] = field(init=False, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------------
    @property
    def positions(self) -> tuple[int, ...]:
        """The position of every row (a tuple of ``batch_size`` ints)."""
        stored = self._position
        if isinstance(stored, tuple):
            return stored
        return (stored,) * self.batch_size

    @positions.setter
    def positions(self, value) -> None:
        self._position = _as_position(value)

    @property
    def uniform(self) -> bool:
        """True when every row is at the same position (``position`` works)."""
        stored = self._position
        return not isinstance(stored, tuple) or all(p == stored[0] for p in stored)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for tensor in layer.values():
                return tensor.shape[0]
        return 0

    @property
    def device(self) -> torch.device:
        for layer in self.layers:
            for tensor in layer.values():
                return tensor.device
        return torch.device("cpu")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat view ``{"layers.<i>.<name>": tensor}``, the names used on disk."""
        return {f"layers.{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def _map(self, fn) -> RecurrentState:
        out = RecurrentState([{k: fn(v) for k, v in layer.items()} for layer in self.layers], 0, self.fingerprint)
        out._position = self._position
        return out

    def clone(self) -> RecurrentState:
        return self._map(lambda t: t.clone())

    def detach(self) -> RecurrentState:
        """Cut the autograd graph (truncated BPTT carries detached states between windows)."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype: torch.dtype | None = None) -> RecurrentState:
        """Move the state; ``dtype`` applies to the floating tensors (counters such as ``seen`` stay int64)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, index: int) -> RecurrentState:
        """Row ``index`` of the batch as a batch-of-one state (a copy, at that row's position)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"row {index} is outside the batch of {self.batch_size}")
        index = index % self.batch_size  # a negative index counts from the end (t[-1:0] would be empty)
        picked = self._map(lambda t: t[index : index + 1].clone())
        if isinstance(self._position, tuple):
            picked._position = self._check_rows()[index]
        return picked

    def _check_rows(self) -> tuple[int, ...]:
        """The per-row positions, after checking there is one per row."""
        stored = self._position
        if isinstance(stored, tuple) and len(stored) != self.batch_size:
            raise StateError(
                f"state positions hold {len(stored)} entries for a batch of {self.batch_size}: one position per row"
            )
        return self.positions

    @classmethod
    def stack(cls, states: list[RecurrentState]) -> RecurrentState:
        """One batch from several states of the same model (rows in the order given), each row keeping its own
        position. A growing tensor (a KV cache) is left-padded to the longest, as its right-aligned layout reads
        it (``concat_rows``)."""
        if not states:
            raise StateMismatchError("RecurrentState.stack needs at least one state")
        first = states[0]
        for i, other in enumerate(states[1:], start=1):
            if other.fingerprint != first.fingerprint:
                raise StateMismatchError(f"states[{i}] was made by another model config than states[0]")
        positions = tuple(p for s in states for p in s._check_rows())
        if all(p == positions[0] for p in positions):
            return cls(concat_rows([s.layers for s in states]), positions[0], first.fingerprint)
        return cls(concat_rows([s.layers for s in states]), positions, first.fingerprint)  # type: ignore[arg-type]

    def advanced(self, layers: list[dict[str, torch.Tensor]], by) -> RecurrentState:
        """A state of the same model with ``layers``, each row's position moved on by ``by`` (an int for every
        row, or a sequence of ints, one per row)."""
        if isinstance(by, numbers.Integral) and not isinstance(self._position, tuple):
            return RecurrentState(layers, self._position + int(by), self.fingerprint)
        steps = (int(by),) * self.batch_size if isinstance(by, numbers.Integral) else tuple(int(b) for b in by)
        here = self._check_rows()
        if len(steps) != len(here):
            raise StateError(f"{len(steps)} position steps for a state of {len(here)} rows")
        return RecurrentState(layers, tuple(p + s for p, s in zip(here, steps)), self.fingerprint)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        where = f"position={self._position}" if self.uniform else f"positions={self._position}"
        if isinstance(self._position, tuple) and self.uniform:
            where = f"position={self._position[0]}"
        return (
            f"RecurrentState(layers={len(self.layers)}, batch_size={self.batch_size}, {where}, "
            f"fingerprint={self.fingerprint!r}, bytes={self.nbytes()})"
        )

    def _check_positions(self, suffix: str = "") -> None:
        stored = self._position
        if isinstance(stored, tuple):
            for i, p in enumerate(stored):
                if _bad_position(p):
                    raise StateError(f"state positions[{i}] must be an int >= 0, got {p!r}{suffix}")
        elif _bad_position(stored):
            raise StateError(f"state position must be an int >= 0, got {stored!r}{suffix}")

    # ------------------------------------------------------------------------------------------------
    def check_compatible(self, model, batch_size: int | None = None, device: torch.device | None = None) -> None:
        """Raise StateMismatchError unless this state can feed ``model`` (and a batch of ``batch_size``)."""
        require_fingerprint(self.fingerprint, model)
        if len(self.layers) != model.config.n_layer:
            raise StateMismatchError(f"state has {len(self.layers)} layers, the model has {model.config.n_layer}")
        self._check_positions()
        check_state_tensors(self.layers, model)
        self._check_rows()
        if batch_size is not None and self.batch_size != batch_size:
            raise StateMismatchError(f"state holds a batch of {self.batch_size}, the input a batch of {batch_size}")
        if device is not None and self.device.type != torch.device(device).type:
            raise StateMismatchError(f"state is on {self.device}, the input on {device}: move it with state.to()")

    # ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors + JSON metadata with a checksum over every byte of the file; a failed
        save leaves the old file."""
        self._check_positions(f": not saved to {path}")
        positions = self._check_rows()
        meta: dict[str, object] = {
            "fingerprint": self.fingerprint,
            # one position for every row: the metadata of older files (readers before per-row positions load it);
            # rows at different positions: "position" null (an older reader refuses the file rather than misread
            # it) and "positions", one per row
            "position": positions[0] if self.uniform else None,
            "batch_size": self.batch_size,
            "layers": [sorted(layer) for layer in self.layers],
        }
        if not self.uniform:
            meta["positions"] = list(positions)
        return write_tensors(path, self.tensors(), kind=STATE_FORMAT, version=STATE_FORMAT_VERSION, meta=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model, device=None) -> RecurrentState:
        """Read a state saved by ``save`` and check that it belongs to ``model`` (same config fingerprint), holds
        the model's tensors (names, shapes, state dtype), finite values and a position >= 0."""
        return cls.from_file_contents(
            *read_tensors(
                path, kind=STATE_FORMAT, version=STATE_FORMAT_VERSION, full_checksum_since=FULL_CHECKSUM_SINCE
            ),
            model,
            str(path),
            device,
        )

    @classmethod
    def from_file_contents(cls, tensors: dict, meta: dict, model, where: str, device=None) -> RecurrentState:
        """A state from a file's checked tensors and metadata (``load``), with every value checked."""
        require_fingerprint(meta.get("fingerprint"), model, where=where)
        try:
            names = meta["layers"]
            layers = [{name: tensors[f"layers.{i}.{name}"] for name in layer} for i, layer in enumerate(names)]
            position = meta["position"]
            positions = meta.get("positions")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{where}: state metadata does not match its tensors ({exc!r})") from None
        if positions is not None:
            batch = meta.get("batch_size")
            if not isinstance(positions, list) or not positions or len(positions) != batch:
                raise CorruptFileError(
                    f"{where}: positions must be a list of one int per row ({batch} rows), got {positions!r}"
                )
            for i, p in enumerate(positions):
                if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                    raise CorruptFileError(f"{where}: positions[{i}] must be an int >= 0, got {p!r}")
            if position is not None:
                raise CorruptFileError(f"{where}: holds both position and positions ({position!r}, {positions!r})")
            position = tuple(positions)
        elif isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise CorruptFileError(f"{where}: position must be an int >= 0, got {position!r}")
        used = {f"layers.{i}.{name}" for i, layer in enumerate(layers) for name in layer}
        extra = sorted(set(tensors) - used)
        if extra:
            raise CorruptFileError(f"{where}: holds tensors the state metadata does not list: {extra}")
        check_state_tensors(layers, model, where, CorruptFileError)
        for i, layer in enumerate(layers):
            for name, tensor in layer.items():
                if not bool(torch.isfinite(tensor).all()):
                    raise CorruptFileError(f"{where}: layers.{i}.{name} holds NaN or infinite values")
        state = cls(layers, position, meta["fingerprint"])
        if isinstance(position, tuple) and len(position) != state.batch_size:
            raise CorruptFileError(
                f"{where}: positions hold {len(position)} entries, the tensors {state.batch_size} rows"
            )
        return state.to(device) if device is not None else state


def _get_position(self: RecurrentState) -> int:
    stored = self._position
    if not isinstance(stored, tuple):
        return stored
    if all(p == stored[0] for p in stored):
        return stored[0]
    raise StateError(
        f"the rows of this state are at different positions {stored}: there is no one position; read "
        "state.positions (one int per row)"
    )


def _set_position(self: RecurrentState, value) -> None:
    self._position = _as_position(value)


# ``position`` is a dataclass field (the constructor's second argument, ``dataclasses.replace(state, position=..)``)
# read and written through this property: an int, or per-row positions (see the class docstring).
RecurrentState.position = property(_get_position, _set_position)  # type: ignore[assignment]
