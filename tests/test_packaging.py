"""The wheel maps kernels/, domains/, pipelines/ to seqlab.kernels etc. and installs no top-level 'kernels'."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("seqlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"seqlab"}, tops
    for needed in ("seqlab/__init__.py", "seqlab/kernels/__init__.py", "seqlab/kernels/scan/ref.py",
                   "seqlab/kernels/scan/chunked.py", "seqlab/kernels/ssd/ref.py", "seqlab/kernels/ssd/chunked.py",
                   "seqlab/kernels/conv1d/ref.py", "seqlab/kernels/conv1d/chunked.py",
                   "seqlab/kernels/scan/triton_ops.py", "seqlab/kernels/scan/chunked_blocks.py",
                   "seqlab/domains/__init__.py",
                   "seqlab/pipelines/__init__.py", "seqlab/mixers/mamba2.py", "seqlab/interop/hf.py"):
        assert needed in names, needed
    assert not any(n.startswith("tests/") for n in names)


def test_installed_import_names():
    import seqlab.domains
    import seqlab.kernels
    import seqlab.pipelines

    assert Path(seqlab.kernels.__file__).parent == ROOT / "kernels" or "site-packages" in seqlab.kernels.__file__
    assert seqlab.domains.__name__ == "seqlab.domains" and seqlab.pipelines.__name__ == "seqlab.pipelines"
