"""Shared fixtures that build miniature datasets (generators live in tests/fixtures.py)."""

import os
from pathlib import Path

# One torch thread per test process (and its subprocesses): on two shared cores, competing
# intra-op threads made the end-to-end tests several times slower, and it keeps runs bit-identical.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.fixtures import make_mvtec_folder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """A fresh tiny MVTec-layout dataset root holding category "widget" (8 train, 3 good, 3 defect test)."""
    return make_mvtec_folder(tmp_path / "mvtec")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo dataset, generated once per test session. Treat it as read-only."""
    from datasets.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")
