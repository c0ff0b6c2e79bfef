"""A run's training and held-out data from a sequence store (``seqlab train --store``), and stored sequences as
held-out inputs of the exact evaluation (``seqlab eval --store``).

The adapter is the one that encoded the store (recorded with each sequence); training windows come from
``StoreSource``, which reads only the chunks each window touches, so a chromosome or hours of audio train
without being loaded. Held-out sequences stream through ``seqlab.domains.training_data.evaluate`` from their
readers. Called by ``seqlab.pipelines.training`` and the ``seqlab eval`` command; zarr is imported on use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from seqlab.domains.training_data import EVAL_WINDOW, HeldOut, TrainData, check_trainable
from seqlab.errors import ConfigError, InputError

__all__ = ["reader_pieces", "store_data", "store_inputs"]

_HINT = "(use fewer --batch-size streams or a shorter --window)"


def reader_pieces(reader, window: int) -> Iterator:
    """A stored sequence's encoded elements, ``window`` at a time, read through its ``SequenceReader``."""
    for start in range(0, reader.length, window):
        yield reader.read(start, min(start + window, reader.length))


def store_data(
    spec: dict, batch_size: int, window: int, model_for: Callable | None = None
) -> tuple[TrainData, object | None]:
    """A run's data from a store. ``spec``: ``{"store": path, "sequences": [...] | None, "eval_sequences": [...] |
    None, "domain": name | None}`` (training sequences default to every complete one but the held-out ones;
    ``domain``, when given, must be the name of the store's adapter). ``model_for(adapter)`` builds the model, which the
    sources then check against the stored encoding. Returns ``(TrainData, model or None)``; the TrainData's spec
    records the store's absolute path, the sequence lists and the adapter's name."""
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
    if spec.get("adapter_settings") and spec.get("domain") in (None, adapter.name):
        raise ConfigError(
            "with --store, the adapter is the one the store was encoded with: leave out --adapter-settings"
        )
    if spec.get("domain") and spec["domain"] != adapter.name:
        reencoded = _reencoded(store, adapter, spec, names, eval_names, batch_size, window, model_for)
        if reencoded is not None:
            return reencoded
        raise ConfigError(
            f"--adapter {spec['domain']!r}, but sequence store {store.where} was encoded by the "
            f"{adapter.name!r} adapter ({info.adapter}); leave out --adapter with --store"
        )
    model = model_for(adapter) if model_for else None
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
        eval_source = StoreSource(store, eval_names, 1, min(window, total - 1), model=model)
        for reader in readers:
            held_out.append(HeldOut(reader.info.name, lambda r=reader: reader_pieces(r, EVAL_WINDOW), reader.length))
    where = spec["store"] if "://" in str(spec["store"]) else os.path.abspath(spec["store"])
    spec = {**spec, "store": where, "sequences": names, "eval_sequences": eval_names, "domain": adapter.name}
    return TrainData(adapter, train, train.total, eval_source, held_out, spec), model


def _reencoded(store, stored, spec, names, eval_names, batch_size, window, model_for):
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

    data = torch.cat([adapter.encode(raw) for raw in raws(names)])
    train = training_source(adapter, data, batch_size, window, f"sequence store {store.where}")
    held_out, eval_source = [], None
    if eval_names:
        held = torch.cat([adapter.encode(raw) for raw in raws(eval_names)])
        if held.shape[0] < 2:
            raise InputError(f"--eval-sequences {eval_names} hold {held.shape[0]} {adapter.name} tokens: at least 2")
        eval_source = training_source(adapter, held, 1, min(window, held.shape[0] - 1), "held-out data")
        held_out.append(HeldOut(", ".join(eval_names), lambda: tensor_pieces(held, EVAL_WINDOW), int(held.shape[0])))
    model = model_for(adapter) if model_for else None
    where = spec["store"] if "://" in str(spec["store"]) else os.path.abspath(spec["store"])
    spec = {**spec, "store": where, "sequences": names, "eval_sequences": eval_names, "domain": adapter.name}
    return TrainData(adapter, train, int(data.shape[0]), eval_source, held_out, spec), model


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
