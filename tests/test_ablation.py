"""benchmarks/study/, memory_ablation.py and memory_study.py: paired statistics, planning, resuming."""
import csv
import io
import math
from argparse import Namespace

import numpy as np
import pytest
from scipy import stats

from benchmarks import memory_ablation, memory_study
from benchmarks.study import cells, cli, launcher
from engine.report import mean_row
from benchmarks.study.cells import DEFAULT, MEMORY_OFF, Cell, CellResult, DatasetSpec, Variant
from benchmarks.study.statistics import METRICS, compare, paired_difference
from benchmarks.study.tables import format_csv, format_markdown
from tests.fixtures import make_mvtec_folder
from engine.config import SCHEMA
from utils.errors import UserError

# --------------------------------------------------------------------------- statistics


def test_paired_difference_matches_a_hand_computed_t_interval():
    variant = [0.91, 0.88, 0.95, 0.90]
    reference = [0.89, 0.88, 0.91, 0.92]
    d = np.array(variant) - np.array(reference)
    half = stats.t.ppf(0.975, df=3) * d.std(ddof=1) / math.sqrt(4)
    result = paired_difference(variant, reference)
    assert result.n == 4
    assert result.mean == pytest.approx(d.mean())
    assert (result.low, result.high) == pytest.approx((d.mean() - half, d.mean() + half))
    # The same interval as scipy's paired t-test, computed independently.
    interval = stats.ttest_rel(variant, reference).confidence_interval(0.95)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high))


def test_paired_difference_with_one_pair_has_no_interval_and_identical_differences_a_zero_width_one():
    single = paired_difference([0.8], [0.75])
    assert single.n == 1 and single.mean == pytest.approx(0.05) and math.isnan(single.low) and math.isnan(single.high)
    constant = paired_difference([0.8, 0.7, 0.6], [0.7, 0.6, 0.5])
    assert (constant.low, constant.mean, constant.high) == pytest.approx((0.1, 0.1, 0.1))
    assert math.isnan(paired_difference([], []).mean)
    with pytest.raises(ValueError):
        paired_difference([0.1, 0.2], [0.1])


def test_category_mean_ignores_undefined_metrics():
    results = [{"image_auroc": 0.8, "pixel_auroc": 0.9, "pixel_aupro": None},
               {"image_auroc": 0.6, "pixel_auroc": float("nan"), "pixel_aupro": 0.5}]
    mean = mean_row(results, METRICS)
    assert mean.pop("category") == "mean"
    assert mean == pytest.approx({"image_auroc": 0.7, "pixel_auroc": 0.9, "pixel_aupro": 0.5})


DEMO = DatasetSpec("demo", ())
ON = Variant("memory on")


def synthetic_cells() -> dict:
    """Three seeds of memory off/on; seed 2's baseline has no AUPRO (undefined there)."""
    values = {  # seed -> (off, on) as (image, pixel, aupro)
        0: ((0.80, 0.90, 0.60), (0.84, 0.91, 0.62)),
        1: ((0.78, 0.88, 0.58), (0.79, 0.90, 0.61)),
        2: ((0.82, 0.89, None), (0.85, 0.92, 0.66)),
    }
    done = {}
    for seed, sides in values.items():
        for variant, (image, pixel, aupro) in zip((MEMORY_OFF, ON), sides):
            metrics = {"image_auroc": image, "pixel_auroc": pixel, "pixel_aupro": aupro}
            done[Cell(DEMO, "st", variant, seed)] = CellResult([{**metrics, "category": "brick"}], metrics, False)
    return done


def test_compare_pairs_values_by_seed_and_leaves_out_seeds_without_a_value():
    rows = {r["metric"]: r for r in compare(synthetic_cells(), DEMO, "st", MEMORY_OFF, ON, [0, 1, 2])}
    image = rows["image_auroc"]
    off, on = np.array([0.80, 0.78, 0.82]), np.array([0.84, 0.79, 0.85])
    assert image["n"] == 3 and image["seeds"] == "0 1 2"
    assert (image["reference_mean"], image["reference_std"]) == pytest.approx((off.mean(), off.std(ddof=1)))
    assert (image["variant_mean"], image["variant_std"]) == pytest.approx((on.mean(), on.std(ddof=1)))
    expected = paired_difference(list(on), list(off))
    assert (image["difference"], image["low"], image["high"]) == pytest.approx((expected.mean, expected.low,
                                                                                expected.high))
    aupro = rows["pixel_aupro"]
    assert aupro["n"] == 2 and aupro["seeds"] == "0 1"  # seed 2 has no baseline AUPRO to pair with
    assert aupro["difference"] == pytest.approx(np.mean([0.02, 0.03]))
    assert aupro["variant_mean"] == pytest.approx(np.mean([0.62, 0.61, 0.66]))  # every seed with a value
    assert image["label"] == "demo ST: memory on - memory off"


