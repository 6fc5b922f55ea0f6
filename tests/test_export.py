"""export.py and the onnxruntime backend: an exported run scores like the checkpoint it came from.

One tiny run of each script with memory on and off (64 px, 1 epoch) is trained and exported once
for the module. Each export is compared with its checkpoint on images it never saw (another
generated category, normal and defective): maps and scores within PARITY_TOLERANCE of the map
range, and the same decision at both image thresholds (normal and F1).
"""
import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import engine.export as export
import engine.inference as inference
from datasets.images import image_to_tensor, load_rgb
from datasets.images import IMAGENET_MEAN, IMAGENET_STD
from models.anomaly_map import image_scores
from tests.fixtures import make_mvtec_folder, tiny_run_args
from engine.cli import main as train
from engine.onnx_backend import OnnxScorer, sidecar_path
from utils.errors import UserError

# End to end: each test trains through the scripts, runs benchmarks or several processes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# (script's method, run folder, memory.enabled): MemKD-ST, STPM, MemKD-RD, RD4AD.
CASES = [("st", "memkd-st", "true"), ("st", "stpm", "false"), ("rd", "memkd-rd", "true"), ("rd", "rd4ad", "false")]
FOLDERS = [folder for _, folder, _ in CASES]
SIZE = 64
DECISION_THRESHOLDS = ("normal_threshold", "image_f1_threshold")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folder per case (as FOLDERS names them), each trained, evaluated and exported with defaults."""
    base = tmp_path_factory.mktemp("export")
    data_root = make_mvtec_folder(base / "data", "widget", n_train=8, n_good_test=3, n_defect=3, size=SIZE)
    folders = {}
    for method, folder, memory in CASES:
        with contextlib.redirect_stdout(io.StringIO()):
            assert train(method, tiny_run_args(data_root, base / "results", f"memory.enabled={memory}", size=SIZE)) == 0
            run_dir = base / "results" / folder / "mvtec" / "widget"
            assert export.main([f"checkpoint={run_dir / 'best.pt'}"]) == 0
        folders[folder] = run_dir
    return folders


@pytest.fixture(scope="module")
def new_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images no run saw: a generated category of 4 normal and 6 defective images."""
    root = make_mvtec_folder(tmp_path_factory.mktemp("new"), "gadget", n_train=0, n_good_test=4, n_defect=6, size=SIZE)
    return root / "gadget" / "test"


def image_batch(folder: Path, size: int = SIZE) -> torch.Tensor:
    """Every image below ``folder`` (sorted), as predict.py feeds them: [B, 3, size, size]."""
    return torch.stack([image_to_tensor(load_rgb(p), size) for p in sorted(folder.rglob("*.png"))])


