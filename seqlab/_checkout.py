"""What happens when a checkout's ``kernels/``, ``domains/`` or ``pipelines/`` folder is imported by its bare name.

In a source checkout those folders are the packages ``seqlab.kernels``, ``seqlab.domains`` and ``seqlab.pipelines``
(pyproject's ``package-dir``). A Python started in the checkout's root (``python``, ``python -m pytest``, a
notebook) puts the root on ``sys.path``, so ``import kernels`` would find our folder before the PyPI package of that
name, which ``transformers`` imports (issue 14: ``ImportError: cannot import name 'CUDAProperties' from 'kernels'``).

Each of the three ``__init__.py`` files calls :func:`hand_over` when it runs under its bare name: the name goes to
the installed distribution that owns it, found on ``sys.path`` without the checkout's root, exactly as if the folder
were not there; with no such distribution the import fails as it would without the folder. This is stdlib-only and
cheap (``seqlab/__init__.py`` imports nothing heavy). Written by hand: no library deals with a package folder that
doubles as a top-level name. docs/development.md says how this was measured.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _is(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, folder)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (our folder, imported by its bare name) with the installed package ``name``.

    Called from the folder's ``__init__.py`` before anything else runs there; the import statement that started
    it then returns the installed package (the import system returns whatever ``sys.modules[name]`` holds after the
    module's code ran). Raises ``ModuleNotFoundError`` when nothing else provides ``name``.
    """
    folder = os.path.dirname(os.path.abspath(init_file))
    root = os.path.dirname(folder)
    ours = sys.modules.pop(name, None)
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not _is(entry, root)]
    try:
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = saved
    if spec is None or (spec.origin is not None and _is(os.path.dirname(spec.origin), folder)):
        if ours is not None:
            sys.modules[name] = ours  # the import system removes it again when this error propagates
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {folder} is seqlab's source of 'seqlab.{name}': import it by "
            f"that name; it was found as {name!r} only because {root} is on sys.path)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
