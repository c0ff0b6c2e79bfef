"""Files seqlab writes for states, models and checkpoints: every byte is checksummed, a damaged file is a
CorruptFileError naming it (never a silent load, never a raw json/struct/safetensors error), atomic writes clean up
after killed writers and respect the umask."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqlab.io
from seqlab.errors import CorruptFileError
from seqlab.io import atomic_write_bytes, remove_stale_temps


def _temps(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------------
# atomic writes


def test_stale_temps_of_dead_writers_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".a.bin.{dead}.abcd1234.tmp"
        held = tmp_path / f".a.bin.{live.pid}.efgh5678.tmp"
        old_style = tmp_path / ".a.bin.zz99yy88.tmp"  # an older seqlab's temp name (no pid), an hour old
        fresh_old_style = tmp_path / ".a.bin.qq11rr22.tmp"  # ... and one just made: perhaps a live old writer
        other = tmp_path / f".a.bin.x.{dead}.abcd1234.tmp"  # a temp of another target, a.bin.x
        for p in (stale, held, old_style, fresh_old_style, other):
            p.write_bytes(b"partial")
        os.utime(old_style, (time.time() - 3600, time.time() - 3600))
        atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new"
        assert not stale.exists() and not old_style.exists()
        assert held.exists() and fresh_old_style.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(target) == [held]  # its writer is gone now


_WRITER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("seqlab_io", sys.argv[3])  # seqlab.io alone: no torch import
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    path, n = sys.argv[1], int(sys.argv[2])
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        io.atomic_write_bytes(path, bytes([i % 251]) * n)
""")


def test_kill_9_mid_write_leaves_a_whole_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "big.bin"
    n = 4 << 20
    atomic_write_bytes(target, b"\x00" * n)
    for delay in (0.02, 0.1, 0.25):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target), str(n), seqlab.io.__file__], stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == n and data == data[:1] * n  # the old file or a new one, whole
    atomic_write_bytes(target, b"done")
    assert target.read_bytes() == b"done"
    assert _temps(tmp_path, "big.bin") == []


def test_two_concurrent_writers_never_remove_each_others_temp_files(tmp_path):
    target = tmp_path / "shared.bin"
    script = _WRITER.replace("while True:", "for _ in range(60):")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(target), str(64 << 10), seqlab.io.__file__],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()  # a removed temp file would fail its writer's rename
    data = target.read_bytes()
    assert len(data) == 64 << 10 and data == data[:1] * len(data)
    assert _temps(tmp_path, "shared.bin") == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    os.chmod(tmp_path / "new.bin", 0o640)  # an existing file keeps its mode, as with open(path, "wb")
    atomic_write_bytes(tmp_path / "new.bin", b"y")
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o640


