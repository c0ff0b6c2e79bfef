"""What a failed Ray job raises: the worker's own error (a seqlab error, out of memory, an OSError of the machine)
unwrapped from Ray's task error, and the failed job's frames released so its actors go at once (docs/ray-jobs.md)."""

from __future__ import annotations

from seqlab.errors import SeqlabError


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception linked to it: causes, contexts, and the worker's exception inside a Ray task
    error (Ray wraps user exceptions in its own and keeps the original in ``cause``)."""
    seen, found, stack = set(), [], [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return found


_OUT_OF_MEMORY = ("can't allocate memory", "out of memory")


def _user_error(e: BaseException | None) -> bool:
    """A seqlab error, a worker out of memory (a window too large for the model) or an OSError of the machine (a
    full disk, no permission, a read-only file system: seqlab.errors.USER_OS_ERRORS): raised to the caller as itself
    (the CLI prints one line), not wrapped in Ray's task error."""
    from seqlab.errors import USER_OS_CLASSES, USER_OS_ERRORS

    return (
        isinstance(e, (SeqlabError, MemoryError))
        or isinstance(e, RuntimeError)
        and any(m in str(e) for m in _OUT_OF_MEMORY)
        or isinstance(e, OSError)
        and (e.errno in USER_OS_ERRORS or isinstance(e, USER_OS_CLASSES))
    )


def _fresh(e: BaseException) -> BaseException:
    """The same error without Ray's frames and context: an OSError keeps its errno, message and path."""
    if isinstance(e, OSError) and e.errno is not None:
        return type(e)(e.errno, e.strerror, *(p for p in (e.filename,) if p is not None))
    return type(e)(str(e))


def _unwrap(exc: BaseException) -> BaseException | None:
    """The seqlab error (or out-of-memory error) inside a Ray task error."""
    for e in _chain(exc):
        cause = getattr(e, "cause", None)
        if _user_error(cause):
            return cause
        if isinstance(e, SeqlabError) and type(e).__module__.startswith("seqlab"):
            return e
    return None


def _release_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames that ``exc``'s tracebacks reach, callers included (file
    and line stay, so the tracebacks still print).

    A task's failure reaches the driver with tracebacks through Ray Data's scheduling loop and its iterators, whose
    frames (and the frames that called them) hold the executor, its metadata fetcher (which keeps the failed tasks
    after shutdown), the job's blocks and, through each task's done-callback, the handle of the actor that ran it.
    Whoever kept the error (a caller, pytest.raises) kept all of that alive; Ray ends an actor only when its last
    handle goes, so this was half of the "a failed job keeps a CPU" bug (issue 14, found with gc.get_referrers on
    the live handles). The other half is a holder the job cannot reach: Ray Data logs the error with a traceback of
    its own, and a logging handler that keeps records (pytest's log capture does) keeps it. ``_end_with_the_job``
    ends the actors whatever holds them. Frames still executing (this thread's callers) cannot be cleared and are
    left alone; the job's finished generator frames (Ray Data's iterators) are cleared too."""
    seen = set()
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None and id(frame) not in seen:
                seen.add(id(frame))
                try:
                    frame.clear()
                except RuntimeError:  # still executing (or, from Python 3.13, a suspended generator's)
                    pass
                frame = frame.f_back
            tb = tb.tb_next