def torch_maps(run_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The checkpoint's own maps of ``images`` and its thresholds."""
    model, _, thresholds, _ = inference.load_run(run_dir / "best.pt", {"train.device": "cpu"})
    return model.anomaly_map(images).float(), thresholds


def assert_close(onnx: torch.Tensor, reference: torch.Tensor, map_range: float) -> None:
    """Max abs difference within PARITY_TOLERANCE of the reference maps' range."""
    assert onnx.shape == reference.shape
    difference = float((onnx - reference).abs().max())
    assert difference <= export.PARITY_TOLERANCE * map_range, (difference, map_range)


@pytest.mark.parametrize("folder", FOLDERS)
def test_onnx_maps_scores_and_decisions_equal_the_checkpoints(folder, runs, new_images):
    images = image_batch(new_images)
    expected, thresholds = torch_maps(runs[folder], images)
    scorer = OnnxScorer(runs[folder] / "best.onnx")
    maps, scores = scorer.score(images)
    map_range = float(expected.max() - expected.min())
    assert map_range > 0
    assert_close(maps, expected, map_range)
    assert_close(scores, image_scores(expected), map_range)
    assert torch.equal(scores, image_scores(maps))  # the graph's score is its map's maximum
    assert scorer.thresholds == thresholds
    for key in DECISION_THRESHOLDS:
        assert thresholds[key] is not None, key
        assert torch.equal(scores >= thresholds[key], image_scores(expected) >= thresholds[key]), key
    # The images do test decisions: the F1 threshold calls some of them normal and some anomalous.
    split = image_scores(expected) >= thresholds["image_f1_threshold"]
    assert split.any() and not split.all()


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_batch_axis_is_dynamic(folder, runs, new_images):
    images = image_batch(new_images)[:3]
    expected, _ = torch_maps(runs[folder], images)
    scorer = OnnxScorer(runs[folder] / "best.onnx")
    map_range = float(expected.max() - expected.min())
    one = scorer.anomaly_map(images[:1])
    three = scorer.anomaly_map(images)
    assert one.shape == (1, SIZE, SIZE) and three.shape == (3, SIZE, SIZE)
    assert_close(three, expected, map_range)
    assert_close(one, expected[:1], map_range)


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_json_says_how_to_feed_and_decide(folder, runs):
    metadata = json.loads(sidecar_path(runs[folder] / "best.onnx").read_text())
    results = json.loads((runs[folder] / "results.json").read_text())
    _, config, thresholds, _ = inference.load_run(runs[folder] / "best.pt", {"train.device": "cpu"})
    assert metadata["thresholds"] == thresholds and metadata["config"] == config.flat()
    assert metadata["input"]["image_size"] == metadata["trained_image_size"] == SIZE
    assert metadata["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert metadata["input"]["mean"] == list(IMAGENET_MEAN) and metadata["input"]["std"] == list(IMAGENET_STD)
    assert metadata["name"] == results["method"] and metadata["backbone"] == "resnet18"
    assert metadata["memory_enabled"] is (folder.startswith("memkd"))
    assert set(metadata["versions"]) == {"torch", "torchvision", "onnx", "onnxscript", "onnxruntime"}
    assert metadata["versions"]["onnxruntime"] == onnxruntime.__version__
    graph = onnx.load(runs[folder] / "best.onnx")
    onnx.checker.check_model(graph)
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == metadata["opset"] == export.OPSET
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.graph.input, *graph.graph.output]}
    assert shapes == {"images": ["batch", 3, SIZE, SIZE], "maps": ["batch", SIZE, SIZE], "scores": ["batch"]}
    assert 0 <= metadata["parity"]["relative_difference"] <= export.PARITY_TOLERANCE


def test_another_image_size_and_output_path(runs, new_images, tmp_path, capsys):
    output = tmp_path / "deploy" / "stpm96.onnx"
    assert export.main([f"checkpoint={runs['stpm'] / 'best.pt'}", f"output={output}", "image_size=96"]) == 0
    assert "trained at 64 px" in capsys.readouterr().out
    assert sorted(p.name for p in output.parent.iterdir()) == ["stpm96.json", "stpm96.onnx"]  # no temporary left
    scorer = OnnxScorer(output)
    assert scorer.image_size == 96 and scorer.metadata["trained_image_size"] == SIZE
    images = image_batch(new_images, size=96)[:2]
    expected, _ = torch_maps(runs["stpm"], images)
    assert expected.shape == (2, 96, 96)
    assert_close(scorer.anomaly_map(images), expected, float(expected.max() - expected.min()))


