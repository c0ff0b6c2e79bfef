"""MemoryStreamAdapter: events <-> bytes with marker bytes that never occur in UTF-8. Round trips over arbitrary
text and JSON metadata, appending one by one == encoding at once, decoding in any chunking, truncated and
malformed streams (errors name the byte offset), JSON Lines and .mem files (streaming == whole file), prompts and
stop markers for generation, build_model + checkpoints, and a tiny model that learns a scripted agent dialogue
far below 8 bits per byte and then answers in a well-formed event."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.checkpoint import load_model, save_model
from seqlab.config import BackboneConfig
from seqlab.domains import adapter_from_checkpoint, get_adapter
from seqlab.domains.bytes import ByteAdapter
from seqlab.domains.memory import CONTENT, END, EVENT, META, TIME, Event, MemoryStreamAdapter, StreamDecoder
from seqlab.errors import ConfigError, InputError
from seqlab.models import LanguageModel
from seqlab.train import TrainConfig, Trainer

ADAPTER = MemoryStreamAdapter()

# -- strategies ------------------------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
metadata = st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
events = st.builds(
    Event,
    role=st.text(min_size=1, max_size=12),
    content=st.text(max_size=60),
    time=st.floats(allow_nan=False, allow_infinity=False),
    metadata=metadata,
)
event_lists = st.lists(events, max_size=6)


def as_bytes(ids: torch.Tensor) -> bytes:
    return bytes(ids.tolist())


def sample_events() -> list[Event]:
    return [
        Event("user", "Hi!\nWhat's 2+2? 😀", 1714564800.0),
        Event("assistant", "", 1714564801.25, {"tool_call": {"name": "calc", "args": [2, 2]}, "ok": True}),
        Event("tool", "4\x00\x1b[0m\t\r\n", "2024-05-01T12:00:02Z", {}),
        Event("assistant", "It is 4.", dt.datetime(2024, 5, 1, 12, 0, 3, tzinfo=dt.timezone.utc), None),
    ]


# ------------------------------------------------------------------------------------------------------
# round trips


@settings(max_examples=150, deadline=None)
@given(event_lists)
def test_round_trip_and_appending_equals_encoding_at_once(items):
    ids = ADAPTER.encode(items)
    assert ids.dtype == torch.int64 and bool(((ids >= 0) & (ids < 256)).all())
    assert ADAPTER.decode(ids) == items
    one_by_one = [ADAPTER.encode(e) for e in items]
    assert torch.equal(torch.cat(one_by_one) if items else torch.zeros(0, dtype=torch.long), ids)
    for e in items:  # metadata survives exactly, types included (ints stay ints, 1.0 stays a float)
        assert json.dumps(ADAPTER.decode(ADAPTER.encode(e))[0].metadata) == json.dumps(e.metadata)


@settings(max_examples=80, deadline=None)
@given(items=event_lists, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_decoding_in_any_chunking_equals_decoding_at_once(items, cuts):
    data = as_bytes(ADAPTER.encode(items))
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder, got = StreamDecoder(), []
    for a, b in zip(points, points[1:]):
        got += decoder.feed(data[a:b])
    decoder.finish()
    assert got == items and decoder.pending == b"" and decoder.events == len(items)


@settings(max_examples=80, deadline=None)
@given(items=st.lists(events, min_size=1, max_size=5), cut=st.integers(0, 10_000))
def test_truncated_stream_keeps_complete_events_and_reports_the_partial_one(items, cut):
    parts = [as_bytes(ADAPTER.encode(e)) for e in items]
    data = b"".join(parts)
    cut %= len(data) + 1
    ends = [sum(len(p) for p in parts[: i + 1]) for i in range(len(parts))]
    complete = [e for e, end in zip(items, ends) if end <= cut]
    assert ADAPTER.decode(data[:cut], partial="drop") == complete
    if cut == 0 or cut in ends:
        assert ADAPTER.decode(data[:cut]) == complete
    else:
        start = max([0] + [end for end in ends if end <= cut])
        with pytest.raises(
            InputError,
            match=rf"event {len(complete)} \(starting at byte {start}\), byte offset "
            rf"{cut}: the stream ends inside an event",
        ):
            ADAPTER.decode(data[:cut])
        decoder = StreamDecoder()
        assert decoder.feed(data[:cut]) == complete and decoder.pending == data[start:cut]


def test_wire_format_is_the_documented_one():
    e = Event("user", "hé", 12.5, {"k": [1, None]})
    assert as_bytes(ADAPTER.encode(e)) == b'\xf5user\xf612.5\xf7{"k":[1,null]}\xf8h\xc3\xa9\xf9'
    assert (EVENT, TIME, META, CONTENT, END) == (0xF5, 0xF6, 0xF7, 0xF8, 0xF9)
    assert as_bytes(ADAPTER.encode(Event("a", "", 0))) == b"\xf5a\xf60.0\xf7\xf8\xf9"  # metadata None: no bytes
    assert ADAPTER.decode(ADAPTER.encode(Event("a", "", 0, {})))[0].metadata == {}  # {} is not None


def test_decode_takes_ids_in_any_container():
    items = sample_events()
    ids = ADAPTER.encode(items)
    assert ADAPTER.decode(ids.tolist()) == items
    assert ADAPTER.decode(ids.numpy()) == items
    assert ADAPTER.decode(as_bytes(ids)) == items
    assert ADAPTER.decode(torch.zeros(0, dtype=torch.long)) == []


# ------------------------------------------------------------------------------------------------------
# events


def test_event_times():
    iso = Event("a", "", "2024-05-01T12:00:00Z")
    aware = Event("a", "", dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    assert iso.time == aware.time == 1714564800.0 and isinstance(Event("a", "", 3).time, float)
    assert iso.datetime == dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert Event("a", "", -0.5).time == -0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(role=""), "role must not be empty"),
        (dict(role=3), "role must be a str"),
        (dict(content=b"x"), "content must be a str"),
        (dict(content="a\ud800"), r"content: character 1 .* has no UTF-8 form"),
        (dict(time=float("nan")), "time must be finite"),
        (dict(time=float("inf")), "time must be finite"),
        (dict(time=True), "number of seconds"),
        (dict(time=dt.datetime(2024, 5, 1)), "has no time zone"),
        (dict(time="yesterday"), "not an ISO-8601"),
        (dict(time=None), "seconds since the Unix epoch"),
        (dict(metadata=[1, 2]), "metadata must be a dict or None"),
        (dict(metadata={"a": (1, 2)}), r"metadata\['a'\] is a tuple"),
        (dict(metadata={1: "x"}), "key 1 of type int"),
        (dict(metadata={"a": [float("nan")]}), "JSON has no NaN"),
        (dict(metadata={"a": {1, 2}}), "is a set"),
    ],
)
def test_event_validation(kwargs, message):
    fields = dict(role="user", content="x", time=1.0, metadata=None)
    fields.update(kwargs)
    with pytest.raises(InputError, match=message):
        Event(**fields)


def test_encode_refuses_non_events():
    with pytest.raises(InputError, match="an Event or an iterable of Events, got str"):
        ADAPTER.encode("hello")
    with pytest.raises(InputError, match="event 1: expected an Event, got dict"):
        ADAPTER.encode([Event("a", "", 0), {"role": "a"}])
    e = Event("a", "", 0)
    e.metadata = {"x": float("inf")}  # changed after creation: encode checks again
    with pytest.raises(InputError, match="JSON has no NaN or infinity"):
        ADAPTER.encode(e)


# ------------------------------------------------------------------------------------------------------
# malformed streams


GOOD = b"\xf5user\xf61.5\xf7\xf8hi\xf9"  # 14 bytes


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello" + GOOD, r"event 0 \(starting at byte 0\), byte offset 0: byte 0x68 outside an event"),
        (GOOD + b"\n" + GOOD, r"event 1 \(starting at byte 14\), byte offset 14: byte 0x0A outside an event"),
        (GOOD + b"x", r"event 1 .* byte offset 14: byte 0x78 outside an event"),
        (b"\xf5user\xf61.5\xf7\xf8h\xfai\xf9", r"byte offset 12: found 0xFA \(reserved\) where 0xF9 \(end of event\)"),
        (b"\xf5user\xf61.5\xf8hi\xf9", r"byte offset 9: found 0xF8 \(content\) where 0xF7 \(metadata\)"),
        (b"\xf5user\xf61.5\xf7\xf8hi" + GOOD, r"byte offset 13: found 0xF5 \(event start\) .*never closed"),
        (GOOD + b"\xf9", r"event 1 .* byte offset 14: found 0xF9 \(end of event\) where 0xF5 \(event start\)"),
        (b"\xf5\xf61.5\xf7\xf8hi\xf9", r"byte offset 1: the role is empty"),
        (b"\xf5us\xc3(\xf61.5\xf7\xf8hi\xf9", r"byte offset 3: invalid UTF-8 in the role"),
        (b"\xf5user\xf61.5\xf7\xf8h\xc3(i\xf9", r"byte offset 12: invalid UTF-8 in the content"),
        (b"\xf5user\xf6\xf7\xf8hi\xf9", r"byte offset 6: the time b'' is not a decimal number"),
        (b"\xf5user\xf6nan\xf7\xf8hi\xf9", r"byte offset 6: the time b'nan' is not a decimal"),
        (b"\xf5user\xf61e999\xf7\xf8hi\xf9", r"byte offset 6: the time b'1e999' is not a finite number"),
        (b'\xf5user\xf61.5\xf7{"a":1e999}\xf8hi\xf9', r"byte offset 10: .*JSON has no NaN or infinity"),
        (b'\xf5user\xf61.5\xf7{"a":\xf8hi\xf9', r"byte offset 10: the metadata is not valid JSON"),
        (b"\xf5user\xf61.5\xf7[1]\xf8hi\xf9", r"byte offset 10: the metadata must be a JSON object, got list"),
        (b'\xf5user\xf61.5\xf7{"a":NaN}\xf8hi\xf9', r"byte offset 10: the metadata is not valid JSON.*NaN"),
    ],
)
def test_malformed_streams_name_the_byte_offset(data, message):
    with pytest.raises(InputError, match=message):
        ADAPTER.decode(data)
    with pytest.raises(InputError, match=message):  # the same error fed one byte at a time
        decoder = StreamDecoder("decode")
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
        decoder.finish()


def test_bad_ids_and_partial_option():
    with pytest.raises(InputError, match=r"id 256 at position 1 is outside \[0, 256\)"):
        ADAPTER.decode(torch.tensor([0xF5, 256]))
    with pytest.raises(InputError, match=r"id -1 at position 0"):
        ADAPTER.decode([-1])
    with pytest.raises(InputError, match="dtype torch.float32"):
        ADAPTER.decode(torch.tensor([245.0]))
    with pytest.raises(ConfigError, match="partial must be 'raise' or 'drop'"):
        ADAPTER.decode(GOOD, partial="keep")


# ------------------------------------------------------------------------------------------------------
# files


@settings(max_examples=30, deadline=None)
@given(items=st.lists(events, min_size=1, max_size=6), window=st.integers(1, 200))
def test_files_round_trip_and_streaming_equals_whole_file(items, window):
    with tempfile.TemporaryDirectory() as folder:
        for name, fmt in (("events.jsonl", None), ("events.mem", None), ("events.log", "stream")):
            path = Path(folder) / name
            ADAPTER.write(path, items, format=fmt)
            assert ADAPTER.read(path, format=fmt) == items
            assert list(ADAPTER.iter_events(path, format=fmt)) == items
            windows = list(ADAPTER.iter_windows(path, window, format=fmt))
            assert all(w.numel() == window for w in windows[:-1]) and 1 <= windows[-1].numel() <= window
            assert torch.equal(torch.cat(windows), ADAPTER.encode(ADAPTER.read(path, format=fmt)))
        assert (Path(folder) / "events.mem").read_bytes() == as_bytes(ADAPTER.encode(items))
        assert sorted(os.listdir(folder)) == ["events.jsonl", "events.log", "events.mem"]  # no temp files left


def test_jsonl_is_one_readable_object_per_line(tmp_path):
    path = tmp_path / "session.jsonl"
    items = sample_events()
    ADAPTER.write(path, items)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(items)
    assert json.loads(lines[0]) == {
        "role": "user",
        "content": "Hi!\nWhat's 2+2? 😀",
        "time": 1714564800.0,
        "metadata": None,
    }
    # hand-written files may use ISO-8601 times, omit metadata and have blank lines
    path.write_text(
        '{"role": "user", "content": "hi", "time": "2024-05-01T12:00:00+00:00"}\n\n'
        '{"role": "tool", "content": "", "time": 3, "metadata": {"a": 1}}\n',
        encoding="utf-8",
    )
    assert ADAPTER.read(path) == [Event("user", "hi", 1714564800.0), Event("tool", "", 3.0, {"a": 1})]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"bad.jsonl: no events \(the file is empty or blank\)"),
        (b"\n  \n", r"bad.jsonl: no events"),
        (
            b'{"role": "a", "content": "x", "time": 1}\n{"role": "a", "content": "\xe9", "time": 2}\n',
            r"bad.jsonl: line 2 \(byte 41\): invalid UTF-8 at byte offset 67",
        ),
        (
            b'{"role": "a", "content": "x", "time": 1}\n{"role": "a", "content": \n',
            r"bad.jsonl: line 2 \(byte 41\): not a JSON event record",
        ),
        (b"[1, 2]\n", r"line 1 \(byte 0\): an event record must be a JSON object, got list"),
        (b'{"role": "a", "time": 1}\n', r"line 1 .*missing keys \['content'\]"),
        (b'{"role": "a", "content": "", "time": 1, "text": "x"}\n', r"line 1 .*unknown keys \['text'\]"),
        (b'{"role": "a", "content": "", "time": "noon"}\n', r"line 1 .*not an ISO-8601"),
        (b'{"role": "", "content": "", "time": 1}\n', r"line 1 .*role must not be empty"),
    ],
)
def test_bad_jsonl_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        ADAPTER.read(path)
    with pytest.raises(InputError, match=message):
        list(ADAPTER.iter_windows(path, 7))


def test_bad_stream_files(tmp_path):
    for name in ("nope.jsonl", "nope.mem"):
        with pytest.raises(InputError, match=rf"{name}: no such file"):
            ADAPTER.read(tmp_path / name)
    empty = tmp_path / "empty.mem"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty.mem: file is empty"):
        ADAPTER.read(empty)
    truncated = tmp_path / "cut.mem"
    truncated.write_bytes(GOOD + GOOD[:-1])
    with pytest.raises(
        InputError,
        match=r"cut.mem: event 1 \(starting at byte 14\), byte offset 27: the stream "
        r"ends inside an event",
    ):
        ADAPTER.read(truncated)
    with pytest.raises(InputError, match=r"cut.mem: event 1"):
        list(ADAPTER.iter_windows(truncated, 5))
    garbage = tmp_path / "text.mem"
    garbage.write_bytes(GOOD + b"plain text")
    with pytest.raises(InputError, match=r"text.mem: event 1 .*byte offset 14: byte 0x70 outside an event"):
        ADAPTER.read(garbage)
    with pytest.raises(InputError, match="no events to write"):
        ADAPTER.write(tmp_path / "none.jsonl", [])
    with pytest.raises(ConfigError, match="format must be 'jsonl' or 'stream'"):
        ADAPTER.read(truncated, format="csv")
    with pytest.raises(ConfigError, match="window must be an int >= 1"):
        ADAPTER.iter_windows(truncated, 0)
    with pytest.raises(InputError, match=r"x.jsonl: event 1: expected an Event, got str"):
        ADAPTER.write(tmp_path / "x.jsonl", [Event("a", "", 0), "b"])
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------------------------------------
# generation helpers, models, checkpoints


def test_prompt_and_reply_helpers():
    prompt = ADAPTER.prompt_for("assistant", time=5.0, metadata={"turn": 3})
    assert as_bytes(prompt) == b'\xf5assistant\xf65.0\xf7{"turn":3}\xf8'
    assert ADAPTER.stop_tokens == (END,)
    reply = list(b"Sure, 4.") + [END]
    event = ADAPTER.reply_event(prompt, reply)
    assert event == Event("assistant", "Sure, 4.", 5.0, {"turn": 3})
    assert as_bytes(ADAPTER.encode(event)) == as_bytes(prompt) + bytes(reply)  # exactly what the model consumed
    # a reply cut by max_new_tokens, with bytes that are not UTF-8 and a stray marker: never a crash
    assert ADAPTER.reply_event(prompt, [0x41, 0x80, 0x42]).content == "A\ufffdB"
    assert ADAPTER.reply_event(prompt, [0x41, EVENT, 0x42, END]).content == "A"
    now = ADAPTER.decode(torch.cat([ADAPTER.prompt_for("user"), torch.tensor([END])]))[0]
    assert abs(now.time - dt.datetime.now(dt.timezone.utc).timestamp()) < 60
    with pytest.raises(InputError, match="role must not be empty"):
        ADAPTER.prompt_for("")
    with pytest.raises(InputError, match="prompt: expected the ids of one event header"):
        ADAPTER.reply_event(ADAPTER.encode(Event("a", "done", 0))[:-1], [END])


def test_build_model_and_checkpoint_remember_the_adapter(tmp_path):
    assert get_adapter("memory") is MemoryStreamAdapter
    assert MemoryStreamAdapter.metric_name == "bits_per_byte" and ADAPTER.uniform_baseline() == 8.0
    assert MemoryStreamAdapter(**ADAPTER.settings()) == ADAPTER
    assert ADAPTER.input_spec == ByteAdapter().input_spec  # a byte model can be fine-tuned on memory streams
    model = ADAPTER.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4))
    assert isinstance(model, LanguageModel) and model.vocab_size == 256
    assert model.adapter_info == {"name": "memory", "settings": {}}
    ids = ADAPTER.encode(sample_events())
    with torch.no_grad():
        out = model(ids[None, :-1])
    assert out.logits.shape == (1, ids.numel() - 1, 256)
    save_model(tmp_path / "memory.safetensors", model)
    assert adapter_from_checkpoint(tmp_path / "memory.safetensors") == MemoryStreamAdapter()
    # fine-tuning a byte model on memory streams: its weights load as they are, the new checkpoint says "memory"
    byte_model = ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4))
    save_model(tmp_path / "bytes.safetensors", byte_model)
    load_model(tmp_path / "bytes.safetensors", model)
    assert torch.equal(model.embeddings.weight, byte_model.embeddings.weight)
    save_model(tmp_path / "tuned.safetensors", model)
    assert adapter_from_checkpoint(tmp_path / "bytes.safetensors") == ByteAdapter()
    assert adapter_from_checkpoint(tmp_path / "tuned.safetensors") == MemoryStreamAdapter()


# ------------------------------------------------------------------------------------------------------
# training proof

CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Seoul", "Tunis"]
CONDITIONS = ["sunny", "cloudy", "raining", "windy", "snowing"]


def scripted_dialogue(turns: int, seed: int) -> list[Event]:
    """A weather agent: the user asks, the assistant calls a tool (metadata), the tool answers, the assistant
    repeats the tool's numbers. Repeated structure, with content that must be copied from earlier events."""
    rng = random.Random(seed)
    t, out = 1714564800.0, []
    for _ in range(turns):
        city, temp, cond = rng.choice(CITIES), rng.randint(-5, 35), rng.choice(CONDITIONS)
        for role, content, meta in (
            ("user", f"What is the weather in {city}?", None),
            ("assistant", f"Let me check {city}.", {"tool": "weather", "city": city}),
            ("tool", f"{city}: {temp} C, {cond}", None),
            ("assistant", f"It is {temp} degrees and {cond} in {city}.", None),
        ):
            t += rng.choice([1.0, 2.0, 4.0])
            out.append(Event(role, content, t, meta))
    return out


