"""Hostile functions against the Docker sandbox: each ends in a clear job error, and the worker serves on."""

from __future__ import annotations

import time

import docker
import pytest

import nanogrid
from nanogrid_backend.sandbox.docker import SANDBOX_UID

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(docker_grid) -> nanogrid.Client:
    return nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)


@nanogrid.remote(timeout=30)
def healthy(x):
    return x + 1


def still_serving() -> None:
    assert healthy.remote(41) == 42


def test_runs_as_nobody_without_capabilities_on_a_read_only_root(client):
    @nanogrid.remote
    def whoami():
        import os

        caps = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")]
        return os.getuid(), os.getgid(), caps[0]

    assert whoami.remote() == (65534, 65534, "0000000000000000")
    assert SANDBOX_UID == "65534:65534"


def test_cannot_see_another_functions_code_or_the_hosts_files(client, docker_grid):
    secret = "the-other-functions-secret-8c1f"

    @nanogrid.remote
    def holder():
        return secret

    assert holder.remote() == secret

    @nanogrid.remote
    def snoop(data_dir):
        import os

        needle = "-".join(
            ["the-other-functions", "secret"]
        ).encode()  # never one constant in this package
        found = []
        for top in ("/sandbox", "/tmp", "/opt", "/home", "/root", "/var", "/etc"):
            for root, _dirs, files in os.walk(top):
                for name in files:
                    try:
                        with open(os.path.join(root, name), "rb") as f:
                            if needle in f.read(1 << 20):
                                found.append(os.path.join(root, name))
                    except OSError:
                        pass
        return found, os.path.exists(data_dir), os.path.exists("/var/run/docker.sock")

    found, sees_data_dir, sees_docker = snoop.remote(str(docker_grid.config.data_dir))
    assert found == [] and sees_data_dir is False and sees_docker is False


def test_cannot_reach_another_host(client, docker_grid):
    engine = docker.from_env()
    server = engine.containers.run(
        docker_grid.config.docker_image,
        entrypoint=["python3", "-m", "http.server", "8000"],
        detach=True,
        remove=True,
        user="65534:65534",
        working_dir="/tmp",
    )
    try:
        server.reload()
        address = server.attrs["NetworkSettings"]["IPAddress"]
        assert address, "the helper container got no address on the default bridge"

        @nanogrid.remote(timeout=30)
        def connect(host):
            import socket

            try:
                socket.create_connection((host, 8000), timeout=3).close()
                return "connected"
            except OSError as exc:
                return type(exc).__name__ + ": " + str(exc)

        outcome = connect.remote(address)
        assert outcome != "connected" and "unreachable" in outcome.lower()
        assert connect.remote("127.0.0.1") != "connected"
    finally:
        server.kill()
    still_serving()


@pytest.mark.parametrize("path", ["/usr/evil", "/opt/nanogrid/bootstrap.py", "/etc/passwd"])
def test_cannot_write_outside_tmp_and_the_output_dir(client, path):
    @nanogrid.remote
    def scribble(target):
        with open(target, "w") as f:
            f.write("pwned")

    with pytest.raises(OSError, match="Read-only file system|Permission denied"):
        scribble.remote(path)
    still_serving()


def test_fork_bomb_hits_the_pids_limit(client):
    @nanogrid.remote(timeout=30)
    def bomb():
        import os

        while True:
            os.fork()

    with pytest.raises(BlockingIOError):
        bomb.remote()
    still_serving()


def test_writing_ten_gigabytes_of_output_fails_cleanly(client):
    @nanogrid.remote(memory=256, timeout=60)
    def flood():
        import nanogrid

        block = b"x" * (1 << 20)
        with open(nanogrid.output_dir() / "huge.bin", "wb") as f:
            for _ in range(10 * 1024):
                f.write(block)

    started = time.monotonic()
    with pytest.raises((nanogrid.OutOfMemory, OSError)) as info:
        flood.remote()
    assert "out of memory" in str(info.value) or "No space left" in str(info.value)
    assert time.monotonic() - started < 60
    still_serving()


def test_peak_memory_of_a_200_mib_allocation_reads_within_ten_percent(client):
    @nanogrid.remote(memory=512, timeout=30)
    def allocate(mib):
        block = bytearray(mib << 20)
        return len(block)

    allocate.remote(1)  # warm: the first call also loads the package
    job = allocate.spawn(200)
    job.result(timeout=30)
    # cgroup v1 resets the peak to the current usage, so the peak includes the idle sandbox's baseline
    used_by_the_call = job.peak_memory_bytes - job.baseline_memory_bytes
    assert abs(used_by_the_call - (200 << 20)) <= 0.10 * (200 << 20), (
        job.peak_memory_bytes,
        job.baseline_memory_bytes,
    )
    assert job.peak_memory_bytes <= 512 << 20


@pytest.mark.parametrize("memory", [96, 700])  # below and above a stem cell's default
def test_a_functions_memory_is_the_containers_memory_and_swap(client, memory):
    """The limit a function asks for is set in its container's cgroup when a stem cell takes it (without a call to
    the engine): memory, and memory plus swap, as `docker update --memory --memory-swap` would set them. Never may a
    function get more than it asked for by swapping."""

    @nanogrid.remote(memory=memory, timeout=30)
    def limits() -> dict[str, int]:
        from pathlib import Path

        root = Path("/sys/fs/cgroup/memory")
        if not root.is_dir():  # cgroup v2
            root = Path("/sys/fs/cgroup")
            return {
                "memory": int(Path(root, "memory.max").read_text()),
                "swap": int(Path(root, "memory.swap.max").read_text()),
            }
        found = {"memory": int(Path(root, "memory.limit_in_bytes").read_text())}
        memsw = Path(root, "memory.memsw.limit_in_bytes")
        if memsw.exists():
            found["memory_and_swap"] = int(memsw.read_text())
        return found

    found = limits.remote()
    assert found["memory"] == memory << 20
    assert found.get("memory_and_swap", memory << 20) == memory << 20
    assert found.get("swap", 0) == 0


def test_the_channel_is_a_socket_no_function_can_reach(client, docker_grid):
    """Frames go through a unix socket on the sandbox's own disk, not through the engine. What must never happen:
    a function that connects to it a second time, replaces it, or learns where it is from its environment."""

    @nanogrid.remote(timeout=30)
    def probe() -> dict[str, str]:
        import os
        import socket

        found = {"env": os.environ.get("NANOGRID_CHANNEL", "")}
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect("/run/nanogrid/ch")
            found["connect"] = "connected"
        except OSError as exc:
            found["connect"] = type(exc).__name__
        for what, attempt in (
            ("replace", lambda: os.rename("/run/nanogrid/ch", "/run/nanogrid/old")),
            ("create", lambda: open("/run/nanogrid/ch2", "w").close()),
        ):
            try:
                attempt()
                found[what] = "done"
            except OSError as exc:
                found[what] = type(exc).__name__
        return found

    found = probe.remote()
    assert found == {
        "env": "",
        "connect": "ConnectionRefusedError",
        "replace": "OSError",
        "create": "OSError",
    }, found
    assert probe.remote() == found  # and the sandbox still answers, over the same socket
    pool = docker_grid.grid.pool
    channels = {s.channel for group in pool._idle.values() for s in group}
    assert channels == {"socket"}, channels
