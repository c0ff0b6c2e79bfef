"""What happens when a checkout's ``kernels/``, ``domains/`` or ``pipelines/`` folder is imported by its bare name.

In a source checkout those folders are the packages ``seqlab.kernels``, ``seqlab.domains`` and ``seqlab.pipelines``
(pyproject's ``package-dir``). A Python started in the checkout's root (``python``, ``python -m pytest``, a
notebook) puts the root on ``sys.path``, so ``import kernels`` would find our folder before the PyPI package of that
name, which ``transformers`` imports (issue 14: ``ImportError: cannot import name 'CUDAProperties' from 'kernels'``).

Each of the three ``__init__.py`` files calls :func:`hand_over` when it runs under its bare name: the name goes to
the installed distribution that owns it, found on ``sys.path`` without the checkout's root, as if the folder were
not there. With no such distribution the name becomes what a stray folder on ``sys.path`` is to Python, an empty
namespace package (no ``__file__``, no ``__version__``), whose attributes explain the mix-up. That is what
transformers' availability check expects of a shadowing folder: it imports a found-but-unregistered name and treats a
module without ``__file__`` as absent (a raised error there would break ``import transformers`` itself, seen with
transformers 5.17 in the GPU image). This is stdlib-only and cheap (``seqlab/__init__.py`` imports nothing heavy).
Written by hand: no library deals with a package folder that doubles as a top-level name. docs/development.md says
how this was measured.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


def _is(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, folder)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (our folder, imported by its bare name) with the installed package ``name``.

    Called from the folder's ``__init__.py`` before anything else runs there; the import statement that started
    it then returns the installed package (the import system returns whatever ``sys.modules[name]`` holds after the
    module's code ran), or, when nothing else provides ``name``, an empty namespace package that explains itself.
    """
    folder = os.path.dirname(os.path.abspath(init_file))
    root = os.path.dirname(folder)
    sys.modules.pop(name, None)
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not _is(entry, root)]
    try:
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = saved
    if spec is None or (spec.origin is not None and _is(os.path.dirname(spec.origin), folder)):
        sys.modules[name] = _stray_folder(name, folder, root)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    assert spec.loader is not None  # a spec found on a path has a loader
    spec.loader.exec_module(module)


def _stray_folder(name: str, folder: str, root: str) -> types.ModuleType:
    """An empty namespace package named ``name``, as Python makes for a folder without ``__init__.py``; any
    attribute looked up on it raises an ``AttributeError`` that says what happened."""
    why = (
        f"{name!r} here is the folder {folder}, seqlab's source of 'seqlab.{name}' (import it by that name); no "
        f"installed package is called {name!r}, and the folder was found only because {root} is on sys.path"
    )
    module = types.ModuleType(name, f"Not a package: {why}.")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    module.__file__ = None

    def __getattr__(attribute: str):
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}: {why}")

    setattr(module, "__getattr__", __getattr__)  # noqa: B010 (a module attribute, not a method)
    return module
