"""Accuracy curves written as PNGs (matplotlib, no display)."""

import pytest

from optsys.telemetry.curves import plot_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _curves(with_bands: bool):
    ns = [1, 2, 4, 8, 16]
    curves = {}
    for method, base in (("majority vote", 0.4), ("best-of-N (RM)", 0.35)):
        points = []
        for i, n in enumerate(ns):
            acc = base + 0.05 * i
            point = {"n": n, "accuracy": acc, "tokens_per_question": 120.0 * n}
            if with_bands:
                point.update(low=acc - 0.04, high=acc + 0.04)
            points.append(point)
        curves[method] = points
    return curves


@pytest.mark.parametrize("with_bands", [False, True])
@pytest.mark.parametrize("x", ["n", "tokens_per_question"])
def test_plot_curves_writes_a_png(tmp_path, x, with_bands):
    image = pytest.importorskip("matplotlib.image")
    path = plot_curves(_curves(with_bands), x=x, path=tmp_path / "sub" / f"{x}.png", title="arithmetic")
    assert path == tmp_path / "sub" / f"{x}.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = image.imread(path).shape
    assert height > 200 and width > 300 and channels in (3, 4)


def test_plot_curves_band_changes_the_picture(tmp_path):
    pytest.importorskip("matplotlib")
    plain = plot_curves(_curves(False), x="n", path=tmp_path / "plain.png", log_x=False)
    banded = plot_curves(_curves(True), x="n", path=tmp_path / "band.png", log_x=False)
    assert plain.read_bytes() != banded.read_bytes()


def test_plot_curves_refuses_points_without_keys(tmp_path):
    curves = _curves(False)
    del curves["best-of-N (RM)"][2]["n"]
    with pytest.raises(ValueError, match=r"method 'best-of-N \(RM\)': point 2 has no 'n' key"):
        plot_curves(curves, x="n", path=tmp_path / "x.png")
    curves = _curves(False)
    del curves["majority vote"][0]["accuracy"]
    with pytest.raises(ValueError, match="method 'majority vote': point 0 has no 'accuracy' key"):
        plot_curves(curves, x="tokens_per_question", path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="which a log x axis cannot show"):
        plot_curves({"m": [{"n": 0, "accuracy": 0.5}]}, x="n", path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="curves is empty"):
        plot_curves({}, x="n", path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_curves_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `from matplotlib.figure import` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_curves(_curves(False), x="n", path=tmp_path / "x.png")
    assert "optsys.telemetry.curves" in sys.modules  # the module itself imported without needing it
