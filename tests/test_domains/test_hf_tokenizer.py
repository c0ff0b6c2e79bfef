"""HF ``tokenizers`` tokenizers as an adapter, and a model with its adapter in one pretrained directory.

A byte-level BPE is trained here with the ``tokenizers`` library on real English (the CPython documentation text
every interpreter ships, ``pydoc_data.topics``); a small Mamba is trained on it for a few steps so that greedy
text has words and spaces; transformers writes it as ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` with its own
``save_pretrained`` and the tokenizer goes beside it as ``tokenizer.json``, the way users download such models.
``seqlab.domains.registry.from_pretrained`` loads model and tokenizer, and ``seqlab generate --model DIR`` streams
the same text as seqlab's greedy ``generate``. seqlab's own pretrained directories round-trip bit-exact with
their adapter (bytes, HF tokenizer) beside them, sharded too; bad input is one line naming the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from seqlab import BackboneConfig, LanguageModel
from seqlab.errors import ConfigError, CorruptFileError
from seqlab.testing import one_line, run_cli

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from seqlab.domains.bytes import ByteAdapter  # noqa: E402
from seqlab.domains.hf_tokenizer import HFTokenizerAdapter  # noqa: E402
from seqlab.domains.registry import from_pretrained, model_from_checkpoint, save_pretrained  # noqa: E402

TOKENS = 300  # the tokenizer's vocabulary
VOCAB = 320  # the model's embedding: padded past the tokenizer's, as HF checkpoints often are
PROMPT = "The default value of the"


def corpus() -> str:
    from pydoc_data import topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics))[:200_000]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENS,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus()], trainer)
    assert tokenizer.get_vocab_size() == TOKENS
    return tokenizer.to_str()


def trained(ssm: str, tokenizer_json: str) -> LanguageModel:
    """A tiny model trained for a few steps on the corpus: greedy text then has words and spaces."""
    torch.manual_seed(0)
    extra = dict(headdim=16, chunk_size=16) if ssm == "mamba2" else {}
    model = LanguageModel(BackboneConfig(d_model=32, n_layer=2, ssm=ssm, d_state=8, **extra), VOCAB, False)
    ids = HFTokenizerAdapter(tokenizer_json).encode(corpus()[:40_000])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def hf_dir(request, tmp_path_factory, tokenizer_json) -> Path:
    """A transformers directory written by transformers itself (sharded for Mamba-2) with a tokenizer.json."""
    from seqlab.interop import hf as seqlab_hf

    staging = tmp_path_factory.mktemp("staging")
    seqlab_hf.save(trained(request.param, tokenizer_json), staging)
    classes = {"mamba1": transformers.MambaForCausalLM, "mamba2": transformers.Mamba2ForCausalLM}
    hf_model = classes[request.param].from_pretrained(staging)
    hf_model.config.eos_token_id = hf_model.config.bos_token_id = hf_model.config.pad_token_id = 0  # <|endoftext|>
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf_model.save_pretrained(folder, max_shard_size="40KB" if request.param == "mamba2" else "5GB")
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    assert (folder / "model.safetensors.index.json").exists() == (request.param == "mamba2")
    return folder


# ------------------------------------------------------------------------------------------------------
# the adapter
# ------------------------------------------------------------------------------------------------------
def test_adapter_encodes_decodes_and_is_rebuilt_from_its_settings(tokenizer_json):
    from tokenizers import Tokenizer

    adapter = HFTokenizerAdapter(tokenizer_json, vocab_size=VOCAB)
    text = "Compound statements contain (groups of) other statements; naïve café 日本"
    ids = adapter.encode(text)
    assert ids.dtype == torch.long and ids.tolist() == Tokenizer.from_str(tokenizer_json).encode(text).ids
    assert adapter.decode(ids) == text and adapter.encode(text.encode()).tolist() == ids.tolist()
    assert type(adapter)(**adapter.settings()) == adapter
    assert adapter.input_spec.vocab_size == VOCAB
    options = adapter.generation_options()
    assert options["suppress_tokens"] == [0, *range(TOKENS, VOCAB)]  # the special token and the padding rows
    assert adapter.decode([5, TOKENS + 3, 6]) == adapter.decode([5, 6])


def test_iter_windows_equal_encode_of_read(tmp_path, tokenizer_json, monkeypatch):
    from seqlab.domains import hf_tokenizer

    file = tmp_path / "doc.txt"
    file.write_text(corpus()[:30_000], encoding="utf-8")
    monkeypatch.setattr(hf_tokenizer, "_READ", 997)  # many chunks from a small file
    adapter = HFTokenizerAdapter(tokenizer_json)
    windows = list(adapter.iter_windows(file, 64))
    assert all(len(w) == 64 for w in windows[:-1])
    assert torch.cat(windows).tolist() == adapter.encode(adapter.read(file)).tolist()


# ------------------------------------------------------------------------------------------------------
# a transformers directory with its tokenizer.json
# ------------------------------------------------------------------------------------------------------
def test_transformers_directory_loads_with_its_tokenizer(hf_dir):
    from seqlab.interop import hf as seqlab_hf

    model, adapter = from_pretrained(hf_dir)
    assert isinstance(adapter, HFTokenizerAdapter) and adapter.vocab_size == VOCAB
    assert adapter.eos_id == json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == 0  # <|endoftext|>
    alone = LanguageModel.from_pretrained(hf_dir)
    reference = seqlab_hf.load(hf_dir)
    for loaded in (model, alone):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    assert model.adapter_info == adapter.info()  # a model file saved from it records the tokenizer
    # transformers computes the same logits on the encoded prompt
    ids = adapter.encode(PROMPT)[None]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf_model(ids).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4


def test_cli_generate_streams_an_hf_directory(hf_dir, capsys):
    model, adapter = from_pretrained(hf_dir)
    prompt = adapter.encode(PROMPT)
    greedy = model.generate(prompt, 40, **adapter.generation_options()).tokens[0]
    code, out, err = run_cli(["generate", "--model", hf_dir, "--prompt", PROMPT, "--max-new-tokens", 40], capsys)
    assert code == 0, err
    assert out == adapter.decode(greedy) + "\n"
    assert " " in out.strip()  # words: the streamed pieces below are real


def test_streaming_writes_stable_text_as_it_is_generated(hf_dir):
    from seqlab.cli.generate import TextStreamer

    model, adapter = from_pretrained(hf_dir)
    writes: list[tuple[int, str]] = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append((len(streamer.ids), text))
            return super().write(text)

    stream = Recorder()
    streamer = TextStreamer(adapter, stream)
    out = model.generate(adapter.encode(PROMPT), 40, callback=streamer, **adapter.generation_options())
    streamer.finish()
    tokens = out.tokens[0]
    assert stream.getvalue() == adapter.decode(tokens) + "\n"
    during = [count for count, _ in writes if count < len(tokens)]
    assert len(during) >= 2, writes  # text came out while tokens were still being generated


def test_streaming_never_prints_half_a_character(tokenizer_json):
    """Multi-byte characters split over byte tokens (bytes adapter) or over byte-level BPE tokens: no U+FFFD."""
    from seqlab.cli.generate import TextStreamer

    text = "naïve café, 日本語のテキスト — ok 🙂 done\nnext line ünïcödé"
    for adapter in (ByteAdapter(), HFTokenizerAdapter(tokenizer_json)):
        stream = io.StringIO()
        streamer = TextStreamer(adapter, stream)
        pieces = []
        for token in adapter.encode(text).tolist():
            before = stream.getvalue()
            streamer(0, token)
            pieces.append(stream.getvalue()[len(before) :])
        streamer.finish()
        assert stream.getvalue() == text + "\n"
        assert not any("\ufffd" in piece for piece in pieces)
        assert sum(1 for piece in pieces if piece) >= 5


# ------------------------------------------------------------------------------------------------------
# seqlab's own directories: model + adapter, round trips
# ------------------------------------------------------------------------------------------------------
def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_with_hf_tokenizer_sharded(tmp_path, tokenizer_json):
    adapter = HFTokenizerAdapter(tokenizer_json, vocab_size=VOCAB, eos_id=0)
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=32, n_layer=2, ssm="mamba2", headdim=16, chunk_size=8))
    folder = save_pretrained(model.eval(), tmp_path / "m", max_shard_size=8000)
    names = sorted(p.name for p in folder.iterdir())
    assert {"adapter.json", "config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(names)
    assert len([n for n in names if n.startswith("model-")]) > 2
    assert (folder / "tokenizer.json").read_text(encoding="utf-8") == tokenizer_json
    assert "tokenizer" not in json.loads((folder / "adapter.json").read_text())["settings"]
    # transformers reads the tokenizer.json too
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert fast(PROMPT)["input_ids"] == adapter.encode(PROMPT).tolist()

    loaded, again = from_pretrained(folder)
    assert again == adapter and same_weights(model, loaded)
    assert LanguageModel.from_pretrained(folder).fingerprint == model.fingerprint  # the model alone, in the core
    # through model_from_checkpoint (what `seqlab generate --model` calls) as well
    loaded2, again2 = model_from_checkpoint(folder)
    assert again2 == adapter and same_weights(model, loaded2)
    # and a model file saved from the loaded model records the tokenizer inline (self-contained)
    from seqlab.checkpoint import save_model

    file = save_model(tmp_path / "m.safetensors", loaded)
    assert model_from_checkpoint(file)[1] == adapter


def test_round_trip_with_byte_adapter_and_cli(tmp_path, capsys):
    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=16, n_layer=2, d_state=8), tie_embeddings=False).eval()
    folder = save_pretrained(model, tmp_path / "bytes")
    assert json.loads((folder / "adapter.json").read_text())["model"] == {"tie_embeddings": False}
    loaded, again = from_pretrained(folder)
    assert again == adapter and same_weights(model, loaded)
    assert loaded.adapter_info == model.adapter_info
    # the core alone (model.save_pretrained) records the adapter in config.json: one call still loads both
    core = model.save_pretrained(tmp_path / "core")
    assert not (core / "adapter.json").exists()
    assert from_pretrained(core)[1] == adapter
    greedy = model.generate(adapter.encode("hello"), 12).tokens[0]
    code, out, err = run_cli(["generate", "--model", folder, "--prompt", "hello", "--max-new-tokens", 12], capsys)
    assert code == 0, err
    assert out == bytes(greedy).decode("utf-8", errors="replace") + "\n"


def test_a_model_without_adapter(tmp_path):
    model = LanguageModel(BackboneConfig(d_model=16, n_layer=1, d_state=4), 256).eval()
    with pytest.raises(ConfigError, match="give the adapter"):
        save_pretrained(model, tmp_path / "x")
    folder = model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CorruptFileError) as exc:
        from_pretrained(folder)
    assert "\n" not in str(exc.value) and "LanguageModel.from_pretrained" in str(exc.value)
    loaded, adapter = from_pretrained(save_pretrained(model, tmp_path / "given", ByteAdapter()))
    assert adapter == ByteAdapter() and same_weights(model, loaded)
    with pytest.raises(ConfigError, match="vocabulary of 256 but the model's embedding has 100"):
        save_pretrained(LanguageModel(BackboneConfig(d_model=16, n_layer=1), 100), tmp_path / "w", ByteAdapter())
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------------
# bad input: one line, naming the file
# ------------------------------------------------------------------------------------------------------
def broken_copy(hf_dir: Path, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(hf_dir, folder)
    return folder


def test_tokenizer_json_that_does_not_parse(hf_dir, tmp_path, capsys):
    folder = broken_copy(hf_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nope"}}')
    with pytest.raises(CorruptFileError) as exc:
        from_pretrained(folder)
    assert "\n" not in str(exc.value) and str(folder / "tokenizer.json") in str(exc.value)
    code, out, err = run_cli(["generate", "--model", folder, "--prompt", "x"], capsys)
    assert code != 0 and str(folder / "tokenizer.json") in one_line(err)


def test_tokenizer_larger_than_the_embedding(tmp_path, tokenizer_json, capsys):
    from seqlab.interop import hf as seqlab_hf

    folder = tmp_path / "small"
    seqlab_hf.save(LanguageModel(BackboneConfig(d_model=16, n_layer=1, d_state=4), 256), folder)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        from_pretrained(folder)
    message = str(exc.value)
    assert "\n" not in message and str(folder / "tokenizer.json") in message and "300" in message and "256" in message
    code, out, err = run_cli(["generate", "--model", folder, "--prompt", "x"], capsys)
    assert code != 0 and "tokenizer.json" in one_line(err)


def test_cli_bad_directories(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(["generate", "--model", empty, "--prompt", "x"], capsys)
    assert code != 0 and str(empty) in one_line(err) and "config.json" in one_line(err)
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(empty)
    assert str(empty / "config.json") in str(exc.value)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, out, err = run_cli(["generate", "--model", gpt2, "--prompt", "x"], capsys)
    assert code != 0 and str(gpt2 / "config.json") in one_line(err) and "gpt2" in one_line(err)


def test_transformers_directory_without_tokenizer(hf_dir, tmp_path):
    folder = broken_copy(hf_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CorruptFileError) as exc:
        from_pretrained(folder)
    assert "\n" not in str(exc.value) and "tokenizer.json" in str(exc.value) and str(folder) in str(exc.value)
