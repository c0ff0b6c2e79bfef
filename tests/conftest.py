import os

# Triton's interpreter must be switched on before triton is first imported (docs/architecture.md, "Kernel conventions"):
# on a machine without a GPU the Triton kernels then run on CPU tensors and are checked against the reference.
# On a CUDA machine the real kernels run (set TRITON_INTERPRET=1 yourself to force the interpreter).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Deterministic and quiet on a 2-core machine.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: (test file, fixture) -> xdist group: module fixtures that run a whole `seqlab` command once per session
#: (seqlab.testing.once_per_session). Their tests share one worker; split over two, the second worker sat idle on
#: the file lock for as long as the run took (about 20 s each for the demo and the ladder).
ONE_WORKER_FIXTURES = {("test_demo.py", "demo"): "demo", ("test_ladder.py", "ladder"): "ladder"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers), every test that uses the shared local Ray cluster
    (the `ray_cluster` fixture) goes to one worker, so the suite starts one such cluster, not one per worker, and
    checks of the cluster's free CPUs see only their own jobs. Tests that start a Ray of their own (the demo, the
    CLI walkthrough, `--address`) run on either worker. The tests of ONE_WORKER_FIXTURES go to one worker each."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "ray_cluster" in names:
            item.add_marker(pytest.mark.xdist_group("ray"))
        for (file, fixture), group in ONE_WORKER_FIXTURES.items():
            if item.path.name == file and fixture in names:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def stubbed(monkeypatch):
    """Every ``seqlab`` command's handler records its parsed arguments (returned list) instead of running."""
    from seqlab import cli
    from seqlab.testing import walk_parsers

    seen = []
    build = cli.build_parser

    def stub(args):
        seen.append(args)
        return 0

    def build_stubbed(commands=None):
        parser, parsers = build(commands)
        for name, p in parsers.items():
            for _, q in walk_parsers(p, (name,)):
                if q.get_default("func") is not None:
                    q.set_defaults(func=stub)
        return parser, parsers

    monkeypatch.setattr(cli, "build_parser", build_stubbed)
    return seen
