"""`streamer plot ENTITY`: one entity's forecasts against what happened, as an SVG file.

The store keeps only each entity's newest forecast, so the history comes from Kafka: the
forecasts from the output topic and the actual values from the input topic. Both are keyed
by entity, so one partition of each holds all of the entity's messages (found with the
producers' partitioner, murmur2 of the key); that partition is read from its earliest
retained offset to its end. The plot therefore covers what the topics still retain, and a
long retention makes the scan slower, not the plot larger (`last` steps are drawn).

Drawn per step t (in the target's own units, `level` of the forecast message):
- actual: the target value of the entity's event in step t;
- model: the level forecast `horizon` batches earlier for t;
- persistence: the actual value `horizon` steps earlier (the naive baseline).

Forecasts are de-duplicated by step (output is at-least-once; the last copy read wins).
Horizons are placed `horizon` steps ahead, which assumes the entity reported in every step
(a horizon counts batches). The SVG needs no plotting library.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from html import escape
from pathlib import Path

import kafka.errors
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from .codec import decode_event
from .config import Config
from .errors import EventError, KafkaError, StreamerError
from .events import EventParser, step_of

log = logging.getLogger(__name__)

DEFAULT_LAST_STEPS = 200
DEFAULT_SCAN_TIMEOUT_S = 60.0
_POLL_MS = 500


@dataclass(frozen=True)
class EntitySeries:
    """Aligned series for one entity; None where a step has no value."""

    entity: str
    horizon: int
    steps: list[int]
    actual: list[float | None]
    model: list[float | None]
    persistence: list[float | None]

    def mae(self, which: str) -> float | None:
        """Mean absolute error of "model" or "persistence" over steps where all three exist."""
        pred = getattr(self, which)
        errs = [
            abs(p - a)
            for a, p, m, q in zip(self.actual, pred, self.model, self.persistence, strict=True)
            if a is not None and p is not None and m is not None and q is not None
        ]
        return sum(errs) / len(errs) if errs else None


def align(
    entity: str,
    actuals: Mapping[int, float],
    forecasts: Mapping[int, list[float]],
    *,
    horizon: int = 1,
    last: int = DEFAULT_LAST_STEPS,
) -> EntitySeries:
    """The last `last` steps that have an actual value or a forecast for them."""
    predicted = {t + horizon: lv[horizon - 1] for t, lv in forecasts.items() if len(lv) >= horizon}
    steps = sorted(set(actuals) | set(predicted))[-last:]
    return EntitySeries(
        entity=entity,
        horizon=horizon,
        steps=steps,
        actual=[actuals.get(t) for t in steps],
        model=[predicted.get(t) for t in steps],
        persistence=[actuals.get(t - horizon) for t in steps],
    )


def read_entity(
    config: Config,
    entity: str,
    *,
    horizon: int = 1,
    last: int = DEFAULT_LAST_STEPS,
    bootstrap: str | None = None,
    timeout_s: float = DEFAULT_SCAN_TIMEOUT_S,
) -> EntitySeries:
    """Scan the entity's partitions of the input and output topics (see the module doc)."""
    k = config.kafka
    bootstrap = bootstrap or k.bootstrap
    parser = EventParser(config.stream)
    target = config.stream.target_index
    actuals: dict[int, float] = {}
    for value in _values_of(bootstrap, k.input_topic, entity, timeout_s):
        try:
            event = parser.parse(decode_event(value, k.encoding, k.max_message_bytes))
        except EventError:
            continue  # the engine dead-lettered it too
        if event.entity == entity:
            actuals[step_of(event.ts, config.stream.interval)] = event.values[target]
    forecasts: dict[int, list[float]] = {}
    for value in _values_of(bootstrap, k.output_topic, entity, timeout_s):
        try:
            msg = json.loads(value)
            if msg["entity"] == entity:
                forecasts[int(msg["step"])] = [
                    math.nan if v is None else float(v) for v in msg["level"]
                ]
        except (ValueError, KeyError, TypeError):
            log.warning("skipping a malformed forecast message in %s", k.output_topic)
    if not forecasts:
        raise StreamerError(f'no forecasts for entity "{entity}" in topic "{k.output_topic}"')
    return align(entity, actuals, forecasts, horizon=horizon, last=last)


