"""The DNA adapter: vocabulary, letter policies, FASTA/FASTQ reading (plain and gzip) against Biopython's
SeqRecord parser, streaming equal to whole-file reading (and bounded in memory), bad files, reverse
complement, the RC-equivariant model, the metric, and a tiny model that learns planted repeats."""

from __future__ import annotations

import gzip
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from Bio import SeqIO
from Bio.Seq import reverse_complement as bio_reverse_complement
from Bio.SeqIO.FastaIO import SimpleFastaParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.checkpoint import load_model, save_model
from seqlab.config import BackboneConfig
from seqlab.domains import adapter_from_checkpoint, adapter_from_info, get_adapter
from seqlab.domains.dna import (
    BOS,
    COMPLEMENT,
    EOS,
    MASK,
    PAD,
    VOCAB,
    DNAAdapter,
    MaskedBaseSource,
    RCAugmentedSource,
    mask_bases,
    reverse_complement,
    reverse_complement_logits,
)
from seqlab.errors import ConfigError, CorruptFileError, InputError, StateError
from seqlab.train import SequenceSource, TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[1] / "data" / "dna"
REAL = {  # file -> (format, records, bases)
    "NC_000932.fasta.gz": ("fasta", 1, 154_478),
    "NC_005816.fna": ("fasta", 1, 9_609),
    "example.fastq.gz": ("fastq", 3, 75),
    "longreads_original_sanger.fastq": ("fastq", 10, 3_665),
}


