"""Agent memory sessions: state size on disk and save / open / observe latency against the history length.

A ``MemorySession`` keeps a fixed-size recurrent state, so its snapshot size and its save, open and observe
times should not depend on how many events were observed. For comparison the table shows the KV cache a
Transformer of the same width and depth would hold for that history (fp32 keys and values for every token of
every layer: 2 * n_layer * d_model * 4 bytes per token), computed, not measured.

For each history length N the session observes N events (about 50 bytes each), saves, then times: ``save``
after one more event, ``open`` (read and check the snapshot, replay an empty log, take the lock), and
``observe`` of one event (log append + fsync + forward). Medians of ``--repeats``.

    python bench/memory.py                  # N = 10, 100, 1000, 3000; d_model 256, 4 layers
    python bench/memory.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine_line

from seqlab.config import BackboneConfig
from seqlab.domains.memory import Event, MemoryStreamAdapter
from seqlab.domains.session import MemorySession


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, nargs="+", default=None, help="history lengths (default 10 100 1000 3000)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small model, short histories")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.quick:
        args.events = args.events or [10, 100]
        args.d_model, args.n_layer, args.repeats = 64, 2, 3
    args.events = args.events or [10, 100, 1000, 3000]
    return args


def event(i: int) -> Event:
    return Event("user" if i % 2 else "assistant", f"note {i}: the quick brown fox jumps", 1.7e9 + i)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    torch.manual_seed(0)
    config = BackboneConfig(d_model=args.d_model, n_layer=args.n_layer, d_state=16)
    model = MemoryStreamAdapter().build_model(config).eval()
    print(
        f"memory model d_model {args.d_model}, {args.n_layer} layers, d_state 16, fp32; "
        f"events ~{len(event(0).content) + 20} bytes each; medians of {args.repeats}"
    )
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="seqlab-bench-memory-"))
    try:
        for n in args.events:
            path = folder / f"s{n}"
            session = MemorySession.open(path, model, create=True)
            start = time.perf_counter()
            session.observe([event(i) for i in range(n)])
            fill = time.perf_counter() - start
            session.save()
            counter = [n]

            def observe_one():
                session.observe(event(counter[0]))
                counter[0] += 1

            observe_s = median_time(observe_one, args.repeats)
            save_times = []
            for _ in range(args.repeats):  # one new event (untimed), then the snapshot
                observe_one()
                start = time.perf_counter()
                session.save()
                save_times.append(time.perf_counter() - start)
            save_s = statistics.median(save_times)
            session.save()
            info = session.info()
            session.close()

            def reopen():
                MemorySession.open(path, model).close()

            open_s = median_time(reopen, args.repeats)
            kv = 2 * args.n_layer * args.d_model * 4 * info["position"]
            rows.append(
                (n, info["position"], info["sizes"]["snapshot_file_bytes"], kv, save_s, open_s, observe_s, fill / n)
            )
            print(
                f"  N={n}: snapshot {info['sizes']['snapshot_file_bytes']:,} B, save {save_s * 1e3:.2f} ms, "
                f"open {open_s * 1e3:.2f} ms, observe {observe_s * 1e3:.2f} ms",
                flush=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print(
        "| events observed | bytes of history | snapshot on disk (B) | same-width Transformer KV cache (B) | "
        "save (ms) | open (ms) | observe 1 event (ms) | observe, per event, first N (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, pos, snap, kv, save_s, open_s, obs_s, fill in rows:
        print(
            f"| {n:,} | {pos:,} | {snap:,} | {kv:,} | {save_s * 1e3:.2f} | {open_s * 1e3:.2f} | {obs_s * 1e3:.2f} | "
            f"{fill * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()
