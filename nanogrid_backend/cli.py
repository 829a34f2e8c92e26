"""The grid's operator commands (up, controller, worker, aws, keys, envs, doctor, loadtest, demo) for ``nanogrid``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogrid_contract.errors import ConfigError

if TYPE_CHECKING:
    from nanogrid_backend.config import GridConfig

# The client's wheel carries this package too: without the [grid] extra's libraries there are no grid commands.
# Found, not imported: each command imports what it needs when it runs, so `nanogrid --help` starts no web framework.
_MISSING = [
    name
    for name in (
        "fastapi",
        "uvicorn",
        "prometheus_client",
        "docker",
        "ollama",
        "uv",
        "jinja2",
        "cronsim",
    )
    if importlib.util.find_spec(name) is None
]
if _MISSING:
    raise ImportError(
        f"the embedded grid needs {', '.join(_MISSING)}: pip install 'nanogrid[grid]'"
    )


def add_commands(
    sub: argparse._SubParsersAction,
    *,
    client_options: Callable[[argparse.ArgumentParser], None],
    connect: Callable[[argparse.Namespace], Any],
    tour: Callable[[str, str], None],
) -> None:
    """Register the grid's commands on the ``nanogrid`` command's subparsers.

    The client lends what these commands need of it: ``client_options`` (its --url), ``connect`` (a client for
    parsed arguments, for ``loadtest``) and ``tour`` (what ``demo`` shows on the grid it starts, given the grid's
    URL and API key), so the grid imports nothing of the client.
    """
    up = sub.add_parser(
        "up", help="start the embedded grid (controller + worker) in the foreground"
    )
    _grid_options(up)
    up.add_argument(
        "--open",
        dest="open_access",
        action="store_true",
        default=None,
        help="serve requests without an API key as this grid's local owner (seed scripts as they are); "
        "loopback addresses only",
    )
    up.set_defaults(command=cmd_up)

    controller = sub.add_parser(
        "controller",
        help="run only the controller (workers run separately; needs SQS_QUEUE_URL and REDIS_HOST)",
    )
    _grid_options(controller)
    controller.set_defaults(command=cmd_controller)

    worker = sub.add_parser(
        "worker", help="run only a worker: take jobs from the shared queue until stopped"
    )
    _grid_options(worker)
    worker.add_argument(
        "--drain", type=float, default=60.0, help="seconds to let running jobs finish on SIGTERM"
    )
    worker.set_defaults(command=cmd_worker)

    aws = sub.add_parser("aws", help="AWS helpers")
    aws_sub = aws.add_subparsers(metavar="ACTION")
    boot = aws_sub.add_parser(
        "bootstrap",
        help="create the queue, dead-letter queue, buckets and table if missing, "
        "and print their settings as NAME=value lines",
    )
    boot.add_argument(
        "--queue",
        default=None,
        help="queue name (default: from SQS_QUEUE_URL, else nanogrid-task-queue)",
    )
    boot.add_argument(
        "--dlq", default=None, help="dead-letter queue name (default: from SQS_DLQ_URL)"
    )
    boot.add_argument(
        "--code-bucket", dest="code_bucket", default=None, help="default S3_CODE_BUCKET"
    )
    boot.add_argument(
        "--data-bucket", dest="data_bucket", default=None, help="default S3_USER_DATA_BUCKET"
    )
    boot.add_argument("--table", dest="dynamodb_table", default=None, help="default DYNAMODB_TABLE")
    boot.add_argument(
        "--visibility",
        dest="sqs_visibility_s",
        type=int,
        default=None,
        help="seconds a taken job stays hidden (default 30, NANOGRID_SQS_VISIBILITY_S)",
    )
    boot.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (NANOGRID_CONFIG)"
    )
    boot.set_defaults(command=cmd_aws_bootstrap)

    demo = sub.add_parser(
        "demo", help="start a throwaway grid, run a short demo on it, and print the results"
    )
    demo.add_argument("--workers", type=int, default=None)
    demo.set_defaults(command=cmd_demo, tour=tour)

    load = sub.add_parser(
        "loadtest",
        help="call a function at a steady rate for a while (a grid on this machine only) "
        "and print throughput, p50/p95/p99 latency and errors",
    )
    load.add_argument("function", help="function id, or name (its newest version)")
    load.add_argument(
        "--rps", type=float, default=10.0, help="calls per second (default 10, at most 500)"
    )
    load.add_argument(
        "--duration", type=float, default=10.0, help="seconds (default 10, at most 300)"
    )
    load.add_argument(
        "--payload", default="{}", help="JSON event for a handler function (default {})"
    )
    load.add_argument(
        "--args", default="[]", help="JSON list of arguments for a Python function (default [])"
    )
    load.add_argument("--json", action="store_true", help="print the summary as JSON")
    client_options(load)
    load.set_defaults(command=cmd_loadtest, connect=connect)

    keys = sub.add_parser(
        "keys", help="API keys of the grid in --data-dir (run it where the grid runs)"
    )
    keys_sub = keys.add_subparsers(metavar="ACTION")
    create = keys_sub.add_parser("create", help="make a key for NAME (an owner) and print it once")
    create.add_argument("name")
    create.add_argument(
        "--rate-limit", type=float, default=None, help="requests per second for this key"
    )
    create.add_argument("--rate-burst", type=int, default=None, help="burst size for this key")
    create.add_argument(
        "--admin", action="store_true", help="may see every owner's jobs and workers"
    )
    create.add_argument(
        "--max-timeout", type=float, default=None, help="seconds; lower than the grid's max timeout"
    )
    create.add_argument(
        "--max-concurrency", type=int, default=None, help="this owner's calls running at once"
    )
    create.add_argument(
        "--disk-quota",
        type=_byte_size,
        default=None,
        help="this owner's stored output files, e.g. 500MiB or 20GiB (0: none kept)",
    )
    create.set_defaults(command=cmd_keys_create)
    listing = keys_sub.add_parser(
        "list", help="keys, owners and limits (never the keys themselves)"
    )
    listing.set_defaults(command=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (or the key itself)")
    revoke.add_argument("key_id")
    revoke.set_defaults(command=cmd_keys_revoke)
    for parser_ in (create, listing, revoke):
        parser_.add_argument(
            "--data-dir", type=Path, default=None, help="default ~/.nanogrid (NANOGRID_DATA_DIR)"
        )

    envs = sub.add_parser(
        "envs", help="function environments built in --data-dir: size and last use; --remove ID"
    )
    envs.add_argument(
        "--data-dir", type=Path, default=None, help="default ~/.nanogrid (NANOGRID_DATA_DIR)"
    )
    envs.add_argument(
        "--remove", metavar="ENV_ID", action="append", default=[], help="delete one (repeatable)"
    )
    envs.set_defaults(command=cmd_envs)

    doctor = sub.add_parser(
        "doctor", help="check the registry in --data-dir: schema version, integrity, jobs, backups"
    )
    doctor.add_argument(
        "--data-dir", type=Path, default=None, help="default ~/.nanogrid (NANOGRID_DATA_DIR)"
    )
    doctor.add_argument(
        "--repair",
        action="store_true",
        help="restore the newest good backup over a damaged registry (the damaged file is kept aside)",
    )
    doctor.add_argument(
        "--clean",
        action="store_true",
        help="remove what a crashed grid left: its containers, work dirs, scratch disks, memory cgroups",
    )
    doctor.set_defaults(command=cmd_doctor)


def _grid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="default 8765")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default ~/.nanogrid (NANOGRID_DATA_DIR)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="calls run at once (default: CPU count)"
    )
    parser.add_argument(
        "--sandbox",
        choices=["auto", "docker", "process"],
        default=None,
        help="where user code runs: docker, process (trusted code only), auto (docker when available)",
    )
    parser.add_argument(
        "--stem-cells", type=int, default=None, help="unspecialised sandboxes kept started"
    )
    parser.add_argument(
        "--env-cache-gb",
        type=float,
        default=None,
        help="function environments kept (default 20 GB); the least recently used go first",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (NANOGRID_CONFIG)"
    )
    parser.add_argument(
        "--ai-endpoint", default=None, help="the AI node (an Ollama server URL) functions may call"
    )
    parser.add_argument("--ai-model", default=None, help="its default model (LLM_MODEL)")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="requests/s per API key (default 1000; 0: off)",
    )
    parser.add_argument(
        "--rate-burst", type=int, default=None, help="requests at once per API key (default 2000)"
    )
    parser.add_argument(
        "--max-payload-bytes",
        type=_byte_size,
        default=None,
        help="largest argument of a call, pickled (default 2GiB; over 1 MiB they travel as blobs)",
    )
    parser.add_argument(
        "--max-result-bytes",
        type=_byte_size,
        default=None,
        help="largest result of a call, pickled (default 2GiB)",
    )


def _grid_config(args: argparse.Namespace) -> GridConfig:
    """The one settings object: defaults < file < environment < this command's flags (named as its fields)."""
    from nanogrid_backend.config import GridConfig

    flags = {f.name: getattr(args, f.name) for f in fields(GridConfig) if hasattr(args, f.name)}
    return GridConfig.load(getattr(args, "config", None), **flags)