def test_write_into_a_read_only_folder_fails_and_keeps_the_old_file(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    atomic_write_bytes(folder / "f", b"old")
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway: the same refusal, as the kernel would give it to a user

        def refused(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(folder))

        monkeypatch.setattr(seqlab.io.tempfile, "mkstemp", refused)
    try:
        with pytest.raises(PermissionError):
            atomic_write_bytes(folder / "f", b"new")
    finally:
        folder.chmod(0o700)
    assert (folder / "f").read_bytes() == b"old" and _temps(folder, "f") == []


def test_a_permission_failure_in_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    from seqlab.cli import main

    (tmp_path / "c.txt").write_text("some text to train on " * 40)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o"))

    monkeypatch.setattr(seqlab.io.tempfile, "mkstemp", refused)
    code = main(
        [
            "train",
            str(tmp_path / "c.txt"),
            "--adapter",
            "bytes",
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--d-model",
            "8",
            "--n-layer",
            "1",
            "--batch-size",
            "1",
            "--window",
            "8",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Permission denied" in err, err


# ------------------------------------------------------------------------------------------------------
# every byte of state, model and checkpoint files is checksummed

import json  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from seqlab.checkpoint import (  # noqa: E402
    MODEL_FORMAT,
    TRAINER_FORMAT,
    latest_checkpoint,
    load_model,
    save_model,
)
from seqlab.errors import FormatVersionError, StateError, StateMismatchError  # noqa: E402
from seqlab.io import tensors_checksum  # noqa: E402
from seqlab.state import STATE_FORMAT, RecurrentState  # noqa: E402
from seqlab.testing import tiny_lm  # noqa: E402
from seqlab.train import TrainConfig, Trainer  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _model():
    return tiny_lm(vocab=16, d_model=16, n_layer=1)


def _data():
    return torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 50)


def _config(folder, **kw):
    base = dict(
        lr=1e-2,
        max_steps=2,
        warmup_steps=0,
        batch_size=4,
        window=8,
        progress=False,
        checkpoint_dir=str(folder),
        checkpoint_every=2,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    model = _model()
    out = model(torch.tensor([[1, 2, 3, 4, 5]]), return_state=True)
    state = replace(out.state, position=5)
    state.save(root / "s.safetensors")
    save_model(root / "m.safetensors", model)
    Trainer(_model(), _config(root / "ckpt"), _data()).fit()
    return root


def _loader(kind, where):
    """A function that loads the file of ``kind`` found under ``where``."""
    if kind == "state":
        return lambda: RecurrentState.load(where / "s.safetensors", _model())
    if kind == "model":
        return lambda: load_model(where / "m.safetensors", _model())
    return lambda: Trainer.resume(where / "ckpt", _model(), _config(where / "ckpt"), _data())


KINDS = {
    "state": "s.safetensors",
    "model": "m.safetensors",
    "checkpoint model": "ckpt/step-00000002/model.safetensors",
    "checkpoint trainer": "ckpt/step-00000002/trainer.safetensors",
    "checkpoint state": "ckpt/step-00000002/state-0.safetensors",
    "checkpoint latest": "ckpt/latest",
}


def _region(data: bytes, region: str, fraction: float) -> int:
    """An offset in ``region`` of a safetensors file: header length, JSON header, the seqlab metadata's values,
    the tensor bytes."""
    if len(data) < 8 or data.startswith(b"step-"):
        return int(fraction * (len(data) - 1))
    (header_len,) = struct.unpack("<Q", data[:8])
    lo, hi = {"length": (0, 8), "header": (8, 8 + header_len), "tensors": (8 + header_len, len(data))}.get(
        region, (8, 8 + header_len)
    )
    if region == "meta values":  # the digits and letters of metadata values: position, step, lr, adapter ...
        start = data.index(b"__metadata__")
        candidates = [i for i in range(start, 8 + header_len) if chr(data[i]).isalnum()]
        return candidates[int(fraction * (len(candidates) - 1))]
    return lo + int(fraction * max(0, hi - lo - 1))


def _check_refused(kind, where, path):
    with pytest.raises(CorruptFileError) as info:
        _loader(kind.split()[0] if kind in ("state", "model") else "checkpoint", where)()
    assert path.name in str(info.value) and "\n" not in str(info.value)


@pytest.fixture()
def copy(files, tmp_path):
    shutil.copytree(files, tmp_path / "c")
    return tmp_path / "c"


@FUZZ
@given(
    kind=st.sampled_from(sorted(KINDS)),
    region=st.sampled_from(["length", "header", "meta values", "tensors"]),
    fraction=st.floats(0, 1),
    bit=st.integers(0, 7),
)
def test_a_bit_flip_anywhere_is_refused_naming_the_file(copy, kind, region, fraction, bit):
    path = copy / KINDS[kind]
    good = path.read_bytes()
    try:
        bad = bytearray(good)
        bad[_region(good, region, fraction)] ^= 1 << bit
        path.write_bytes(bytes(bad))
        _check_refused(kind, copy, path)
    finally:
        path.write_bytes(good)


@FUZZ
@given(kind=st.sampled_from(sorted(KINDS)), cut=st.floats(0, 1), extra=st.binary(min_size=1, max_size=64))
def test_truncated_or_extended_files_are_refused(copy, kind, cut, extra):
    path = copy / KINDS[kind]
    good = path.read_bytes()
    try:
        path.write_bytes(good[: int(cut * (len(good) - 1))])
        _check_refused(kind, copy, path)
        path.write_bytes(good + extra)
        _check_refused(kind, copy, path)
    finally:
        path.write_bytes(good)


def _legacy(tensors, kind, meta):
    """A file as format version 1 wrote it: the checksum covers the tensors only."""
    flat = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    header = {"format": kind, "format_version": 1, **meta, "checksum": tensors_checksum(sorted(flat.items()))}
    return st_save(flat, metadata={"seqlab": json.dumps(header, sort_keys=True)})


def test_same_length_edits_of_metadata_are_refused(copy):
    """The issue's cases: position in a state file, an adapter setting or config in a model file, the scheduler's
    step in a checkpoint; each edited in place, same length."""
    for name, old, new in [
        ("s.safetensors", b'position\\": 5', b'position\\": 7'),
        ("m.safetensors", b'd_conv\\": 4', b'd_conv\\": 3'),
        ("ckpt/step-00000002/trainer.safetensors", b'last_epoch\\": 2', b'last_epoch\\": 1'),
    ]:
        path = copy / name
        good = path.read_bytes()
        assert good.count(old) == 1, name
        path.write_bytes(good.replace(old, new))
        kind = {"s.safetensors": "state", "m.safetensors": "model"}.get(name, "checkpoint trainer")
        _check_refused(kind, copy, path)
        path.write_bytes(good)


def test_version_1_files_still_load_with_their_tensor_checksum(tmp_path):
    model = _model()
    state = model(torch.tensor([[1, 2, 3]]), return_state=True).state
    meta = {
        "fingerprint": state.fingerprint,
        "position": 3,
        "batch_size": 1,
        "layers": [sorted(layer) for layer in state.layers],
    }
    (tmp_path / "s1").write_bytes(_legacy(state.tensors(), STATE_FORMAT, meta))
    loaded = RecurrentState.load(tmp_path / "s1", model)
    assert loaded.position == 3 and all(
        torch.equal(a, b) for a, b in zip(loaded.tensors().values(), state.tensors().values())
    )
    (tmp_path / "m1").write_bytes(_legacy(model.state_dict(), MODEL_FORMAT, {"fingerprint": model.fingerprint}))
    load_model(tmp_path / "m1", _model())
    damaged = bytearray((tmp_path / "s1").read_bytes())
    damaged[-2] ^= 1
    (tmp_path / "s1").write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match="s1: checksum mismatch"):
        RecurrentState.load(tmp_path / "s1", model)
    # a version 2 file must carry the whole-file checksum: one relabelled as version 1 with a forged tensor checksum
    # would load, but a version 2 file without one is refused
    body = {k: v for k, v in meta.items()}
    flat = {k: v.contiguous() for k, v in state.tensors().items()}
    header = {"format": STATE_FORMAT, "format_version": 2, **body, "checksum": tensors_checksum(sorted(flat.items()))}
    (tmp_path / "s2").write_bytes(st_save(flat, metadata={"seqlab": json.dumps(header)}))
    with pytest.raises(CorruptFileError, match="s2: no file checksum"):
        RecurrentState.load(tmp_path / "s2", model)


def test_a_future_version_is_refused_with_its_own_error_and_a_damaged_version_is_damage(files, tmp_path):
    tensors, meta = read_tensors(files / "s.safetensors", kind=STATE_FORMAT, version=2)
    body = {k: v for k, v in meta.items() if k not in ("format", "format_version", "file_sha256")}
    write_tensors(tmp_path / "f", tensors, kind=STATE_FORMAT, version=9, meta=body)
    with pytest.raises(FormatVersionError, match="f: written in seqlab.recurrent_state format version 9"):
        RecurrentState.load(tmp_path / "f", _model())
    data = (files / "s.safetensors").read_bytes()  # a bit flip turns the 2 into a 3: damage, not the future
    (tmp_path / "d").write_bytes(data.replace(b'format_version\\": 2', b'format_version\\": 3'))
    with pytest.raises(CorruptFileError, match="d: checksum mismatch") as info:
        RecurrentState.load(tmp_path / "d", _model())
    assert not isinstance(info.value, FormatVersionError)


# ------------------------------------------------------------------------------------------------------
# state values: finite, the model's dtype and shapes, a position >= 0


def _state(model, batch=1):
    return model(torch.tensor([[1, 2, 3]] * batch), return_state=True).state


_MODELS: dict = {}


def _scratch(factory):
    if "scratch" not in _MODELS:
        _MODELS["scratch"] = factory.mktemp("scratch")
    return _MODELS["scratch"]


def _cached(ssm, batch):
    """A tiny model of kind ``ssm`` and a state of it with ``batch`` rows, built once (hypothesis reuses them)."""
    if (ssm, batch) not in _MODELS:
        model = tiny_lm(ssm)
        _MODELS[ssm, batch] = model, _state(model, batch)
    model, state = _MODELS[ssm, batch]
    return model, state.clone()


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@FUZZ
@given(data=st.data())
def test_saved_states_with_bad_values_are_refused_naming_file_and_tensor(tmp_path_factory, ssm, data):
    model, state = _cached(ssm, 1)
    layer = data.draw(st.integers(0, len(state.layers) - 1))
    name = data.draw(st.sampled_from(sorted(state.layers[layer])))
    bad = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    tensor = state.layers[layer][name].clone()
    flat = tensor.view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = bad
    state.layers[layer][name] = tensor
    path = _scratch(tmp_path_factory) / "s.safetensors"
    state.save(path)
    with pytest.raises(CorruptFileError, match=rf"s\.safetensors: layers\.{layer}\.{name} holds NaN or infinite"):
        RecurrentState.load(path, model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32])
def test_a_state_file_of_another_dtype_is_refused(tmp_path, dtype):
    model = _model()
    _state(model).to(dtype=dtype).save(tmp_path / "s")
    with pytest.raises(
        CorruptFileError,
        match=rf"s: layers\.0\.\w+ has dtype {dtype}, the model's state dtype is "
        "torch.float32",
    ):
        RecurrentState.load(tmp_path / "s", model)


def test_negative_positions_are_refused(tmp_path):
    model = _model()
    state = _state(model)
    with pytest.raises(StateError, match="position must be an int >= 0, got -1"):
        replace(state, position=-1).save(tmp_path / "s")
    assert not (tmp_path / "s").exists()
    # a file that says so anyway (written with the low-level writer, so its checksum is right)
    from seqlab.safetensors_io import write_tensors

    meta = {
        "fingerprint": state.fingerprint,
        "position": -4,
        "batch_size": 1,
        "layers": [sorted(layer) for layer in state.layers],
    }
    write_tensors(tmp_path / "s", state.tensors(), kind=STATE_FORMAT, version=2, meta=meta)
    with pytest.raises(CorruptFileError, match="s: position must be an int >= 0, got -4"):
        RecurrentState.load(tmp_path / "s", model)
    with pytest.raises(StateError, match="position must be an int >= 0"):
        model(torch.tensor([[1]]), replace(state, position=-1))


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@FUZZ
@given(data=st.data())
def test_hand_built_states_of_the_wrong_shape_or_dtype_are_a_state_mismatch(ssm, data):
    model, state = _cached(ssm, 2)
    layer = data.draw(st.integers(0, len(state.layers) - 1))
    name = data.draw(st.sampled_from(sorted(state.layers[layer])))
    tensor = state.layers[layer][name]
    how = data.draw(st.sampled_from(["shorter", "longer", "extra dim", "fewer dims", "dtype", "missing", "batch"]))
    if how == "shorter":
        dim = data.draw(st.integers(1, tensor.dim() - 1))
        tensor = tensor.narrow(dim, 0, tensor.shape[dim] - 1)
    elif how == "longer":
        dim = data.draw(st.integers(1, tensor.dim() - 1))
        tensor = torch.cat([tensor, tensor.narrow(dim, 0, 1)], dim)
    elif how == "extra dim":
        tensor = tensor[..., None]
    elif how == "fewer dims":
        tensor = tensor.flatten(-2)
    elif how == "dtype":
        tensor = tensor.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.int64])))
    elif how == "batch":
        tensor = tensor[:1]
    layers = [dict(lay) for lay in state.layers]
    if how == "missing":
        del layers[layer][name]
    else:
        layers[layer][name] = tensor
    bad = RecurrentState(layers, state.position, state.fingerprint)
    with pytest.raises(StateMismatchError, match=rf"layers\.{layer}"):
        model(torch.tensor([[1], [2]]), bad)
    with pytest.raises(StateMismatchError, match=rf"layers\.{layer}"):
        model.step(torch.tensor([1, 2]), bad)


