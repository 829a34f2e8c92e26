"""How fast an over-limit request is refused: a burst of 1,000 requests from 50 clients.

    python -m benchmarks.bench_ratelimit [--out benchmarks/results/ratelimit.json]

Starts `nanogrid up` with a low limit (10 requests/s, burst 10) so almost the whole burst is refused,
and times every answer at the client; the seeds report under 150 ms for a 429.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bench_embedded import percentiles, start_grid


async def burst(url: str, key: str, clients: int, total: int) -> dict[int, list[float]]:
    latencies: dict[int, list[float]] = {}
    per_client = total // clients

    ready, go = asyncio.Semaphore(0), asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers={"x-api-key": key}) as http:
            await http.get(
                "/health"
            )  # connect first (no key, no limit): time the burst, not 50 handshakes
            ready.release()
            await go.wait()
            for _ in range(per_client):
                started = time.perf_counter()
                response = await http.get("/v1/functions")
                latencies.setdefault(response.status_code, []).append(time.perf_counter() - started)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    for _ in range(clients):
        await ready.acquire()
    go.set()
    await asyncio.gather(*tasks)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--port", type=int, default=8797)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ratelimit.json"
    )
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-bench-"))
    (data_dir / "config.toml").write_text("rate_limit = 10.0\nrate_burst = 10\n")
    import os

    os.environ["NANOGRID_CONFIG"] = str(data_dir / "config.toml")
    grid = start_grid(data_dir, args.port)
    try:
        key = (data_dir / "local-key").read_text().strip()
        started = time.perf_counter()
        latencies = asyncio.run(
            burst(f"http://127.0.0.1:{args.port}", key, args.clients, args.requests)
        )
        seconds = time.perf_counter() - started
    finally:
        grid.terminate()
        grid.wait(15)
        shutil.rmtree(data_dir, ignore_errors=True)
    report = {
        "clients": args.clients,
        "requests": args.requests,
        "seconds": round(seconds, 3),
        "by_status": {str(code): percentiles(values) for code, values in sorted(latencies.items())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