def bio_records(path: Path, fmt: str) -> list[tuple[str, str]]:
    """The SeqRecord path, as a reference for ours."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return [(r.id, str(r.seq)) for r in SeqIO.parse(handle, fmt)]


def write_text(path: Path, text: str, compress: bool = False) -> Path:
    data = text.encode("latin-1")
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    return path


# ------------------------------------------------------------------------------------------------------
# vocabulary, encode / decode


def test_vocabulary_ids_are_fixed():
    assert VOCAB == ("<pad>", "<mask>", "<unk>", "<bos>", "<eos>", "A", "C", "G", "T", "N")
    a = DNAAdapter()
    assert a.input_spec.kind == "tokens" and a.input_spec.vocab_size == 10
    assert a.encode("ACGTN").tolist() == [5, 6, 7, 8, 9]
    assert [VOCAB[c] for c in COMPLEMENT] == ["<pad>", "<mask>", "<unk>", "<bos>", "<eos>", "T", "G", "C", "A", "N"]


def test_settings_round_trip_and_registry():
    a = DNAAdapter(iupac="error", invalid="unk", lowercase="n", add_bos_eos=True)
    assert type(a)(**a.settings()) == a
    assert adapter_from_info(a.info()) == a
    assert get_adapter("dna") is DNAAdapter
    assert a != DNAAdapter()
    for bad in ({"iupac": "x"}, {"invalid": "drop"}, {"lowercase": "lower"}, {"add_bos_eos": 1}):
        with pytest.raises(ConfigError):
            DNAAdapter(**bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ACGTNacgtn", max_size=40), min_size=1, max_size=4), st.booleans())
def test_encode_decode_round_trip(seqs, bos_eos):
    a = DNAAdapter(add_bos_eos=bos_eos)
    records = [(f"r{i}", s) for i, s in enumerate(seqs)]
    ids, soft = a.encode(records, return_soft_mask=True)
    assert ids.dtype == torch.int64 and ids.shape == soft.shape
    assert ids.numel() == sum(len(s) for s in seqs) + (2 * len(seqs) if bos_eos else 0)
    assert a.decode(ids, soft_mask=soft) == "".join(seqs)  # case restored by the soft mask
    assert a.decode(ids) == "".join(seqs).upper()
    if bos_eos:
        assert a.decode_records(ids) == [s.upper() for s in seqs]


def test_decode_specials_and_bad_ids():
    a = DNAAdapter()
    assert a.decode(torch.tensor([BOS, 5, MASK, 8, EOS, PAD])) == "AT"
    assert a.decode(torch.tensor([BOS, 5, MASK, 8, EOS]), specials=True) == "<bos>A<mask>T<eos>"
    with pytest.raises(InputError, match="position"):
        a.decode(torch.tensor([5, 10]))


def test_letter_policies():
    a = DNAAdapter()
    # IUPAC ambiguity codes -> N by default; U (RNA) reads as T; lower case keeps the base and is flagged
    ids, soft = a.encode("ACRYu-ok".replace("-ok", "g"), return_soft_mask=True)
    assert a.decode(ids) == "ACNNTG" and soft.tolist() == [False] * 4 + [True, True]
    assert DNAAdapter(lowercase="n").decode(DNAAdapter(lowercase="n").encode("ACgtN")) == "ACNNN"
    with pytest.raises(InputError, match=r"record 'chr9'.*position 4 \(1-based\).*ambiguous IUPAC code 'R'"):
        DNAAdapter(iupac="error").encode(("chr9", "ACGRT"))
    # letters outside IUPAC: error by default, or mapped by an explicit policy
    with pytest.raises(InputError, match=r"record 'x'.*position 3 .*invalid letter 'X'"):
        a.encode(("x", "ACXGT"))
    with pytest.raises(InputError, match=r"position 2 .*invalid letter '-'"):
        a.encode("A-C")
    with pytest.raises(InputError, match=r"position 2 .*invalid letter 'é'"):
        a.encode("Aé")
    assert DNAAdapter(invalid="n").decode(DNAAdapter(invalid="n").encode("AX-C")) == "ANNC"
    assert DNAAdapter(invalid="unk").encode("AXC").tolist() == [5, 2, 6]
    with pytest.raises(InputError, match="expected a str"):
        a.encode([("id", "ACGT"), 3])


# ------------------------------------------------------------------------------------------------------
# real files


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files_match_biopython_seqrecord_path(name):
    fmt, n_records, n_bases = REAL[name]
    a = DNAAdapter()
    path = DATA / name
    assert a.detect_format(path) == fmt
    records = a.read(path)
    assert records == bio_records(path, fmt)
    assert len(records) == n_records and sum(len(s) for _, s in records) == n_bases
    assert a.decode(a.encode(records)) == "".join(s for _, s in records).upper()


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("bos_eos", [False, True])
def test_streaming_equals_whole_file(name, bos_eos):
    a = DNAAdapter(add_bos_eos=bos_eos)
    path = DATA / name
    whole, whole_soft = a.encode(a.read(path), return_soft_mask=True)
    for window in ((1,) if whole.numel() < 20_000 else ()) + (7, 60, 4096, whole.numel() + 5):
        windows = list(a.iter_windows(path, window))
        assert all(w.numel() == window for w in windows[:-1]) and 0 < windows[-1].numel() <= window
        assert torch.equal(torch.cat(windows), whole), window
    pairs = list(a.iter_windows(path, 333, return_soft_mask=True))
    assert torch.equal(torch.cat([s for _, s in pairs]), whole_soft)


def test_real_reads_are_soft_masked_and_genome_rc_matches_biopython():
    a = DNAAdapter()
    _, soft = a.encode(a.read(DATA / "longreads_original_sanger.fastq"), return_soft_mask=True)
    assert 0.1 < float(soft.float().mean()) < 0.5  # these Sanger reads carry lower-case stretches
    ((rid, seq),) = a.read(DATA / "NC_000932.fasta.gz")
    assert rid == "NC_000932.1"
    assert a.decode(reverse_complement(a.encode(seq))) == bio_reverse_complement(seq)


# the line reader (FASTA iter_windows) against SimpleFastaParser on awkward but legal files
_fasta_line = st.one_of(
    st.text(alphabet="ACGTNacgtnRY", min_size=0, max_size=70),
    st.text(alphabet="ACGT ", min_size=1, max_size=20),  # spaces inside a line
    st.just(""),  # blank lines
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    preamble=st.lists(st.sampled_from(["", "; a comment", "# notes"]), max_size=2),
    records=st.lists(
        st.tuples(st.text(alphabet="abc12 |._", max_size=12), st.lists(_fasta_line, max_size=6)), min_size=1, max_size=4
    ),
    crlf=st.booleans(),
    compress=st.booleans(),
    window=st.integers(1, 50),
)
def test_line_reader_equals_simple_fasta_parser(tmp_path, preamble, records, crlf, compress, window):
    newline = "\r\n" if crlf else "\n"
    text = newline.join([*preamble, *(f">{title}{newline}{newline.join(lines)}" for title, lines in records)])
    path = write_text(tmp_path / "x.fa", text + newline, compress)
    a = DNAAdapter(add_bos_eos=True)
    with (gzip.open if compress else open)(path, "rt") as handle:
        expected = list(SimpleFastaParser(handle))
    assert [s for _, s in a.read(path)] == [s for _, s in expected]
    assert torch.equal(torch.cat(list(a.iter_windows(path, window))), a.encode(a.read(path)))


def test_chromosome_scale_record_streams_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    seq = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, 3_000_000)].tobytes().decode()
    lines = [seq[i : i + 80] for i in range(0, len(seq), 80)]
    path = write_text(tmp_path / "chr.fa.gz", ">chrBig one huge record\n" + "\n".join(lines) + "\n", compress=True)
    a = DNAAdapter()
    tracemalloc.start()
    try:
        total, first = 0, None
        for w in a.iter_windows(path, 10_000):
            first = w if first is None else first
            total += w.numel()
        _, streaming_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole = a.read(path)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 3_000_000 and a.decode(first) == seq[:10_000]
    assert whole == [("chrBig", seq)]
    # The line reader holds ~64 k bases (plus one window) at a time (< 1 MB traced here); the SeqIO path
    # holds the whole 3 MB record, several times over while it joins lines.
    assert streaming_peak < 2_000_000, streaming_peak
    assert whole_peak > 6_000_000, whole_peak


def test_gzip_is_recognised_by_magic_bytes_not_name(tmp_path):
    a = DNAAdapter()
    gz_named_fa = write_text(tmp_path / "reads.fa", ">r1\nACGT\n>r2\nGG\n", compress=True)
    plain_named_gz = write_text(tmp_path / "reads.fastq.gz", "@q1\nACGT\n+\nIIII\n")
    assert a.read(gz_named_fa) == [("r1", "ACGT"), ("r2", "GG")]
    assert a.read(plain_named_gz) == [("q1", "ACGT")]
    assert a.detect_format(plain_named_gz) == "fastq"
    with pytest.raises(CorruptFileError, match="format='fasta' was asked for, but the file is FASTQ"):
        a.read(plain_named_gz, format="fasta")


def test_write_read_round_trip(tmp_path):
    a = DNAAdapter()
    records = [("chrA", "ACGTacgtNN" * 13), ("chrB", ""), ("chrC", "GATTACA")]
    for name in ("out.fa", "out.fa.gz"):
        a.write(tmp_path / name, records)
        assert a.read(tmp_path / name) == records
        assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b">c")
    assert [r[1] for r in bio_records(tmp_path / "out.fa.gz", "fasta")] == [s for _, s in records]
    a.write(tmp_path / "one.fa", "ACGT")
    assert a.read(tmp_path / "one.fa") == [("#1", "ACGT")]
    before = (tmp_path / "out.fa").read_bytes()
    with pytest.raises(InputError, match=r"out.fa: record 'bad'.*position 3"):
        a.write(tmp_path / "out.fa", [("ok", "AC"), ("bad", "ACZ")])
    assert (tmp_path / "out.fa").read_bytes() == before  # nothing written on refusal
    with pytest.raises(ConfigError, match="FASTA only"):
        a.write(tmp_path / "x.fastq.gz", records)


# ------------------------------------------------------------------------------------------------------
# bad input: every error names the file (and the record and position where there is one)


@pytest.mark.parametrize("stream", [False, True], ids=["read", "iter_windows"])
def test_invalid_letter_names_file_record_and_position(tmp_path, stream):
    path = write_text(tmp_path / "bad.fa.gz", ">ok first\nACGT\n>seq2 second\n" + "A" * 60 + "\nACGTJ\n", compress=True)
    a = DNAAdapter()
    with pytest.raises(
        InputError,
        match=r"bad\.fa\.gz: record 'seq2' \(#2 in the file\), position 65 "
        r"\(1-based\): invalid letter 'J'",
    ):
        list(a.iter_windows(path, 8)) if stream else a.read(path)
    fq = write_text(tmp_path / "bad.fq", "@r1\nACGT\n+\nIIII\n@r2\nAC.T\n+\nIIII\n")
    with pytest.raises(InputError, match=r"bad\.fq: record 'r2' \(#2 in the file\), position 3 .*'\.'"):
        list(a.iter_windows(fq, 8)) if stream else a.read(fq)
    assert DNAAdapter(invalid="n").read(path)[1][1].endswith("ACGTJ")  # read keeps letters, encode maps them
    assert (
        DNAAdapter(invalid="n").decode(torch.cat(list(DNAAdapter(invalid="n").iter_windows(path, 8)))).endswith("ACGTN")
    )


@pytest.mark.parametrize(
    "content,compress",
    [(b"", False), (b"\n \n\t\n", False), (b"", True)],
    ids=["zero-bytes", "blank-lines", "empty-gzip"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["read", "iter_windows"])
def test_empty_files(tmp_path, content, compress, stream):
    path = tmp_path / "empty.fa"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(InputError, match=r"empty\.fa: empty file"):
        list(DNAAdapter().iter_windows(path, 4)) if stream else DNAAdapter().read(path)


@pytest.mark.parametrize("stream", [False, True], ids=["read", "iter_windows"])
def test_wrong_formats(tmp_path, stream):
    a = DNAAdapter()
    png = tmp_path / "image.fa"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    text = write_text(tmp_path / "notes.fasta", "hello world\n>late header\nACGT\n")
    for path in (png, text):
        with pytest.raises(CorruptFileError, match=rf"{path.name}: not FASTA or FASTQ"):
            list(a.iter_windows(path, 4)) if stream else a.read(path)
    truncated = write_text(tmp_path / "cut.fastq", "@r1\nACGT\n+\nIIII\n@r2 lost\nACGT\n")
    with pytest.raises(CorruptFileError, match=r"cut\.fastq: malformed FASTQ after record #1 \('r1'\)"):
        list(a.iter_windows(truncated, 4)) if stream else a.read(truncated)
    mismatch = write_text(tmp_path / "len.fq", "@r1\nACGT\n+\nIII\n")
    with pytest.raises(
        CorruptFileError,
        match=r"len\.fq: malformed FASTQ: line 4, record #1 \('r1'\): the quality "
        r"has 3 characters, the sequence 4",
    ):
        list(a.iter_windows(mismatch, 4)) if stream else a.read(mismatch)
    with pytest.raises(InputError, match="no such file"):
        a.read(tmp_path / "missing.fa")
    with pytest.raises(ConfigError, match="window"):
        list(a.iter_windows(DATA / "NC_005816.fna", 0))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "iter_windows"])
def test_corrupt_gzip(tmp_path, damage, stream):
    data = (DATA / "NC_000932.fasta.gz").read_bytes()
    path = tmp_path / "broken.fasta.gz"
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        body = bytearray(data)
        for i in range(len(body) // 2, len(body) // 2 + 64):
            body[i] ^= 0xFF
        path.write_bytes(bytes(body))
    with pytest.raises(CorruptFileError, match=r"broken\.fasta\.gz: corrupt gzip stream"):
        list(DNAAdapter().iter_windows(path, 1000)) if stream else DNAAdapter().read(path)


# ------------------------------------------------------------------------------------------------------
# reverse complement, augmentation, masking


def test_reverse_complement_on_ids():
    a = DNAAdapter(add_bos_eos=True)
    ids = a.encode("AACGTN")
    rc = reverse_complement(ids)
    assert a.decode(rc) == "NACGTT"
    assert rc[0] == EOS and rc[-1] == BOS  # specials keep their id
    x = torch.randint(0, 10, (3, 17))
    assert torch.equal(reverse_complement(reverse_complement(x)), x)
    logits = torch.randn(3, 17, 10)
    assert torch.equal(reverse_complement(logits.argmax(-1)), reverse_complement_logits(logits).argmax(-1))
    with pytest.raises(InputError, match="outside"):
        reverse_complement(torch.tensor([5, 11]))


def test_rc_augmented_source():
    ids = DNAAdapter().encode("".join(random.Random(1).choice("ACGT") for _ in range(4000)))
    base = SequenceSource(ids, batch_size=8, window=32)
    assert torch.equal(RCAugmentedSource(base, p=0.0).window(3)[0], base.window(3)[0])
    never = torch.cat(base.window(5)[:1] + (base.window(5)[1][:, -1:],), 1)
    always = RCAugmentedSource(base, p=1.0).window(5)
    assert torch.equal(torch.cat([always[0], always[1][:, -1:]], 1), reverse_complement(never))
    half = RCAugmentedSource(base, p=0.5, seed=3)
    inputs, targets = half.window(2)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # still a next-element pair
    flipped = [not torch.equal(inputs[r], base.window(2)[0][r]) for r in range(8)]
    assert 0 < sum(flipped) < 8
    assert torch.equal(half.window(2)[0], inputs)  # deterministic per window


def test_mask_bases_and_source():
    a = DNAAdapter(add_bos_eos=True)
    ids = a.encode([("r", "ACGT" * 50)])
    inputs, targets = mask_bases(ids, 0.3, torch.Generator().manual_seed(0))
    masked = inputs == MASK
    assert 0.2 < float(masked.float().mean()) < 0.4
    assert torch.equal(targets[masked], ids[masked]) and bool((targets[~masked] == -100).all())
    assert inputs[0] == BOS and inputs[-1] == EOS  # specials are never masked
    src = MaskedBaseSource(ids.repeat(10), batch_size=4, window=32, rate=0.2, seed=1)
    assert torch.equal(src.window(3)[0], src.window(3)[0]) and src.window(3)[0].shape == (4, 32)


# ------------------------------------------------------------------------------------------------------
# models


def _spread(model):
    # make the scan's decay, D and norms matter, so that a broken symmetry would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm.weight")):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("mode", ["ps", "conjoin"])
@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_rc_equivariant_model(mode, ssm, tmp_path):
    torch.manual_seed(0)
    extra = {"headdim": 8, "chunk_size": 8} if ssm == "mamba2" else {}
    config = BackboneConfig(d_model=16, n_layer=2, d_state=8, ssm=ssm, bidirectional=True, **extra)
    a = DNAAdapter()
    model = _spread(a.build_model(config, rc_equivariant=True if mode == "ps" else mode))
    x = torch.randint(0, 10, (2, 29))
    with torch.no_grad():
        out, out_rc = model(x), model(reverse_complement(x))
    assert out.logits.shape == (2, 29, 10) and out.state is None
    torch.testing.assert_close(out_rc.logits, reverse_complement_logits(out.logits), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_rc.hidden, out.hidden.flip(-2, -1), atol=1e-5, rtol=1e-5)
    # the same backbone without the symmetry is not equivariant: the check above can fail
    plain = _spread(a.build_model(config))
    with torch.no_grad():
        gap = (plain(reverse_complement(x)).logits - reverse_complement_logits(plain(x).logits)).abs().max()
    assert gap > 1e-2
    # a checkpoint remembers the adapter and the RC mode
    save_model(tmp_path / "m.safetensors", model)
    assert adapter_from_checkpoint(tmp_path / "m.safetensors") == a
    again = a.build_model(config, rc_equivariant=mode)
    load_model(tmp_path / "m.safetensors", again)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, out.logits)


def test_rc_equivariant_refusals():
    a = DNAAdapter()
    with pytest.raises(ConfigError, match="bidirectional=True"):
        a.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4), rc_equivariant=True)
    with pytest.raises(ConfigError, match="rc_equivariant must be"):
        a.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4, bidirectional=True), rc_equivariant="yes")
    model = a.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4, bidirectional=True), rc_equivariant=True)
    with pytest.raises(StateError, match="no streaming state"):
        model(torch.randint(5, 9, (1, 8)), state=object())
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(torch.tensor([[5, 12]]))


def test_metric_bits_per_base():
    a = DNAAdapter()
    assert a.metric_name == "bits_per_base" and a.uniform_baseline() == 2.0
    logits = torch.full((2, 6, 10), -1e4)
    logits[..., 5:9] = 0.0  # uniform over A, C, G, T
    targets = torch.tensor([[5, 6, 7, 8, EOS, PAD], [8, 8, -100, 6, 5, 7]])
    assert a.metric(logits, targets) == pytest.approx(2.0, abs=1e-6)  # specials and -100 not counted
    assert a.perplexity(logits, targets) == pytest.approx(4.0, abs=1e-5)
    logits[0, 0, 5] = 20.0  # certain of the first A
    assert a.metric(logits, targets) == pytest.approx(2.0 * 8 / 9, abs=1e-4)
    ignored = targets.masked_fill(targets == PAD, -100)  # the loss skips <pad> targets
    assert float(a.loss(logits, targets)) == pytest.approx(float(a.loss(logits, ignored)))
    counting_pad = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), targets.clamp(min=0).reshape(-1))
    assert float(a.loss(logits, targets)) != pytest.approx(float(counting_pad))
    with pytest.raises(InputError, match="no base among the targets"):
        a.metric(logits, torch.full((2, 6), EOS))


def test_tiny_model_learns_planted_repeats_below_two_bits(tmp_path):
    """A sequence built from 8 planted 12-base motifs (entropy 0.25 bit/base) streamed from a real FASTA.gz:
    120 steps of a tiny Mamba take held-out bits/base well below the 2-bit uniform baseline."""
    rng = random.Random(0)
    motifs = ["".join(rng.choice("ACGT") for _ in range(12)) for _ in range(8)]
    a = DNAAdapter()
    for name, n in (("train.fa.gz", 3400), ("eval.fa.gz", 400)):
        a.write(tmp_path / name, [(name.split(".")[0], "".join(rng.choice(motifs) for _ in range(n)))])
    train, held_out = (torch.cat(list(a.iter_windows(tmp_path / n, 4096))) for n in ("train.fa.gz", "eval.fa.gz"))
    torch.manual_seed(0)
    model = a.build_model(BackboneConfig(d_model=32, n_layer=1, d_state=8))
    config = TrainConfig(
        lr=1e-2,
        warmup_steps=10,
        max_steps=120,
        batch_size=8,
        window=64,
        weight_decay=0.0,
        eval_every=120,
        eval_windows=4,
        progress=False,
    )
    trainer = Trainer(model, config, train, held_out, loss_fn=a.loss, metric_fn=a.metric)
    first = trainer.evaluate()["eval_metric"]
    records = trainer.fit()
    bits = records[-1]["eval_metric"]
    assert first > 1.9  # it starts at (or above) the uniform baseline
    assert bits < 1.0, bits  # and ends well below it


def test_rc_equivariant_masked_lm_learns_planted_repeats():
    """The RC-equivariant bidirectional model, trained as a masked LM (MaskedBaseSource), predicts masked bases
    of held-out planted-repeat DNA well below 2 bits/base."""
    rng = random.Random(0)
    motifs = ["".join(rng.choice("ACGT") for _ in range(12)) for _ in range(8)]
    a = DNAAdapter()
    train, held_out = (a.encode("".join(rng.choice(motifs) for _ in range(n))) for n in (3400, 400))
    torch.manual_seed(0)
    model = a.build_model(BackboneConfig(d_model=32, n_layer=1, d_state=8, bidirectional=True), rc_equivariant=True)
    config = TrainConfig(
        lr=2e-2,
        warmup_steps=10,
        max_steps=150,
        batch_size=8,
        window=64,
        weight_decay=0.0,
        carry_state=False,
        eval_every=150,
        eval_windows=4,
        progress=False,
    )
    trainer = Trainer(
        model,
        config,
        MaskedBaseSource(train, 8, 64, rate=0.15, seed=0),
        MaskedBaseSource(held_out, 8, 48, rate=0.15, seed=1),
        loss_fn=a.loss,
        metric_fn=a.metric,
    )
    first = trainer.evaluate()["eval_metric"]
    bits = trainer.fit()[-1]["eval_metric"]
    assert first > 2.0 and bits < 1.5, (first, bits)


@pytest.mark.parametrize("chunk_chars", [3, 1 << 16])
@pytest.mark.parametrize("window", [1, 4, 1000])
def test_iter_records_streams_each_record(tmp_path, monkeypatch, chunk_chars, window):
    """Per-record streaming (what the store's ingest uses) equals encoding each record whole, also when the
    line reader cuts records into many small pieces, and when a caller skips a record's windows."""
    import seqlab.domains.dna.files as dna_module

    monkeypatch.setattr(dna_module, "_CHUNK_CHARS", chunk_chars)
    path = tmp_path / "multi.fa"
    path.write_text(">chr1 first\nACGTNN\nacg\n>chr2\nTTTT\n>empty\n>scaffold|7\nGATTACA\nGG\n")
    for adapter in (DNAAdapter(), DNAAdapter(add_bos_eos=True)):
        records = adapter.read(path)
        none = [torch.zeros(0, dtype=torch.long)]  # an empty record yields no window
        streamed = [(rid, torch.cat(list(ws) or none)) for rid, ws in adapter.iter_records(path, window)]
        assert [rid for rid, _ in streamed] == [rid for rid, _ in records]
        for (rid, ids), record in zip(streamed, records):
            assert torch.equal(ids, adapter.encode([record])), rid
        skipped = [rid for rid, _ in adapter.iter_records(path, window)]  # windows never consumed
        assert skipped == [rid for rid, _ in records]
    fastq = tmp_path / "r.fastq"
    fastq.write_text("@r1\nACGT\n+\nIIII\n@r2\nGG\n+\nII\n")
    assert [(rid, torch.cat(list(ws)).tolist()) for rid, ws in DNAAdapter().iter_records(fastq, 3)] == [
        ("r1", DNAAdapter().encode("ACGT").tolist()),
        ("r2", DNAAdapter().encode("GG").tolist()),
    ]


def test_metric_weight_counts_bases_so_window_metrics_combine_exactly():
    """bits per base averages over bases only: weighting each window's metric by metric_weight gives the
    whole-sequence metric, where weighting by the number of targets would not."""
    from seqlab.domains.dna import BOS, EOS, DNAAdapter

    adapter = DNAAdapter()
    gen = torch.Generator().manual_seed(0)
    targets = torch.cat(
        [
            torch.tensor([BOS]),
            adapter.encode("ACGTNACGGT" * 3),
            torch.tensor([EOS, BOS]),
            adapter.encode("TTGCA"),
            torch.tensor([EOS]),
        ]
    )[None]
    logits = torch.randn(1, targets.shape[1], adapter.input_spec.vocab_size, generator=gen)
    whole = adapter.metric(logits, targets)
    cuts = [(0, 7), (7, 33), (33, targets.shape[1])]
    parts = [(adapter.metric(logits[:, a:b], targets[:, a:b]), adapter.metric_weight(targets[:, a:b])) for a, b in cuts]
    assert [w for _, w in parts] == [6, 24, 5]
    assert sum(m * w for m, w in parts) / sum(w for _, w in parts) == pytest.approx(whole, rel=1e-6)
    naive = sum(m * (b - a) for (m, _), (a, b) in zip(parts, cuts)) / targets.shape[1]
    assert naive != pytest.approx(whole, rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# FASTQ strictness: what Biopython's SeqIO "fastq" parser refuses, we refuse, naming the record and the line


def bio_fastq(path: Path) -> list[tuple[str, str]] | Exception:
    """Biopython's verdict on a FASTQ file: its records, or the exception it raised."""
    try:
        with open(path, encoding="latin-1") as handle:
            return [(r.id, str(r.seq)) for r in SeqIO.parse(handle, "fastq")]
    except Exception as exc:  # noqa: BLE001 - ValueError, IndexError (no title), InvalidCharError ...
        return exc


BAD_FASTQ = [  # (content, line named, what the message says)
    ("@\nACGT\n+\nIIII\n", 1, "no title"),
    ("@   \nACGT\n+\nIIII\n", 1, "no title"),
    ("@r1\nACGT\n", 2, r"ends before the record's '\+' line"),
    ("@r1\nACGT\nACGT", 3, r"ends before the record's '\+' line"),
    ("@r1\nACGT\n+\n", 3, "quality line is missing"),
    ("@r1\nACGT\n+r2\nIIII\n", 3, "repeats another title"),
    ("@r1 x\nACGT\n+r1\nIIII\n", 3, "repeats another title"),
    ("@r1\nAC GT\n+\nIIIII\n", 2, "whitespace or control character ' '"),
    ("@r1\nACGT\nA\tC\n+\nIIIIIII\n", 3, "whitespace or control character '\\\\t'"),
    ("@r1\nAC\x00GT\n+\nIIIII\n", 2, "control character"),
    ("@r1\nACGT\n+\nIII\n", 4, "the quality has 3 characters, the sequence 4"),
    ("@r1\nACGT\n+\nIIIII\n", 4, "the quality has 5 characters, the sequence 4"),
    ("@r1\nACGT\n+\nII\nIII\n", 4, "the quality has 5 characters"),
    ("@r1\nACGT\n+\nI II\n", 4, "quality character ' ' is outside"),
    ("@r1\nACGT\n+\nII\x7fI\n", 4, "quality character '\\\\x7f' is outside"),
    ("@r1\nACGT\n+\nII\x1fI\n", 4, "quality character '\\\\x1f' is outside"),
    ("@r1\nACGT\n+\nII\xe9I\n", 4, "non-ASCII character"),
    (
        "@r1\nACGT\n+\nIIII\n@r2\nACGT\n@r3\nACGT\n+\nIIII\n",
        10,
        r"2 \('r2'\): the quality has 4 characters, "
        "the sequence 11",
    ),  # r2's '+' line is missing: r3's lines read as r2's sequence, as Biopython reads them
    ("@r1\nACGT\n+\nIIII\n@r2\nAC\n+\nII\n@r3\n", 9, r"3 \('r3'\): the file ends before"),
    ("\n@r1\nACGT\n+\nIIII\n", 1, "starts with an '@' title line, this line starts with '\\\\n'"),
]


@pytest.mark.parametrize("content,line,what", BAD_FASTQ)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_fastq_refuses_what_biopython_refuses_naming_record_and_line(tmp_path, content, line, what, compress):
    path = write_text(tmp_path / "reads.fq", content, compress)
    plain = write_text(tmp_path / "plain.fq", content)
    assert isinstance(bio_fastq(plain), Exception), "Biopython accepts this: not a rejection case"
    a = DNAAdapter()
    for read in (
        lambda: a.read(path),
        lambda: list(a.iter_windows(path, 3)),
        lambda: [list(w) for _, w in a.iter_records(path, 3)],
    ):
        with pytest.raises(CorruptFileError, match=rf"reads\.fq: malformed FASTQ.*line {line}, record #.*{what}"):
            read()


def test_fastq_accepts_what_biopython_accepts(tmp_path):
    # '@' and '+' starting quality lines, multi-line sequence and quality, a repeated title, blank lines at the end
    tricky = "@r1 first read\nACGT\nAC\n+r1 first read\n@III\n+I\n@r2\nGG\n+\n@@\n\n@r3\n\n+\n\n\n"
    path = write_text(tmp_path / "tricky.fq", tricky)
    assert bio_fastq(path) == [("r1", "ACGTAC"), ("r2", "GG"), ("r3", "")]
    assert list(DNAAdapter().records(path)) == bio_fastq(path)
    assert [list(map(len, w)) for _, w in DNAAdapter().iter_records(path, 4)] == [[4, 2], [2], []]


def _fastq_text(records, repeat_title: bool, width: int) -> str:
    out = []
    for rid, seq, qual in records:
        out.append(f"@{rid}\n")
        out.extend(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
        out.append(f"+{rid if repeat_title else ''}\n")
        out.extend(qual[i : i + width] + "\n" for i in range(0, len(qual), width))
    return "".join(out)


_PIECES = ["", "+", "+r0", "@", "@r9", "@r0", "ACGT", "II I", "A\tC", "!!", "~~~~", "\x7f", "\r", " "]


@st.composite
def _mutated_fastq(draw):
    n = draw(st.integers(1, 3))
    records = []
    for k in range(n):
        seq = draw(st.text(alphabet="ACGTN", min_size=0, max_size=9))
        qual = draw(
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=len(seq), max_size=len(seq))
        )
        records.append((f"r{k}", seq, qual))
    text = _fastq_text(records, draw(st.booleans()), draw(st.integers(2, 6)))
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        op = draw(st.sampled_from(["char", "delete", "insert", "duplicate", "truncate"]))
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        row = draw(st.integers(0, len(lines) - 1))
        if op == "char" and text:
            char = draw(st.sampled_from(list(" \t\x00\x0b\x7f@+!~-IAN") + ["\n"]))
            text = text[:at] + char + text[at + 1 :]
        elif op == "delete":
            text = "\n".join(lines[:row] + lines[row + 1 :])
        elif op == "insert":
            text = "\n".join(lines[:row] + [draw(st.sampled_from(_PIECES))] + lines[row:])
        elif op == "duplicate":
            text = "\n".join(lines[:row] + [lines[row]] + lines[row:])
        else:
            text = text[:at]
    return text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_mutated_fastq())
def test_fastq_mutations_agree_with_biopython(tmp_path, text):
    path = write_text(tmp_path / "m.fq", text)
    verdict = bio_fastq(path)
    a = DNAAdapter()
    if isinstance(verdict, list) and verdict:
        assert list(a.records(path, format="fastq")) == verdict
        return
    with pytest.raises((CorruptFileError, InputError)) as caught:
        list(a.records(path, format="fastq"))
    message = str(caught.value)
    if isinstance(verdict, Exception) and "malformed FASTQ" in message:
        assert "line " in message and "record #" in message, message
    else:  # no record at all, or a first line that is not FASTQ: said so
        assert "empty file" in message or "FASTA" in message or "not FASTA or FASTQ" in message, message


def test_fastq_gzip_damage_names_the_record_being_read(tmp_path):
    reads = "".join(f"@r{k}\n{'ACGT' * 30}\n+\n{'I' * 120}\n" for k in range(3))
    data = bytearray(gzip.compress(reads.encode(), compresslevel=0))  # stored blocks: the text is in it verbatim
    data[data.index(b"@r1") + 10] = ord("T") if data[data.index(b"@r1") + 10] != ord("T") else ord("A")
    path = tmp_path / "reads.fq.gz"
    path.write_bytes(bytes(data))  # decodes to valid FASTQ with one altered base; only the CRC at the end tells
    with pytest.raises(
        CorruptFileError,
        match=r"reads\.fq\.gz: corrupt gzip stream in record #3 \('r2', from line "
        r"9\), after line \d+: CRC check failed",
    ):
        DNAAdapter().read(path)
