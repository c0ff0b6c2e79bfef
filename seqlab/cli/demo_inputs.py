"""``seqlab demo``'s inputs and output folder: the corpus (the CPython documentation text, or the user's files),
the 1 MiB long sequence built from it and the standard library's sources, the agent-memory events made from the
text, the model and training budgets, and the demo folder's own outputs (seqlab/cli/demo.py runs the steps)."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".seqlab-demo"
#: what a demo run writes in its folder (and replaces when run again there); nothing else is touched
OUTPUTS = (
    "data",
    "store.zarr",
    "train-log.jsonl",
    "checkpoint",
    "model.safetensors",
    "scores.zarr",
    "bpb.png",
    "memory-model.safetensors",
    "memory.session",
    "summary.json",
)
LONG_BYTES = 1 << 20  # the long sequence scored in step 4 (built from the corpus + stdlib sources)
HELDOUT_FRACTION = 0.05
HELDOUT_MAX = 64 * 1024
MIN_CORPUS = 8 * 1024
EVENT_TIME = 1714564800.0  # the memory events' timestamps (fixed, so a re-run observes the same bytes)
DEFAULT_PROMPT = 'The "with" statement'


@dataclass(frozen=True)
class Budget:
    """Model and training sizes of a run."""

    steps: int
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    batch_size: int = 16
    window: int = 128
    lr: float = 4e-3
    new_tokens: int = 200
    memory_steps: int = 150  # fine-tuning on the memory stream before the session
    answer_tokens: int = 120


FULL = Budget(steps=600)
QUICK = Budget(steps=40, new_tokens=80, memory_steps=10, answer_tokens=40)


@dataclass
class Inputs:
    """What the run reads: the corpus (embedded or the user's files) and the long sequence's parts."""

    corpus: bytes
    corpus_what: str
    big: Path | None = None  # the user's long sequence (used as is)
    long_parts: list[dict] = field(default_factory=list)  # {"what", "bytes"} for a built long sequence
    prompt: str = DEFAULT_PROMPT


def python_docs() -> bytes:
    """The CPython documentation text shipped with every interpreter (topics in sorted order)."""
    from pydoc_data import topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name (real code present on every install)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _read_user_file(path: str, flag: str) -> bytes:
    from seqlab.errors import InputError

    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise InputError(f"{flag} {path}: not a file")
    data = p.read_bytes()
    if not data:
        raise InputError(f"{flag} {path}: file is empty")
    return data


def resolve_inputs(
    texts: list[str] | None = None, big: str | None = None, prompt: str | None = None, command: str = "demo"
) -> Inputs:
    """Check and read the inputs (nothing is written): the corpus from ``texts`` (default the CPython docs text)
    and either the user's ``big`` file or the parts of a 1 MiB sequence made of the corpus and stdlib sources."""
    from seqlab.errors import ConfigError, InputError

    if texts:
        corpus = b"".join(_read_user_file(t, "--text") for t in texts)
        what = ", ".join(texts) if len(texts) <= 3 else f"{texts[0]} and {len(texts) - 1} more files"
        if len(corpus) < MIN_CORPUS:
            raise InputError(
                f"--text {what}: {len(corpus):,} bytes in all, the {command} needs at least {MIN_CORPUS:,} "
                "(a training part and a held-out tail)"
            )
        default_prompt = corpus[-heldout_size(len(corpus)) :][:24].decode("utf-8", errors="ignore").strip() or "The"
    else:
        corpus, what, default_prompt = (
            python_docs(),
            "the CPython documentation text (pydoc_data.topics)",
            DEFAULT_PROMPT,
        )
    inputs = Inputs(corpus, what, prompt=default_prompt if prompt is None else prompt)
    if not inputs.prompt:
        raise ConfigError("--prompt must not be empty")
    if big is not None:
        p = Path(big)
        if not p.is_file():
            raise InputError(f"--big {big}: {'no such file' if not p.exists() else 'not a file'}")
        if p.stat().st_size < 2:
            raise InputError(f"--big {big}: {p.stat().st_size} byte(s), scoring needs at least 2")
        inputs.big = p
        return inputs
    take = min(len(corpus), LONG_BYTES)
    inputs.long_parts.append({"what": "corpus" if texts else "CPython docs text", "bytes": take})
    need = LONG_BYTES - take
    files = []
    for path in stdlib_sources():
        if need <= 0:
            break
        size = min(path.stat().st_size, need)
        if size:
            files.append(path)
            need -= size
    if files:
        inputs.long_parts.append(
            {
                "what": f"Python stdlib sources ({len(files)} .py files, {files[0].name} .. {files[-1].name})",
                "bytes": LONG_BYTES - take - need,
                "files": [str(f) for f in files],
            }
        )
    return inputs


def heldout_size(n: int) -> int:
    """The held-out tail of an ``n``-byte corpus: 5% of it, at least 2 bytes and at most 64 KiB (the demo's and
    the ladder's split)."""
    return max(2, min(int(n * HELDOUT_FRACTION), HELDOUT_MAX))


def prepare_out(out: str | os.PathLike) -> Path:
    """The output folder, ready for a run: created when missing; in an earlier demo folder (it holds the marker
    file) the demo's own outputs are removed and other files are left; any other non-empty folder is refused."""
    return output_folder(out, MARKER, OUTPUTS, "seqlab demo")


def output_folder(out, marker: str, outputs, what: str, *, clear: bool = True) -> Path:
    """A command's own output folder (the demo's, the ladder's): ``out`` is created when missing; a non-empty
    folder without the ``marker`` file is refused (InputError) before anything is written; with ``clear`` the
    names in ``outputs`` are removed (other files are left alone). The marker is written last."""
    from seqlab.errors import InputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise InputError(
            f"--out {out}: the folder is not empty and is not a {what} folder (no {marker}); "
            "choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in outputs if clear else ():
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (out / marker).write_text(json.dumps({"what": f"{what} output folder", "outputs": list(outputs)}) + "\n")
    return out


def memory_events(text: bytes, limit: int = 600) -> list:
    """Question/answer events from a text, for teaching a byte model the event format: every paragraph (blank
    line separated) becomes a user event holding its first line and an assistant event holding the rest (at
    most ``limit`` characters). Times are fixed, a second apart."""
    from seqlab.domains.memory import Event

    chars = text.decode("utf-8", errors="replace")
    events: list = []
    covered = 0
    for paragraph in chars.split("\n\n"):
        first, _, rest = paragraph.strip("\n").partition("\n")
        first, rest = first.strip(), rest.strip("\n")
        if len(first) < 3 or len(rest) < 20:
            continue
        t = EVENT_TIME - 10_000_000 + 2 * len(events)
        events += [Event("user", first[:120], t), Event("assistant", rest[:limit], t + 1)]
        covered += len(first[:120]) + len(rest[:limit])
    if covered < len(chars) // 2:  # a text with few paragraphs: fixed-size pieces of all of it instead
        events = []
        for i in range(0, len(chars), limit):
            t = EVENT_TIME - 10_000_000 + 2 * len(events)
            events += [Event("user", "Continue.", t), Event("assistant", chars[i : i + limit], t + 1)]
    return events
