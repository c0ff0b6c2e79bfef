"""One line describing the machine a bench ran on (CPU model, cores, Python, torch, threads)."""

from __future__ import annotations

from seqlab.machine import machine


def machine_line() -> str:
    m = machine()  # the same description `seqlab bench` prints (seqlab.machine)
    load = f", load average {m['load_average']:.2f}" if "load_average" in m else ""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores available ({m['logical_cpus']} logical), {m['os']}, "
        f"python {m['python']}, torch {m['torch']}, torch threads {m['torch_threads']}{load}"
    )


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


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...); None off Linux or when absent."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False when
    not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