# ------------------------------------------------------------------------------------------------------
# files with a right checksum but odd contents (written by another tool, or by hand): seqlab errors only

from seqlab.checkpoint import read_trainer_file  # noqa: E402
from seqlab.errors import SeqlabError  # noqa: E402
from seqlab.safetensors_io import read_tensors, write_tensors  # noqa: E402

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _replace_at(tree, path, value):
    """``tree`` with the value at ``path`` (keys / indices) replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, head: _replace_at(tree[head], rest, value)}
    copy = list(tree)
    copy[head] = _replace_at(copy[head], rest, value)
    return copy


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree[:4]):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_odd_metadata_with_a_right_checksum_is_a_seqlab_error(copy, data):
    kind = data.draw(st.sampled_from(["state", "model", "checkpoint trainer", "checkpoint state"]))
    path = copy / KINDS[kind]
    fmt = {
        "state": STATE_FORMAT,
        "model": MODEL_FORMAT,
        "checkpoint trainer": TRAINER_FORMAT,
        "checkpoint state": STATE_FORMAT,
    }[kind]
    good = path.read_bytes()
    tensors, meta = read_tensors(path, kind=fmt, version=2)
    body = {k: v for k, v in meta.items() if k not in ("format", "format_version", "file_sha256")}
    where = data.draw(st.sampled_from(sorted((p for p in _paths(body) if p), key=repr)))
    body = _replace_at(body, where, data.draw(JSON))
    if data.draw(st.booleans()) and tensors:  # and perhaps an odd tensor too
        name = data.draw(st.sampled_from(sorted(tensors)))
        t = tensors[name]
        odd = [t.double(), t.flatten(), t.reshape(-1)[:0], t.to(torch.int8)]
        tensors = {**tensors, name: data.draw(st.sampled_from(odd))}
    try:
        write_tensors(path, tensors, kind=fmt, version=2, meta=body)
        try:
            loaded = _loader(kind.split()[0] if kind in ("state", "model") else "checkpoint", copy)()
        except (SeqlabError, FileNotFoundError):
            return
        # loaded anyway: only an edit that does not change what was loaded may pass
        if kind == "state":
            assert isinstance(loaded.position, int) and loaded.position >= 0
    finally:
        path.write_bytes(good)


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_a_float64_model_streams_saves_and_loads_its_own_state(tmp_path, ssm):
    model = tiny_lm(ssm).double()
    ids = torch.tensor([[1, 2, 3, 4]])
    state = model(ids[:, :2], return_state=True).state
    state.save(tmp_path / "s")
    again = RecurrentState.load(tmp_path / "s", model)
    assert torch.equal(model(ids[:, 2:], again).logits, model(ids[:, 2:], state).logits)
    with pytest.raises(CorruptFileError, match="dtype torch.float64"):
        RecurrentState.load(tmp_path / "s", tiny_lm(ssm))  # ... but a float32 model refuses it


_TRAINER = textwrap.dedent("""
    import sys
    import torch
    from seqlab.testing import tiny_lm
    from seqlab.train import TrainConfig, Trainer
    torch.set_num_threads(1)
    config = TrainConfig(lr=1e-2, max_steps=100000, batch_size=4, window=8, progress=False, checkpoint_dir=sys.argv[1],
                         checkpoint_every=1, keep_checkpoints=1)
    def ready(trainer, record):
        if trainer.step == 2:
            print("ready", flush=True)
    Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), config, torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 50),
            callbacks=[ready]).fit()
