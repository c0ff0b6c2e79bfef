import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (docs/architecture.md: "Ray tests share one local
    cluster")."""
    ray = pytest.importorskip("ray")
    from seqlab.pipelines.ray_cluster import connect

    # quiet: none of Ray's lines, so tests can check that a quiet job prints nothing at all
    started = connect(quiet=True, log_to_driver=False, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
