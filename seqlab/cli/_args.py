"""Range-checked argparse types for every number a ``seqlab`` command takes.

argparse's own ``type=int`` accepts ``-5`` for a window and ``type=float`` accepts ``nan``, ``inf`` and ``1e-300``;
a command then writes thousands of one-element chunks, runs until killed, or fails deep inside torch with a
traceback. Each option here states its range once; a value outside it is refused by argparse, which the CLI
turns into one line on stderr and exit code 2 (``seqlab.cli._Parser.error``), e.g.::

    seqlab ingest: error: argument --window: must be an integer in [1, 1073741824], got '-5'

Use ``type=count(1)`` for sizes and counts, ``type=count(0)`` where zero means "none", ``type=number(...)`` for
floats (NaN and the infinities are always refused), ``type=seed`` for seeds.
"""

from __future__ import annotations

import argparse
import math

#: the largest count any option accepts unless it says otherwise: 2**30 elements, steps, tokens ...
BIG = 1 << 30
#: the most CPU threads a command may ask torch for
MAX_THREADS = 1024


def count(low: int = 1, high: int = BIG, what: str = "an integer"):
    """An argparse type: an int in ``[low, high]`` (no floats, no bools, no '1e3')."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip(), 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what} in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what} in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = "count"  # argparse names the type in some messages
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval (``low_open``/``high_open`` exclude the ends)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


#: --threads: torch CPU threads
threads = count(1, MAX_THREADS)
#: --seed: what torch.manual_seed and numpy accept
seed = count(0, 2**63 - 1, "a seed (an integer)")
#: --temperature: 0 is greedy
temperature = number(0.0, 100.0)
#: --top-p
top_p = number(0.0, 1.0, low_open=True)
#: --top-k, --max-new-tokens and the like
positive = count(1)
non_negative = count(0)

__all__ = ["BIG", "MAX_THREADS", "count", "non_negative", "number", "positive", "seed", "temperature", "threads",
           "top_p"]