def cmd_envs(args: argparse.Namespace) -> int:
    """List or remove the grid's built environments (layers under the data dir, and their Docker images)."""
    from nanogrid_backend.builds.builder import Environments
    from nanogrid_backend.config import GridConfig

    config = GridConfig.load(data_dir=args.data_dir)
    # so that remove also deletes the image
    docker_images: dict[str, str] | None = {} if config.sandbox != "process" else None
    environments = Environments(config.data_dir / "envs", runtimes={}, docker_images=docker_images)
    for env_id in args.remove:
        print(f"removed {env_id}" if environments.remove(env_id) else f"no environment {env_id}")
    if args.remove:
        return 0
    listed = environments.list()
    if not listed:
        print("no environments built yet")
    for info in listed:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["last_used"]))
        packages = ", ".join(info["spec"]["packages"]) or "(no packages)"
        print(
            f"{info['env_id']}  {info['size'] / (1 << 20):8.1f} MiB  used {used}  "
            f"Python {info['spec']['python']}  {packages}"
        )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import logging

    from nanogrid_backend import health
    from nanogrid_backend.embedded import serve, write_grid_file
    from nanogrid_backend.store.blobs import blobs_of

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = _grid_config(args)

    def ready(url: str, grid: Any) -> None:
        try:
            found = f"clients find this grid through {write_grid_file(config.data_dir, url)}"
        except OSError as exc:  # a full data disk: the grid serves all the same
            found = f"grid.json could not be written ({exc.strerror}): clients need --url or NANOGRID_URL"
        print(f"NanoGrid is up at {url}", flush=True)
        print(f"  sandbox:  {grid.describe_sandbox()}", flush=True)
        print(
            f"  workers:  {config.workers} slots, {config.stem_cells} stem cells, pool cap {config.effective_pool_cap}"
        )
        print(f"  data:     {config.data_dir} ({found})", flush=True)
        space = blobs_of(grid).space(None)
        print(
            f"  blobs:    {space.count} stored, {space.bytes / (1 << 20):.1f} MiB (large arguments and results, "
            "nanogrid.put)",
            flush=True,
        )
        for note in [
            *getattr(grid.registry, "start_notes", []),
            *health.problems(grid, for_operator=True),
        ]:
            print(f"  WARNING:  {note}", flush=True)
        if config.open_access:
            print(
                f"  WARNING:  --open: requests WITHOUT an API key act as the local owner; anyone on this machine "
                f"can run code here ({url})",
                flush=True,
            )
        print("  stop with Ctrl-C", flush=True)

    serve(config, on_ready=ready)
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    import logging

    from nanogrid_backend.embedded import serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def ready(url: str, grid: Any) -> None:
        print(f"NanoGrid controller at {url} (queue {grid.config.queue_url})", flush=True)

    serve(_grid_config(args), on_ready=ready, role="controller")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from nanogrid_backend.grid import Grid

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    grid = Grid(_grid_config(args), role="worker")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = grid.worker
    assert worker is not None  # role="worker" always has one
    grid.start()
    print(f"NanoGrid worker {worker.worker_id}: {grid.describe_sandbox()}", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    worker.drain(args.drain)  # scale-in: finish what runs, take nothing new
    grid.stop()
    return 0


def cmd_aws_bootstrap(args: argparse.Namespace) -> int:
    try:
        from nanogrid_backend.aws import bootstrap
    except ImportError as exc:  # boto3 comes with the [aws] extra only
        raise ConfigError(
            f"the AWS adapters are not installed ({exc.name} is missing): "
            "pip install 'nanogrid[aws]'"
        ) from None

    # the same variables the controller and workers read (DYNAMODB_TABLE, ...)
    config = _grid_config(args)
    names = {
        "queue": args.queue or _queue_name(config.queue_url),
        "dlq": args.dlq or _queue_name(config.dlq_url),
        "code_bucket": config.code_bucket,
        "data_bucket": config.data_bucket,
        "table": config.dynamodb_table,
    }
    settings = bootstrap(names, visibility_s=config.sqs_visibility_s)
    for name, value in settings.items():
        print(f"{name}={value}")
    return 0


def _queue_name(url: str) -> str:
    """An SQS queue URL ends with the queue's name: https://sqs.REGION.amazonaws.com/ACCOUNT/NAME."""
    return url.rstrip("/").rsplit("/", 1)[-1] if url else ""


def cmd_demo(args: argparse.Namespace) -> int:
    """A throwaway embedded grid in a temporary data dir, shown by the client's tour and then removed."""
    import tempfile

    # Before the grid's imports: they take a second or two on a first run, when nothing is compiled yet.
    print("Starting an embedded grid ...", flush=True)
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.embedded import EmbeddedGrid

    with tempfile.TemporaryDirectory(prefix="nanogrid-demo-") as data_dir:
        config = GridConfig.load(data_dir=Path(data_dir), port=0, workers=args.workers)
        with EmbeddedGrid(config) as embedded:
            print(f"  {embedded.url}  [{embedded.grid.describe_sandbox()}]")
            args.tour(embedded.url, embedded.api_key)
    return 0


def _registry(args: argparse.Namespace) -> Any:
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.grid import make_registry

    return make_registry(GridConfig.load(data_dir=args.data_dir))


def _byte_size(text: str) -> int:
    """``1048576``, ``500MiB``, ``20GiB``, ``1TiB`` (also KiB, and KB/MB/GB/TB as powers of 1000)."""
    units = {
        "": 1,
        "B": 1,
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
    }
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number) :].upper()
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: write e.g. 500MiB, 20GiB or a byte count"
        ) from None


