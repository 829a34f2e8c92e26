"""``nanogrid demo``'s tour of a throwaway grid (the grid starts it): calls, outputs, errors and timeouts."""

from __future__ import annotations

import time

import nanogrid


@nanogrid.remote(memory=256, timeout=30)
def square(x: int) -> int:
    print("working on", x)
    return x * x


@nanogrid.remote(memory=256, timeout=30)
def report(rows: int) -> str:
    path = nanogrid.output_dir() / "report.csv"
    path.write_text("n,square\n" + "".join(f"{n},{n * n}\n" for n in range(rows)))
    return path.name


@nanogrid.remote(timeout=30)
def divide(a: float, b: float) -> float:
    return a / b


@nanogrid.remote(timeout=1)
def forever() -> None:
    while True:
        pass


def tour(url: str, api_key: str) -> None:
    """Connect to the grid at ``url`` and show what it does, one step at a time."""
    nanogrid.connect(url, api_key=api_key)
    print("\n1. square.remote(7)")
    print("   ->", square.remote(7))

    job = square.spawn(8)
    value = job.result()
    print("\n2. job = square.spawn(8); job.result()")
    print(
        f"   -> {value}; stdout {job.stdout.strip()!r}; {(job.duration or 0) * 1000:.2f} ms in the sandbox, "
        f"peak memory {(job.peak_memory_bytes or 0) / (1 << 20):.1f} MiB, {'cold' if job.cold else 'warm'} start"
    )

    started = time.perf_counter()
    results = list(square.map(range(1000), progress=False))
    seconds = time.perf_counter() - started
    print("\n3. list(square.map(range(1000)))")
    rate = len(results) / seconds
    print(
        f"   -> [{results[0]}, {results[1]}, ..., {results[-1]}] in {seconds:.2f} s ({rate:,.0f} calls/s)"
    )

    report_job = report.spawn(5)
    report_job.result()
    (output,) = report_job.outputs
    print("\n4. a function that writes to nanogrid.output_dir()")
    print(
        f"   -> {output.name} ({output.size} bytes): {output.read().decode().splitlines()[:3]} ..."
    )

    print("\n5. a remote exception is re-raised here, with its remote traceback attached")
    try:
        divide.remote(1, 0)
    except ZeroDivisionError as exc:
        print(f"   -> ZeroDivisionError: {exc}")

    print("\n6. a function that never returns, with timeout=1")
    started = time.perf_counter()
    try:
        forever.remote()
    except nanogrid.FunctionTimeout as exc:
        print(f"   -> FunctionTimeout after {time.perf_counter() - started:.1f} s: {exc}")
    print(f"   ... and the grid carries on: square.remote(9) -> {square.remote(9)}")
