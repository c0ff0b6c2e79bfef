"""README's and docs/'s Python blocks run as written (in a scratch folder)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(doc, tmp_path):
    script = "\n\n".join(python_blocks(doc))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{doc.relative_to(ROOT)}:\n{result.stdout}\n{result.stderr}"
