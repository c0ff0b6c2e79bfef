"""One line describing the machine a bench ran on (CPU model, cores, Python, torch, threads)."""

from __future__ import annotations

import os
import platform

import torch


def machine_line() -> str:
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
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"machine: {cpu}, {cores} cores available ({os.cpu_count()} logical), {platform.system()} "
            f"{platform.release()}, python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}{load}")


def vm_hwm_kib() -> int | None:
    """This process's own peak RSS from /proc (Linux), a cross-check of ru_maxrss; None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
