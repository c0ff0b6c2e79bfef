"""seqlab.pipelines: Zarr v3 sequence stores, windowed streaming with carried state, Ray jobs and Ray Train.

Names are imported on first use, so ``import seqlab.pipelines`` needs neither zarr nor ray. The function
``stream`` is imported from its module (``from seqlab.pipelines.stream import stream``): the package attribute
``stream`` is that submodule.
"""

from __future__ import annotations

import importlib

if __name__ != "seqlab.pipelines":  # this folder imported as a bare 'pipelines' from a checkout's root: see
    from seqlab._checkout import hand_over  # seqlab/_checkout.py

    hand_over(__name__, __file__)

_EXPORTS = {
    "SequenceStore": "store", "SequenceInfo": "store", "StoreSource": "store", "ingest": "store",
    "IngestResult": "store", "IngestProgress": "store",
    "stream_output": "stream", "stream_bits": "stream", "StreamWindow": "stream",
    "run_job": "ray_jobs", "JobResult": "ray_jobs", "SequenceStoreDatasource": "ray_jobs",
    "train_data_parallel": "ray_train", "load_trained_model": "ray_train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'seqlab.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
