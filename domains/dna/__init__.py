"""seqlab.domains.dna: FASTA and FASTQ (plain or gzip) as a character vocabulary of 5 specials and A, C, G, T, N.

FASTA goes through Biopython's ``SimpleFastaParser`` (plain string tuples, no ``SeqRecord``), except
``iter_windows`` / ``iter_records``, which use a small line reader of our own so that a chromosome-scale record
streams window by window instead of being joined into one string (it is tested to equal the Biopython path).
FASTQ goes through ``_fastq_records``, our reader, which refuses what Biopython's ``SeqIO.parse(..., "fastq")``
refuses and names the record and the line. gzip is recognised by its magic bytes, FASTA/FASTQ by the first
non-blank character, never only by the file name.

Letter policy (``DNAAdapter`` settings, see docs/domains/dna.md):

- ``A C G T N`` are bases; ``U`` (RNA) reads as ``T``.
- IUPAC ambiguity codes ``R Y S W K M B D H V`` become ``N`` (``iupac="n"``, the default) or raise
  (``iupac="error"``).
- Any other letter (``X``, ``-``, digits, ...) raises an ``InputError`` naming file, record and position
  (``invalid="error"``, the default), or becomes ``N`` (``invalid="n"``) or ``<unk>`` (``invalid="unk"``).
- Lower case (soft-masked repeats) reads as the upper-case base (``lowercase="upper"``, the default; the mask
  can be returned alongside) or as ``N`` (``lowercase="n"``, hard masking).

Reverse-complement equivariance follows Caduceus (Schiff et al. 2024): a model ``f`` is RC-equivariant when
``f(rc(x)) == rc(f(x))``, where ``rc`` of token ids reverses the sequence and complements each id, and ``rc``
of per-position logits reverses the sequence and permutes the vocabulary channels by the same complement.
"""

from .adapter import DNAAdapter
from .model import RCEquivariantLM
from .sources import MaskedBaseSource, RCAugmentedSource, mask_bases
from .vocab import (
    BOS,
    COMPLEMENT,
    EOS,
    MASK,
    PAD,
    SPECIALS,
    UNK,
    VOCAB,
    A,
    C,
    G,
    N,
    T,
    reverse_complement,
    reverse_complement_logits,
)

__all__ = [
    "BOS",
    "COMPLEMENT",
    "EOS",
    "MASK",
    "PAD",
    "SPECIALS",
    "UNK",
    "VOCAB",
    "A",
    "C",
    "DNAAdapter",
    "G",
    "MaskedBaseSource",
    "N",
    "RCAugmentedSource",
    "RCEquivariantLM",
    "T",
    "mask_bases",
    "reverse_complement",
    "reverse_complement_logits",
]
