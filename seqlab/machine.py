"""What machine a measurement ran on: CPU model, cores, OS, Python, torch and its threads, the GPU, the load.

Used by ``seqlab bench`` and the benches in ``bench/`` (one description, so their headers agree), and by the
up-front memory checks (:func:`available_memory`).
"""

from __future__ import annotations

import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
    """This machine and process: ``cpu``, ``cores`` (available to this process), ``logical_cpus``, ``os``,
    ``python``, ``torch``, ``torch_threads``, ``gpu`` (CUDA device 0's name or None) and, where the OS has it,
    ``load_average`` (1 minute)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: dict | None = None, *, with_os: bool = True) -> str:
    """``machine: CPU, N cores available (M logical), OS, python X, torch Y, torch threads T, GPU ..., load ...``."""
    m = machine() if info is None else info
    load = f", load average {m['load_average']:.2f}" if "load_average" in m else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no CUDA GPU"
    system = f", {m['os']}" if with_os else ""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores available ({m['logical_cpus']} logical){system}, python "
        f"{m['python']}, torch {m['torch']}, torch threads {m['torch_threads']}{gpu}{load}"
    )


def available_memory() -> int | None:
    """Bytes of memory this process can still take (MemAvailable of /proc/meminfo, else the physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


__all__ = ["available_memory", "machine", "machine_line"]
