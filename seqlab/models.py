"""Models on top of the backbone: a token language model and a continuous-input sequence model.

Both follow the one contract ``model(x, state) -> (output, new_state)``: the ModelOutput they return unpacks
as that pair (and keeps ``.output`` / ``.logits``, ``.state``, ``.hidden``); ``model.step(x, state)`` does the
same for one element per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqlab.backbone import Backbone
from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError
from seqlab.fused_step import fused_lm_step
from seqlab.mixers.base import check_states_at
from seqlab.state import RecurrentState


@dataclass(eq=False)
class ModelOutput:
    """``output``: the head's result (logits for a LanguageModel); ``state``: the new state (None for a
    bidirectional model or when ``return_state=False``); ``hidden``: final normalised hidden states;
    ``states_at``: with ``model(x, state, states_at=[p1, ...])``, the states after the first p1, ... elements of
    this call (one ``RecurrentState`` each, at position start + p), else None.

    It unpacks as ``(output, state)``, the contract ``model(x, state) -> (output, new_state)``:
    ``out, state = model(ids)``; ``result[0]`` / ``result[1]`` and ``len(result) == 2`` agree with that.
    """

    output: torch.Tensor
    state: RecurrentState | None
    hidden: torch.Tensor
    states_at: list[RecurrentState] | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.output

    def __iter__(self):
        return iter((self.output, self.state))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        return (self.output, self.state)[index]


class _Model(nn.Module):
    """What both models share: the backbone, init, state helpers, fingerprint.

    ``fused_step`` (default True; ``model.fused_step = False`` turns it off): ``step`` runs the compiled decode
    step of ``seqlab.fused_step`` where it applies, the eager per-block steps elsewhere.

    ``inference_block`` (default 2048, None or 0 to turn off): without autograd, a causal model runs longer
    inputs block by block, threading its state, which keeps memory flat and the working set in cache.
    """

    inference_block: int | None = 2048
    #: ``step`` (and so ``generate``) runs the compiled fused decode step where it applies (``seqlab.fused_step``:
    #: CPU, float32/float64, no autograd, plain Mamba-1/Mamba-2 blocks; other blocks and anything unusual run
    #: eagerly with the same results). Set ``model.fused_step = False`` for the eager step everywhere.
    fused_step: bool = True

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if not isinstance(config, BackboneConfig):
            raise ConfigError(f"{type(self).__name__} needs a BackboneConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config)

    @property
    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    def set_backend(self, backend: str) -> _Model:
        """Pick the kernel backend of every layer (see ``Backbone.set_backend``); returns the model."""
        self.backbone.set_backend(backend, _stacklevel=2)
        return self

    def init_state(self, batch_size: int, device=None) -> RecurrentState:
        if device is None:
            device = next(self.parameters()).device
        return self.backbone.init_state(batch_size, device)

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None):
        """The model saved in ``source``: a directory written by ``save_pretrained``, a transformers directory of a
        supported family (Mamba, Mamba-2, Llama, Jamba, Bamba; a LanguageModel), or a seqlab model file /
        checkpoint folder. ``dtype``: the parameters' dtype (default: as stored, so a round trip is bit-exact);
        ``device``: where they go (default: the CPU). Built on the meta device and filled tensor by tensor from
        the files, every name and shape checked first. Returned in eval mode. The model alone: its adapter (the
        tokenizer) comes with ``seqlab.domains.registry.from_pretrained(source) -> (model, adapter)``
        (``seqlab.pretrained``)."""
        from seqlab.pretrained import load_pretrained

        return load_pretrained(source, dtype=dtype, device=device, expect=cls)

    def save_pretrained(self, directory, *, max_shard_size: int | str | None = "5GB", files=None):
        """Write this model as a directory in Hugging Face's conventions: seqlab's config.json (marked
        ``"format": "seqlab.pretrained"``), the weights as ``model.safetensors``, or HF's shards and index past
        ``max_shard_size`` (bytes, or "5GB", "500MiB"; None: one file), and ``files`` (name -> bytes) beside
        them; all or nothing, config.json last. Returns the directory (``seqlab.pretrained``)."""
        from seqlab.pretrained import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size, files=files)

    def _init_weights(self) -> None:
        """Mamba's init: default linear weights with zero biases (dt_proj keeps its dt-range bias),
        embeddings normal(0, 0.02), residual output projections scaled by 1/sqrt(n_layer)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith(("out_proj.weight", "ffn.down.weight", "ffn.down")):
                    param.div_(math.sqrt(self.config.n_layer))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover - each model defines its head
        raise NotImplementedError

    def _run(
        self,
        hidden: torch.Tensor,
        state: RecurrentState | None,
        return_state: bool,
        states_at=None,
        cu_seqlens=None,
        seq_idx=None,
    ) -> ModelOutput:
        if cu_seqlens is not None or seq_idx is not None:  # packed rows: one pass (the backbone checks them)
            if states_at is not None:
                raise InputError("states_at cannot be combined with packed rows (cu_seqlens/seq_idx)")
            hidden, new_state = self.backbone(hidden, state, return_state, cu_seqlens=cu_seqlens, seq_idx=seq_idx)
            return ModelOutput(self.head(hidden), new_state, hidden)
        if states_at is not None:
            return self._run_states_at(hidden, state, return_state, states_at)
        block = self.inference_block
        length = hidden.shape[1]
        if block and length > block and not torch.is_grad_enabled() and not self.config.bidirectional:
            # Long inputs without autograd go through in blocks with the state threaded (exact by the state
            # contract): the working set stays cache-sized and memory stays flat in the length.
            heads, hiddens = [], []
            for start in range(0, length, block):
                h, state = self.backbone(hidden[:, start : start + block], state, True)
                hiddens.append(h)
                heads.append(self.head(h))
            return ModelOutput(torch.cat(heads, 1), state if return_state else None, torch.cat(hiddens, 1))
        hidden, new_state = self.backbone(hidden, state, return_state)
        return ModelOutput(self.head(hidden), new_state, hidden)

    def _run_states_at(self, hidden: torch.Tensor, state: RecurrentState | None, return_state: bool, states_at):
        """``_run`` that also returns the states at ``states_at`` (offsets 1..l in this call), block by block like
        ``_run`` for long inputs without autograd (each block gets the positions that fall inside it)."""
        length = hidden.shape[1]
        positions = check_states_at(states_at, length)
        block = self.inference_block
        if not (block and length > block and not torch.is_grad_enabled()):
            hidden, new_state, states = self.backbone(hidden, state, return_state, states_at=positions)
            return ModelOutput(self.head(hidden), new_state, hidden, states)
        heads, hiddens, states = [], [], []
        for start in range(0, length, block):
            piece = hidden[:, start : start + block]
            inside = [p - start for p in positions if start < p <= start + piece.shape[1]]
            h, state, at = self.backbone(piece, state, True, states_at=inside)
            hiddens.append(h)
            heads.append(self.head(h))
            states.extend(at)
        return ModelOutput(torch.cat(heads, 1), state if return_state else None, torch.cat(hiddens, 1), states)

    def _run_step(self, hidden: torch.Tensor, state: RecurrentState | None) -> ModelOutput:
        hidden, new_state = self.backbone.step(hidden, state, fused=bool(self.fused_step))
        return ModelOutput(self.head(hidden), new_state, hidden)


