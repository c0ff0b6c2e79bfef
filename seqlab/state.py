"""RecurrentState: everything a causal model needs to continue a sequence exactly where it stopped.

Per layer a dict of named fp32 tensors (for the Mamba mixers: ``conv``, the last d_conv - 1 conv inputs,
and ``ssm``, the scan state), plus the absolute ``position`` (elements consumed so far) and the fingerprint
of the backbone config that made it. The design's invariants (split anywhere and thread the state, step
equals forward, save/load/continue is bit-exact, refuse another config's state) are tested in
tests/test_core/test_state_contract.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from seqlab.errors import CorruptFileError, StateMismatchError
from seqlab.safetensors_io import read_tensors, write_tensors

STATE_FORMAT = "seqlab.recurrent_state"
STATE_FORMAT_VERSION = 1


def require_fingerprint(found, model, what: str = "state", where: str = "") -> None:
    """Raise StateMismatchError unless ``found`` is ``model``'s config fingerprint. ``where`` names a file."""
    expected = getattr(model, "fingerprint", None)
    if found != expected:
        prefix = f"{where}: " if where else ""
        raise StateMismatchError(
            f"{prefix}{what} was made by a model with config fingerprint {found}, this model's is {expected}"
        )


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

    def _map(self, fn) -> "RecurrentState":
        return RecurrentState([{k: fn(v) for k, v in layer.items()} for layer in self.layers],
                              self.position, self.fingerprint)

    def clone(self) -> "RecurrentState":
        return self._map(lambda t: t.clone())

    def detach(self) -> "RecurrentState":
        """Cut the autograd graph (truncated BPTT carries detached states between windows)."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "RecurrentState":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def select(self, index: int) -> "RecurrentState":
        """Row ``index`` of the batch as a batch-of-one state (a copy; same position)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"row {index} is outside the batch of {self.batch_size}")
        return self._map(lambda t: t[index:index + 1].clone())

    @classmethod
    def stack(cls, states: "list[RecurrentState]") -> "RecurrentState":
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
        layers = [{name: torch.cat([s.layers[i][name] for s in states], dim=0) for name in layer}
                  for i, layer in enumerate(first.layers)]
        return cls(layers, first.position, first.fingerprint)

    def __repr__(self) -> str:
        return (f"RecurrentState(layers={len(self.layers)}, batch_size={self.batch_size}, position={self.position}, "
                f"fingerprint={self.fingerprint!r}, bytes={self.nbytes()})")

    # ------------------------------------------------------------------------------------------------
    def check_compatible(self, model, batch_size: int | None = None, device: torch.device | None = None) -> None:
        """Raise StateMismatchError unless this state can feed ``model`` (and a batch of ``batch_size``)."""
        require_fingerprint(self.fingerprint, model)
        if len(self.layers) != model.config.n_layer:
            raise StateMismatchError(f"state has {len(self.layers)} layers, the model has {model.config.n_layer}")
        if batch_size is not None and self.batch_size != batch_size:
            raise StateMismatchError(f"state holds a batch of {self.batch_size}, the input a batch of {batch_size}")
        if device is not None and self.device.type != torch.device(device).type:
            raise StateMismatchError(f"state is on {self.device}, the input on {device}: move it with state.to()")

    # ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors + JSON metadata with a checksum; a failed save leaves the old file."""
        meta = {"fingerprint": self.fingerprint, "position": int(self.position), "batch_size": self.batch_size,
                "layers": [sorted(layer) for layer in self.layers]}
        return write_tensors(path, self.tensors(), kind=STATE_FORMAT, version=STATE_FORMAT_VERSION, meta=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model, device=None) -> "RecurrentState":
        """Read a state saved by ``save`` and check that it belongs to ``model`` (same config fingerprint)."""
        tensors, meta = read_tensors(path, kind=STATE_FORMAT, version=STATE_FORMAT_VERSION)
        require_fingerprint(meta.get("fingerprint"), model, where=str(path))
        try:
            layers = [{name: tensors[f"layers.{i}.{name}"] for name in names} for i, names in enumerate(meta["layers"])]
            position = int(meta["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: state metadata does not match its tensors ({exc})") from None
        state = cls(layers, position, meta["fingerprint"])
        expected = model.init_state(state.batch_size, device="meta")
        for i, (have, want) in enumerate(zip(state.layers, expected.layers)):
            for name, tensor in want.items():
                if name not in have or have[name].shape != tensor.shape:
                    got = tuple(have[name].shape) if name in have else "nothing"
                    raise CorruptFileError(f"{path}: layers.{i}.{name} should have shape {tuple(tensor.shape)}, got {got}")
        if len(state.layers) != len(expected.layers):
            raise CorruptFileError(f"{path}: {len(state.layers)} layers stored, the model has {len(expected.layers)}")
        return state.to(device) if device is not None else state
