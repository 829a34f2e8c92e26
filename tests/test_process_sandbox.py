"""The process sandbox directly: isolation where bubblewrap exists, and the no-cgroup, no-bwrap fallback."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import cloudpickle
import pytest

from nanogrid.packaging import package_function
from nanogrid_backend.sandbox.base import Limits, SandboxError
from nanogrid_backend.sandbox.process import ProcessSandboxFactory
from tests.conftest import require

pytestmark = pytest.mark.integration


def loaded(factory: ProcessSandboxFactory, fn, memory_mib: int = 256):
    sandbox = factory.start()
    package = package_function(fn, name="t")
    sandbox.load(package.function_id, package.data, memory_mib)
    return sandbox


def call(sandbox, *args, timeout: float = 10):
    result = sandbox.call("job-test", cloudpickle.dumps((args, {})), timeout)
    return result, cloudpickle.loads(result.body) if result.body else None


@pytest.fixture()
def fallback(tmp_path: Path) -> ProcessSandboxFactory:
    return ProcessSandboxFactory(tmp_path / "sandboxes", tmp_path, bubblewrap="off", cgroups="off")


def test_fallback_limits_memory_with_rlimit_and_measures_peak_with_vmhwm(fallback):
    def allocate(mib):
        return len(bytearray(mib << 20))

    sandbox = loaded(fallback, allocate, memory_mib=128)
    try:
        result, value = call(sandbox, 64)
        assert value == 64 << 20
        assert 64 << 20 <= result.peak_memory_bytes <= 100 << 20
        result, _ = call(sandbox, 512)
        assert result.reply["ok"] is False and result.reply["error"]["kind"] == "memory"
        assert not sandbox.alive  # replaced after a MemoryError
    finally:
        sandbox.close()


def test_fallback_timeout(fallback):
    def spin():
        while True:
            pass

    sandbox = loaded(fallback, spin)
    with pytest.raises(SandboxError) as info:
        call(sandbox, timeout=0.5)
    assert info.value.kind == "timeout"
    assert not sandbox.alive


def test_print_cannot_corrupt_the_result_channel(fallback):
    def noisy():
        import os
        import subprocess
        import sys

        print("x" * 100_000)
        os.write(1, b"\x00\x00\x00\x05raw bytes on fd 1\n")
        sys.stderr.write("to stderr\n")
        subprocess.run(["echo", "from a child process"], check=True)
        return "fine"

    sandbox = loaded(fallback, noisy)
    try:
        result, value = call(sandbox)
        assert value == "fine"
        assert (
            "from a child process" in result.reply["stdout"]
            and "raw bytes" in result.reply["stdout"]
        )
        assert result.reply["stderr"] == "to stderr\n"
    finally:
        sandbox.close()


def test_stdout_is_capped(tmp_path):
    factory = ProcessSandboxFactory(
        tmp_path / "s", tmp_path, bubblewrap="off", cgroups="off", limits=Limits(capture_bytes=1000)
    )

    def chatty():
        print("y" * 5000)

    sandbox = loaded(factory, chatty)
    try:
        result, _ = call(sandbox)
        assert result.reply["stdout"].startswith("y" * 1000)
        assert "output truncated, 4001 more bytes" in result.reply["stdout"]
    finally:
        sandbox.close()


def test_bubblewrap_hides_the_grid_and_cuts_the_network(tmp_path):
    require(
        shutil.which("bwrap") is not None,
        "bubblewrap is not installed (apt-get install bubblewrap)",
    )
    secret = tmp_path / "store" / "packages" / "other-function.zip"
    secret.parent.mkdir(parents=True)
    secret.write_text("another function's code")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    factory = ProcessSandboxFactory(
        tmp_path / "sandboxes", tmp_path, bubblewrap="on", cgroups="off"
    )

    host_tmp_file = Path("/tmp") / f"nanogrid-test-{port}"
    host_tmp_file.write_text("on the host's /tmp")

    def probe(secret_path, port, host_tmp_file):
        import os
        import socket

        seen = {
            "secret_visible": os.path.exists(secret_path),
            "host_tmp_visible": os.path.exists(host_tmp_file),
        }
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            seen["network"] = "connected"
        except OSError as exc:
            seen["network"] = type(exc).__name__
        try:
            open("/usr/nanogrid-test", "w")
            seen["system_writable"] = True
        except OSError:
            seen["system_writable"] = False
        return seen

    sandbox = loaded(factory, probe)
    try:
        _, seen = call(sandbox, str(secret), port, str(host_tmp_file))
    finally:
        sandbox.close()
        listener.close()
        host_tmp_file.unlink()
    assert seen["secret_visible"] is False  # the grid's data directory is hidden
    assert seen["network"] != "connected"  # a listener on the host's loopback is out of reach
    assert seen["system_writable"] is False
    assert seen["host_tmp_visible"] is False  # a private /tmp


def test_bubblewrap_hides_the_container_engine(tmp_path):
    """Never: a process sandbox that reads the container engine's storage (other sandboxes' files) or reaches its
    control socket; nor one that fails to start because a container's mount came or went while it was being made."""
    require(
        shutil.which("bwrap") is not None,
        "bubblewrap is not installed (apt-get install bubblewrap)",
    )
    factory = ProcessSandboxFactory(
        tmp_path / "sandboxes", tmp_path, bubblewrap="on", cgroups="off"
    )

    def probe(paths):
        import os

        return {path: os.path.lexists(path) for path in paths}

    hidden = ["/var/lib/docker", "/var/lib/containerd", "/run/docker.sock", "/var/run/docker.sock"]
    sandbox = loaded(factory, probe)
    try:
        _, seen = call(sandbox, hidden)
    finally:
        sandbox.close()
    assert seen == dict.fromkeys(hidden, False), seen


def test_close_returns_only_once_the_sandboxs_processes_are_gone(tmp_path):
    """Never: close() returning while a process of the sandbox still runs, holding its files open (their disk
    space not yet free, so the next call finds the disk still full) or its memory cgroup (left behind)."""
    from nanogrid_backend.sandbox import cgroup

    require(cgroup.available(), "memory cgroups are not writable here (run as root)")
    factory = ProcessSandboxFactory(tmp_path / "sandboxes", tmp_path, cgroups="on")

    def hold_a_file_open(mib):
        import builtins
        import os

        held = open(os.path.join(os.environ["NANOGRID_WORK_DIR"], "held.bin"), "wb")  # noqa: SIM115
        held.write(b"x" * (mib << 20))
        held.flush()
        builtins.held = held  # open until the process dies
        return os.getpid()

    for _ in range(5):  # the bootstrap used to outlive close() by a few ms, now and then
        sandbox = loaded(factory, hold_a_file_open)
        try:
            _, pid = call(sandbox, 16)
            assert pid
            group = sandbox.cgroup.path
            processes = [int(p) for p in (group / "cgroup.procs").read_text().split()]
            assert processes
        finally:
            sandbox.close()
        for process in processes:
            stat = Path(f"/proc/{process}/stat")
            state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
            assert state in ("Z", "X", "gone"), (
                f"process {process} of a closed sandbox is still {state}"
            )
        assert not group.exists(), "a closed sandbox's memory cgroup was left behind"