def _values_of(bootstrap: str, topic: str, entity: str, timeout_s: float) -> Iterator[bytes]:
    """Values of the messages keyed `entity` in its partition of `topic`, oldest first."""
    key = entity.encode()
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
        )
    except kafka.errors.KafkaError as exc:
        raise KafkaError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            consumer.topics()  # metadata may not be loaded yet
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise KafkaError(f'topic "{topic}" does not exist on {bootstrap}')
        parts = sorted(partitions)
        tp = TopicPartition(topic, parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)])
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while True:
            for records in consumer.poll(timeout_ms=_POLL_MS).values():
                for rec in records:
                    if rec.key == key and rec.value is not None:
                        yield rec.value
            high = consumer.highwater(tp)
            if high is not None and consumer.position(tp) >= high:
                return
            if time.monotonic() > deadline:
                log.warning("%s: stopped reading after %.0f s (not at the end)", topic, timeout_s)
                return
    except kafka.errors.KafkaError as exc:
        raise KafkaError(f"cannot read {topic}: {exc}") from exc
    finally:
        consumer.close()


# ---------------------------------------------------------------------- SVG

_W, _H = 960, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 20, 50, 50
_STYLE = {
    "actual": ("#222222", ""),
    "model": ("#1f77b4", ""),
    "persistence": ("#999999", "6 4"),
}


def render_svg(series: EntitySeries) -> str:
    """A line chart of actual, model and persistence against the step."""
    values = [
        v for name in _STYLE for v in getattr(series, name) if v is not None and math.isfinite(v)
    ]
    if not series.steps or not values:
        raise StreamerError(f'nothing to plot for entity "{series.entity}"')
    x0, x1 = series.steps[0], max(series.steps[-1], series.steps[0] + 1)
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(t: int) -> float:
        return _LEFT + (t - x0) / (x1 - x0) * plot_w

    def py(v: float) -> float:
        return _TOP + (hi - v) / (hi - lo) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_W}" height="{_H}" fill="white"/>',
    ]
    mae_m, mae_p = series.mae("model"), series.mae("persistence")
    title = f"{series.entity}: forecast vs actual, horizon {series.horizon}"
    if mae_m is not None and mae_p is not None:
        title += f" (MAE model {mae_m:.4g}, persistence {mae_p:.4g})"
    out.append(f'<text x="{_LEFT}" y="20" font-size="14">{escape(title)}</text>')
    out.append(
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#cccccc"/>'
    )
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = py(v)
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eeeeee"/>'
        )
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.4g}</text>')
    for t in (x0, series.steps[-1]):
        out.append(
            f'<text x="{px(t):.1f}" y="{_H - _BOTTOM + 18}" text-anchor="middle">step {t}</text>'
        )
    for i, (name, (color, dash)) in enumerate(_STYLE.items()):
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        for segment in _segments(series.steps, getattr(series, name)):
            points = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in segment)
            out.append(
                f'<polyline class="{name}" points="{points}" fill="none" stroke="{color}" '
                f'stroke-width="1.5"{dashes}/>'
            )
        lx = _LEFT + 10 + i * 130
        out.append(
            f'<line x1="{lx}" x2="{lx + 24}" y1="{_H - 14}" y2="{_H - 14}" stroke="{color}" '
            f'stroke-width="2"{dashes}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{_H - 10}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _segments(steps: list[int], values: list[float | None]) -> Iterator[list[tuple[int, float]]]:
    """Runs of consecutive finite values (a gap breaks the line)."""
    run: list[tuple[int, float]] = []
    for t, v in zip(steps, values, strict=True):
        if v is None or not math.isfinite(v):
            if run:
                yield run
            run = []
        else:
            run.append((t, v))
    if run:
        yield run


def render_png(series: EntitySeries, path: Path) -> None:
    """The same three lines as a PNG (needs matplotlib: `pip install 'streamer[plot]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamerError(
            "a PNG needs matplotlib (pip install 'streamer[plot]'); or write --out FILE.svg"
        ) from None
    nan = float("nan")
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    for name, values, style in (
        ("actual", series.actual, "-"),
        ("model", series.model, "-"),
        ("persistence", series.persistence, "--"),
    ):
        ax.plot(series.steps, [nan if v is None else v for v in values], style, label=name)
    ax.set_title(f"{series.entity}: forecast {series.horizon} step(s) ahead vs actual")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_entity(
    config: Config,
    entity: str,
    out: str | Path,
    *,
    horizon: int = 1,
    last: int = DEFAULT_LAST_STEPS,
    bootstrap: str | None = None,
) -> dict[str, object]:
    """Read, align, write the SVG; returns a summary for the command line."""
    if not 1 <= horizon <= config.model.horizon:
        raise StreamerError(f"horizon must be in 1..{config.model.horizon}, got {horizon}")
    series = read_entity(config, entity, horizon=horizon, last=last, bootstrap=bootstrap)
    path = Path(out)
    if path.suffix.lower() == ".png":
        render_png(series, path)
    else:
        path.write_text(render_svg(series))
    return {
        "out": str(path),
        "entity": entity,
        "steps": len(series.steps),
        "forecasts": sum(v is not None for v in series.model),
        "mae_model": series.mae("model"),
        "mae_persistence": series.mae("persistence"),
    }