def test_tables_show_mean_std_and_the_interval_in_percent_and_csv_keeps_fractions():
    rows = compare(synthetic_cells(), DEMO, "st", MEMORY_OFF, ON, [0, 1, 2])
    markdown = format_markdown(rows, ["demo ST: resnet18, 128 px"])
    image = next(r for r in rows if r["metric"] == "image_auroc")
    lines = markdown.splitlines()
    assert lines[0] == "- demo ST: resnet18, 128 px"
    assert f"| demo | ST | memory off | {100 * image['reference_mean']:.1f} ± {100 * image['reference_std']:.1f} |" \
        in markdown
    difference_line = next(line for line in lines if "memory on − memory off, 95% CI" in line)
    assert f"{100 * image['difference']:+.1f} [{100 * image['low']:+.1f}, {100 * image['high']:+.1f}]" \
        in difference_line
    assert difference_line.endswith("| 0 1 2 |")
    parsed = list(csv.DictReader(io.StringIO(format_csv(rows))))
    assert [r["metric"] for r in parsed] == ["image_auroc", "pixel_auroc", "pixel_aupro"]
    assert float(parsed[0]["low"]) == pytest.approx(image["low"], abs=1e-6)


# --------------------------------------------------------------------------- options and planning


@pytest.mark.parametrize("call, message", [
    (lambda tmp: cells.parse_seeds("0,a"), "--seeds"),
    (lambda tmp: cells.parse_seeds("1,1"), "distinct"),
    (lambda tmp: cells.parse_students("st,cnn"), "--students"),
    (lambda tmp: cells.named_datasets(["magnetic_tile"], shared=tmp), "magnetic_tile needs"),
    (lambda tmp: cells.named_datasets(["mvtec"], shared=tmp), "unknown dataset 'mvtec'"),
    (lambda tmp: cells.custom_dataset(tmp / "absent", "mvtec", "all"), "not a folder"),
    (lambda tmp: cells.common_arguments(["train.seed=3"], None, memory_ablation.RESERVED), "--seeds"),
    (lambda tmp: cells.common_arguments(["memory.enabled=false"], None, memory_study.RESERVED), "memory.enabled"),
    (lambda tmp: cells.common_arguments(["train.epochs=3"], 2, {}), "--epochs"),
    (lambda tmp: cli.datasets_from(Namespace(data_root=str(tmp), datasets="demo", shared=tmp), "demo"), "not both"),
    (lambda tmp: memory_study.chosen_settings("memory.slot", SCHEMA), "unknown setting 'memory.slot'"),
    (lambda tmp: memory_study.chosen_settings("memory.slots", {}), "no config key memory.slots"),
])
def test_bad_options_are_one_line_errors(call, message, tmp_path):
    with pytest.raises(UserError, match=message) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)


def test_the_magnetic_tile_preset_points_at_the_shared_folder(tmp_path):
    (tmp_path / "data" / "magnetic_tile").mkdir(parents=True)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mobilenet_v2_imagenet1k.pth").write_bytes(b"")
    spec, = cells.named_datasets(["magnetic_tile"], shared=tmp_path)
    assert f"data.root={tmp_path / 'data' / 'magnetic_tile'}" in spec.args
    assert "model.backbone=mobilenet_v2" in spec.args and "data.image_size=128" in spec.args