def cmd_keys_create(args: argparse.Namespace) -> int:
    from nanogrid_backend.keys import create_key

    try:
        key, record = create_key(
            _registry(args),
            args.name,
            rate_limit=args.rate_limit,
            rate_burst=args.rate_burst,
            admin=args.admin,
            max_timeout_s=args.max_timeout,
            max_concurrency=args.max_concurrency,
            disk_quota_bytes=args.disk_quota,
        )
    except ValueError as exc:
        print(f"nanogrid: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(
        f"key {record.key_id} for {record.name}: shown once, only its hash is stored",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    print(f"{'key id':10} {'owner':20} {'created':20} {'rate/s':>8} {'burst':>6}  state")
    for key in _registry(args).list_keys():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(key.created_at))
        state = (
            "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(key.revoked_at))
            if key.revoked_at
            else "active"
        )
        rate = "" if key.rate_limit is None else f"{key.rate_limit:g}"
        burst = "" if key.rate_burst is None else str(key.rate_burst)
        print(f"{key.key_id:10} {key.name:20} {created:20} {rate:>8} {burst:>6}  {state}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from nanogrid_backend.keys import revoke_key

    try:
        record = revoke_key(_registry(args), args.key_id)
    except KeyError as exc:
        print(f"nanogrid: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"revoked key {record.key_id} of {record.name}")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    import base64

    import cloudpickle

    from nanogrid_backend.controller import load_runner as loadtest

    client = args.connect(args)
    loadtest.check_loopback(client.url)
    loadtest.check_bounds(args.rps, args.duration)
    names = ("function_id", "function_name", "stable_id")  # stable_id: a seed function's uuid
    functions = [f for f in client.functions() if args.function in (f.get(name) for name in names)]
    if not functions:
        print(
            f"nanogrid: no function {args.function!r} (`nanogrid deploy` one, or see GET /v1/functions)",
            file=sys.stderr,
        )
        return 1
    function = max(functions, key=lambda f: f["created_at"])
    try:
        body: dict[str, Any] = {"function_id": function["function_id"]}
        if function["kind"] == "pickle":
            body["args_pickle"] = base64.b64encode(
                cloudpickle.dumps((tuple(json.loads(args.args)), {}))
            ).decode()
        else:
            body["payload"] = json.loads(args.payload)
    except ValueError as exc:
        print(f"nanogrid: --payload / --args is not JSON: {exc}", file=sys.stderr)
        return 2

    def call() -> str | None:
        view = client.run(body)
        while view["status"] in ("pending", "running"):
            view = client.status(view["job_id"], wait=30)
        return (
            None
            if view["status"] == "completed"
            else (view.get("error") or {}).get("kind", view["status"])
        )

    def progress(test: loadtest.LoadTest) -> None:
        now = test.summary()
        print(
            f"\r{function['function_name']}: {now['sent']}/{now['planned']} sent, {now['completed']} ok, "
            f"{now['failed']} failed, p50 {now['p50_ms'] or 0:.1f} ms, p99 {now['p99_ms'] or 0:.1f} ms ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    summary = loadtest.run(call, args.rps, args.duration, on_progress=progress).summary()
    print(file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['completed'] + summary['failed']} calls in {summary['elapsed_s']:.1f} s: "
            f"{summary['throughput']:.1f} calls/s, p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
            f"p99 {summary['p99_ms']} ms, {summary['failed']} failed {summary['errors'] or ''}".rstrip()
        )
    return 0 if summary["failed"] == 0 else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit status 0 when the registry is healthy (or was repaired), 1 when it needs --repair."""
    from nanogrid_backend import health
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.registry import doctor

    config = GridConfig.load(data_dir=args.data_dir)
    data_dir = config.data_dir
    if args.repair:
        for line in doctor.repair(data_dir):
            print(line)
    report = doctor.inspect(data_dir)
    registry = report.registry
    print(f"registry  {registry.path} ({registry.size / (1 << 20):.1f} MiB)")
    print(
        f"grid      {'running, pid %d' % report.grid_pid if report.grid_pid is not None else 'not running'}"
    )
    if registry.ok and registry.size:
        print(
            f"schema    version {registry.version} (this NanoGrid: {doctor.SCHEMA_VERSION}"
            f"{'; upgraded at the next start' if registry.version < doctor.SCHEMA_VERSION else ''})"
        )
        print("integrity ok (quick_check)")
        print(
            "jobs      "
            + (", ".join(f"{n} {s}" for s, n in sorted(registry.jobs.items())) or "none")
        )
        print(f"functions {registry.functions}, keys {registry.keys}")
    elif registry.ok:
        print("integrity none yet: the first `nanogrid up` creates it")
    else:
        print(f"integrity DAMAGED: {registry.problem}")
    for backup in report.backups:
        print(
            f"backup    {backup.path.name} ({backup.size / (1 << 20):.1f} MiB, "
            f"{'ok, %d jobs' % sum(backup.jobs.values()) if backup.ok else backup.problem})"
        )
    if not report.backups:
        print("backup    none yet (one is made at each start)")
    enough, space = health.space_report(data_dir, config.default_disk_mib)
    print(
        f"disk      {space}" + ("" if enough else ": TOO LITTLE, calls fail until space is freed")
    )
    if not _doctor_leftovers(data_dir, report.grid_pid, args.clean):
        return 1
    if not registry.ok:
        print(
            f"nanogrid: repair with `nanogrid doctor --data-dir {data_dir} --repair`",
            file=sys.stderr,
        )
        return 1
    return 0


def _doctor_leftovers(data_dir: Path, grid_pid: int | None, clean: bool) -> bool:
    """Show (and with ``clean`` remove) the sandboxes a crashed grid left; False when cleaning was refused."""
    from nanogrid_backend.sandbox import leftovers

    sandbox_dir = data_dir / "sandboxes"
    if clean and grid_pid is not None:
        print(
            f"nanogrid: a grid (pid {grid_pid}) runs on {data_dir}: its sandboxes are not leftovers; stop it "
            "first (a grid also removes what an earlier run left when it starts)",
            file=sys.stderr,
        )
        return False
    found = leftovers.clean(sandbox_dir) if clean else leftovers.find(sandbox_dir)
    parts = [
        f"{len(found.containers)} containers",
        f"{len(found.directories)} sandbox directories",
        f"{len(found.cgroups)} memory cgroups",
        f"{len(found.disks)} scratch disks",
    ]
    if grid_pid is not None:
        print(f"sandboxes {', '.join(parts)} of the running grid")
    elif found.count:
        print(
            f"leftovers {', '.join(parts)} of a grid that stopped without closing them"
            + (
                ": removed"
                if clean
                else f": remove with `nanogrid doctor --data-dir {data_dir} --clean`"
            )
        )
    else:
        print("leftovers none")
    if found.docker_problem:
        print(f"containers not checked: {found.docker_problem}")
    return True
