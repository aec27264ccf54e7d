"""`streamer plot`: aligning forecasts with actuals, and the SVG."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from streamer.errors import StreamerError
from streamer.plot import align, render_svg

SVG = "{http://www.w3.org/2000/svg}"


def test_forecasts_land_horizon_steps_ahead_and_persistence_lags_by_horizon():
    actuals = {10: 1.0, 11: 2.0, 12: 3.0, 13: 4.0}
    forecasts = {10: [1.5, 9.0], 11: [2.5, 9.5], 12: [3.5, 9.9]}
    s = align("E", actuals, forecasts, horizon=1)
    assert s.steps == [10, 11, 12, 13]
    assert s.actual == [1.0, 2.0, 3.0, 4.0]
    assert s.model == [None, 1.5, 2.5, 3.5]
    assert s.persistence == [None, 1.0, 2.0, 3.0]
    assert s.mae("model") == pytest.approx(0.5)
    assert s.mae("persistence") == pytest.approx(1.0)
    s2 = align("E", actuals, forecasts, horizon=2)
    assert s2.model[s2.steps.index(12)] == 9.0
    assert s2.persistence[s2.steps.index(12)] == 1.0
    assert s2.steps[-1] == 14  # the newest forecast reaches past the newest actual


def test_only_the_last_steps_are_kept():
    actuals = {t: float(t) for t in range(100)}
    s = align("E", actuals, {t: [float(t)] for t in range(100)}, last=10)
    assert s.steps == list(range(91, 101))


def test_svg_draws_three_series_and_breaks_lines_at_gaps():
    s = align("SYN<1>", {1: 1.0, 2: 2.0, 4: 4.0, 5: 5.0}, {1: [2.1], 2: [math.nan], 4: [4.9]})
    root = ET.fromstring(render_svg(s))
    lines = {}
    for poly in root.iter(f"{SVG}polyline"):
        lines.setdefault(poly.get("class"), []).append(poly.get("points").split())
    assert set(lines) == {"actual", "model", "persistence"}
    assert [len(run) for run in lines["actual"]] == [2, 2]  # step 3 is missing
    assert [len(run) for run in lines["model"]] == [1, 1]  # the NaN forecast breaks the line
    title = next(root.iter(f"{SVG}text")).text
    assert title.startswith("SYN<1>: forecast vs actual") and "MAE model" in title


def test_nothing_to_plot_is_an_error():
    with pytest.raises(StreamerError, match="nothing to plot"):
        render_svg(align("E", {}, {}))


def test_png_is_a_real_png(tmp_path):
    from streamer.plot import EntitySeries, render_png

    series = EntitySeries(
        entity="AAPL",
        horizon=1,
        steps=[1, 2, 3, 4],
        actual=[1.0, 2.0, None, 4.0],
        model=[None, 1.5, 2.5, 3.5],
        persistence=[None, 1.0, 2.0, None],
    )
    path = tmp_path / "aapl.png"
    render_png(series, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
