"""``SequenceStoreDatasource``: a ``ray.data.Datasource`` of work rows over a sequence store, for Ray Data
pipelines of your own (the jobs build their rows in the driver instead: docs/ray-jobs.md)."""

from __future__ import annotations

from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

__all__ = ["SequenceStoreDatasource"]


class SequenceStoreDatasource(Datasource):
    """Rows of work over a Zarr v3 sequence store: one row per (sequence, segment) with names and ranges only
    (``plan_items``); the workers read the data themselves, a window at a time."""

    def __init__(self, items: list[dict]) -> None:
        super().__init__()
        self.items = list(items)

    def get_name(self) -> str:
        return "SeqlabSequenceStore"

    def estimate_inmemory_data_size(self) -> int | None:
        return 64 * len(self.items)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        import pyarrow as pa

        if not self.items:
            return []
        groups = max(1, min(int(parallelism) if parallelism and parallelism > 0 else len(self.items), len(self.items)))
        tasks = []
        for g in range(groups):
            rows = self.items[g::groups]

            def read(rows=rows):
                yield pa.Table.from_pylist(rows)

            meta = BlockMetadata(num_rows=len(rows), size_bytes=64 * len(rows), exec_stats=None, input_files=None)
            tasks.append(ReadTask(read, meta))
        return tasks
