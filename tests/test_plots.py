"""Line and interval pictures: a run's training curves (engine/pictures.py) and a study's paired
differences (benchmarks/study/tables.py)."""
import math

import pytest
from PIL import Image

from utils.errors import UserError
from benchmarks.study.tables import paired_differences_figure, save_paired_differences
from engine.pictures import save_training_curves, training_curves_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def memory_history(epochs: int = 4) -> list[dict]:
    """Records as a MemKD run with a validation slice writes them."""
    return [{"epoch": e, "loss": 2.0 / e, "kd": 1.5 / e, "nm": 0.5 / e, "orth": 0.01 / e,
             "recall_entropy": 0.6 - 0.02 * e, "exemplar_entropy": 0.5 - 0.01 * e, "val_kd": 1.6 / e}
            for e in range(1, epochs + 1)]


def baseline_history(epochs: int = 3) -> list[dict]:
    """Records as a baseline run (no memory) without a validation slice writes them."""
    return [{"epoch": e, "loss": 1.0 / e, "kd": 1.0 / e} for e in range(1, epochs + 1)]


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.width > 300 and image.height > 200


def test_full_history_draws_every_loss_on_a_log_axis_and_both_entropies(tmp_path):
    fig = training_curves_figure(memory_history())
    loss_ax, entropy_ax = fig.axes
    assert legend_labels(loss_ax) == ["L (total)", "L_KD", "L_NM", "L_Orth", "validation L_KD"]
    assert loss_ax.get_yscale() == "log"
    assert legend_labels(entropy_ax) == ["student queries", "exemplar queries"]
    assert list(entropy_ax.lines[0].get_ydata()) == pytest.approx([0.58, 0.56, 0.54, 0.52])
    path = save_training_curves(memory_history(), tmp_path / "run" / "curves.png")
    assert path == tmp_path / "run" / "curves.png"
    assert_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary file left behind


def test_baseline_history_draws_only_its_losses_and_says_there_is_no_memory(tmp_path):
    fig = training_curves_figure(baseline_history())
    loss_ax, entropy_ax = fig.axes
    assert legend_labels(loss_ax) == ["L (total)", "L_KD"]
    assert len(entropy_ax.lines) == 0 and "no memory" in entropy_ax.texts[0].get_text()
    assert_png(save_training_curves(baseline_history(), tmp_path / "curves.png"))


def test_a_single_epoch_gets_integer_epoch_ticks(tmp_path):
    fig = training_curves_figure(baseline_history(epochs=1))
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert [tick for tick in ax.get_xticks() if low <= tick <= high] == [1.0]
    assert_png(save_training_curves(baseline_history(epochs=1), tmp_path / "curves.png"))


def test_a_zero_loss_term_falls_back_to_a_linear_axis_and_missing_values_are_gaps():
    history = memory_history(3)
    history[0]["orth"] = 0.0  # lambda2 = 0 can log an exactly zero L_Orth
    history[1]["val_kd"] = None  # history.json writes NaN as null
    fig = training_curves_figure(history)
    loss_ax = fig.axes[0]
    assert loss_ax.get_yscale() == "linear"
    val_line = loss_ax.lines[legend_labels(loss_ax).index("validation L_KD")]
    assert math.isnan(val_line.get_ydata()[1])


def test_an_empty_history_is_refused_and_an_earlier_picture_kept(tmp_path):
    path = save_training_curves(baseline_history(), tmp_path / "curves.png")
    before = path.read_bytes()
    with pytest.raises(UserError, match="history is empty"):
        save_training_curves([], path)
    assert path.read_bytes() == before


def difference_rows() -> list[dict]:
    rows = []
    for label, difference, half in (("demo ST: memory on - memory off", 0.02, 0.01),
                                    ("demo RD: memory on - memory off", -0.01, 0.03),
                                    ("demo RD: memory.slots=10 - default", 0.005, math.nan)):  # a single seed
        for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            rows.append({"label": label, "metric": metric, "difference": difference,
                         "low": difference - half, "high": difference + half})
    return rows


def test_paired_differences_draw_one_panel_per_metric_with_every_setting(tmp_path):
    fig = paired_differences_figure(difference_rows())
    assert [ax.get_title() for ax in fig.axes] == ["image AUROC", "pixel AUROC", "AUPRO"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "demo RD: memory.slots=10 - default", "demo RD: memory on - memory off", "demo ST: memory on - memory off"]
    assert_png(save_paired_differences(difference_rows(), tmp_path / "study.png"))


@pytest.mark.parametrize("rows, message", [
    ([], "no paired differences"),
    ([{"label": "x", "metric": "image_f1_max", "difference": 0.0, "low": 0.0, "high": 0.0}], "image_f1_max"),
])
def test_paired_differences_refuse_what_they_cannot_draw(rows, message, tmp_path):
    with pytest.raises(UserError, match=message) as info:
        save_paired_differences(rows, tmp_path / "study.png")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "study.png").exists()
