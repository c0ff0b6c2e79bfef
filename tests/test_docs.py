"""Every fenced block of README.md and docs/**/*.md is run or checked, by its tag; none is left behind.

- ``python``/``py``: a doc's Python blocks, in order, run as one script in a scratch folder (a later block uses
  what an earlier one defined). Each block keeps its line numbers: a traceback's line is the doc's line.
- ``bash``/``sh``/``shell``/``console``: a doc's shell blocks, in order, run as one ``bash -e -o pipefail`` script
  in the same scratch folder, after its Python script (a walkthrough uses files the Python example wrote), with
  this environment's ``bin`` first on the PATH. Both run with ``OMP_NUM_THREADS=1`` (two pytest workers share two
  cores) in a process session of their own, killed whole after a timeout. A ``console`` block runs its ``$ ``
  lines; the others are output.
- ``toml``: parsed; a ``--config`` file of the ``seqlab`` command (its first line ``# NAME.toml`` and the doc
  says ``--config NAME.toml``) is also read by ``seqlab --config NAME.toml COMMAND [ACTION] --help`` for each
  of its tables, which refuses an unknown key or a value its flag would refuse.
- ``text``: shown output or a layout; nothing is checked but the tag.
- An untagged fence, an unknown tag or an unclosed fence fails with the file and line.

A block that cannot run here (it needs a GPU, a remote Ray cluster or the network) says so on the line before its
fence: ``<!-- docs-test: skip: REASON -->``; the reason is required, the skips are listed by
``test_skipped_blocks_are_few`` (``pytest -rP``) and there may be at most ``MAX_SKIPS`` of them.

Three tiny tables below name what another test runs instead of this one, and what that test must contain.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BIN = Path(sys.executable).parent

PYTHON, SHELL, CONSOLE, TOML, TEXT = "python", "shell", "console", "toml", "text"
KINDS = {
    "python": PYTHON,
    "py": PYTHON,
    "bash": SHELL,
    "sh": SHELL,
    "shell": SHELL,
    "console": CONSOLE,
    "toml": TOML,
    "text": TEXT,
}

#: the most blocks that may be skipped (each names its reason in the doc); raising it is a deliberate edit
MAX_SKIPS = 6

#: shell commands that cannot run inside a test, and the file that runs or defines the same work instead, with a
#: string that file must contain
COMMANDS_RUN_ELSEWHERE = {
    "make demo": ("tests/test_demo.py", '"demo", "--quick"'),  # `seqlab demo --quick`, every output checked
    "make test": ("Makefile", "\ntest: $(STAMP)\n\t$(BIN)/$(PYTEST)"),  # the suite this test is part of
    ".venv/bin/python examples/train_bytes.py": ("tests/test_examples.py", '"train_bytes.py"'),  # 3 steps
    # 3 seeds x 2 models x 2 corpora, 1000 steps: 17 min on 2 shared cores; the test runs --quick (24 steps)
    ".venv/bin/python examples/moe_bytes.py": ("tests/test_examples.py", '"moe_bytes.py"'),
}
#: docs whose shell blocks (all ```bash) another test runs as written and checks the output of
SHELL_RUN_ELSEWHERE = {"docs/cli.md": ("tests/test_cli_walkthrough.py", '"docs" / "cli.md"')}
#: Python blocks (a doc, a string in the block) another test runs; here only their imports run
PYTHON_RUN_ELSEWHERE = {
    # Ray Train with 2 workers, about 70 s on 2 cores: that test makes the same call and checks what it returns
    ("docs/training.md", "train_data_parallel("): ("tests/test_pipelines/test_ray_train.py", "num_workers=2"),
}


@dataclass
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    tag: str
    code: str
    skip: str | None = None

    @property
    def kind(self) -> str | None:
        return KINDS.get(self.tag)

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test\b:?(.*?)-->\s*$")  # a line that is only such a comment
SKIP = re.compile(r"^\s*skip:\s*(\S.*?)\s*$")


def parse(text: str, doc: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown text, and its problems (``doc:line: what``)."""
    lines = text.splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if DIRECTIVE.match(lines[i]):
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                if not FENCE.match(nxt):
                    problems.append(f"{doc}:{i + 1}: a docs-test comment must be on the line just before a fence")
            i += 1
            continue
        indent, fence, info = m.groups()
        tag = info.strip().split()[0] if info.strip() else ""
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if j == len(lines):
            problems.append(f"{doc}:{i + 1}: fence never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : j]]
        block = Block(doc, i + 1, tag, "\n".join(body) + "\n")
        directive = DIRECTIVE.match(lines[i - 1]) if i > 0 else None
        if directive:
            skip = SKIP.match(directive.group(1))
            if skip is None:
                problems.append(
                    f"{doc}:{i}: expected '<!-- docs-test: skip: REASON -->' (a reason is required), "
                    f"got {directive.group(0)!r}"
                )
            else:
                block.skip = skip.group(1)
        if not tag:
            problems.append(f"{doc}:{i + 1}: untagged fence: tag it ({', '.join(KINDS)})")
        elif block.kind is None:
            problems.append(f"{doc}:{i + 1}: unknown fence tag {tag!r}: use one of {', '.join(KINDS)}")
        blocks.append(block)
        i = j + 1
    return blocks, problems


def doc_blocks(path: Path) -> list[Block]:
    return parse(path.read_text(), str(path.relative_to(ROOT)))[0]


BLOCKS = {str(d.relative_to(ROOT)): doc_blocks(d) for d in DOCS}


def covered_python(block: Block) -> tuple[str, str] | None:
    return next(
        (by for (doc, marker), by in PYTHON_RUN_ELSEWHERE.items() if doc == block.doc and marker in block.code), None
    )


def python_script(blocks: list[Block]) -> str:
    """The doc's Python blocks at their own line numbers (blank lines between them). A block another test runs
    contributes its import statements only."""
    lines: list[str] = []
    for block in blocks:
        code = block.code
        if covered_python(block):
            tree = ast.parse(code)
            kept = {
                n
                for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in range(node.lineno, node.end_lineno + 1)
            }
            code = "\n".join(line if n in kept else "" for n, line in enumerate(code.splitlines(), 1))
        lines += [""] * (block.line - len(lines))
        lines += code.splitlines()
    return "\n".join(lines) + "\n"


def shell_lines(block: Block) -> list[str]:
    """The block's lines as a script (same count: output lines of a console block become blank)."""
    lines = block.code.splitlines()
    if block.kind == CONSOLE:
        out, going_on = [], False
        for line in lines:
            command = line.startswith("$ ") or going_on
            out.append((line[2:] if line.startswith("$ ") else line) if command else "")
            going_on = command and line.rstrip().endswith("\\")
        lines = out
    result = []
    for line in lines:
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command in COMMANDS_RUN_ELSEWHERE:
            line = f": run by {COMMANDS_RUN_ELSEWHERE[command][0]}: {command}"
        result.append(line)
    return result


def shell_script(blocks: list[Block], doc: str) -> str:
    # line 1 only: every block's first line comes after its fence's line, so the doc's line numbers hold
    lines = [f"trap 'echo \"docs-test: {doc} line $LINENO failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    for block in blocks:
        lines += [""] * (block.line - len(lines))
        lines += shell_lines(block)
    return "\n".join(lines) + "\n"


def runnable(doc: str, kind: str) -> list[Block]:
    kinds = {PYTHON} if kind == PYTHON else {SHELL, CONSOLE}
    blocks = [b for b in BLOCKS[doc] if b.kind in kinds and not b.skip]
    if kind != PYTHON and doc in SHELL_RUN_ELSEWHERE:
        return []
    return blocks


def run(argv: list[str], cwd: Path, what: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in a session of its own, so that a timeout kills what it started too (Ray's processes)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} took more than {timeout} s (killed)\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")
    with contextlib.suppress(ProcessLookupError):  # whatever it left running in its session
        os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# --- the tags, the skips and the tables -------------------------------------------------------------------------


def test_every_fence_has_a_known_tag():
    problems = [p for d in DOCS for p in parse(d.read_text(), str(d.relative_to(ROOT)))[1]]
    assert not problems, "\n".join(problems)


def test_skipped_blocks_are_few():
    skips = [b for blocks in BLOCKS.values() for b in blocks if b.skip]
    print("\n".join(f"skipped {b.where()} ({b.tag}): {b.skip}" for b in skips))
    assert len(skips) <= MAX_SKIPS, "\n".join(f"{b.where()}: {b.skip}" for b in skips)


def test_checks_catch_what_they_should():
    """The parser is not vacuous: it finds what this test must refuse."""
    text = (
        "a `<!-- docs-test: skip: R -->` in prose\n```\nx\n```\n```pyhton\nx\n```\n<!-- docs-test: skip: -->\n"
        "```python\nx\n```\n"
        "<!-- docs-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n<!-- docs-test: skip: x -->\n\n```text\n"
    )
    blocks, problems = parse(text, "t.md")
    assert [b.tag for b in blocks] == ["", "pyhton", "python", "bash", "text"]
    assert [b.skip for b in blocks] == [None, None, None, "needs a GPU", None]
    assert [p.split(": ", 1)[0] for p in problems] == ["t.md:2", "t.md:5", "t.md:8", "t.md:16", "t.md:18"]
    console = Block("t.md", 1, "console", "$ seqlab describe s.zarr \\\n    --quiet\nnotes 9000\n$ make demo\n")
    assert shell_lines(console) == [
        "seqlab describe s.zarr \\",
        "    --quiet",
        "",
        ": run by tests/test_demo.py: make demo",
    ]


def test_commands_run_elsewhere_are_run_there():
    for table in (COMMANDS_RUN_ELSEWHERE, SHELL_RUN_ELSEWHERE, PYTHON_RUN_ELSEWHERE):
        for key, (path, marker) in table.items():
            assert marker in (ROOT / path).read_text(), f"{key}: {path} does not contain {marker!r}"
    for doc in SHELL_RUN_ELSEWHERE:  # the walkthrough test reads ```bash blocks
        assert {b.tag for b in BLOCKS[doc] if b.kind in (SHELL, CONSOLE)} <= {"bash"}, doc
    used = {
        c
        for blocks in BLOCKS.values()
        for b in blocks
        if b.kind in (SHELL, CONSOLE)
        for c in COMMANDS_RUN_ELSEWHERE
        if c in b.code
    }
    assert used == set(COMMANDS_RUN_ELSEWHERE), "an entry no doc uses any more"
    found = {
        (b.doc, m)
        for blocks in BLOCKS.values()
        for b in blocks
        if b.kind == PYTHON
        for (d, m) in PYTHON_RUN_ELSEWHERE
        if d == b.doc and m in b.code
    }
    assert found == set(PYTHON_RUN_ELSEWHERE), "an entry no doc uses any more"


# --- running them -----------------------------------------------------------------------------------------------


RUNNABLE = [d for d in BLOCKS if runnable(d, PYTHON) or runnable(d, SHELL)]


@pytest.mark.parametrize("doc", RUNNABLE)
def test_doc_blocks_run(doc, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    name = doc.replace("/", "_")
    if blocks := runnable(doc, PYTHON):
        script = tmp_path / f"{name}.py"  # tracebacks name the doc, at its line numbers
        script.write_text(python_script(blocks))
        result = run([sys.executable, str(script)], work, f"{doc}: its Python blocks")
        assert result.returncode == 0, f"{doc} (Python blocks):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    if blocks := runnable(doc, SHELL):
        script = tmp_path / f"{name}.sh"
        script.write_text(shell_script(blocks, doc))
        result = run(["bash", "-e", "-o", "pipefail", str(script)], work, f"{doc}: its shell blocks")
        assert result.returncode == 0, f"{doc} (shell blocks):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


TOML_DOCS = [d for d, blocks in BLOCKS.items() if any(b.kind == TOML and not b.skip for b in blocks)]


def toml_module():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: what the CLI reads TOML with there
        tomllib = pytest.importorskip("tomli")
    return tomllib


def check_config(path: Path) -> list[str]:
    """What ``seqlab --config PATH COMMAND [ACTION] --help`` says is wrong with each table of the file."""
    from seqlab.cli import main

    tomllib = toml_module()

    problems = []
    for command, table in tomllib.loads(path.read_text()).items():
        if not isinstance(table, dict):
            continue  # a top-level key: read with each command's table
        actions = [[a] for a, sub in table.items() if isinstance(sub, dict)] or [[]]
        for action in actions:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(["--config", str(path), command, *action, "--help"])
                except SystemExit as exc:  # --help
                    code = exc.code
            if code != 0 or err.getvalue():
                problems.append(f"[{'.'.join([command, *action])}]: exit {code}: {err.getvalue().strip()}")
    return problems


@pytest.mark.parametrize("doc", TOML_DOCS)
def test_toml_blocks_parse_and_configs_fit_their_commands(doc, tmp_path):
    tomllib = toml_module()
    text = (ROOT / doc).read_text()
    for block in (b for b in BLOCKS[doc] if b.kind == TOML and not b.skip):
        try:
            tomllib.loads(block.code)
        except tomllib.TOMLDecodeError as exc:
            pytest.fail(f"{block.where()}: not TOML: {exc}")
        name = re.match(r"#\s*(\S+\.toml)\s*$", block.code.splitlines()[0])
        if name and f"--config {name.group(1)}" in text:
            path = tmp_path / name.group(1)
            path.write_text(block.code)
            problems = check_config(path)
            assert not problems, f"{block.where()}: seqlab refuses {name.group(1)}:\n" + "\n".join(problems)


def test_config_check_refuses_a_bad_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[bench]\nno-such-setting = 1\n")
    assert check_config(path) and "no-such-setting" in check_config(path)[0]
    path.write_text("[bench]\nthreads = 1\n")
    assert check_config(path) == []
