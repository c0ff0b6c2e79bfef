"""The dispatcher: one backend table for every op, names that shadow nothing, and the deprecated "torch" name."""

from __future__ import annotations

import importlib
import pkgutil
import warnings

import pytest
import torch

import seqlab.kernels as K
from seqlab.errors import ConfigError
from seqlab.kernels import KernelInputError
from seqlab.testing import scan_inputs, tiny_lm

OPS = (
    "selective_scan",
    "selective_state_update",
    "ssd_scan",
    "ssd_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "mamba3_scan",
    "mamba3_state_update",
)


def test_the_table_names_every_backend_of_every_public_op():
    assert set(K.BACKEND_TABLE) == set(OPS)
    for op in OPS:
        assert callable(getattr(K, op))
        assert set(K.BACKEND_TABLE[op]) == set(K.BACKENDS) - {"auto"}, op
        for backend in ("ref", "chunked"):
            fn = K._dispatch.implementation(op, backend)
            assert callable(fn) and fn.__name__ == f"{op}_{backend}", (op, backend)


@pytest.mark.skipif(not K.triton_available(), reason="Triton cannot run here (import failed)")
def test_the_table_resolves_the_triton_entry_points():
    for op in OPS:
        assert K._dispatch.implementation(op, "triton").__name__ == f"{op}_triton"


def _subpackages():
    return [m.name for m in pkgutil.iter_modules(K.__path__) if m.ispkg]


def test_no_op_function_shadows_a_subpackage_and_every_backend_module_imports_by_its_path():
    subpackages = _subpackages()
    # the op families behind the dispatcher, and aqlm: the quantized layer's Triton kernels, outside the table
    # (their reference is seqlab.quant.AQLMLinear.forward_reference; tests/test_kernels/test_triton_aqlm.py)
    assert sorted(subpackages) == ["aqlm", "conv1d", "mamba3", "scan", "ssd"]
    for name in subpackages:
        assert name not in K.__all__ and not callable(getattr(K, name, None)), name
        for module in ("ref", "chunked") if name != "aqlm" else ():
            importlib.import_module(f"seqlab.kernels.{name}.{module}")
    importlib.import_module("seqlab.kernels.aqlm")
    assert callable(K.selective_scan)  # still the function after its subpackage was imported


def test_no_kernel_module_is_named_like_a_top_level_package():
    taken = {"torch", "triton", "einops", "numpy"}
    for info in pkgutil.walk_packages(K.__path__, "seqlab.kernels."):
        assert info.name.rsplit(".", 1)[-1] not in taken, info.name


def test_auto_picks_the_compiled_kernels_for_cpu_tensors_where_they_build_else_the_chunked_path():
    from seqlab.kernels._native import native_available

    for op, source in K._dispatch.NATIVE_SOURCES.items():
        want = "native" if native_available(source) else "chunked"
        assert K.resolve_backend("auto", torch.zeros(1), op=op) == want, op
    assert K.resolve_backend("ref", torch.zeros(1)) == "ref"
    with pytest.raises(KernelInputError, match="backend must be one of"):
        K.resolve_backend("cuda", torch.zeros(1))


def test_torch_is_a_deprecated_name_of_chunked_with_a_warning_at_the_callers_line():
    inputs = scan_inputs(l=12, seed=3)
    want = K.selective_scan(**inputs, backend="chunked")
    with pytest.warns(FutureWarning, match="backend='chunked'") as record:
        got = K.selective_scan(**inputs, backend="torch")
    assert torch.equal(got, want)
    assert record[0].filename == __file__


def test_set_backend_translates_torch_and_refuses_unknown_names():
    model = tiny_lm("mamba2", seed=2)
    with pytest.warns(FutureWarning, match="backend='chunked'") as record:
        assert model.set_backend("torch") is model
    assert record[0].filename == __file__
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"chunked"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_backend("chunked")
    with pytest.raises(ConfigError, match="backend must be one of"):
        model.set_backend("fast")
