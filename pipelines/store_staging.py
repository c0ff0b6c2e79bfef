"""Staged replacements: a sequence that ``ingest`` replaces is written into the store's ``_seqlab_staging`` group
and swapped in only once its source file has been read and verified, so a failed ingest leaves the old one; a
swap killed half-way is put back by the next ingest of that name (docs/stores.md, "Crash semantics")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from seqlab.errors import CorruptFileError

from .store import SequenceStore
from .store_format import STAGING

__all__: list[str] = []


def _staging(store: SequenceStore) -> SequenceStore:
    """The same store rooted at its staging group, where ``ingest`` writes a replacement of a sequence until its
    source file is verified (the group's name is not a sequence name: never listed)."""
    sub = object.__new__(SequenceStore)
    sub.__dict__.update(store.__dict__)
    try:
        sub.group = store.group.require_group(STAGING)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged zarr.json of the staging group
        raise CorruptFileError(
            f"sequence store {store.where}: {store.where}/{STAGING}/zarr.json is unreadable "
            f"({type(exc).__name__}: {exc}); the {STAGING} group holds only replacements "
            "in progress: remove it if no ingest is running"
        ) from None
    sub.where = f"{store.where}/{STAGING}"
    return sub


def _local_dir(store: SequenceStore, *parts: str) -> Path | None:
    from zarr.storage import LocalStore

    zarr_store = store.group.store_path.store
    return Path(zarr_store.root, store._key(*parts)) if isinstance(zarr_store, LocalStore) else None


def _swap_in(store: SequenceStore, staging: SequenceStore, name: str) -> None:
    """Put the staged (verified, complete) sequence ``name`` in place of the stored one.

    Local stores: two renames (the old folder aside, the new one in), then the old one is removed; a kill
    between them leaves the old one in the staging group, put back by the next ingest of that name.
    Other stores: the old keys are deleted and the new ones copied, metadata last."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    final, staged = _local_dir(store, name), _local_dir(staging, name)
    if final is not None and staged is not None:
        aside = _local_dir(staging, f"{name}.replaced")
        if aside.exists():
            shutil.rmtree(aside)
        had = final.exists()
        if had:
            os.rename(final, aside)
        os.rename(staged, final)
        if had:
            shutil.rmtree(aside, ignore_errors=True)
        return
    zarr_store = store.group.store_path.store
    source_prefix = staging._key(name) + "/"

    async def keys():
        return [key async for key in zarr_store.list_prefix(source_prefix)]

    found = sorted(sync(keys()), key=lambda key: key.endswith("zarr.json"))  # metadata last
    if name in store:
        store._delete_node(name)
    for key in found:
        data = sync(zarr_store.get(key, prototype=default_buffer_prototype()))
        sync(zarr_store.set(store._key(name, key[len(source_prefix) :]), data))
    staging._delete_node(name)


def _recover(store: SequenceStore, name: str) -> None:
    """Put back a sequence left aside by an ingest killed in the middle of ``_swap_in`` (local stores)."""
    final = _local_dir(store, name)
    if final is None or final.exists() or not _local_dir(store, STAGING).is_dir():
        return
    aside = _local_dir(store, STAGING, f"{name}.replaced")
    if aside.is_dir():
        os.rename(aside, final)
