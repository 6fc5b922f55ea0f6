"""Shared fixtures that build miniature datasets (generators live in tests/fixtures.py)."""

from pathlib import Path

import pytest

from tests.fixtures import make_mvtec_folder


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """A fresh tiny MVTec-layout dataset root holding category "widget" (8 train, 3 good, 3 defect test)."""
    return make_mvtec_folder(tmp_path / "mvtec")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo dataset, generated once per test session. Treat it as read-only."""
    from datasets.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")
