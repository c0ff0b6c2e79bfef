"""The adapter protocol itself: InputSpec validation, the registry, build_model stamping, and checkpoints that
remember their adapter (save_model -> adapter_from_checkpoint), with a small real adapter defined here."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.checkpoint import save_model
from seqlab.config import BackboneConfig
from seqlab.domains import (ADAPTERS, InputSpec, TokenAdapter, adapter_from_checkpoint, adapter_from_info,
                            get_adapter, register_adapter)
from seqlab.domains.testing import FramesTestAdapter
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.models import LanguageModel, SequenceModel

CONFIG = BackboneConfig(d_model=16, n_layer=1, d_state=4)


@register_adapter
class _DigitsAdapter(TokenAdapter):
    """Decimal digits as tokens 0..9 (with a settable offset to prove settings travel)."""

    name = "test-digits"
    metric_name = "bits_per_digit"

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def settings(self):
        return {"offset": self.offset}

    @property
    def input_spec(self):
        return InputSpec("tokens", vocab_size=10)

    def encode(self, raw):
        return torch.tensor([(int(c) + self.offset) % 10 for c in raw], dtype=torch.long)

    def decode(self, tensor):
        return "".join(str((int(t) - self.offset) % 10) for t in self.check_ids(tensor))

    def read(self, path, **options):
        return open(path).read().strip()

    def iter_windows(self, path, window, **options):
        text = self.read(path)
        for i in range(0, len(text), window):
            yield self.encode(text[i:i + window])

    def write(self, path, raw):
        open(path, "w").write(raw)


@register_adapter
class _FramesAdapter(FramesTestAdapter):
    name = "test-frames"


def test_input_spec_is_validated():
    with pytest.raises(ConfigError, match="vocab_size"):
        InputSpec("tokens")
    with pytest.raises(ConfigError, match="width"):
        InputSpec("continuous", width=0)
    with pytest.raises(ConfigError, match="kind"):
        InputSpec("pixels", width=3)


def test_registry_finds_adapters_and_refuses_clashes():
    assert get_adapter("test-digits") is _DigitsAdapter
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        get_adapter("nope")

    class Other(_DigitsAdapter):
        name = "test-digits"

    with pytest.raises(ConfigError, match="already registered"):
        register_adapter(Other)
    assert ADAPTERS["test-digits"] is _DigitsAdapter


def test_settings_round_trip_and_equality():
    a = _DigitsAdapter(offset=3)
    b = adapter_from_info(a.info())
    assert a == b and hash(a) == hash(b) and a != _DigitsAdapter(offset=4)
    assert b.decode(a.encode("0123")) == "0123"
    with pytest.raises(ConfigError, match="cannot be rebuilt"):
        adapter_from_info({"name": "test-digits", "settings": {"colour": 1}})
    with pytest.raises(ConfigError, match="'name'"):
        adapter_from_info({"settings": {}})


def test_build_model_fits_the_spec():
    lm = _DigitsAdapter().build_model(CONFIG)
    assert isinstance(lm, LanguageModel) and lm.adapter_info == {"name": "test-digits", "settings": {"offset": 0}}
    out = lm(torch.zeros(1, 5, dtype=torch.long))
    assert out.logits.shape == (1, 5, 10)
    sm = _FramesAdapter().build_model(CONFIG)
    assert isinstance(sm, SequenceModel)
    assert sm(torch.zeros(1, 4, 3)).output.shape == (1, 4, 3)


def test_token_metric_is_bits_and_uniform_baseline():
    adapter = _DigitsAdapter()
    logits = torch.zeros(2, 7, 10)  # uniform prediction: exactly log2(10) bits
    targets = torch.randint(0, 10, (2, 7))
    assert adapter.metric(logits, targets) == pytest.approx(math.log2(10), rel=1e-6)
    assert adapter.uniform_baseline() == pytest.approx(math.log2(10))


def test_check_ids_names_the_position():
    with pytest.raises(InputError, match=r"id 12 at position \(1,\)"):
        _DigitsAdapter().check_ids(torch.tensor([1, 12, 3]))
    with pytest.raises(InputError, match="integer"):
        _DigitsAdapter().check_ids(torch.tensor([1.0]))


def test_checkpoint_remembers_its_adapter(tmp_path):
    model = _DigitsAdapter(offset=7).build_model(CONFIG)
    path = save_model(tmp_path / "model.safetensors", model)
    assert adapter_from_checkpoint(path) == _DigitsAdapter(offset=7)

    plain = LanguageModel(CONFIG, vocab_size=10)
    save_model(tmp_path / "plain.safetensors", plain)
    with pytest.raises(CorruptFileError, match="records no adapter"):
        adapter_from_checkpoint(tmp_path / "plain.safetensors")


def test_training_checkpoint_directory_remembers_its_adapter(tmp_path):
    from seqlab.train import TrainConfig, Trainer

    model = _DigitsAdapter(offset=2).build_model(CONFIG)
    data = torch.arange(400) % 10
    cfg = TrainConfig(max_steps=2, batch_size=2, window=16, checkpoint_dir=str(tmp_path / "ckpt"),
                      checkpoint_every=1, progress=False)
    Trainer(model, cfg, data).fit()
    assert adapter_from_checkpoint(tmp_path / "ckpt") == _DigitsAdapter(offset=2)


def test_model_from_checkpoint_rebuilds_model_options_and_weights(tmp_path):
    from seqlab.domains import model_from_checkpoint

    torch.manual_seed(3)
    model = _DigitsAdapter(offset=1).build_model(CONFIG, tie_embeddings=False).eval()
    assert model.adapter_info["model"] == {"tie_embeddings": False}
    path = save_model(tmp_path / "m.safetensors", model)
    rebuilt, adapter = model_from_checkpoint(path)
    assert adapter == _DigitsAdapter(offset=1) and not rebuilt.training
    ids = torch.randint(0, 10, (2, 9))
    assert torch.equal(rebuilt(ids).logits, model(ids).logits)
    assert rebuilt.lm_head.weight.data_ptr() != rebuilt.embeddings.weight.data_ptr()

    save_model(tmp_path / "plain.safetensors", LanguageModel(CONFIG, vocab_size=10))
    with pytest.raises(CorruptFileError, match="records no adapter"):
        model_from_checkpoint(tmp_path / "plain.safetensors")
