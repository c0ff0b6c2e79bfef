"""RecurrentState keeps a position per row (issue 23): a batch of sequences at different positions is one state.

``positions`` (one int per row) always works; ``position`` is the int while the rows agree and a StateError
naming ``positions`` when they differ. ``stack`` accepts different positions, ``select`` keeps the row's,
save/load keeps them (a uniform state's file keeps its old metadata), ``check_compatible`` validates them, and a
forward or a step advances every row's own position. A batch of rows at different positions continues exactly as
each row alone (Mamba and attention layers: rotary positions come from each row's own count).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from seqlab import RecurrentState
from seqlab.decoding.cursor import ModelCursor
from seqlab.errors import CorruptFileError, StateError, StateMismatchError
from seqlab.generate import generate
from seqlab.safetensors_io import read_tensors
from seqlab.state import FULL_CHECKSUM_SINCE, STATE_FORMAT, STATE_FORMAT_VERSION
from seqlab.testing import rel_err, tiny_hybrid_options, tiny_lm


@pytest.fixture(scope="module")
def hybrid():
    return tiny_lm(**dict(tiny_hybrid_options(), attn_window=4))


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def rows(hybrid):
    """Three batch-of-one states at positions 3, 7 and 1."""
    return [hybrid(ids(n, seed=n)).state for n in (3, 7, 1)]


def test_stack_select_and_position(rows):
    state = RecurrentState.stack(rows)
    assert state.positions == (3, 7, 1) and state.batch_size == 3 and not state.uniform
    with pytest.raises(StateError, match=r"different positions \(3, 7, 1\).*state\.positions"):
        state.position  # noqa: B018 (the property raises)
    assert [state.select(i).position for i in range(3)] == [3, 7, 1]
    assert state.select(-1).positions == (1,)
    assert "positions=(3, 7, 1)" in repr(state)
    # rows that agree: position is the int again, old-style
    same = RecurrentState.stack([rows[1], rows[1]])
    assert same.position == 7 and same.positions == (7, 7) and same.uniform
    # stacking stacks keeps every row's position
    assert RecurrentState.stack([state, rows[0]]).positions == (3, 7, 1, 3)
    # clone / detach / to keep them
    assert state.clone().positions == state.detach().positions == state.to("cpu").positions == (3, 7, 1)


def test_setting_positions(rows):
    state = RecurrentState.stack(rows)
    state.positions = [4, 4, 4]
    assert state.position == 4
    state.position = 9  # an int sets every row
    assert state.positions == (9, 9, 9)
    state.position = (1, 2, 3)
    assert state.positions == (1, 2, 3)
    assert dataclasses.replace(state, position=5).positions == (5, 5, 5)
    with pytest.raises(StateError, match="empty"):
        state.positions = []


def test_save_load_round_trip(tmp_path, hybrid, rows):
    state = RecurrentState.stack(rows)
    state.save(tmp_path / "ragged")
    loaded = RecurrentState.load(tmp_path / "ragged", hybrid)
    assert loaded.positions == (3, 7, 1)
    for name, tensor in state.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    _, meta = read_tensors(
        tmp_path / "ragged", kind=STATE_FORMAT, version=STATE_FORMAT_VERSION, full_checksum_since=FULL_CHECKSUM_SINCE
    )
    assert meta["positions"] == [3, 7, 1] and meta["position"] is None
    # a uniform state's file keeps the old metadata (one int, no "positions")
    rows[1].save(tmp_path / "one")
    _, meta = read_tensors(
        tmp_path / "one", kind=STATE_FORMAT, version=STATE_FORMAT_VERSION, full_checksum_since=FULL_CHECKSUM_SINCE
    )
    assert meta["position"] == 7 and "positions" not in meta
    assert RecurrentState.load(tmp_path / "one", hybrid).position == 7


def test_bad_positions_are_refused(tmp_path, hybrid, rows):
    state = RecurrentState.stack(rows)
    wrong_count = RecurrentState(state.layers, (1, 2), state.fingerprint)  # type: ignore[arg-type]
    with pytest.raises(StateError, match="2 entries for a batch of 3"):
        hybrid(ids(2, 0).expand(3, 2), wrong_count)
    with pytest.raises(StateError, match="2 entries for a batch of 3"):
        wrong_count.save(tmp_path / "x")
    negative = RecurrentState(state.layers, (1, -2, 3), state.fingerprint)  # type: ignore[arg-type]
    with pytest.raises(StateError, match=r"positions\[1\] must be an int >= 0, got -2"):
        hybrid(ids(2, 0).expand(3, 2), negative)
    with pytest.raises(StateError, match=r"positions\[1\] must be an int >= 0, got -2: not saved"):
        negative.save(tmp_path / "x")
    # a file whose positions do not fit its rows is refused (rewritten with a valid checksum by the writer)
    from seqlab.safetensors_io import write_tensors

    meta = {"fingerprint": state.fingerprint, "position": None, "positions": [1, 2], "batch_size": 3}
    meta["layers"] = [sorted(layer) for layer in state.layers]
    write_tensors(tmp_path / "bad", state.tensors(), kind=STATE_FORMAT, version=STATE_FORMAT_VERSION, meta=meta)
    with pytest.raises(CorruptFileError, match="positions must be a list of one int per row"):
        RecurrentState.load(tmp_path / "bad", hybrid)
    assert json.dumps(meta)  # the metadata is plain JSON


def test_step_and_forward_advance_each_row(hybrid, rows):
    state = RecurrentState.stack(rows)
    tokens = torch.tensor([5, 6, 7])
    stepped = hybrid.step(tokens, state)
    assert stepped.state.positions == (4, 8, 2)
    for i, row in enumerate(rows):  # a batch at different positions steps as each row alone
        alone = hybrid.step(tokens[i : i + 1], row)
        assert rel_err(stepped.logits[i : i + 1], alone.logits) <= 1e-5
    more = torch.cat([ids(4, 11), ids(4, 12), ids(4, 13)])
    out = hybrid(more, state)
    assert out.state.positions == (7, 11, 5)
    for i, row in enumerate(rows):
        alone = hybrid(more[i : i + 1], row)
        assert rel_err(out.logits[i : i + 1], alone.logits) <= 1e-5
    at = hybrid(more, state, states_at=[1, 3]).states_at
    assert [s.positions for s in at] == [(4, 8, 2), (6, 10, 4)]


def test_uniform_states_behave_as_before(hybrid):
    state = hybrid.init_state(2)
    assert state.position == 0 and state.positions == (0, 0)
    out = hybrid(ids(3, 1).expand(2, 3), state)
    assert out.state.position == 3 and isinstance(out.state.position, int)
    assert hybrid.step(torch.tensor([1, 2]), out.state).state.position == 4


def test_stack_still_refuses_another_model(rows):
    other = tiny_lm("mamba1").init_state(1)
    with pytest.raises(StateMismatchError, match="another model config"):
        RecurrentState.stack([rows[0], other])


def test_generation_from_rows_at_different_positions(hybrid, rows):
    """generate / speculative generate continue a state whose rows sit at different positions, each row as it
    would alone; the cursor's batches carry each row's true position."""
    state = RecurrentState.stack(rows)
    prompts = [[4, 5], [6], [7, 8, 9]]
    plain = generate(hybrid, prompts, 4, state=state)
    assert [s.position for s in plain.states] == [3 + 2 + 4, 7 + 1 + 4, 1 + 3 + 4]
    for i, row in enumerate(rows):
        alone = generate(hybrid, [prompts[i]], 4, state=row)
        assert alone.tokens[0] == plain.tokens[i]
    drafted = generate(hybrid, prompts, 4, state=state, draft=hybrid, speculate=2)
    assert drafted.tokens == plain.tokens
    assert [s.position for s in drafted.states] == [s.position for s in plain.states]
    cursor = ModelCursor(hybrid, [[1, 2, 3], [4, 5]], [rows[0], rows[1]])
    cursor.sync([[1, 2, 3], [4, 5]], [0, 1])
    assert cursor.state is not None and cursor.state.positions == (3 + 2, 7 + 1)
