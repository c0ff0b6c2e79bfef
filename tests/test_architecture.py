"""The arrows of docs/architecture.md, checked on the source: a lower room never imports a higher one, not even
lazily inside a function; no module shares its name with a function or class its package exports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> (folder, rank): a module may import rooms of lower or equal rank only
ROOMS = {
    "kernels": (ROOT / "kernels", 0),
    "core": (ROOT / "seqlab", 1),
    "domains": (ROOT / "domains", 2),
    "pipelines": (ROOT / "pipelines", 3),
    "cli": (ROOT / "seqlab" / "cli", 4),
    # `seqlab ladder`'s library: it composes every room's public pieces (and the demo's corpus), as the CLI does
    "ladder": (ROOT / "seqlab" / "ladder", 4),
}
# what each import prefix belongs to (longest prefix wins)
PREFIXES = {
    "seqlab.kernels": "kernels",
    "seqlab.domains": "domains",
    "seqlab.pipelines": "pipelines",
    "seqlab.cli": "cli",
    "seqlab.ladder": "ladder",
    "seqlab": "core",
}
# modules outside the rooms' rules, each with its reason
EXEMPT = {
    # test helpers for the suite and for users' own tests: builds tiny models of every room (a memory model file)
    ROOT / "seqlab" / "testing.py",
}
# single imports allowed against the arrows, each with its reason
ALLOWED = {
    # the root's kernels/ imported as a bare `kernels` (a Python started in a checkout) hands itself over to the
    # real seqlab.kernels; seqlab._checkout imports nothing of the core
    ("kernels/__init__.py", "seqlab._checkout"),
    ("kernels/__init__.py", "seqlab._checkout.hand_over"),
}
# files of the seqlab/ folder that belong to the CLI room: `python -m seqlab` is the command line
CLI_FILES = {ROOT / "seqlab" / "__main__.py"}


def _room_of_import(name: str) -> str | None:
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return PREFIXES[prefix]
    return None


def _folder_room(path: Path) -> str:
    best, best_len = None, -1
    for room, (folder, _) in ROOMS.items():
        if folder in path.parents and len(folder.parts) > best_len:
            best, best_len = room, len(folder.parts)
    return best


def _room_of_file(path: Path) -> str:
    return "cli" if path in CLI_FILES else _folder_room(path)


def _package_of(path: Path) -> str:
    """The package a module's relative imports are resolved against (for __init__.py, its own package)."""
    room = _folder_room(path)
    base = {
        "kernels": "seqlab.kernels",
        "core": "seqlab",
        "domains": "seqlab.domains",
        "pipelines": "seqlab.pipelines",
        "cli": "seqlab.cli",
        "ladder": "seqlab.ladder",
    }[room]
    parts = list(path.relative_to(ROOMS[room][0]).with_suffix("").parts)
    return ".".join([base, *parts[:-1]])


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from seqlab import domains` imports a room too
                yield node.lineno, f"{name}.{alias.name}"


def _sources():
    seen = set()
    for folder, _ in ROOMS.values():
        for path in sorted(folder.rglob("*.py")):
            if path not in seen:
                seen.add(path)
                yield path


def test_lower_rooms_never_import_higher_ones():
    bad = []
    for path in _sources():
        if path in EXEMPT:
            continue
        room = _room_of_file(path)
        rank = ROOMS[room][1]
        for line, name in _imports(path):
            target = _room_of_import(name)
            allowed = (str(path.relative_to(ROOT)), name) in ALLOWED
            if target is not None and ROOMS[target][1] > rank and not allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {name} ({target})")
    assert not bad, "imports against the arrows of docs/architecture.md:\n" + "\n".join(sorted(set(bad)))


PACKAGES = [
    "seqlab",
    "seqlab.kernels",
    "seqlab.domains",
    "seqlab.pipelines",
    "seqlab.cli",
    "seqlab.mixers",
    "seqlab.ladder",
]

# in a fresh interpreter (nothing imported yet): what `from package import name` gives before and after the
# submodule of the same name is imported must be the same object, the module itself
_SHADOW_PROBE = """
import importlib, json, pkgutil, sys
out = {}
for package in sys.argv[1:]:
    pkg = importlib.import_module(package)
    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    for name in sorted((set(getattr(pkg, "__all__", ())) | set(vars(pkg))) & modules):
        before = getattr(pkg, name)
        importlib.import_module(package + "." + name)
        after = getattr(pkg, name)
        if before is not after or getattr(after, "__name__", None) != package + "." + name:
            out[package + "." + name] = [repr(before), repr(after)]
print(json.dumps(out))
"""


def test_no_export_shadows_a_module():
    """`from package import name` must give one thing: no exported function or class is named like a module or
    subpackage beside it (a `stream` function next to a `stream.py` module gives the function or the module
    depending on what was imported first)."""
    result = subprocess.run(
        [sys.executable, "-c", _SHADOW_PROBE, *PACKAGES], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    clash = json.loads(result.stdout.strip().splitlines()[-1])
    assert not clash, f"names that are both an export and a module (before, after importing the module): {clash}"


def test_no_module_named_like_a_top_level_package_it_lives_beside():
    """A module named torch.py or triton.py forces `from . import torch as fast` and hides the real package from
    a reader; none in our folders."""
    taken = {"torch", "triton", "ray", "zarr", "numpy", "einops", "safetensors", "tqdm"}
    bad = [str(p.relative_to(ROOT)) for p in _sources() if p.stem in taken]
    assert not bad, f"modules named like the packages they sit beside: {bad}"
