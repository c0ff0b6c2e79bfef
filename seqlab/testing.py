"""Helpers for seqlab's own tests, importable from the installed package (the tests never put the repository root
or a test folder on ``sys.path``; docs/development.md): comparison of a fast path against its reference twin, small
model factories, and the kernel tests' random inputs and memory layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64 (the absolute error when ``want`` is all zeros)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """Fail with the measured error when ``rel_err(got, want) > tol`` (NaN or inf in ``got`` always fails)."""
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def tiny_config(ssm: str = "mamba1", **kw):
    """A two-layer, 16-wide ``BackboneConfig`` (Mamba-2 and Mamba-3 with head dim 8 and chunk size 8); ``kw``
    overrides."""
    from seqlab.config import BackboneConfig

    base: dict[str, Any] = dict(d_model=16, n_layer=2, ssm=ssm, d_state=8)
    if ssm in ("mamba2", "mamba3"):
        base.update(headdim=8, chunk_size=8)
    base.update(kw)
    return BackboneConfig(**base)


def shrinking_interventions(model, rho: float = 0.25) -> list:
    """LASER interventions (``seqlab.posttrain.laser.Intervention``) for every dense target of ``model`` whose
    factors at ``rho`` are smaller than it, and for each MoE part's experts together (``[*]``)."""
    from seqlab.posttrain.laser import Intervention, factor_size, intervention_targets, rank_for

    out, parts = [], set()
    for layer, kind in intervention_targets(model):
        if "[" in kind:
            parts.add((layer, kind[: kind.index("[")] + "[*]"))
            continue
        shape = tuple(model.get_submodule(f"backbone.layers.{layer}.{kind}").weight.shape)
        if factor_size(shape, rank_for(shape, rho)) < shape[0] * shape[1]:
            out.append(Intervention(layer, kind, rho))
    return out + [Intervention(layer, kind, rho) for layer, kind in sorted(parts)]


def tiny_moe_options() -> dict[str, Any]:
    """``tiny_config`` keywords of a two-layer Mamba-1 model whose blocks carry an MoE feed-forward (4 experts of
    width 24, top 2). A fresh dict each call."""
    return dict(ssm="mamba1", n_layer=2, ffn="moe", d_ffn=24, moe_experts=4, moe_top_k=2)


def tiny_hybrid_options() -> dict[str, Any]:
    """``tiny_config`` keywords of a three-layer hybrid with dense MLPs: Mamba-1, then attention (4 heads over 2
    key/value heads), then Mamba-2 (head dim 8, state 4, chunk 4). A fresh dict each call."""
    return dict(
        ssm="mamba1",
        n_layer=3,
        ffn="mlp",
        d_ffn=24,
        attn_heads=4,
        attn_kv_heads=2,
        layer_overrides={
            1: {"mixer": "attention"},
            2: {"mixer": "mamba2", "options": {"headdim": 8, "d_state": 4, "chunk_size": 4}},
        },
    )


