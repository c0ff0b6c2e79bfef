"""The wheel maps kernels/, domains/, pipelines/ to seqlab.kernels etc. and installs no top-level 'kernels'."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("seqlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"seqlab"}, tops
    # every module of every room is in the wheel (a subpackage missing from pyproject's `packages` is left out)
    rooms = {
        "seqlab": ROOT / "seqlab",
        "seqlab/kernels": ROOT / "kernels",
        "seqlab/domains": ROOT / "domains",
        "seqlab/pipelines": ROOT / "pipelines",
    }
    expected = {
        f"{prefix}/{path.relative_to(folder).as_posix()}"
        for prefix, folder in rooms.items()
        for path in folder.rglob("*.py")
    }
    missing = sorted(expected - set(names))
    assert not missing, f"modules missing from the wheel (add their package to pyproject's packages): {missing}"
    assert not any(n.startswith("tests/") for n in names)


def test_installed_import_names():
    import seqlab.domains
    import seqlab.kernels
    import seqlab.pipelines

    assert Path(seqlab.kernels.__file__).parent == ROOT / "kernels" or "site-packages" in seqlab.kernels.__file__
    assert seqlab.domains.__name__ == "seqlab.domains" and seqlab.pipelines.__name__ == "seqlab.pipelines"
