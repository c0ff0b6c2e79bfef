"""A run's training and held-out data from a sequence store (``seqlab train --store``), and stored sequences as
held-out inputs of the exact evaluation (``seqlab eval --store``).

The adapter is the one that encoded the store (recorded with each sequence); training windows come from
``StoreSource``, which reads only the chunks each window touches, so a chromosome or hours of audio train
without being loaded. Held-out sequences stream through ``seqlab.domains.training_data.evaluate`` from their
readers. Called by ``seqlab.pipelines.training`` and the ``seqlab eval`` command; zarr is imported on use.

With ``pack=True`` each stored sequence is one document and the training source is packed rows
(``seqlab.packing.PackedSource`` over ``StoredDocuments``, which reads only the chunks each window touches).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from seqlab.domains.training_data import EVAL_WINDOW, HeldOut, TrainData, check_trainable
from seqlab.errors import ConfigError, InputError

__all__ = ["StoredDocuments", "reader_pieces", "store_data", "store_inputs"]

_HINT = "(use fewer --batch-size streams or a shorter --window)"


def reader_pieces(reader, window: int) -> Iterator:
    """A stored sequence's encoded elements, ``window`` at a time, read through its ``SequenceReader``."""
    for start in range(0, reader.length, window):
        yield reader.read(start, min(start + window, reader.length))