class LanguageModel(_Model):
    """Embedding -> backbone -> LM head (tied to the embedding by default). Token ids (b, l) in, logits out."""

    def __init__(self, config: BackboneConfig, vocab_size: int, tie_embeddings: bool = True) -> None:
        super().__init__(config)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ConfigError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings
        self.embeddings = nn.Embedding(vocab_size, config.d_model)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head  # an nn.Linear, or a quantized layer (seqlab.quant.AQLMLinear: no .weight)
        dtype = head.weight.dtype if isinstance(head, nn.Linear) else next(head.parameters()).dtype
        return head(hidden.to(dtype))

    def _check_ids(self, input_ids, expect_dim: int) -> torch.Tensor:
        """The ids as int64 (what the embedding takes), after checking type, shape and vocabulary range."""
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != expect_dim:
            layout = "(batch, length)" if expect_dim == 2 else "(batch,)"
            raise InputError(f"input_ids must have shape {layout}, got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
        # every integer dtype a store can hold (uint8 bytes and bases, int16, uint32, ...) is checked in int64, so
        # a comparison with the vocabulary size cannot wrap around (256 is 0 in uint8)
        wide = input_ids.to(torch.int64)
        # one reduction (the common, valid case runs on every decoded token); the mask only to name a bad id
        low, high = torch.aminmax(wide)
        if int(low) < 0 or int(high) >= self.vocab_size:
            bad = (wide < 0) | (wide >= self.vocab_size)
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise InputError(
                f"input_ids[{', '.join(map(str, where))}] = {int(wide[where])} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        return wide

    def forward(
        self,
        input_ids: torch.Tensor,
        state: RecurrentState | None = None,
        return_state: bool = True,
        states_at=None,
        *,
        cu_seqlens=None,
        seq_idx=None,
    ) -> ModelOutput:
        """Logits (b, l, vocab) and the new state. ``states_at=[p1, p2, ...]`` (strictly increasing offsets in
        1..l): ``out.states_at`` also holds the states after the first p1, p2, ... tokens of this call, from this one
        forward (a speculative verifier's rollback points; docs/generation.md).

        Packed rows: ``cu_seqlens`` ([0, e1, ..., T], N + 1 ints) or ``seq_idx`` ((1, T), the sequence number of
        every token) with ``input_ids`` (1, T): N sequences end to end, each run exactly as if alone (from a fresh
        state, or from row i of ``state``, which then has N rows). Logits (1, T, vocab); ``out.state`` has one row
        per sequence, row i at its start position + its length (``state.positions``)."""
        input_ids = self._check_ids(input_ids, 2)
        return self._run(self.embeddings(input_ids), state, return_state, states_at, cu_seqlens, seq_idx)

    def generate(self, input_ids=None, max_new_tokens: int = 64, **options):
        """Greedy or sampled continuation of token-id prompts; see ``seqlab.generate.generate``."""
        from seqlab.generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def step(self, input_ids: torch.Tensor, state: RecurrentState | None = None) -> ModelOutput:
        """One token per sequence: ids (b,) or (b, 1); logits (b, vocab)."""
        if self.fused_step and state is not None:  # the whole step in one compiled call (seqlab.fused_step)
            done = fused_lm_step(self, input_ids, state)
            if done is not None:
                return ModelOutput(*done)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 1:
            input_ids = input_ids[:, 0]
        input_ids = self._check_ids(input_ids, 1)
        return self._run_step(self.embeddings(input_ids), state)


class SequenceModel(_Model):
    """Continuous inputs (b, l, d_input) -> input projection -> backbone -> linear head (b, l, d_output).

    ``d_output=None`` returns the hidden features themselves (an identity head), for embedding uses.
    """

    def __init__(self, config: BackboneConfig, d_input: int, d_output: int | None = None) -> None:
        super().__init__(config)
        for name, value in (("d_input", d_input), ("d_output", d_output)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        self.d_input = d_input
        self.d_output = d_output
        self.input_proj = nn.Linear(d_input, config.d_model)
        self.output_head = nn.Linear(config.d_model, d_output) if d_output is not None else nn.Identity()
        self._init_weights()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_head(hidden)

    def _check_x(self, x, expect_dim: int) -> None:
        layout = "(batch, length, d_input)" if expect_dim == 3 else "(batch, d_input)"
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x must be a floating-point tensor {layout}, got {what}")
        if x.dim() != expect_dim or x.shape[-1] != self.d_input:
            raise InputError(f"x must have shape {layout} with d_input={self.d_input}, got {tuple(x.shape)}")
        if x.numel() == 0:
            raise InputError(f"x is empty (shape {tuple(x.shape)}): give at least one element")
        if not bool(torch.isfinite(x).all()):
            where = tuple(int(i) for i in (~torch.isfinite(x)).nonzero()[0])
            raise InputError(f"x{list(where)} is {float(x[where])}: inputs must be finite")

    def forward(
        self,
        x: torch.Tensor,
        state: RecurrentState | None = None,
        return_state: bool = True,
        states_at=None,
        *,
        cu_seqlens=None,
        seq_idx=None,
    ) -> ModelOutput:
        """Outputs (b, l, d_output) and the new state; ``states_at`` and packed rows (``cu_seqlens`` /
        ``seq_idx``, x (1, T, d_input)) as in ``LanguageModel.forward``."""
        self._check_x(x, 3)
        hidden = self.input_proj(x.to(self.input_proj.weight.dtype))
        return self._run(hidden, state, return_state, states_at, cu_seqlens, seq_idx)

    def step(self, x: torch.Tensor, state: RecurrentState | None = None) -> ModelOutput:
        """One element per sequence: x (b, d_input) or (b, 1, d_input)."""
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == 1:
            x = x[:, 0]
        self._check_x(x, 2)
        return self._run_step(self.input_proj(x.to(self.input_proj.weight.dtype)), state)


def _quantization_summary(model: nn.Module) -> dict | None:
    """None for a full-precision model; for one quantized by ``seqlab.quant.quantize_model``: method, config,
    the number of quantized layers and their exact storage in bits per weight (codebooks and scales included)."""
    layout = getattr(model, "quantization", None)
    if not layout:
        return None
    bits = weights = 0
    for module in model.modules():
        if callable(getattr(module, "represented_parameters", None)):
            layer: Any = module  # a seqlab.quant.AQLMLinear (not imported: the quant package builds on this one)
            bits += int(layer.storage_bits())
            weights += int(layer.out_features) * int(layer.in_features)
    for part in getattr(model, "_aqlm_experts", {}).values():
        bits += part.storage_bits()
        weights += part.out_features * part.in_features
    return {
        "method": layout.get("method"),
        "config": layout.get("config"),
        "layers": len(layout.get("layers", {})),
        "bits_per_parameter": bits / weights if weights else None,
        "full_precision_bits": layout.get("full_precision_bits"),
    }


def model_summary(model: nn.Module) -> dict:
    """What a model is, as plain data (``seqlab describe MODEL`` prints it): ``class``; ``fingerprint``;
    ``parameters`` ``{"total", "active"}`` (``seqlab.ffn.parameter_counts``: an MoE layer counts its router and
    ``top_k`` experts as active, so a dense model has total == active); ``config`` (the ``BackboneConfig`` as a
    dict, None for a model without one); ``moe`` (None without MoE layers, else the ``MoESettings`` fields with
    ``layers``, the indices of the MoE layers); ``mixers`` (each layer's mixer kind); ``attention`` (None without
    attention layers, else the first attention layer's ``AttentionSettings`` fields with ``layers``);
    ``quantization`` (None, or for a model quantized by ``seqlab.quant.quantize_model`` its method, config, number
    of quantized layers and their bits per weight); ``vocab_size`` for a ``LanguageModel``, ``d_input`` and
    ``d_output`` for a ``SequenceModel``."""
    import dataclasses

    from seqlab.ffn import parameter_counts

    config = getattr(model, "config", None)
    summary: dict = {
        "class": type(model).__name__,
        "fingerprint": getattr(model, "fingerprint", None),
        "parameters": parameter_counts(model),
        "config": config.to_dict() if isinstance(config, BackboneConfig) else None,
        "moe": None,
        "mixers": None,
        "attention": None,
        "quantization": _quantization_summary(model),
    }
    if isinstance(config, BackboneConfig):
        summary["mixers"] = [config.layer_spec(i)[0] for i in range(config.n_layer)]
        attention = [i for i, kind in enumerate(summary["mixers"]) if kind == "attention"]
        if attention:
            settings = dataclasses.asdict(config.attention_settings(attention[0]))
            summary["attention"] = {**settings, "layers": attention}
        layers = [i for i in range(config.n_layer) if config.layer_spec(i)[1] == "moe"]
        if layers:
            summary["moe"] = {**dataclasses.asdict(config.moe_settings()), "layers": layers}
    if isinstance(model, LanguageModel):
        summary["vocab_size"] = model.vocab_size
    elif isinstance(model, SequenceModel):
        summary.update(d_input=model.d_input, d_output=model.d_output)
    return summary
