"""A Ray score job on a Mamba-3 model (on the suite's shared local cluster): per-position bits equal scoring the
stored sequence directly."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("ray")

from seqlab.checkpoint import save_model  # noqa: E402
from seqlab.config import BackboneConfig  # noqa: E402
from seqlab.domains.bytes import ByteAdapter  # noqa: E402

M3 = dict(ssm="mamba3", headdim=8, chunk_size=8)
TEXT = b"The state of a recurrent model is a fixed-size summary of everything it has read. " * 6


def test_ray_score_job_on_a_mamba3_model(ray_cluster, tmp_path):
    from seqlab.pipelines import SequenceStore
    from seqlab.pipelines.ray_jobs import score

    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=16, n_layer=1, **M3, d_state=8)).eval()
    save_model(tmp_path / "model.safetensors", model)
    store = SequenceStore(tmp_path / "in.zarr", "w")
    store.write("a", [adapter.encode(TEXT[:300])], adapter=adapter, chunk_elements=128)
    score(str(tmp_path / "model.safetensors"), str(tmp_path / "in.zarr"), tmp_path / "out.zarr", window=64)
    ids = SequenceStore(tmp_path / "in.zarr", "r").read("a")
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    want = (-torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0] / math.log(2)).numpy()
    got = SequenceStore(tmp_path / "out.zarr", "r").read("a", raw=True)
    assert got.shape == want.shape == (299,)
    assert float(abs(torch.as_tensor(got) - torch.as_tensor(want)).max()) <= 1e-4
