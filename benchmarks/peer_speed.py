"""Side by side with anomalib: training and test throughput of our scripts and of anomalib's
STFPM / ReverseDistillation on the same images, teacher, layers, image size and batch.

    python benchmarks/peer_speed.py --data-root ../shared/data/magnetic_tile --category magnetic_tile \\
        --teacher-weights ../shared/weights/mobilenet_v2_imagenet1k.pth \\
        --peer-python ../anomalib-venv/bin/python --peer-script ../shared/bench/anomalib_peer.py \\
        [--methods st,rd] [--st-backbone mobilenet_v2] [--rd-backbone resnet18] [--threads 2] [--epochs 3] [--size 256] [--batch 16] [--train-images 160] [--test-images 120] [--rounds 2]

Each round runs, per method, ours without memory (STPM / RD4AD), ours with memory (MemKD) and the
peer, one after the other, so that a machine shared with other jobs slows all of them alike; the
ratios of one round compare runs made minutes apart. ``--train-images`` / ``--test-images`` pick a
seeded subset of the category (symbolic links in a temporary MVTec-layout folder, masks included)
to keep each run short. Neither side has a validation slice.

anomalib's ReverseDistillation has decoders for ResNets only, so RD is compared at ``--rd-backbone``
(resnet18 by default, random teachers on both sides: no ImageNet ResNet weights are available
offline here, and speed does not depend on the weights).

Figures: ours from ``results.json`` (``train_seconds``: every epoch plus the teacher-feature
cache; ``eval_seconds``: anomaly maps and every metric, AUPRO included, no pictures); the peer
from its ``RESULT`` line (``train_seconds``: Lightning's fit; test: its whole test loop, metrics
included). The peer runs in its own virtual environment (see ../shared/bench/anomalib_peer.py);
anomalib is never a dependency of this project.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The peer's names for our methods, and its layers for MobileNetV2 at strides 4, 8, 16 (the
# harness's default for mobilenetv2_100), which are our teacher's stages 3, 6 and 13.
PEER_MODELS = {"st": "stfpm", "rd": "rd"}
PEER_BACKBONES = {"mobilenet_v2": "mobilenetv2_100", "resnet18": "resnet18", "wide_resnet50_2": "wide_resnet50_2"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def make_subset(source: Path, target: Path, train_images: int, test_images: int, seed: int = 0) -> tuple[int, int]:
    """Link a seeded subset of the MVTec-layout category ``source`` into ``target``: ``train_images``
    of train/good and ``test_images`` of the test set (each test folder in proportion, at least one
    image each), with their masks. 0 keeps a split whole. Returns (train, test) image counts."""
    rng = random.Random(seed)

    def pick(files: list[Path], count: int) -> list[Path]:
        return files if count <= 0 or count >= len(files) else sorted(rng.sample(files, count))

    train = pick(_images(source / "train" / "good"), train_images)
    test_folders = sorted(p for p in (source / "test").iterdir() if p.is_dir())
    all_test = {folder.name: _images(folder) for folder in test_folders}
    total = sum(len(files) for files in all_test.values())
    chosen = {name: pick(files, max(1, round(len(files) * test_images / total)) if test_images > 0 else 0)
              for name, files in all_test.items()}
    for path in train:
        _link(path, target / "train" / "good" / path.name)
    for name, files in chosen.items():
        for path in files:
            _link(path, target / "test" / name / path.name)
            mask = source / "ground_truth" / name / f"{path.stem}_mask.png"
            if name != "good" and mask.is_file():
                _link(mask, target / "ground_truth" / name / mask.name)
    return len(train), sum(len(files) for files in chosen.values())


def _link(source: Path, link: Path) -> None:
    # A hard link where the file system allows one, else a copy: anomalib's dataset finds no
    # image behind a symbolic link that points outside its root.
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, link)
    except OSError:
        shutil.copyfile(source, link)


def backbone_of(method: str, args: argparse.Namespace) -> str:
    return args.st_backbone if method == "st" else args.rd_backbone


def pretrained(method: str, args: argparse.Namespace) -> bool:
    """Whether both sides get the MobileNetV2 ImageNet weights: the harness maps them into STFPM only."""
    return bool(args.teacher_weights) and method == "st" and args.st_backbone == "mobilenet_v2"


def run_ours(method: str, memory: bool, args: argparse.Namespace, data_root: Path, out: Path) -> dict[str, float]:
    """One training + evaluation by our script; seconds from its results.json."""
    script = ROOT / f"trainRM_{method.upper()}.py"
    backbone = backbone_of(method, args)
    overrides = [f"data.root={data_root}", f"data.category={args.category}", f"data.image_size={args.size}",
                 "data.val_fraction=0", "data.num_workers=0", f"model.backbone={backbone}",
                 f"memory.enabled={str(memory).lower()}", f"train.epochs={args.epochs}",
                 f"train.batch_size={args.batch}", f"eval.batch_size={args.batch}", "eval.max_pictures=0",
                 "train.device=cpu", "train.resume=false", f"output.dir={out}", *args.ours]
    overrides.append(f"model.teacher_weights={args.teacher_weights}" if pretrained(method, args)
                     else "model.pretrained=false")
    done = subprocess.run([sys.executable, str(script), *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})  # torch's thread count
    if done.returncode != 0:
        sys.exit(f"{script.name} failed:\n{done.stderr[-3000:]}")
    results_path = Path(done.stdout.strip().splitlines()[-1].removeprefix("results: "))
    results = json.loads(results_path.read_text())
    return {"train_s": results["train_seconds"], "test_s": results["eval_seconds"],
            "image_auroc": results["image_auroc"], "pixel_auroc": results["pixel_auroc"]}


def run_peer(method: str, args: argparse.Namespace, data_root: Path, out: Path) -> dict[str, float]:
    """One training + test by anomalib's harness, in its own environment."""
    command = [args.peer_python, args.peer_script, "--model", PEER_MODELS[method],
               "--backbone", PEER_BACKBONES[backbone_of(method, args)], "--image-size", str(args.size),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch), "--eval-batch-size", str(args.batch),
               "--threads", str(args.threads), "--data-root", str(data_root), "--category", args.category,
               "--out-dir", str(out)]
    if pretrained(method, args):
        command += ["--pretrained-mbv2", args.teacher_weights]  # the harness maps it into STFPM's teacher
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"anomalib peer failed:\n{(done.stdout + done.stderr)[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return {"train_s": result["train_seconds"], "test_s": result["test_total_seconds_incl_metrics"],
            "image_auroc": result["image_AUROC"], "pixel_auroc": result["pixel_AUROC"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding <category>/train/good (MVTec layout)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--teacher-weights", default=None, help="MobileNetV2 state_dict; none: random teachers")
    parser.add_argument("--peer-python", required=True, help="python of the virtual environment with anomalib")
    parser.add_argument("--peer-script", required=True, help="the harness, ../shared/bench/anomalib_peer.py")
    parser.add_argument("--methods", default="st,rd")
    parser.add_argument("--st-backbone", default="mobilenet_v2", choices=sorted(PEER_BACKBONES))
    parser.add_argument("--rd-backbone", default="resnet18", choices=("resnet18", "wide_resnet50_2"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of every run, ours and the peer's")
    parser.add_argument("--train-images", type=int, default=160, help="0: the whole train split")
    parser.add_argument("--test-images", type=int, default=120, help="0: the whole test split")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ours", nargs="*", default=[], help="extra key=value overrides for our scripts")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "data"
        n_train, n_test = make_subset(Path(args.data_root) / args.category, data_root / args.category,
                                      args.train_images, args.test_images)
        backbones = ", ".join(f"{m.upper()} {backbone_of(m, args)} ({'ImageNet' if pretrained(m, args) else 'random'} "
                              "teacher)" for m in methods)
        print(f"{args.category}: {n_train} train, {n_test} test images; {backbones}; {args.size} px, batch "
              f"{args.batch}, {args.epochs} epochs, no validation slice, CPU, {args.threads} threads, {args.rounds} "
              "rounds, runs alternating", flush=True)
        rows: dict[str, list[dict[str, float]]] = {}
        for round_index in range(1, args.rounds + 1):
            for method in methods:
                out = Path(tmp) / f"round{round_index}"
                runs = {f"ours {method.upper()} memory off": lambda: run_ours(method, False, args, data_root, out),
                        f"ours {method.upper()} memory on": lambda: run_ours(method, True, args, data_root, out),
                        f"anomalib {PEER_MODELS[method]}": lambda: run_peer(method, args, data_root, out / "peer")}
                for name, run in runs.items():
                    figures = run()
                    figures.update(train_ips=n_train * args.epochs / figures["train_s"],
                                   test_ips=n_test / figures["test_s"])
                    rows.setdefault(name, []).append(figures)
                    print(f"round {round_index}  {name:<28} train {figures['train_ips']:6.2f} img/s  test "
                          f"{figures['test_ips']:6.2f} img/s  I/P-AUROC {100 * figures['image_auroc']:.1f}/"
                          f"{100 * figures['pixel_auroc']:.1f}", flush=True)
    print("\nmedian over rounds; ratio = ours / anomalib in the same rounds")
    print(f"{'run':<30}{'train img/s':>12}{'ratio':>8}{'test img/s':>12}{'ratio':>8}")
    for method in methods:
        peer = rows[f"anomalib {PEER_MODELS[method]}"]
        for name in (f"ours {method.upper()} memory off", f"ours {method.upper()} memory on",
                     f"anomalib {PEER_MODELS[method]}"):
            own = rows[name]
            train_ratio = statistics.median(o["train_ips"] / p["train_ips"] for o, p in zip(own, peer))
            test_ratio = statistics.median(o["test_ips"] / p["test_ips"] for o, p in zip(own, peer))
            print(f"{name:<30}{statistics.median(o['train_ips'] for o in own):>12.2f}{train_ratio:>8.2f}"
                  f"{statistics.median(o['test_ips'] for o in own):>12.2f}{test_ratio:>8.2f}")
        off, on = rows[f"ours {method.upper()} memory off"], rows[f"ours {method.upper()} memory on"]
        step_ratio = statistics.median(a["train_ips"] / b["train_ips"] for a, b in zip(off, on))
        print(f"  memory cost, {method.upper()}: step time with memory / without = {step_ratio:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
