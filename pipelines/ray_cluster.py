"""Starting or joining Ray for a job (``connect``), refusing a request the cluster cannot place
(``check_resources``), and ``quiet``: Ray's own log lines silenced (contract E in docs/architecture.md).

Without ``quiet`` a local job prints some 15 lines of Ray's own, some looking like errors: the token
authentication notice and "Started a local Ray instance" (the ``ray`` logger), the C++ core worker's line about
actor constructor arguments, Ray Data's execution plan, its progress log and its "execution finished", and the
workers' output forwarded to the driver. ``quiet=True`` silences all of them:

- when seqlab starts or joins Ray: ``ray.init(log_to_driver=False, logging_level=ERROR)``, and
  ``RAY_BACKEND_LOG_LEVEL=fatal`` for the C++ core worker of this process (and the daemons of a local cluster
  seqlab starts; unless the variable is set already) with stderr on the null device while ``ray.init`` runs;
- during the job (``quiet_ray``): Ray Data's progress bars, execution start print and stats log off in its
  ``DataContext``, and Ray Data's console log handler muted (its log file keeps everything); all restored after.

A Ray the caller started already (``ray.init`` of their own) keeps its own settings: only the job's part is quiet,
and the driver's core worker may still print its line about actor constructor arguments (C++, straight to fd 2).
Start Ray with ``connect(quiet=True)`` instead for none at all.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from seqlab.errors import BackendUnavailableError, InputError

__all__ = ["check_resources", "connect", "quiet_ray"]

#: the C++ core worker's log level while seqlab starts Ray quietly (its lines go straight to stderr)
QUIET_BACKEND_LEVEL = "fatal"


def connect(
    address: str | None = None, *, quiet: bool = False, log_to_driver: bool | None = None, num_cpus: int | None = None
) -> bool:
    """Start an embedded local Ray cluster (``address=None``; ``num_cpus``: its CPUs, default all of this
    machine's) or join the one at ``address``, unless Ray is initialized already in this process. ``quiet``:
    Ray's own log lines off (module docstring). A cluster that cannot be joined raises InputError naming the
    address. Returns True when this call started or joined Ray."""
    import ray

    if ray.is_initialized():
        return False
    options: dict = {"log_to_driver": log_to_driver}
    if quiet:
        options.update(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if address:
        _check_reachable(address)
    with _backend_level(quiet):
        if address:
            try:
                ray.init(address=address, **options)
            except Exception as exc:  # no cluster there, refused, wrong auth token: one clear line
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
                raise InputError(
                    f"cannot join the Ray cluster at {address!r}: {type(exc).__name__}: {reason[:300]}"
                ) from exc
        else:  # an embedded local cluster
            ray.init(include_dashboard=False, num_cpus=num_cpus, **options)
    return True


#: how long ``connect`` waits for the cluster's address to answer before saying nothing does
REACH_TIMEOUT_S = 5.0


def _check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Refuse at once an address where nothing answers: ``ray.init`` would retry its GCS connection 20 times over
    some 4 minutes (5 s connect timeouts and 1 s sleeps), silently, before failing. ``HOST:PORT`` and
    ``ray://HOST:PORT`` are tried with one TCP connection; other forms (``auto``) are left to Ray."""
    target = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(
            f"cannot join the Ray cluster at {address!r}: nothing answers at {host}:{port} ({why}); "
            f"check the address, or start the cluster there (ray start --head --port={port})"
        ) from None


@contextmanager
def _backend_level(quiet: bool) -> Iterator[None]:
    """While ``ray.init`` starts the core worker (and, for a local cluster, Ray's daemons): with ``quiet``,
    ``RAY_BACKEND_LOG_LEVEL=fatal`` (read once, when each starts; not if the caller set it) and this process's
    stderr (fd 2) on the null device, which swallows the core worker's line saying it read that variable; the
    daemons log to the session folder. A failed start still raises."""
    key = "RAY_BACKEND_LOG_LEVEL"
    if not quiet:
        yield
        return
    set_here = key not in os.environ
    if set_here:
        os.environ[key] = QUIET_BACKEND_LEVEL
    try:
        with _stderr_off():
            yield
    finally:
        if set_here:
            os.environ.pop(key, None)


@contextmanager
def _stderr_off() -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no fd 2 to silence
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _Silence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def quiet_ray(quiet: bool = True) -> Iterator[None]:
    """While it lasts (``quiet=True``), Ray Data prints nothing: no progress bars or progress log, no execution
    plan, no stats, no log lines on the console (its log file under the session folder still gets them)."""
    if not quiet:
        yield
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    settings = {
        "enable_progress_bars": False,
        "enable_operator_progress_bars": False,
        "print_on_execution_start": False,
        "enable_auto_log_stats": False,
    }
    saved = {name: getattr(context, name) for name in settings if hasattr(context, name)}
    for name in saved:
        setattr(context, name, settings[name])
    silence = _Silence()
    consoles = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler in consoles:
        handler.addFilter(silence)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(silence)
        for name, value in saved.items():
            setattr(context, name, value)


def check_resources(num_cpus: float, num_gpus: float, concurrency: int, address: str | None) -> None:
    """Refuse a job whose actors cannot run on the cluster it joined: not even one actor's CPUs or GPUs are
    there (Ray would queue it forever, printing autoscaler lines). A request that fits once but not
    ``concurrency`` times runs with the actors that fit (Ray queues the others): a warning says so."""
    import ray

    have = ray.cluster_resources()
    where = f"the Ray cluster at {address!r}" if address else "this machine's Ray cluster"
    queued = []
    for resource, per_actor, name in (("CPU", num_cpus, "num_cpus"), ("GPU", num_gpus, "num_gpus")):
        if not per_actor:
            continue
        total = float(have.get(resource, 0.0))
        flag = "--" + name.replace("_", "-")
        if per_actor > total + 1e-9:
            raise BackendUnavailableError(
                f"{name}={per_actor:g} ({flag} {per_actor:g}: {resource}s per actor) is more than {where} has: "
                f"{total:g} {resource}s in all; not even one actor could start. Lower {flag}, or join a cluster "
                f"with {resource}s (--address)"
            )
        if per_actor * concurrency > total + 1e-9:
            queued.append(f"{resource}: {per_actor:g} x {concurrency} actors > {total:g}")
    if queued:
        warnings.warn(
            f"{where} cannot run all {concurrency} actors at once ({'; '.join(queued)}): the others wait "
            f"for a free slot; lower --concurrency to match",
            stacklevel=3,
        )