def test_a_variants_override_wins_over_the_shared_ones_and_names_its_folder(tmp_path):
    variant = memory_study.variant_for("memory.temperature", 0.1)
    cell = Cell(DEMO, "st", variant, 4)
    args = cell.arguments(tmp_path, ["memory.temperature=0.5", "train.epochs=2"])
    assert args[-3:] == ["memory.temperature=0.1", "train.seed=4", f"output.dir={cell.output_dir(tmp_path)}"]
    assert cell.output_dir(tmp_path) == tmp_path / "runs" / "demo" / "st" / "memory.temperature=0.1" / "seed4"
    # The study's memory-off variant is the ablation's: same folder, so the runs are shared.
    assert memory_study.variant_for("memory.enabled", False) == MEMORY_OFF
    assert DEFAULT.folder == memory_ablation.MEMORY_ON.folder == "default"
    assert Variant("x", ("memory.stages=[bottleneck, 3, 2]",)).folder == "memory.stages=bottleneck-3-2"
    assert memory_study.value_text(["bottleneck", 3, 2]) == "[bottleneck, 3, 2]"


def test_the_study_leaves_out_a_value_equal_to_the_default_and_keys_the_config_lacks(tmp_path):
    keys, notes = memory_study.chosen_settings(None, {k: v for k, v in SCHEMA.items() if k != "memory.fusion"})
    assert "memory.fusion" not in keys and any("memory.fusion" in note for note in notes)
    dataset = cells.custom_dataset(make_mvtec_folder(tmp_path / "data"), "mvtec", "widget")
    variants, notes = memory_study.plan([dataset], ["st", "rd"], ["loss.lambda2", "memory.slots"], tmp_path,
                                        ["loss.lambda2=1.0"])
    assert [v.name for v in variants[("widget", "st")]] == ["loss.lambda2=0.0", "memory.slots=10", "memory.slots=200"]
    assert notes == ["widget ST: loss.lambda2=1.0 is the default, left out",
                     "widget RD: loss.lambda2=1.0 is the default, left out"]


@pytest.mark.skipif("memory.stages" not in SCHEMA, reason="this version has no memory.stages key")
def test_every_stage_variant_is_a_valid_config_for_its_student(tmp_path):
    from engine.config import load_config

    for student in ("st", "rd"):
        for value in memory_study.SETTINGS["memory.stages"][student]:
            variant = memory_study.variant_for("memory.stages", value)
            config = load_config(student, Cell(DEMO, student, variant, 0).arguments(tmp_path, []))
            assert list(config.memory.stages) == value


# --------------------------------------------------------------------------- end to end, resuming


TINY = ["data.image_size=64", "data.num_workers=0", "data.val_fraction=0.25", "model.backbone=resnet18",
        "model.pretrained=false", "train.batch_size=4", "eval.batch_size=4", "memory.exemplars=2",
        "train.device=cpu", "eval.max_pictures=0"]


@pytest.mark.slow
def test_the_ablation_trains_each_cell_once_and_a_second_invocation_trains_nothing(tmp_path, monkeypatch):
    from engine.cli import main as script_main

    root = make_mvtec_folder(tmp_path / "data")
    out = tmp_path / "study"
    argv = ["--data-root", str(root), "--category", "widget", "--seeds", "0", "--students", "st", "--epochs", "1",
            "--out", str(out), *TINY]
    launched = []

    def in_process(student, args):  # the scripts' own entry point, without a new interpreter per run
        launched.append(args)
        return script_main(student, args)

    monkeypatch.setattr(launcher, "launch", in_process)
    assert memory_ablation.main(argv) == 0
    assert len(launched) == 2 and any("memory.enabled=false" in args for args in launched)
    table = (out / "ablation.csv").read_text()
    assert "memory on - memory off" in table and "widget" in table
    assert "| widget | ST | memory on − memory off, 95% CI |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 0
    assert (out / "runs" / "widget" / "st" / "default" / "seed0" / "memkd-st" / "mvtec" / "widget"
            / "results.json").is_file()

    launched.clear()
    assert memory_ablation.main(argv) == 0
    assert launched == []  # both runs finished earlier: nothing is trained again
    assert (out / "ablation.csv").read_text() == table

    # Other shared settings under the same --out are refused before anything runs.
    changed = [a if a != "1" else "2" for a in argv]
    assert memory_ablation.main(changed) == 2
    assert launched == []


@pytest.mark.slow
def test_a_failing_run_stops_the_study_with_its_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "launch", lambda student, args: 2)
    root = make_mvtec_folder(tmp_path / "data")
    code = memory_ablation.main(["--data-root", str(root), "--category", "widget", "--seeds", "0", "--students", "rd",
                                 "--epochs", "1", "--out", str(tmp_path / "out"), *TINY])
    assert code == 2
    assert "widget RD memory off, seed 0 failed with exit code 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- several runs at once


