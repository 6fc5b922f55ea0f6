"""Time the content digest of a category's data: a first run reads every file once, a rerun of
unchanged data costs one ``stat`` per file (engine/records.py, utils/digests.py).

    python benchmarks/data_digest.py --data-root ../shared/data/magnetic_tile --category magnetic_tile

Prints the number of files, their size, and the seconds of the first (empty store) and the
second (store filled) digest; the store lives in a temporary folder, the data is only read.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.build import build_datasets  # noqa: E402
from engine.records import data_digests  # noqa: E402
from utils.digests import FileDigests  # noqa: E402
from utils.errors import run_command  # noqa: E402


def measure(root: str, dataset: str, category: str) -> str:
    splits = build_datasets(dataset, root, category, 64, 0.1, 0)
    samples = [s for split in (splits.train, splits.val, splits.test) for s in split.samples]
    files = [s.image for s in samples] + [s.mask for s in samples if s.mask is not None]
    megabytes = sum(Path(f).stat().st_size for f in files) / 2**20
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "digests.json"
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            cache = FileDigests(store)
            digests = data_digests(splits, root, cache)
            cache.save()
            timings.append(time.perf_counter() - started)
    return (f"{dataset}/{category}: {len(files)} files, {megabytes:.1f} MiB; digest {digests.train}/{digests.test}; "
            f"first run {timings[0]:.2f} s, rerun {timings[1]:.3f} s")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="mvtec", help="data.dataset (default mvtec)")
    parser.add_argument("--category", required=True)
    options = parser.parse_args(argv)
    return run_command([], "", lambda _: measure(options.data_root, options.dataset, options.category))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
