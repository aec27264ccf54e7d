"""Writes daily_1997.csv: 3 made-up tickers x 60 weekday bars from 1997-01-02.

Deterministic (a seeded random walk, no download): `python tests/data/make_daily_1997.py`
rewrites the same file. Columns as a typical daily-bars export: Date,Ticker,Open,High,Low,
Close,Adj Close,Volume; rows in time order (date, then ticker).
"""

from __future__ import annotations

import random
from datetime import date, timedelta
from pathlib import Path

TICKERS = {"ACME": 41.25, "GLOBEX": 17.5, "INITECH": 88.0}
DAYS = 60
START = date(1997, 1, 2)
# Adj Close = Close * factor (a made-up dividend/split adjustment per ticker).
ADJUST = {"ACME": 0.5, "GLOBEX": 0.9712, "INITECH": 0.25}


def weekdays(start: date, n: int) -> list[date]:
    out, day = [], start
    while len(out) < n:
        if day.weekday() < 5:
            out.append(day)
        day += timedelta(days=1)
    return out


def main() -> None:
    rng = random.Random(1997)
    close = dict(TICKERS)
    lines = ["Date,Ticker,Open,High,Low,Close,Adj Close,Volume"]
    for day in weekdays(START, DAYS):
        for ticker in TICKERS:
            open_ = close[ticker] * (1 + rng.gauss(0, 0.004))
            new = open_ * (1 + rng.gauss(0.0005, 0.015))
            high = max(open_, new) * (1 + abs(rng.gauss(0, 0.005)))
            low = min(open_, new) * (1 - abs(rng.gauss(0, 0.005)))
            volume = int(rng.lognormvariate(13.5, 0.4))
            close[ticker] = new
            lines.append(
                f"{day.isoformat()},{ticker},{open_:.4f},{high:.4f},{low:.4f},{new:.4f},"
                f"{new * ADJUST[ticker]:.4f},{volume}"
            )
    out = Path(__file__).with_name("daily_1997.csv")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
