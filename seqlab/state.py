"""RecurrentState: everything a causal model needs to continue a sequence exactly where it stopped.

Per layer a dict of named fp32 tensors (for the Mamba mixers: ``conv``, the last d_conv - 1 conv inputs,
and ``ssm``, the scan state), plus the absolute ``position`` (elements consumed so far) and the fingerprint
of the backbone config that made it. The design's invariants (split anywhere and thread the state, step
equals forward, save/load/continue is bit-exact, refuse another config's state) are tested in
tests/test_core/test_state_contract.py.
"""

from __future__ import annotations

import numbers
import os
import weakref
from dataclasses import dataclass
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


@dataclass(eq=False)
class RecurrentState:
    layers: list[dict[str, torch.Tensor]]
    position: int
    fingerprint: str

    # ------------------------------------------------------------------------------------------------
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
        return RecurrentState(
            [{k: fn(v) for k, v in layer.items()} for layer in self.layers], self.position, self.fingerprint
        )

    def clone(self) -> RecurrentState:
        return self._map(lambda t: t.clone())

    def detach(self) -> RecurrentState:
        """Cut the autograd graph (truncated BPTT carries detached states between windows)."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype: torch.dtype | None = None) -> RecurrentState:
        """Move the state; ``dtype`` applies to the floating tensors (counters such as ``seen`` stay int64)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, index: int) -> RecurrentState:
        """Row ``index`` of the batch as a batch-of-one state (a copy; same position)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"row {index} is outside the batch of {self.batch_size}")
        return self._map(lambda t: t[index : index + 1].clone())

    @classmethod
    def stack(cls, states: list[RecurrentState]) -> RecurrentState:
        """One batch from several states of the same model and position (rows in the order given)."""
        if not states:
            raise StateMismatchError("RecurrentState.stack needs at least one state")
        first = states[0]
        for i, other in enumerate(states[1:], start=1):
            if other.fingerprint != first.fingerprint:
                raise StateMismatchError(f"states[{i}] was made by another model config than states[0]")
            if other.position != first.position:
                raise StateMismatchError(
                    f"states[{i}] is at position {other.position}, states[0] at {first.position}: "
                    "rows of one state share a position"
                )
        return cls(concat_rows([s.layers for s in states]), first.position, first.fingerprint)

    def __repr__(self) -> str:
        return (
            f"RecurrentState(layers={len(self.layers)}, batch_size={self.batch_size}, position={self.position}, "
            f"fingerprint={self.fingerprint!r}, bytes={self.nbytes()})"
        )

    # ------------------------------------------------------------------------------------------------
    def check_compatible(self, model, batch_size: int | None = None, device: torch.device | None = None) -> None:
        """Raise StateMismatchError unless this state can feed ``model`` (and a batch of ``batch_size``)."""
        require_fingerprint(self.fingerprint, model)
        if len(self.layers) != model.config.n_layer:
            raise StateMismatchError(f"state has {len(self.layers)} layers, the model has {model.config.n_layer}")
        if isinstance(self.position, bool) or not isinstance(self.position, numbers.Integral) or self.position < 0:
            raise StateError(f"state position must be an int >= 0, got {self.position!r}")
        check_state_tensors(self.layers, model)
        if batch_size is not None and self.batch_size != batch_size:
            raise StateMismatchError(f"state holds a batch of {self.batch_size}, the input a batch of {batch_size}")
        if device is not None and self.device.type != torch.device(device).type:
            raise StateMismatchError(f"state is on {self.device}, the input on {device}: move it with state.to()")

    # ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors + JSON metadata with a checksum over every byte of the file; a failed
        save leaves the old file."""
        if isinstance(self.position, bool) or not isinstance(self.position, numbers.Integral) or self.position < 0:
            raise StateError(f"state position must be an int >= 0, got {self.position!r}: not saved to {path}")
        meta = {
            "fingerprint": self.fingerprint,
            "position": int(self.position),
            "batch_size": self.batch_size,
            "layers": [sorted(layer) for layer in self.layers],
        }
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
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{where}: state metadata does not match its tensors ({exc!r})") from None
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
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
        return state.to(device) if device is not None else state
