import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parent.parent
PACK = REPO.parent / "shared" / "data" / "cifar10-jpeg.npz"


@pytest.fixture(scope="session")
def cifar10():
    """The real CIFAR-10 (bundled JPEG pack), decoded once per test session."""
    if not PACK.exists():
        pytest.skip(f"real CIFAR-10 pack not found at {PACK}")
    from training.data import load_cifar

    return load_cifar("cifar10")


@pytest.fixture(scope="session")
def bench_module():
    """Loads a script of bench/ (not a package) as a module: ``bench_module("poisoning")``."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
