"""Export a seqlab Mamba-1 / Mamba-2 ``LanguageModel`` as a GGUF file that llama.cpp loads (``seqlab export gguf``).

The layout is the one llama.cpp's own converter (``convert_hf_to_gguf.py``, ``MambaModel`` / ``Mamba2Model``)
writes for transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM``, and that llama.cpp's loader
(``llama_model_mamba::load_arch_tensors`` / ``llama_model_mamba2::load_arch_tensors``) asks for. seqlab's weight
names are transformers' (``seqlab.interop.hf``), so the mapping is per name:

=====================================  ======================  ============================================
seqlab tensor                          GGUF tensor             transform (numpy shape; GGUF lists it reversed)
=====================================  ======================  ============================================
embeddings.weight                      token_embd.weight       (vocab, d_model)
lm_head.weight                         output.weight           omitted when tied (llama.cpp reuses token_embd)
backbone.norm_f.weight                 output_norm.weight
backbone.layers.N.norm.weight          blk.N.attn_norm.weight  the pre-mixer RMSNorm
mixer.in_proj.weight                   blk.N.ssm_in.weight     rows x|z (Mamba-1), z|xBC|dt (Mamba-2)
mixer.conv1d.weight / .bias            blk.N.ssm_conv1d.*      (channels, 1, width) -> (channels, width);
                                                               a missing bias (conv_bias=False) is written
                                                               as zeros: llama.cpp requires one
mixer.x_proj.weight (Mamba-1)          blk.N.ssm_x.weight      rows dt|B|C
mixer.dt_proj.weight / .bias (M-1)     blk.N.ssm_dt.*
mixer.dt_bias (Mamba-2)                blk.N.ssm_dt.bias       (nheads,)
mixer.A_log                            blk.N.ssm_a             A = -exp(A_log); Mamba-2: (nheads, 1)
mixer.D                                blk.N.ssm_d             Mamba-2: (nheads, 1)
mixer.norm.weight (Mamba-2)            blk.N.ssm_norm.weight   (ngroups, d_inner / ngroups)
mixer.out_proj.weight                  blk.N.ssm_out.weight
=====================================  ======================  ============================================

Metadata: ``general.architecture`` (``mamba`` / ``mamba2``), ``{arch}.context_length`` (2**20, as the
converter: a recurrent model has no limit), ``embedding_length``, ``block_count``, ``feed_forward_length`` 0 and
``attention.head_count`` 0 (unused, but read when loading), ``ssm.conv_kernel``, ``ssm.inner_size``,
``ssm.state_size``, ``ssm.time_step_rank`` (Mamba-1: dt_rank; Mamba-2: the number of heads), ``ssm.group_count``
(Mamba-2), ``ssm.dt_b_c_rms`` false (Mamba-1), ``attention.layer_norm_rms_epsilon`` (llama.cpp uses it for every
RMSNorm, Mamba-2's gated group norm included, as seqlab does), ``general.file_type`` and the tokenizer keys.

Tensor types: ``f32``; ``f16``; ``q8_0`` (blocks of 32 int8 with an f16 scale, quantized here by ``gguf.quants``).
As in llama.cpp's converter, 1-D tensors, norms, ``ssm_a``, ``ssm_d`` and ``ssm_conv1d`` always stay f32; a
matrix whose rows are not a multiple of 32 long cannot be Q8_0 and is written f16.

Vocabularies (llama.cpp refuses a file without one):

* ``byte_vocab()``: for byte models (seqlab's ``ByteAdapter``, 256 tokens, id = byte value). llama.cpp's
  SentencePiece vocabulary ("llama") is no use here: it turns a space into U+2581 before byte fallback, so " "
  would become three byte tokens. A byte-level BPE vocabulary ("gpt2") of exactly the 256 single bytes, each
  written as GPT-2's printable stand-in character, tokenizes any UTF-8 text into its bytes, one token each, and
  detokenizes each token to its byte. It has no merges that can ever apply; gguf-py cannot write an empty array,
  so the merge list holds one inert rule whose halves are two-character strings, which never form when every
  symbol starts as one character and no other rule joins them. A byte model has no start or end token: BOS and
  EOS are set to byte 0 (NUL; llama.cpp needs ids, and its gpt2 default 11 is a byte too), with
  ``add_bos_token`` / ``add_eos_token`` false so nothing is ever added; llama.cpp stops generating at a NUL.
* ``hf_vocab(folder, n)``: a transformers directory's ``tokenizer.json`` when it is a byte-level BPE (model
  ``BPE``, pre-tokenizer ``ByteLevel`` with GPT-2's regex and no prefix space, no normalizer or NFC): written as
  llama.cpp's "gpt2" vocabulary with pre-tokenizer "gpt-2" (the same split regex; llama.cpp's converter picks
  "gpt-2" by fingerprint for such tokenizers), its merges, added tokens as control (special) or user-defined
  types, ids the tokenizer lacks up to the embedding's rows as unused ``[PAD{i}]`` tokens (as the converter
  pads), BOS/EOS from config.json or tokenizer_config.json. llama.cpp applies no normalizer: NFC text (what the
  GPT-NeoX tokenizer of the Mamba checkpoints normalizes to) tokenizes the same. Any other tokenizer is refused,
  naming the field.
* ``no_vocab(n)``: ``tokenizer.ggml.model = "none"`` with ``{arch}.vocab_size``: llama.cpp loads the model and
  runs token ids, but cannot turn text into ids (for a model whose tokenizer is elsewhere).

The file is written to a temporary file beside the target and renamed over it only when complete, so a failed
export leaves nothing (an existing target is replaced only with ``overwrite=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_output

__all__ = [
    "ARCHITECTURES",
    "CONTEXT_LENGTH",
    "OUTTYPES",
    "GGUFVocab",
    "byte_vocab",
    "check_exportable",
    "check_target",
    "export_gguf",
    "gguf_tensors",
    "hf_vocab",
    "no_vocab",
]

#: seqlab mixer kind -> GGUF ``general.architecture``
ARCHITECTURES = {"mamba1": "mamba", "mamba2": "mamba2"}
#: the tensor types ``export_gguf`` writes
OUTTYPES = ("f32", "f16", "q8_0")
#: ``{arch}.context_length``: the value llama.cpp's converter writes for Mamba (no real limit)
CONTEXT_LENGTH = 1 << 20
#: llama.cpp token types (``gguf.TokenType``)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
#: the byte vocabulary's one merge rule, which can never apply (see the module docstring)
INERT_MERGE = "ĠĠ ĠĠ"


def _gguf():
    from seqlab._deps import require_module

    return require_module("gguf", "GGUF export")


# ==================================================================================================
# vocabularies
# ==================================================================================================
@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer keys of a GGUF file. ``model``: ``tokenizer.ggml.model`` ("gpt2" or "none"); ``size``: the
    number of token ids (the embedding's rows); the rest is written only for a "gpt2" vocabulary."""

    model: str
    size: int
    tokens: tuple[str, ...] = ()
    token_types: tuple[int, ...] = ()
    merges: tuple[str, ...] = ()
    pre: str = "default"
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    description: str = ""


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> a printable character (printable Latin-1 bytes stand for themselves,
    the other 68 bytes take U+0100 onwards, in byte order). llama.cpp maps these characters back to bytes."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: list[str] = [""] * 256
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(0x100 + extra)
            extra += 1
    return chars


