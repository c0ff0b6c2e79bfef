"""The whole model on backend="triton" (Triton interpreter on CPU here, real kernels on a GPU) against
backend="chunked": logits, final states, parameter gradients, streaming in pieces and the decode steps."""

from __future__ import annotations

import pytest
import torch

import seqlab.kernels as K
from seqlab.testing import rel_err, tiny_lm

pytestmark = pytest.mark.skipif(not K.triton_available(), reason="Triton cannot run here (import failed)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls of every Triton entry point, so a silent fallback to another backend fails the tests."""
    import importlib

    calls = {}
    for module_name, ops in (
        ("scan", ("selective_scan", "selective_state_update")),
        ("ssd", ("ssd_scan", "ssd_state_update")),
        ("conv1d", ("causal_conv1d", "causal_conv1d_update")),
    ):
        module = importlib.import_module(f"seqlab.kernels.{module_name}.triton_ops")
        for op in ops:
            real = getattr(module, f"{op}_triton")

            def spy(*args, _real=real, _op=op, **kwargs):
                calls[_op] = calls.get(_op, 0) + 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, f"{op}_triton", spy)
    return calls


def _pair(ssm):
    torch_model = tiny_lm(ssm, vocab=32, seed=1).to(DEVICE).set_backend("chunked")
    triton_model = tiny_lm(ssm, vocab=32, seed=1).to(DEVICE).set_backend("triton")
    return torch_model, triton_model


def _states_close(a, b, tol):
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        for name in la:
            assert rel_err(lb[name], la[name]) < tol, name


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_forward_state_and_gradients_match_torch(ssm, triton_calls):
    ref, tri = _pair(ssm)
    ids = torch.randint(0, 32, (2, 37), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out_ref, out_tri = ref(ids), tri(ids)
    assert rel_err(out_tri.logits, out_ref.logits) < 1e-4
    _states_close(out_ref.state, out_tri.state, 1e-4)

    scan = "selective_scan" if ssm == "mamba1" else "ssd_scan"
    assert triton_calls.get(scan) == 2 and triton_calls.get("causal_conv1d") == 2  # two layers
    ref.train(), tri.train()
    for m in (ref, tri):
        loss = torch.nn.functional.cross_entropy(m(ids).logits.reshape(-1, 32), ids.roll(-1, 1).reshape(-1))
        loss.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, grads_ref[name].grad) < 1e-3, name


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_streaming_pieces_and_decode_steps_match_one_pass(ssm, triton_calls):
    ref, tri = _pair(ssm)
    ids = torch.randint(0, 32, (1, 23), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        whole = ref(ids)
        first = tri(ids[:, :9])
        rest = tri(ids[:, 9:20], first.state)
        logits = [first.logits, rest.logits]
        state = rest.state
        for t in range(20, 23):  # decode steps on the Triton kernels
            out = tri.step(ids[:, t], state)
            logits.append(out.logits[:, None])
            state = out.state
    assert rel_err(torch.cat(logits, 1), whole.logits) < 1e-4
    _states_close(whole.state, state, 1e-4)
    step = "selective_state_update" if ssm == "mamba1" else "ssd_state_update"
    assert triton_calls.get(step) == 6 and triton_calls.get("causal_conv1d_update") == 6  # 3 steps x 2 layers
