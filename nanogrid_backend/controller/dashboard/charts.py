"""The dashboard's numbers as text (times, durations, sizes) and its charts as inline SVG (no JavaScript)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

# window -> (its span, one bar's width) in seconds: the calls and errors over time of a function's page
TIMELINES = {
    "1h": (3600, 300),
    "24h": (86400, 3600),
    "7d": (7 * 86400, 6 * 3600),
    "30d": (30 * 86400, 86400),
}


def _when(value: float | None) -> str:
    return "" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / (1 << 20):.1f} MiB"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def bars(
    title: str,
    series: list[tuple[str, float | None]],
    unit: str,
    width: int = 360,
    height: int = 180,
) -> Markup:
    """A small bar chart as inline SVG (presentation attributes only: the page's CSP allows no inline style)."""
    top, bottom, left = 34, 26, 8
    values = [v or 0.0 for _, v in series]
    peak = max(values, default=0.0) or 1.0
    slot = (width - 2 * left) / max(1, len(series))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><text x="{left}" y="14" font-size="12" font-weight="600">{escape(title)}</text>'
    ]
    for i, (label, value) in enumerate(series):
        h = (height - top - bottom) * (value or 0.0) / peak
        x, y = left + i * slot + slot * 0.15, height - bottom - h
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
            f'fill="#3b6fd8"><title>{escape(label)}: {escape(_num(value))} {escape(unit)}</title></rect>'
        )
        parts.append(
            f'<text x="{x + slot * 0.35:.1f}" y="{height - 10}" font-size="10" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
        if value:
            parts.append(
                f'<text x="{x + slot * 0.35:.1f}" y="{y - 3:.1f}" font-size="10" text-anchor="middle">'
                f"{escape(f'{value:.4g}')}</text>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def charts(windows: dict[str, dict[str, Any]]) -> dict[str, Markup]:
    day = windows["24h"]
    return {
        "calls": bars(
            "calls (errors in the table)", [(n, w["count"]) for n, w in windows.items()], "calls"
        ),
        "duration": bars(
            "duration p50 / p95 / p99, 24h",
            [(k, day["duration_ms"][k]) for k in ("p50", "p95", "p99")],
            "ms",
        ),
        "memory": bars(
            "peak memory, 30d (calls per MiB bucket)",
            [
                (f"≤{b['le']:.0f}", b["count"])
                for b in windows["30d"]["peak_memory_mib"]["histogram"][-12:]
            ],
            "calls",
        ),
    }


def timeline(
    window: str, points: list[tuple[int, int, int]], now: float, width: int = 270, height: int = 120
) -> Markup:
    """Calls (blue) and failed calls (red, in front) per bar over one window, as inline SVG."""
    span, step = TIMELINES[window]
    count, last = span // step, int(now // step)
    calls, failed = [0] * count, [0] * count
    for start, n, errors in points:
        i = count - 1 - (last - int(start // step))
        if 0 <= i < count:
            calls[i] += n
            failed[i] += errors
    top, bottom, left = 22, 16, 6
    peak, slot = max(calls) or 1, (width - 2 * left) / count
    title = f"{window}: {sum(calls)} calls, {sum(failed)} failed"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><text x="{left}" y="14" font-size="12" font-weight="600">{escape(title)}'
        f'</text><line x1="{left}" x2="{width - left}" y1="{height - bottom}" y2="{height - bottom}" '
        f'stroke="#c5ccd6"/><text x="{left}" y="{height - 3}" font-size="10">−{escape(window)}</text>'
        f'<text x="{width - left}" y="{height - 3}" font-size="10" text-anchor="end">now</text>'
    ]
    for i, (n, errors) in enumerate(zip(calls, failed, strict=True)):
        if not n:
            continue
        x, label = left + i * slot, _when((last - count + 1 + i) * step)
        for kind, value, colour in (("calls", n, "#3b6fd8"), ("errors", errors, "#d92d20")):
            if value:
                h = max(1.0, (height - top - bottom) * value / peak)
                parts.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{height - bottom - h:.1f}" width="{slot * 0.8:.1f}" '
                    f'height="{h:.1f}" fill="{colour}"><title>{escape(label)} UTC: {n} calls, {errors} failed'
                    f"</title></rect>"
                )
    parts.append("</svg>")
    return Markup("".join(parts))
