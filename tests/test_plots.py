"""The run directory's figures: which panels the curves have."""

from PIL import Image

from eanet.plots import curve_panels, plot_curves

HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "train_top1": 0.1 * e, "train_top5": 1.0, "val_top1": None}
    for e in (1, 2)
]


def test_top5_is_shown_only_above_five_classes():
    assert [key for key, _ in curve_panels(3)] == ["loss", "top1"]
    assert [key for key, _ in curve_panels(5)] == ["loss", "top1"]  # top-5 of 5 classes: 100%
    assert [key for key, _ in curve_panels(6)] == ["loss", "top1", "top5"]
    assert [key for key, _ in curve_panels(None)] == ["loss", "top1", "top5"]


def test_the_curves_figure_has_one_panel_fewer_without_top5(tmp_path):
    plot_curves(HISTORY, tmp_path / "few.png", classes=3)
    plot_curves(HISTORY, tmp_path / "many.png", classes=100)
    few, many = (Image.open(tmp_path / f"{n}.png").size for n in ("few", "many"))
    assert few[1] == many[1] and 0.6 < few[0] / many[0] < 0.75  # 2 panels of 3 (tight crop)
