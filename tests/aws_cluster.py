"""A grid on the AWS adapters, all on loopback: moto server, redis-server, a controller and workers.

Used by tests/test_aws.py and benchmarks/bench_aws.py. The product talks to these servers through
boto3 and redis-py exactly as it would to AWS; only the endpoint differs (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent
VISIBILITY_S = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """A moto server on loopback for the test's lifetime, with boto3's default clients pointed at it
    (AWS_ENDPOINT_URL and test credentials in the environment, put back after); yields its port."""
    from tests.conftest import require

    require(
        shutil.which(str(VENV_BIN / "moto_server")) is not None,
        "moto_server is not installed (make setup-test)",
    )
    port = free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        wait_for_port(port)
        yield port
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(10)


class Redis:
    def __init__(self, port: int, directory: Path) -> None:
        self.port, self.directory, self.proc = port, directory, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Cluster:
    """The services, one controller and ``workers`` worker processes, all on loopback."""

    def __init__(self, root: Path, workers: int = 3, slots: int = 2) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        moto_port, redis_port = free_port(), free_port()
        self.moto = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.redis = Redis(redis_port, root)
        self.redis.start()
        wait_for_port(moto_port)
        self.env = {
            **os.environ,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(redis_port),
            "NANOGRID_HEARTBEAT_S": "1",
            "NANOGRID_CLOUDWATCH_NAMESPACE": "NanoGrid",
        }
        for name in ("NANOGRID_URL", "NANOGRID_API_KEY", "NANOGRID_CONFIG"):
            self.env.pop(name, None)
        settings = self.cli("aws", "bootstrap", "--visibility", str(VISIBILITY_S))
        self.env.update(line.split("=", 1) for line in settings.splitlines())
        self.env["NANOGRID_SQS_VISIBILITY_S"] = str(VISIBILITY_S)
        self.key = self.cli("keys", "create", "tester").strip()
        self.port, self.port2 = free_port(), free_port()
        self.url, self.url2 = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port2}"
        self.slots = slots
        self.start_controller()
        self.start_controller(
            "controller2", self.port2
        )  # controllers are stateless: any of them serves any job
        for n in range(workers):
            self.start_worker(n)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "nanogrid.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "nanogrid.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_controller(self, name: str = "controller", port: int | None = None) -> None:
        port = port or self.port
        self.spawn(
            name,
            "controller",
            "--port",
            str(port),
            "--data-dir",
            str(self.root / name),
            "--rate-limit",
            "0",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError((self.root / f"{name}.log").read_text())

    def start_worker(self, n: int) -> None:
        self.spawn(
            f"worker{n}",
            "worker",
            "--workers",
            str(self.slots),
            "--stem-cells",
            "1",
            "--sandbox",
            "process",
            "--data-dir",
            str(self.root / f"worker{n}"),
            "--drain",
            "5",
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.redis.stop()
        self.moto.terminate()
        self.moto.wait(10)
