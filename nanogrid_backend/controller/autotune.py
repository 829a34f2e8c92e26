"""AutoTuner: a function's memory size from what its calls really used, with the reasoning and what it saves.

Memory is what a call reserves on a worker (and what Lambda bills by the GB-second), so a function sized far
above its peak wastes money on every call, and one sized at its peak fails when an input is a little larger.
The advice takes the highest peak of the largest window that holds enough calls, adds headroom and rounds
up to a step; where versions of the same function ran at other sizes (CPU-bound code runs faster with more
memory on Lambda), the cheapest measured size per call wins if it is cheaper still.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nanogrid_backend.models import FunctionRecord

MIN_CALLS = 20  # fewer measured calls than this: no advice, only what is known
HEADROOM = 1.25  # the advice is the highest peak seen plus a quarter
STEP_MIB = 64
MIN_MEMORY_MIB = 128
CALLS = 1_000_000  # savings are quoted per this many calls


@dataclass(frozen=True)
class Rates:
    """Prices the saving is quoted in (USD): Lambda's GB-second, and an EC2 worker's hour and memory."""

    lambda_gb_s: float = 0.0000166667  # x86, us-east-1
    ec2_hourly: float = 0.1008  # m7i.large on demand, us-east-1
    ec2_memory_gib: float = 8.0

    def lambda_cost(self, memory_mib: float, duration_ms: float) -> float:
        return memory_mib / 1024 * duration_ms / 1000 * self.lambda_gb_s * CALLS

    def ec2_cost(self, memory_mib: float, duration_ms: float) -> float:
        """Memory decides how many calls share a worker: a call costs its share of the worker's memory-hours."""
        return (
            memory_mib
            / 1024
            * duration_ms
            / 3_600_000
            * self.ec2_hourly
            / self.ec2_memory_gib
            * CALLS
        )


def recommend(
    function: FunctionRecord,
    windows: dict[str, dict[str, Any]],
    rates: Rates,
    versions: Sequence[tuple[FunctionRecord, dict[str, Any]]] = (),
) -> dict[str, Any]:
    """Advice for ``function`` from its metrics windows; ``versions``: other versions of it with their 30d window."""
    name, window = _busiest(windows)
    memory, duration = window["peak_memory_mib"], window["duration_ms"]
    current = function.memory_mib
    advice: dict[str, Any] = {
        "function_id": function.function_id,
        "function_name": function.function_name,
        "current_mib": current,
        "window": name,
        "calls": window["count"],
        "peak_mib": memory["max"],
        "p99_peak_mib": memory["p99"],
        "mean_duration_ms": duration["mean"],
        "recommended_mib": None,
        "reasons": [],
        "sizes": [],
        "rates": {
            "lambda_gb_s": rates.lambda_gb_s,
            "ec2_hourly": rates.ec2_hourly,
            "ec2_memory_gib": rates.ec2_memory_gib,
        },
        "saving_per_million": None,
    }
    measured = sum(bucket["count"] for bucket in memory["histogram"])
    if measured < MIN_CALLS or memory["max"] is None or duration["mean"] is None:
        advice["reasons"].append(
            f"only {measured} calls with a measured peak memory in the last 30 days; "
            f"the AutoTuner advises from {MIN_CALLS} on"
        )
        return advice
    peak = memory["max"]
    target = max(MIN_MEMORY_MIB, math.ceil(peak * HEADROOM / STEP_MIB) * STEP_MIB)
    reasons = [
        f"the highest peak of {window['count']} calls in the last {name} was {peak:.1f} MiB "
        f"(p99 {memory['p99']:.1f} MiB) of the {current} MiB the function reserves ({peak / current:.0%})"
    ]
    if target < current:
        reasons.append(
            f"{peak:.1f} MiB plus {HEADROOM - 1:.0%} headroom, rounded up to {STEP_MIB} MiB "
            f"(at least {MIN_MEMORY_MIB}), is {target} MiB"
        )
    elif target > current:
        reasons.append(
            f"that leaves less than {HEADROOM - 1:.0%} headroom: a slightly larger input may run out of "
            f"memory; {target} MiB gives it"
        )
    else:
        reasons.append(
            f"{current} MiB is already the peak plus {HEADROOM - 1:.0%} headroom: keep it"
        )
    duration_ms = duration["mean"]
    sizes = [
        {
            "function_id": function.function_id,
            "memory_mib": current,
            "calls": window["count"],
            "mean_duration_ms": duration_ms,
            "peak_mib": peak,
        }
    ]
    for version, version_window in versions:
        if (
            version_window["count"] >= MIN_CALLS
            and version_window["duration_ms"]["mean"] is not None
        ):
            sizes.append(
                {
                    "function_id": version.function_id,
                    "memory_mib": version.memory_mib,
                    "calls": version_window["count"],
                    "mean_duration_ms": version_window["duration_ms"]["mean"],
                    "peak_mib": version_window["peak_memory_mib"]["max"],
                }
            )
    cheapest = min(sizes, key=lambda s: s["memory_mib"] * s["mean_duration_ms"])
    if (
        cheapest["memory_mib"] > target
        and cheapest["peak_mib"] is not None
        and cheapest["memory_mib"] * cheapest["mean_duration_ms"] < target * duration_ms
    ):
        reasons.append(
            f"at {cheapest['memory_mib']} MiB it ran in {cheapest['mean_duration_ms']:.1f} ms on average "
            f"against {duration_ms:.1f} ms here: more memory (and so more CPU on Lambda) costs less per call"
        )
        target, duration_ms = cheapest["memory_mib"], cheapest["mean_duration_ms"]
    now_ms = duration["mean"]
    advice.update(
        recommended_mib=target,
        reasons=reasons + _money(rates, current, now_ms, target, duration_ms),
        sizes=sorted(sizes, key=lambda s: s["memory_mib"]),
        saving_per_million={
            "lambda": round(
                rates.lambda_cost(current, now_ms) - rates.lambda_cost(target, duration_ms), 4
            ),
            "ec2": round(rates.ec2_cost(current, now_ms) - rates.ec2_cost(target, duration_ms), 4),
        },
    )
    return advice


def _busiest(windows: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The window with the most calls (the longest of equals: they nest, so it is the most evidence)."""
    name = max(reversed(list(windows)), key=lambda n: windows[n]["count"])
    return name, windows[name]


def _money(
    rates: Rates, current: int, duration_ms: float, target: int, target_ms: float
) -> list[str]:
    now, then = rates.lambda_cost(current, duration_ms), rates.lambda_cost(target, target_ms)
    ec2_now, ec2_then = rates.ec2_cost(current, duration_ms), rates.ec2_cost(target, target_ms)
    verb = "saves" if then <= now else "costs"
    return [
        f"per million calls of {duration_ms:.1f} ms: Lambda ${now:.2f} at {current} MiB, ${then:.2f} at {target} MiB "
        f"({verb} ${abs(now - then):.2f} at ${rates.lambda_gb_s:g}/GB-s); on EC2 workers ${ec2_now:.4f} against "
        f"${ec2_then:.4f} (${rates.ec2_hourly:g}/h for {rates.ec2_memory_gib:g} GiB)"
    ]