def tiny_lm(ssm: str = "mamba1", vocab: int = 32, seed: int = 0, **kw):
    """A ``LanguageModel`` on ``tiny_config`` in eval mode, with D and the norm weights spread over [0.5, 1.5] so
    that the scan's decay, conv tail and gating all matter in a test."""
    from seqlab.models import LanguageModel

    torch.manual_seed(seed)
    model = LanguageModel(tiny_config(ssm, **kw), vocab_size=vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("D") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def run_chunked(model, ids: torch.Tensor, cuts):
    """Feed ``ids`` (batch, length, ...) to ``model`` in pieces split at ``cuts``, threading the state (empty
    pieces skipped); return the concatenated logits and the final state: the chunking half of the state contract."""
    state, outs, start = None, [], 0
    for stop in [*cuts, ids.shape[1]]:
        if stop > start:
            out = model(ids[:, start:stop], state)
            outs.append(out.logits)
            state = out.state
        start = stop
    return torch.cat(outs, dim=1), state


def memory_model_file(folder) -> Path:
    """Save a one-layer, 16-wide memory-stream model (seed 0) to ``folder/memory.safetensors``: the model the
    memory-session tests open sessions with. Returns the path."""
    from pathlib import Path

    from seqlab.checkpoint import save_model
    from seqlab.domains.memory import MemoryStreamAdapter

    torch.manual_seed(0)
    model = MemoryStreamAdapter().build_model(tiny_config(n_layer=1, d_state=4)).eval()
    path = Path(folder) / "memory.safetensors"
    save_model(path, model)
    return path


def as_f64(x):
    """A detached float64 copy (``None`` stays ``None``)."""
    return None if x is None else x.detach().to(torch.float64)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same (b, d, l) values stored position-major: the transpose of a contiguous (b, l, d)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view with gaps (every other element of a larger tensor)."""
    big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    view = big[..., ::2]
    view.copy_(x)
    return view


def scan_inputs(
    b=2,
    d=4,
    n=3,
    l=37,
    *,
    gB=None,
    gC=None,
    D=True,
    z=True,
    bias=True,
    init=True,
    dtype=torch.float32,
    seed=0,
    delta_scale=0.5,
    a_range=(-2.0, -0.1),
    positive_delta=False,
):
    """Random selective-scan inputs (u, delta, A, B, C, D, z, delta_bias, initial_state) on the CPU; each optional
    input can be switched off, B / C grouped with gB / gC groups."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    lo, hi = a_range
    inputs = {
        "u": r(b, d, l),
        "delta": (r(b, d, l).abs() if positive_delta else r(b, d, l)) * delta_scale,
        "A": lo + (hi - lo) * torch.rand(d, n, generator=gen),
        "B": r(b, n, l) if gB is None else r(b, gB, n, l),
        "C": r(b, n, l) if gC is None else r(b, gC, n, l),
        "D": r(d) if D else None,
        "z": r(b, d, l) if z else None,
        "delta_bias": r(d) * 0.3 if bias else None,
        "initial_state": r(b, d, n) if init else None,
    }
    return {k: (None if v is None else v.to(dtype)) for k, v in inputs.items()}


# -- the command line ---------------------------------------------------------------------------------------


def walk_parsers(parser, path: tuple[str, ...] = ()):
    """(command path, parser) of an argparse ``parser`` and of every sub-command parser below it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_parsers(sub, (*path, name))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``seqlab.cli.main(argv)`` in this process: (exit code, stdout, stderr) captured by pytest's ``capsys``."""
    from seqlab import cli

    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def seqlab_process(*args, cwd, timeout: float = 600):
    """``python -m seqlab.cli ARGS`` in a subprocess (seqlab as installed: the checkout is never put on sys.path)
    on one OpenMP thread; the finished ``subprocess.CompletedProcess`` (text output, not checked)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seqlab.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def once_per_session(tmp_path_factory, name: str, *args) -> tuple[Path, dict]:
    """Run ``seqlab ARGS`` once per test session whatever pytest-xdist does: the first worker to get here runs it
    under a file lock in the session's shared temporary folder (in ``<shared>/<name>``) and records it; every later
    call (another worker, or the same one after xdist tore a module fixture down) reads that record. Returns
    (the folder it ran in, {"stdout", "stderr", "seconds"}); a failed run fails every caller."""
    import json
    import os
    import time

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder per session
    cwd = shared / name
    record = cwd / "run.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.exists():
            cwd.mkdir(exist_ok=True)
            started = time.perf_counter()
            proc = seqlab_process(*args, cwd=cwd)
            seconds = time.perf_counter() - started
            assert proc.returncode == 0, proc.stderr[-4000:]
            record.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr, "seconds": seconds}))
    return cwd, json.loads(record.read_text())


def one_line(err: str) -> str:
    """The one line a user's mistake prints on stderr (fails when there are several, or a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; cells with expected count < 5 are pooled into one.
    Returns the p-value (the speculative-decoding exactness tests compare sampled counts with an enumerated law)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0)))


def vectorised_generic_scan(self, input):
    """A stand-in for ``triton.runtime.interpreter.ScanOps.generic_scan`` (monkeypatched in by the Triton test
    modules). Triton's interpreter folds ``tl.associative_scan`` element by element (one Python combine call per
    tile element, ~0.1 ms each); this folds the same way, in the same order, one call per position along the axis
    for all the other elements at once: bitwise the same results (tests/test_kernels/test_triton_selective_scan.py
    ``test_vectorised_interpreter_scan``), ~10x less test time."""
    import numpy as np
    import triton.language as tl

    axis = self.axis
    data = [np.moveaxis(arg.handle.data, axis, 0) for arg in input]
    outs = [np.empty_like(d) for d in data]
    acc = None
    for i in range(data[0].shape[0]):
        x = tuple(self.to_tensor(d[i], arg.dtype) for d, arg in zip(data, input))
        if acc is None:
            acc = x
        else:
            ret = self.combine_fn.fn(*acc, *x)
            acc = ret if isinstance(ret, tuple) else (ret,)
        for o, a in zip(outs, acc):
            val = np.asarray(a.handle.data if isinstance(a, tl.core.tensor) else a)
            o[i] = val.reshape(o[i].shape) if val.size == o[i].size else np.broadcast_to(val, o[i].shape)
    return [self.to_tensor(np.moveaxis(o, 0, axis), arg.dtype) for o, arg in zip(outs, input)]
