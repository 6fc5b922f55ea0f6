"""Check that two trees of run folders hold the same numbers: for a change that must not move them
(a refactor, a speed path), train the same runs before and after it and compare.

    python benchmarks/compare_runs.py BEFORE_OUTPUT_DIR AFTER_OUTPUT_DIR

For every results.json under BEFORE (matched by its path below it), the same file must exist
under AFTER with every metric, threshold and training fact equal (timings excepted), the same
teacher fingerprint and training-data digest, and a best.pt whose student weights are equal
tensor by tensor. Prints one line per run and exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import UserError, run_command  # noqa: E402

TIMINGS = ("train_seconds", "eval_seconds", "picture_seconds")
IDENTITY = ("teacher_fingerprint", "data_digest", "method", "backbone", "category")


def compared_numbers(results: dict) -> dict:
    """What must be equal: every number of results.json but the timings, and the run's identity."""
    numbers = {k: v for k, v in results.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TIMINGS}
    return {**numbers, **{k: results.get(k) for k in IDENTITY}}


def same_weights(before: Path, after: Path) -> bool:
    import torch

    a = torch.load(before, map_location="cpu", weights_only=True)["student"]
    b = torch.load(after, map_location="cpu", weights_only=True)["student"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def compare(before: Path, after: Path) -> int:
    runs = sorted(before.rglob("results.json"))
    if not runs:
        raise UserError(f"no results.json under {before}; give the output.dir of the runs made before the change")
    differing = 0
    for path in runs:
        name = path.parent.relative_to(before)
        other = after / name / "results.json"
        if not other.is_file():
            print(f"{name}: missing under {after}")
            differing += 1
            continue
        a, b = compared_numbers(json.loads(path.read_text())), compared_numbers(json.loads(other.read_text()))
        changed = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        weights = same_weights(path.parent / "best.pt", other.parent / "best.pt")
        if changed or not weights:
            differing += 1
            print(f"{name}: DIFFERENT {changed if changed else ''}{'' if weights else ' (best.pt weights differ)'}")
        else:
            print(f"{name}: identical ({len(a)} numbers, best.pt weights bit for bit)")
    print(f"{len(runs) - differing} of {len(runs)} runs identical")
    return 1 if differing else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    options = parser.parse_args(argv)
    codes = []
    run_command([], "", lambda _: codes.append(compare(options.before, options.after)))
    return codes[0] if codes else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
