"""The adapter protocol itself: InputSpec validation, the registry, build_model stamping, and checkpoints that
remember their adapter (save_model -> adapter_from_checkpoint), with a small real adapter defined here."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.checkpoint import save_model
from seqlab.config import BackboneConfig
from seqlab.domains import (
    ADAPTERS,
    InputSpec,
    TokenAdapter,
    adapter_from_checkpoint,
    adapter_from_info,
    get_adapter,
    register_adapter,
)
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
            yield self.encode(text[i : i + window])

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
    cfg = TrainConfig(
        max_steps=2, batch_size=2, window=16, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1, progress=False
    )
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


# ------------------------------------------------------------------------------------------------------
# the protocol's generic members, for every built-in adapter: continuous, loss_unit, source, position_metric


def _builtin_cases():
    """(label, adapter, encoded input of one stream, targets-maker) for every built-in adapter and mode."""
    import numpy as np

    from seqlab.domains.audio import AudioAdapter, Waveform
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.dna import DNAAdapter
    from seqlab.domains.memory import Event, MemoryStreamAdapter
    from seqlab.domains.video import VideoAdapter, moving_square_clips

    t = torch.arange(400) / 8000
    wave = Waveform(torch.stack([torch.sin(2 * math.pi * 440 * t), 0.5 * torch.sin(2 * math.pi * 97 * t)]), 8000)
    clips, labels = moving_square_clips(2, 6, size=8, square=2)
    return [
        ("bytes", ByteAdapter(), ByteAdapter().encode("the cat sat on the mat, and the mat sat still. " * 3)),
        (
            "memory",
            MemoryStreamAdapter(),
            MemoryStreamAdapter().encode([Event("user", "hi there", 1.5), Event("tool", "ok {x}", 2.0, {"a": 1})]),
        ),
        ("dna", DNAAdapter(add_bos_eos=True), DNAAdapter(add_bos_eos=True).encode(["ACGTNACGGT", "TTAGC", "GGA"])),
        (
            "audio-mulaw",
            AudioAdapter(8000, channels="keep", num_channels=2),
            AudioAdapter(8000, channels="keep", num_channels=2).encode(wave),
        ),
        (
            "audio-continuous",
            AudioAdapter(8000, mode="continuous", channels="keep", num_channels=2),
            AudioAdapter(8000, mode="continuous", channels="keep", num_channels=2).encode(wave),
        ),
        (
            "video-next",
            VideoAdapter((8, 8), 1, (1, 4, 4), embed_dim=4),
            VideoAdapter((8, 8), 1, (1, 4, 4), embed_dim=4).encode(np.asarray(clips[0])),
        ),
        (
            "video-classify",
            VideoAdapter((8, 8), 1, (1, 4, 4), task="classify", num_classes=4, embed_dim=4),
            (torch.stack([VideoAdapter((8, 8), 1, (1, 4, 4)).encode(c) for c in clips]), torch.as_tensor(labels)),
        ),
        ("frames", FramesTestAdapter(), torch.randn(40, 3, generator=torch.Generator().manual_seed(0))),
    ]


CASES = _builtin_cases()


@pytest.mark.parametrize("label,adapter,encoded", CASES, ids=[c[0] for c in CASES])
def test_position_metric_averages_to_the_metric_and_counts_its_weight(label, adapter, encoded):
    torch.manual_seed(0)
    model = adapter.build_model(CONFIG).eval()
    if label == "video-classify":
        inputs, targets = encoded
    else:
        inputs, targets = encoded[:-1][None].repeat(2, *[1] * encoded.dim()), encoded[1:][None]
        targets = targets.repeat(2, *[1] * encoded.dim())
    with torch.no_grad():
        out = model(inputs)
    values = adapter.position_metric(out, targets)
    assert values.dtype == torch.float32
    assert values.shape == ((2, 1) if label == "video-classify" else tuple(inputs.shape[:2]))
    counted = ~torch.isnan(values)
    assert int(counted.sum()) == adapter.metric_weight(targets)
    assert float(values[counted].double().mean()) == pytest.approx(adapter.metric(out, targets), rel=1e-5, abs=1e-6)
    assert adapter.metric_totals(out, targets) == (
        pytest.approx(float(values[counted].double().sum())),
        int(counted.sum()),
    )
    if label == "dna":  # the specials among the targets are left out, the bases are not
        assert 0 < int(counted.sum()) < values.numel()
    if label != "video-classify":  # real per-position values, not the window's metric spread out
        assert float(values[counted].std()) > 0


@pytest.mark.parametrize("label,adapter,encoded", CASES, ids=[c[0] for c in CASES])
def test_generic_members_continuous_loss_unit_and_source(label, adapter, encoded):
    from seqlab.train import WindowSource

    assert adapter.continuous == (adapter.input_spec.kind == "continuous")
    assert adapter.loss_unit in ("bits", "mse")
    mse = label in ("video-next", "frames")
    assert adapter.loss_unit == ("mse" if mse else "bits")
    assert adapter.report_loss(2.0) == pytest.approx(2.0 if mse else 2.0 / math.log(2))
    if label == "video-classify":
        clips, labels = encoded
        from seqlab.domains.video import moving_square_clips

        raw, labels = moving_square_clips(4, 6, size=8, square=2)
        source = adapter.source(raw, 2, None, labels=labels)
        with pytest.raises(InputError, match="classify"):
            adapter.source(clips[0], 2, 2)
    else:
        source = adapter.source(encoded, 2, 2 if label == "video-next" else 4)
    assert isinstance(source, WindowSource) and source.batch_size == 2 and source.num_windows >= 1
    inputs, targets = source.window(0)
    assert inputs.shape[0] == 2
    if adapter.continuous:
        assert inputs.is_floating_point()
    else:
        assert inputs.dtype == torch.int64 and torch.equal(inputs[:, 1:], targets[:, :-1])


def test_source_refuses_options_it_does_not_know():
    with pytest.raises(InputError, match="no options"):
        FramesTestAdapter().source(torch.zeros(40, 3), 2, 4, start=3)
    with pytest.raises(InputError, match=r"frames \(T, \*frame\)"):
        FramesTestAdapter().source(torch.zeros(40), 2, 4)