@pytest.mark.slow
def test_jobs_two_trains_two_runs_at_once_and_the_tables_match_one_at_a_time(tmp_path, monkeypatch):
    import threading

    from engine.cli import main as script_main

    root = make_mvtec_folder(tmp_path / "data")
    both_started = threading.Barrier(2, timeout=60)  # broken (an error) unless two runs are launched together
    one_training = threading.Lock()  # the scripts share torch's global state in-process: train one at a time
    logs = []

    def in_process(student, args, log=None, threads=None):
        logs.append((log, threads))
        both_started.wait()
        with one_training:
            return script_main(student, args)

    monkeypatch.setattr(launcher, "launch", in_process)
    argv = ["--data-root", str(root), "--category", "widget", "--seeds", "0", "--students", "st", "--epochs", "1", *TINY]
    assert memory_ablation.main([*argv, "--jobs", "2", "--out", str(tmp_path / "parallel")]) == 0
    assert len(logs) == 2 and all(threads >= 1 for _, threads in logs)
    assert sorted(str(log.relative_to(tmp_path / "parallel")) for log, _ in logs) == [
        "runs/widget/st/default/seed0/train.log", "runs/widget/st/memory.enabled=false/seed0/train.log"]

    monkeypatch.setattr(launcher, "launch", lambda student, args: script_main(student, args))
    assert memory_ablation.main([*argv, "--out", str(tmp_path / "serial")]) == 0
    assert ((tmp_path / "parallel" / "ablation.csv").read_text()
            == (tmp_path / "serial" / "ablation.csv").read_text())  # the same runs, so the same table


@pytest.mark.slow
def test_with_jobs_a_failure_starts_no_more_runs_and_names_the_log(tmp_path, monkeypatch, capsys):
    launched = []

    def failing(student, args, log=None, threads=None):
        launched.append(args)
        return 3

    monkeypatch.setattr(launcher, "launch", failing)
    root = make_mvtec_folder(tmp_path / "data")
    code = memory_ablation.main(["--data-root", str(root), "--category", "widget", "--seeds", "0,1", "--students",
                                 "st", "--epochs", "1", "--jobs", "2", "--out", str(tmp_path / "out"), *TINY])
    assert code == 2
    assert len(launched) == 2  # four cells; the two started together failed, the other two never started
    error = capsys.readouterr().err
    assert "failed with exit code 3" in error and "train.log" in error


def test_jobs_below_one_is_a_user_error(tmp_path, capsys):
    root = make_mvtec_folder(tmp_path / "data")
    code = memory_ablation.main(["--data-root", str(root), "--category", "widget", "--seeds", "0", "--students", "st",
                                 "--jobs", "0", "--out", str(tmp_path / "out"), *TINY])
    assert code == 2 and "--jobs must be at least 1, not 0" in capsys.readouterr().err


def test_launch_writes_the_runs_output_to_its_log_and_sets_the_thread_count(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text("import os, sys\nprint('threads', os.environ.get('OMP_NUM_THREADS'), 'args', *sys.argv[1:])\n"
                      "print('oops', file=sys.stderr)\nsys.exit(5)\n")
    monkeypatch.setitem(cells.SCRIPTS, "st", script)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    log = tmp_path / "new" / "folder" / "train.log"
    assert launcher.launch("st", ["a=1"], log=log, threads=3) == 5
    assert log.read_text().splitlines() == ["threads 3 args a=1", "oops"]
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the caller's own setting wins
    assert launcher.launch("st", [], log=log, threads=3) == 5
    assert log.read_text().startswith("threads 7 args")


def test_an_out_folder_inside_the_data_root_is_refused(tmp_path):
    root = make_mvtec_folder(tmp_path / "data")
    for out in (root, root / "widget" / "train" / "good"):
        options = Namespace(data_root=str(root), datasets=None, dataset_layout="mvtec", category="widget",
                            shared=tmp_path, out=out)
        with pytest.raises(UserError, match="lies inside the data root"):
            cli.datasets_from(options, "demo")
    fine = Namespace(data_root=str(root), datasets=None, dataset_layout="mvtec", category="widget", shared=tmp_path,
                     out=tmp_path / "study")
    assert cli.datasets_from(fine, "demo")[0].root == root.resolve()