""")


def test_kill_9_while_checkpointing_and_pruning_leaves_a_checkpoint_that_resumes(tmp_path):
    """A trainer saving and pruning a checkpoint every step, killed at a random moment: latest names a whole
    checkpoint that resumes, and every step folder left under its name is whole."""
    import random

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(ckpt)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(random.uniform(0.05, 0.6))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    config = _config(ckpt, max_steps=10**5, window=8, keep_checkpoints=1, checkpoint_every=1)
    trainer = Trainer.resume(ckpt, _model(), config, _data())
    assert trainer.step >= 2 and latest_checkpoint(ckpt).name == f"step-{trainer.step:08d}"
    from seqlab.checkpoint import read_model_file

    for folder in ckpt.glob("step-*"):
        if int(folder.name[5:]) <= trainer.step:  # later ones: a save that never reached latest
            read_model_file(folder / "model.safetensors")
            read_trainer_file(folder / "trainer.safetensors")


def test_a_version_1_checkpoint_still_resumes(copy):
    """A checkpoint folder as seqlab wrote it before format version 2: tensor checksums only, latest holding the
    folder name alone."""
    folder = copy / "ckpt" / "step-00000002"
    for name, fmt in (
        ("model.safetensors", MODEL_FORMAT),
        ("trainer.safetensors", TRAINER_FORMAT),
        ("state-0.safetensors", STATE_FORMAT),
    ):
        tensors, meta = read_tensors(folder / name, kind=fmt, version=2)
        body = {k: v for k, v in meta.items() if k not in ("format", "format_version", "file_sha256")}
        (folder / name).write_bytes(_legacy(tensors, fmt, body))
    (copy / "ckpt" / "latest").write_text("step-00000002\n")
    trainer = Trainer.resume(copy / "ckpt", _model(), _config(copy / "ckpt", max_steps=3), _data())
    assert trainer.step == 2
    trainer.fit()
    assert latest_checkpoint(copy / "ckpt").name == "step-00000003"
    assert (copy / "ckpt" / "latest").read_text().startswith("step-00000003 sha256:")  # new saves: version 2
