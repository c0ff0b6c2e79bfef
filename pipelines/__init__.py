"""seqlab.pipelines: Zarr v3 sequence stores, windowed streaming with carried state, Ray jobs and Ray Train.
The top room of the library: it imports domains and the core, never the CLI (docs/architecture.md).

Names are imported on first use, so ``import seqlab.pipelines`` needs neither zarr nor ray. Modules by job:
``store_format`` (format, attrs, checks), ``store`` (``SequenceStore``), ``reader`` / ``writer``,
``store_ingest`` (``ingest``; ``store_staging``: its staged replacements), ``sources`` (``StoreSource``,
``check_model_fits``), ``store_stream`` (``stream``, ``stream_bits``), ``ray_cluster`` (starting or joining Ray,
``quiet``), ``ray_datasource``, ``ray_plan``, ``ray_execute`` (the actor pool), ``ray_work`` (what a job's actor
does), ``ray_errors``, ``ray_jobs`` (``run_job``, ``score``, ``embed``, ``generate``) and ``ray_train``
(``train_data_parallel``); ``training`` and ``train_data`` run whole training runs from files or stores.
"""

from __future__ import annotations

import importlib

if __name__ != "seqlab.pipelines":  # this folder imported as a bare 'pipelines' from a checkout's root: see
    from seqlab._checkout import hand_over  # seqlab/_checkout.py

    hand_over(__name__, __file__)

_EXPORTS = {
    "SequenceStore": "store",
    "open_store": "store",
    "SequenceInfo": "store_format",
    "sequence_name": "store_format",
    "DamagedSequenceWarning": "store_format",
    "SequenceReader": "reader",
    "SequenceWriter": "writer",
    "StoreSource": "sources",
    "check_model_fits": "sources",
    "ingest": "store_ingest",
    "IngestResult": "store_ingest",
    "IngestProgress": "store_ingest",
    "stream": "store_stream",
    "stream_output": "store_stream",
    "stream_bits": "store_stream",
    "StreamWindow": "store_stream",
    "run_job": "ray_jobs",
    "JobResult": "ray_jobs",
    "JobProgress": "ray_jobs",
    "SequenceStoreDatasource": "ray_datasource",
    "train_data_parallel": "ray_train",
    "load_trained_model": "ray_train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'seqlab.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