def test_the_scorer_needs_no_checkpoint_models_or_torchvision(runs, tmp_path):
    alone = tmp_path / "deploy"
    alone.mkdir()
    for name in ("best.onnx", "best.json"):
        shutil.copy(runs["memkd-rd"] / name, alone / name)
    code = ("import sys, torch; from pathlib import Path; from engine.onnx_backend import OnnxScorer; "
            f"s = OnnxScorer(Path({str(alone / 'best.onnx')!r})); "
            "m = s.anomaly_map(torch.zeros(2, 3, s.image_size, s.image_size)); "
            # models.registry is a list of names (the config's allowed values); no network code.
            "loaded = [n for n in sys.modules if n.split('.')[0] == 'torchvision' "
            "or n.startswith('models.') and n != 'models.registry']; "
            "print(tuple(m.shape), loaded)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"(2, {SIZE}, {SIZE}) []"


def read_scores(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("folder", FOLDERS)
def test_predict_with_onnx_decides_like_predict_with_torch(folder, runs, new_images, tmp_path):
    # The graph and its JSON alone, away from best.pt, as a deployment would have them.
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    for name in ("best.onnx", "best.json"):
        shutil.copy(runs[folder] / name, deployed / name)
    common = [f"input={new_images}", "threshold=f1", "train.device=cpu"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert inference.main([f"checkpoint={runs[folder] / 'best.pt'}", *common, f"output={tmp_path / 'torch'}"]) == 0
        assert inference.main(["backend=onnx", f"model={deployed / 'best.onnx'}", *common,
                             f"output={tmp_path / 'onnx'}"]) == 0
    by_torch, by_onnx = read_scores(tmp_path / "torch" / "scores.csv"), read_scores(tmp_path / "onnx" / "scores.csv")
    assert sorted(by_onnx) == sorted(by_torch) and len(by_torch) == 10
    scores = [float(row["score"]) for row in by_torch.values()]
    tolerance = export.PARITY_TOLERANCE * (max(scores) - min(scores)) + 1e-6 * max(map(abs, scores))  # + csv rounding
    for path, row in by_torch.items():
        assert by_onnx[path]["decision"] == row["decision"], path
        assert by_onnx[path]["threshold"] == row["threshold"], path
        assert abs(float(by_onnx[path]["score"]) - float(row["score"])) <= tolerance, path
        stem = Path(path).relative_to(new_images).with_suffix("")
        assert (tmp_path / "onnx" / f"{stem}_overlay.png").is_file() and (tmp_path / "onnx" / f"{stem}_mask.png").is_file()
    assert {row["decision"] for row in by_torch.values()} == {"normal", "anomalous"}


# --------------------------------------------------------------------------- bad input


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


@pytest.mark.parametrize("args, says", [
    (["image_size=96"], "give checkpoint=..."),
    (["checkpoint={best}", "colour=red"], "unknown argument 'colour'"),
    (["checkpoint={best}", "image_size=50"], "image_size is 50 but must be a multiple of 32 from 64 to 1024"),
    (["checkpoint={best}", "image_size=big"], "image_size must be an integer, got str 'big'"),
    (["checkpoint={best}", "output={tmp}/model.pt"], "must be an .onnx file"),
    (["checkpoint={best}", "output={tmp}/a_file/model.onnx"], "cannot create output folder"),
    (["checkpoint={tmp}/nowhere/best.pt"], "no checkpoint at"),
])
def test_export_refuses_bad_input_in_one_line(args, says, runs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("a file where a folder is asked for")
    argv = [a.format(best=runs["stpm"] / "best.pt", tmp=tmp_path) for a in args]
    assert export.main(argv) == 2
    assert says in one_line_error(capsys)
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.tmp"))


def test_export_missing_checkpoint_exits_with_code_2_without_traceback(tmp_path):
    missing = tmp_path / "nowhere" / "best.pt"
    result = subprocess.run([sys.executable, "export.py", f"checkpoint={missing}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith("error: ") and str(missing) in error and "\n" not in error


@pytest.mark.parametrize("args, says", [
    (["backend=onnx"], "give model=..."),
    (["backend=tflite", "model={onnx}"], "backend is 'tflite'; choose one of torch, onnx"),
    (["model={onnx}"], "model= is read with backend=onnx"),
    (["backend=onnx", "model={onnx}", "checkpoint={best}"], "checkpoint= is not read with backend=onnx"),
    (["backend=onnx", "model={tmp}/nowhere.onnx"], "no ONNX model at"),
    (["backend=onnx", "model={tmp}/lonely.onnx"], "no lonely.json beside"),
    (["backend=onnx", "model={tmp}/broken.onnx"], "onnxruntime cannot load"),
    (["backend=onnx", "model={tmp}/paired.onnx"], "paired.json is not the JSON of"),
    (["backend=onnx", "model={onnx}", "train.device=cuda"], "backend=onnx scores on the CPU"),
])
def test_predict_onnx_refuses_bad_input_in_one_line(args, says, runs, new_images, tmp_path, capsys):
    shutil.copy(runs["stpm"] / "best.onnx", tmp_path / "lonely.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx graph")
    shutil.copy(runs["stpm"] / "best.json", tmp_path / "broken.json")
    shutil.copy(runs["stpm"] / "best.onnx", tmp_path / "paired.onnx")  # with the JSON of another run's export
    shutil.copy(runs["rd4ad"] / "best.json", tmp_path / "paired.json")
    argv = [a.format(onnx=runs["stpm"] / "best.onnx", best=runs["stpm"] / "best.pt", tmp=tmp_path) for a in args]
    assert inference.main([*argv, f"input={new_images}", f"output={tmp_path / 'out'}"]) == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_predict_onnx_without_model_exits_with_code_2_without_traceback(new_images):
    result = subprocess.run([sys.executable, "predict.py", "backend=onnx", f"input={new_images}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith("error: ") and "model=" in error and "\n" not in error


def test_an_export_never_replaces_a_run_record(runs, tmp_path, capsys):
    record = runs["stpm"] / "results.json"
    before = record.read_bytes()
    assert export.main([f"checkpoint={runs['stpm'] / 'best.pt'}", f"output={runs['stpm'] / 'results.onnx'}"]) == 2
    assert "which is not the JSON of an export" in one_line_error(capsys)
    assert record.read_bytes() == before and not (runs["stpm"] / "results.onnx").exists()


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["thresholds"].pop("normal_threshold"), "lacks thresholds.normal_threshold"),
    (lambda m: m["input"].update(image_size=128), "was changed after export"),
    (lambda m: m["input"].update(image_size="abc"), "unusable input.image_size"),
    (lambda m: m["input"].update(image_size=0), "unusable input.image_size"),
    (lambda m: m["input"].update(mean="x"), "unusable input.mean"),
    (lambda m: m["input"].update(name="other"), "was changed after export"),
    (lambda m: m["thresholds"].update(normal_threshold=0.0), "was changed after export"),
    (lambda m: m.update(method="xx"), "unusable method"),
], ids=["threshold removed", "size 128", "size abc", "size 0", "mean x", "input name", "threshold edited", "method"])
def test_an_edited_json_is_refused_in_one_line(edit, says, runs, new_images, tmp_path, capsys):
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    shutil.copy(runs["stpm"] / "best.onnx", deployed / "best.onnx")
    metadata = json.loads((runs["stpm"] / "best.json").read_text())
    edit(metadata)
    (deployed / "best.json").write_text(json.dumps(metadata))
    assert inference.main(["backend=onnx", f"model={deployed / 'best.onnx'}", f"input={new_images}",
                           f"output={tmp_path / 'out'}"]) == 2
    assert says in one_line_error(capsys)


def test_a_json_that_cannot_be_written_leaves_no_graph_behind(runs, tmp_path, capsys, monkeypatch):
    import utils.io

    def full_disk(path, data):
        raise UserError(f"cannot write {path} (No space left on device); {Path(path).name} was not written; "
                        "free disk space or set output.dir to a writable folder")

    monkeypatch.setattr(utils.io, "write_json", full_disk)
    output = tmp_path / "deploy" / "brick.onnx"
    assert export.main([f"checkpoint={runs['stpm'] / 'best.pt'}", f"output={output}"]) == 2
    line = one_line_error(capsys)
    assert "No space left on device" in line and "give output= in a writable folder" in line
    assert "output.dir" not in line and not output.exists()


def test_opening_a_graph_switches_onnxruntime_telemetry_off(runs, monkeypatch):
    calls = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(True), raising=False)
    OnnxScorer(runs["stpm"] / "best.onnx")
    assert calls == [True]