class StoredDocuments:
    """Stored sequences laid end to end as one 1-D id array for ``PackedSource``: ``shape`` and ``[start:stop]``
    (the stored dtype), reading only the chunks a slice touches. ``lengths``: each sequence's elements."""

    def __init__(self, readers) -> None:
        import numpy as np

        self.readers = list(readers)
        self.lengths = [int(r.length) for r in self.readers]
        self.offsets = np.cumsum([0, *self.lengths])
        self.shape = (int(self.offsets[-1]),)
        self.dtype = np.dtype(self.readers[0].info.dtype)

    def __getitem__(self, index):
        import numpy as np

        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("StoredDocuments takes slices [start:stop]")
        start, stop, _ = index.indices(self.shape[0])
        parts = []
        for k, reader in enumerate(self.readers):
            base = int(self.offsets[k])
            lo, hi = max(start - base, 0), min(stop - base, reader.length)
            if hi > lo:
                parts.append(reader.read(lo, hi, raw=True))
        if not parts:
            return np.zeros(0, self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _packed_store_source(store, names, batch_size, window, model, where):
    """Packed rows of stored sequences (each one document), refused for frames or mixed encodings."""
    from seqlab.domains.training_data import packed_source
    from seqlab.pipelines.sources import check_model_fits
    from seqlab.pipelines.store_format import _jsonable

    readers = [store.reader(n) for n in names]
    first = readers[0].info
    for reader in readers:
        if reader.info.kind != "tokens":
            raise ConfigError(
                f"--pack packs documents of token ids; stored sequence {reader.info.name!r} holds continuous "
                "frames: train it without --pack"
            )
        if _jsonable(reader.info.adapter) != _jsonable(first.adapter):
            raise InputError(
                f"sequence store {store.where}: sequences {first.name!r} and {reader.info.name!r} were encoded "
                "differently: they cannot be one source"
            )
        if model is not None:
            check_model_fits(model, reader.info, reader.where)
    docs = StoredDocuments(readers)
    return packed_source(docs, docs.lengths, batch_size, window, where)


def store_data(
    spec: dict, batch_size: int, window: int, model_for: Callable | None = None, pack: bool = False
) -> tuple[TrainData, object | None]:
    """A run's data from a store. ``spec``: ``{"store": path, "sequences": [...] | None, "eval_sequences": [...] |
    None, "domain": name | None}`` (training sequences default to every complete one but the held-out ones;
    ``domain``, when given, must be the name of the store's adapter). ``model_for(adapter)`` builds the model, which the
    sources then check against the stored encoding. Returns ``(TrainData, model or None)``; the TrainData's spec
    records the store's absolute path, the sequence lists and the adapter's name. ``pack``: packed rows, each
    stored sequence one document (the periodic evaluation's held-out sequences too)."""
    from seqlab.domains.base import adapter_from_info
    from seqlab.pipelines.sources import StoreSource
    from seqlab.pipelines.store import SequenceStore

    store = SequenceStore(spec["store"], "r")
    eval_names = list(spec.get("eval_sequences") or [])
    names = list(spec.get("sequences") or [])
    if not names:
        names = [n for n in store.list(incomplete=False) if n not in eval_names]
        if not names:
            raise InputError(
                f"sequence store {store.where} holds no complete sequence to train on"
                + (" besides --eval-sequences" if eval_names else "")
            )
    overlap = sorted(set(names) & set(eval_names))
    if overlap:
        raise ConfigError(f"--eval-sequences {overlap} are also training sequences: held-out data must be unseen")
    info = store.describe(names[0])
    if not info.adapter:
        raise InputError(
            f"sequence store {store.where}: sequence {names[0]!r} records no adapter (it was not "
            "written by seqlab ingest or an adapter), so seqlab train cannot know how it was encoded"
        )
    adapter = adapter_from_info(info.adapter)
    check_trainable(adapter)
    if pack:
        from seqlab.domains.training_data import check_packable

        check_packable(adapter)
    if spec.get("adapter_settings") and spec.get("domain") in (None, adapter.name):
        raise ConfigError(
            "with --store, the adapter is the one the store was encoded with: leave out --adapter-settings"
        )
    if spec.get("domain") and spec["domain"] != adapter.name:
        reencoded = _reencoded(store, adapter, spec, names, eval_names, batch_size, window, model_for, pack)
        if reencoded is not None:
            return reencoded
        raise ConfigError(
            f"--adapter {spec['domain']!r}, but sequence store {store.where} was encoded by the "
            f"{adapter.name!r} adapter ({info.adapter}); leave out --adapter with --store"
        )
    model = model_for(adapter) if model_for else None
    if pack:
        train = _packed_store_source(store, names, batch_size, window, model, f"sequence store {store.where}")
    else:
        try:
            train = StoreSource(store, names, batch_size, window, model=model)
        except InputError as exc:
            raise InputError(f"{exc} {_HINT}") from None
    held_out, eval_source = [], None
    if eval_names:
        readers = [store.reader(n) for n in eval_names]
        total = sum(r.length for r in readers)
        if total < 2:
            raise InputError(f"--eval-sequences {eval_names} hold {total} elements: at least 2 are needed")
        if pack:
            eval_source = _packed_store_source(store, eval_names, 1, min(window, total), model, "--eval-sequences")
        else:
            eval_source = StoreSource(store, eval_names, 1, min(window, total - 1), model=model)
        for reader in readers:
            held_out.append(HeldOut(reader.info.name, lambda r=reader: reader_pieces(r, EVAL_WINDOW), reader.length))
    where = spec["store"] if "://" in str(spec["store"]) else os.path.abspath(spec["store"])
    spec = {**spec, "store": where, "sequences": names, "eval_sequences": eval_names, "domain": adapter.name}
    packing = train.stats().to_dict() if pack else None
    return TrainData(adapter, train, train.total, eval_source, held_out, spec, packing), model


def _reencoded(store, stored, spec, names, eval_names, batch_size, window, model_for, pack=False):
    """A run of an adapter that learns its encoding (``Adapter.fitted``: a subword BPE) on a store written by
    another one (bytes): the training sequences are decoded to their raw values (read whole, so this suits a
    drafter's text, not a chromosome), the adapter learns on them and re-encodes them in memory. None when
    the requested adapter learns nothing (then the store's adapter must be used)."""
    from seqlab.domains.training_data import adapter_for, tensor_pieces, training_source

    wanted = adapter_for(spec["domain"], spec.get("adapter_settings"))
    check_trainable(wanted)

    def raws(which):
        for name in which:
            reader = store.reader(name)
            yield stored.decode(reader.read(0, reader.length))

    adapter = wanted.fitted(raws(names))
    if adapter is wanted or adapter.continuous:
        return None
    import torch

    from seqlab.domains.training_data import packed_source

    docs = [adapter.encode(raw) for raw in raws(names)]
    data = torch.cat(docs)
    where = f"sequence store {store.where}"
    if pack:
        train = packed_source(data, [d.shape[0] for d in docs], batch_size, window, where)
    else:
        train = training_source(adapter, data, batch_size, window, where)
    held_out, eval_source = [], None
    if eval_names:
        held_docs = [adapter.encode(raw) for raw in raws(eval_names)]
        held = torch.cat(held_docs)
        if held.shape[0] < 2:
            raise InputError(f"--eval-sequences {eval_names} hold {held.shape[0]} {adapter.name} tokens: at least 2")
        if pack:
            lengths = [d.shape[0] for d in held_docs]
            eval_source = packed_source(held, lengths, 1, min(window, held.shape[0]), "held-out data")
        else:
            eval_source = training_source(adapter, held, 1, min(window, held.shape[0] - 1), "held-out data")
        held_out.append(HeldOut(", ".join(eval_names), lambda: tensor_pieces(held, EVAL_WINDOW), int(held.shape[0])))
        if pack:  # a packed run's model is measured on each stored sequence from a fresh state
            held_out[-1].documents = lambda: iter(held_docs)
    model = model_for(adapter) if model_for else None
    where = spec["store"] if "://" in str(spec["store"]) else os.path.abspath(spec["store"])
    spec = {**spec, "store": where, "sequences": names, "eval_sequences": eval_names, "domain": adapter.name}
    packing = train.stats().to_dict() if pack else None
    return TrainData(adapter, train, int(data.shape[0]), eval_source, held_out, spec, packing), model


def store_inputs(store, names: list[str] | None, window: int, model=None) -> list[HeldOut]:
    """Stored sequences (default: every complete one) as held-out inputs streamed ``window`` elements at a time;
    with a ``model``, each is refused unless the model was built by the adapter that wrote it."""
    from seqlab.pipelines.sources import check_model_fits
    from seqlab.pipelines.store import open_store

    store = open_store(store, "r")
    inputs = []
    for name in names or store.list(incomplete=False):
        reader = store.reader(name)
        if model is not None:
            check_model_fits(model, reader.info, reader.where)
        inputs.append(HeldOut(name, lambda r=reader: reader_pieces(r, window), reader.length))
    if not inputs:
        raise InputError(f"sequence store {store.where} holds no complete sequence")
    return inputs