def test_tiny_model_learns_a_memory_stream_and_answers_in_a_well_formed_event(tmp_path, one_thread):
    """120 steps of a 2-layer d_model=32 Mamba. Measured: 0.63 bits/byte on held-out dialogue (8.00 untrained)."""
    train_file = tmp_path / "train.jsonl"
    ADAPTER.write(train_file, scripted_dialogue(600, seed=0))
    train = ADAPTER.source(train_file, batch_size=8, window=128)
    held_out = ADAPTER.source(scripted_dialogue(60, seed=1), batch_size=4, window=256)
    torch.manual_seed(0)
    model = ADAPTER.build_model(BackboneConfig(d_model=32, n_layer=2, d_state=16))
    config = TrainConfig(
        max_steps=120, batch_size=8, window=128, lr=6e-3, warmup_steps=10, eval_windows=4, progress=False
    )
    trainer = Trainer(model, config, train, held_out, loss_fn=ADAPTER.loss, metric_fn=ADAPTER.metric)
    before = trainer.evaluate()["eval_metric"]
    trainer.fit()
    after = trainer.evaluate()["eval_metric"]
    assert before > 7.0
    assert after < 2.0, f"held-out bits per byte {after:.3f} (untrained {before:.3f}, uniform 8.0)"

    # The agent loop: the history goes in, a prompt opens the assistant's event, generation stops at its end.
    history = scripted_dialogue(1, seed=5)[:3]
    prompt = ADAPTER.prompt_for("assistant", time=history[-1].time + 1.0)
    model.eval()
    result = model.generate(torch.cat([ADAPTER.encode(history), prompt]), 120, temperature=0, stop=ADAPTER.stop_tokens)
    assert result.stop_reasons == ["stop"] and result.tokens[0][-1] == END
    reply = ADAPTER.reply_event(prompt, result.tokens[0])
    assert reply.role == "assistant" and reply.content
    stream = ADAPTER.encode(history + [reply])  # the reply re-encodes to exactly what the state consumed
    assert as_bytes(stream) == as_bytes(ADAPTER.encode(history)) + as_bytes(prompt) + bytes(result.tokens[0])