def byte_vocab() -> GGUFVocab:
    """The 256-token byte vocabulary for byte models (id = byte value), as a byte-level BPE without merges."""
    chars = _gpt2_byte_chars()
    return GGUFVocab(
        model="gpt2",
        size=256,
        tokens=tuple(chars),
        token_types=(TOKEN_NORMAL,) * 256,
        merges=(INERT_MERGE,),
        pre="default",
        bos_id=0,
        eos_id=0,
        add_bos=False,
        add_eos=False,
        description="bytes (256 byte tokens)",
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not readable JSON ({exc})") from None


def _special_id(folder: Path, key: str, token_ids: dict[str, int], size: int) -> int | None:
    """``{key}_token_id`` of config.json, else ``{key}_token`` of tokenizer_config.json looked up in the vocabulary."""
    config = _read_json(folder / "config.json") or {}
    value = config.get(f"{key}_token_id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size:
        return value
    tok_config = _read_json(folder / "tokenizer_config.json") or {}
    text = tok_config.get(f"{key}_token")
    if isinstance(text, dict):
        text = text.get("content")
    return token_ids.get(text) if isinstance(text, str) else None


def hf_vocab(folder: str | os.PathLike, size: int) -> GGUFVocab:
    """The byte-level BPE ``tokenizer.json`` of a transformers directory as a "gpt2" vocabulary of ``size`` ids
    (the model's embedding rows); ``ConfigError`` naming the field for a tokenizer llama.cpp would split another
    way."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    data = _read_json(path)
    if data is None:
        raise ConfigError(f"{folder}: has no tokenizer.json")
    where = str(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CorruptFileError(f"{where}: has no 'model' object")
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"{where}: model.type is {model.get('type')!r}; GGUF export writes byte-level BPE only")
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("use_regex", True) is not True or pre.get("add_prefix_space"):
        raise ConfigError(
            f"{where}: pre_tokenizer is {pre!r}; llama.cpp's 'gpt-2' split matches ByteLevel(use_regex=true, "
            f"add_prefix_space=false) only"
        )
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ConfigError(f"{where}: normalizer is {normalizer!r}; llama.cpp applies none (NFC is accepted)")
    for key, ok in (
        ("dropout", (None,)),
        ("byte_fallback", (False, None)),
        ("ignore_merges", (False, None)),
        ("continuing_subword_prefix", (None, "")),
        ("end_of_word_suffix", (None, "")),
    ):
        if model.get(key) not in ok:
            raise ConfigError(f"{where}: model.{key} is {model.get(key)!r}; llama.cpp's BPE has no such option")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise CorruptFileError(f"{where}: model.vocab is not an object")
    token_ids: dict[str, int] = {str(text): int(i) for text, i in vocab.items()}
    control: set[int] = set()
    user: set[int] = set()
    for added in data.get("added_tokens") or []:
        token_ids[str(added["content"])] = int(added["id"])
        (control if added.get("special") else user).add(int(added["id"]))
    by_id: dict[int, str] = {}
    for text, i in token_ids.items():
        if not 0 <= i < size:
            raise ConfigError(
                f"{where}: token {text!r} has id {i}, outside the model's {size} embedding rows [0, {size})"
            )
        if by_id.setdefault(i, text) != text:
            raise CorruptFileError(f"{where}: id {i} is both {by_id[i]!r} and {text!r}")
    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        if len(pair) != 2 or not all(isinstance(half, str) and half and " " not in half for half in pair):
            raise CorruptFileError(f"{where}: merge {merge!r} is not two tokens")
        merges.append(f"{pair[0]} {pair[1]}")
    if not merges:  # gguf-py cannot write an empty list; llama.cpp needs the key
        merges.append(INERT_MERGE)
    tokens = tuple(by_id.get(i, f"[PAD{i}]") for i in range(size))
    types = tuple(
        TOKEN_CONTROL
        if i in control
        else TOKEN_USER_DEFINED
        if i in user
        else TOKEN_NORMAL
        if i in by_id
        else TOKEN_UNUSED
        for i in range(size)
    )
    tok_config = _read_json(folder / "tokenizer_config.json") or {}
    return GGUFVocab(
        model="gpt2",
        size=size,
        tokens=tokens,
        token_types=types,
        merges=tuple(merges),
        pre="gpt-2",
        bos_id=_special_id(folder, "bos", token_ids, size),
        eos_id=_special_id(folder, "eos", token_ids, size),
        add_bos=tok_config.get("add_bos_token") is True,
        add_eos=tok_config.get("add_eos_token") is True,
        description=f"tokenizer.json ({len(by_id)} tokens, {len(merges)} merges)",
    )


def no_vocab(size: int) -> GGUFVocab:
    """No tokenizer (``tokenizer.ggml.model = "none"``): llama.cpp runs token ids 0..size-1 but cannot tokenize."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"no_vocab: size must be a positive int, got {size!r}")
    return GGUFVocab(model="none", size=size, description=f"none ({size} token ids, no tokenizer)")


def _check_vocab(vocab: GGUFVocab, model_vocab: int) -> None:
    if not isinstance(vocab, GGUFVocab):
        raise ConfigError(f"vocab must be a GGUFVocab (byte_vocab(), no_vocab(n)), got {type(vocab).__name__}")
    if vocab.size != model_vocab:
        raise ConfigError(
            f"the vocabulary has {vocab.size} tokens but the model's embedding has {model_vocab} rows; "
            f"llama.cpp needs one token per row"
        )
    if vocab.model == "none":
        return
    if vocab.model != "gpt2":
        raise ConfigError(f"vocab.model {vocab.model!r}: export_gguf writes 'gpt2' or 'none' vocabularies")
    if len(vocab.tokens) != vocab.size or len(vocab.token_types) != vocab.size:
        raise ConfigError(
            f"vocab has {len(vocab.tokens)} tokens and {len(vocab.token_types)} token types for size {vocab.size}"
        )
    if len(set(vocab.tokens)) != len(vocab.tokens):
        raise ConfigError("vocab: two tokens have the same text (llama.cpp maps text to one id)")
    if not vocab.merges:
        raise ConfigError("vocab: a 'gpt2' vocabulary needs at least one merge rule (llama.cpp requires the key)")
    for key in ("bos_id", "eos_id"):
        value = getattr(vocab, key)
        if value is not None and not 0 <= value < vocab.size:
            raise ConfigError(f"vocab.{key} {value} is outside [0, {vocab.size})")


# ==================================================================================================
# what can be exported
# ==================================================================================================
def check_exportable(model: Any) -> None:
    """Refuse, with one line naming it, a model llama.cpp's ``mamba`` / ``mamba2`` graph would not compute."""
    from seqlab.models import LanguageModel

    if not isinstance(model, LanguageModel):
        raise ConfigError(
            f"GGUF export writes a seqlab LanguageModel (token ids in, logits out); got {type(model).__name__}"
        )
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "AQLMLinear":
            raise ConfigError(
                f"{name} is AQLM-quantized; GGUF export needs the full-precision model (export before "
                f"seqlab quantize, and use --outtype q8_0 for a quantized GGUF)"
            )
        if kind == "LowRankLinear":
            raise ConfigError(
                f"{name} is a LASER low-rank layer; llama.cpp's Mamba has no low-rank layers: export the model "
                f"before seqlab laser"
            )
    config = model.config
    if config.layer_overrides:
        raise ConfigError(
            f"layer_overrides {sorted(config.layer_overrides)}: a hybrid stack; llama.cpp's mamba/mamba2 "
            f"architectures have identical Mamba layers only"
        )
    if config.ssm not in ARCHITECTURES:
        raise ConfigError(f"ssm={config.ssm!r}: GGUF export writes Mamba-1 ('mamba1') and Mamba-2 ('mamba2') models")
    if config.ffn == "moe" or config.moe_experts:
        raise ConfigError("ffn='moe': a mixture-of-experts model; llama.cpp's Mamba architectures have no MoE")
    if config.ffn is not None:
        raise ConfigError(f"ffn={config.ffn!r}: llama.cpp's Mamba blocks have no feed-forward layer")
    if config.bidirectional:
        raise ConfigError("bidirectional=True: llama.cpp runs causal Mamba models only")
    if config.proj_bias:
        raise ConfigError("proj_bias=True: llama.cpp's Mamba has no in_proj / out_proj bias")
    if config.mamba_inner_norms:
        raise ConfigError(
            "mamba_inner_norms=True: weighted RMSNorms on dt, B and C (Jamba style); llama.cpp's mamba "
            "architecture has no such weights"
        )
    if config.ssm == "mamba1" and config.expand != 2:
        raise ConfigError(f"expand={config.expand}: llama.cpp's Mamba-1 supports an expansion factor of 2 only")


def _np32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def gguf_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in numpy order) of every tensor the file holds, in file order. Refuses a model
    with a tensor that has no GGUF place (nothing is silently dropped)."""
    check_exportable(model)
    config = model.config
    state = {k: v for k, v in model.state_dict().items()}
    used: set[str] = set()
    tied = model.lm_head.weight is model.embeddings.weight

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name]

    yield "token_embd.weight", _np32(take("embeddings.weight"))
    head = take("lm_head.weight")
    if not tied:
        yield "output.weight", _np32(head)
    yield "output_norm.weight", _np32(take("backbone.norm_f.weight"))

    mamba2 = config.ssm == "mamba2"
    for i in range(config.n_layer):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        b = f"blk.{i}."
        yield b + "attn_norm.weight", _np32(take(p + "norm.weight"))
        yield b + "ssm_in.weight", _np32(take(m + "in_proj.weight"))
        conv = take(m + "conv1d.weight")
        channels, width = conv.shape[0], conv.shape[-1]
        yield b + "ssm_conv1d.weight", _np32(conv).reshape(channels, width)
        if m + "conv1d.bias" in state:
            yield b + "ssm_conv1d.bias", _np32(take(m + "conv1d.bias"))
        else:  # conv_bias=False: adding zeros computes the same
            yield b + "ssm_conv1d.bias", np.zeros(channels, dtype=np.float32)
        if not mamba2:
            yield b + "ssm_x.weight", _np32(take(m + "x_proj.weight"))
            yield b + "ssm_dt.weight", _np32(take(m + "dt_proj.weight"))
            yield b + "ssm_dt.bias", _np32(take(m + "dt_proj.bias"))
            yield b + "ssm_a", -np.exp(_np32(take(m + "A_log")))
            yield b + "ssm_d", _np32(take(m + "D"))
        else:
            heads = config.nheads
            yield b + "ssm_dt.bias", _np32(take(m + "dt_bias"))
            yield b + "ssm_a", -np.exp(_np32(take(m + "A_log"))).reshape(heads, 1)
            yield b + "ssm_d", _np32(take(m + "D")).reshape(heads, 1)
            yield (
                b + "ssm_norm.weight",
                _np32(take(m + "norm.weight")).reshape(config.ngroups, config.d_inner // config.ngroups),
            )
        yield b + "ssm_out.weight", _np32(take(m + "out_proj.weight"))

    left = sorted(set(state) - used)
    if left:
        raise ConfigError(
            f"tensor {left[0]} (and {len(left) - 1} more) has no place in llama.cpp's "
            f"{ARCHITECTURES[config.ssm]} layout; refusing to write a file that would compute something else"
        )


def _always_f32(name: str, array: np.ndarray) -> bool:
    return (
        array.ndim <= 1
        or name.endswith(("_norm.weight", ".bias"))
        or name.rsplit(".", 1)[-1] in ("ssm_a", "ssm_d")
        or ".ssm_conv1d." in name
    )


# ==================================================================================================
# writing
# ==================================================================================================
def check_target(path: Path, overwrite: bool) -> None:
    if path.suffix.lower() != ".gguf":
        raise InputError(f"{path}: a GGUF file name must end in .gguf")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the .gguf file to write")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (pass overwrite=True, or --overwrite, to replace it)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")


def export_gguf(
    model: Any,
    path: str | os.PathLike,
    *,
    vocab: GGUFVocab,
    outtype: str = "f32",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a Mamba-1 / Mamba-2 ``LanguageModel``) to ``path`` (``*.gguf``) for llama.cpp.

    ``vocab``: ``byte_vocab()`` for a byte model, ``no_vocab(model.vocab_size)`` for ids only. ``outtype``: "f32",
    "f16" or "q8_0" (see the module docstring for which tensors stay f32). ``name``: ``general.name``. The
    file appears only when complete; an existing ``path`` is replaced only with ``overwrite=True``.
    Returns the path.
    """
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    path = Path(path)
    check_target(path, overwrite)
    check_exportable(model)
    _check_vocab(vocab, model.vocab_size)
    config = model.config
    arch = ARCHITECTURES[config.ssm]
    qtype = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        outtype, gguf.LlamaFileType.MOSTLY_Q8_0
    )

    with atomic_output(path) as tmp:  # a failed export leaves nothing, an old file untouched
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or f"seqlab-{arch}")
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(config.d_model)
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        writer.add_block_count(config.n_layer)
        writer.add_ssm_conv_kernel(config.d_conv)
        writer.add_ssm_inner_size(config.d_inner)
        writer.add_ssm_state_size(config.d_state)
        if config.ssm == "mamba1":
            writer.add_ssm_time_step_rank(int(config.dt_rank))
            writer.add_ssm_dt_b_c_rms(False)
        else:
            writer.add_ssm_time_step_rank(config.nheads)
            writer.add_ssm_group_count(config.ngroups)
        writer.add_layer_norm_rms_eps(float(config.norm_eps))
        _add_vocab(writer, vocab)

        for tensor_name, array in gguf_tensors(model):
            if outtype == "f32" or _always_f32(tensor_name, array):
                writer.add_tensor(tensor_name, array.astype(np.float32))
            elif outtype == "f16" or array.shape[-1] % 32:
                writer.add_tensor(tensor_name, array.astype(np.float16))
            else:
                data = gguf.quants.quantize(array, qtype.Q8_0)
                writer.add_tensor(tensor_name, data, raw_dtype=qtype.Q8_0)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "none":
        writer.add_vocab_size(vocab.size)
        return
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    writer.add_token_merges(list(vocab.merges))
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
