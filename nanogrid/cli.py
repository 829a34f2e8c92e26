"""The ``nanogrid`` command: start a grid, deploy and invoke functions, look at its state."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from nanogrid.client import Client, discover_url
from nanogrid_contract.errors import NanoGridError

# The grid's operator commands, registered by the grid itself when it is installed (pip install 'nanogrid[grid]').
GRID_COMMANDS = ("up", "controller", "worker", "aws", "demo", "loadtest", "keys", "envs", "doctor")
GRID_MISSING = "the embedded grid is not installed: pip install 'nanogrid[grid]'"


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr (what was wrong, where help is) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    # those of a grid command not installed
    if unknown and getattr(args, "command", None) is not _grid_missing:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.command(args) or 0
    except NanoGridError as exc:
        print(f"nanogrid: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nanogrid", description="Run Python functions and notebook cells on a grid."
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    _grid_commands(sub)
    deploy = sub.add_parser("deploy", help="upload a .py file or zip package as a function")
    deploy.add_argument("file", type=Path)
    deploy.add_argument("--name", required=True, help="function name")
    deploy.add_argument(
        "--handler", help="module.function taking (event, context), e.g. hello.handler"
    )
    deploy.add_argument("--runtime", default="python%d.%d" % sys.version_info[:2])
    deploy.add_argument("--memory", type=int, help="MiB")
    deploy.add_argument("--timeout", type=float, help="seconds")
    _client_options(deploy)
    deploy.set_defaults(command=cmd_deploy)

    invoke = sub.add_parser("invoke", help="run a deployed function with a JSON payload")
    invoke.add_argument("function_id")
    invoke.add_argument("--payload", default="{}", help="JSON event (default {})")
    invoke.add_argument(
        "--async", dest="asynchronous", action="store_true", help="print the job id and return"
    )
    _client_options(invoke)
    invoke.set_defaults(command=cmd_invoke)

    status = sub.add_parser("status", help="workers, warm sandboxes, queue depth")
    _client_options(status)
    status.set_defaults(command=cmd_status)

    secrets = sub.add_parser(
        "secrets",
        help="secrets: environment variables kept encrypted, for functions that name them",
    )
    secrets_sub = secrets.add_subparsers(metavar="ACTION")
    secret_set = secrets_sub.add_parser(
        "set", help="store NAME with KEY=VALUE variables (replaces earlier values)"
    )
    secret_set.add_argument("name")
    secret_set.add_argument("values", nargs="+", metavar="KEY=VALUE")
    _client_options(secret_set)
    secret_set.set_defaults(command=cmd_secrets_set)
    secret_list = secrets_sub.add_parser(
        "list", help="your secrets and their variable names (never the values)"
    )
    _client_options(secret_list)
    secret_list.set_defaults(command=cmd_secrets_list)
    secret_delete = secrets_sub.add_parser("delete", help="delete a secret")
    secret_delete.add_argument("name")
    _client_options(secret_delete)
    secret_delete.set_defaults(command=cmd_secrets_delete)

    volumes = sub.add_parser(
        "volumes", help="your volumes: filesystems on the grid that outlive calls"
    )
    volumes_sub = volumes.add_subparsers(metavar="ACTION")
    for action, arguments, text in (
        ("list", (), "your volumes, their size and what their files take"),
        ("create", ("name",), "make a volume (--size MiB, default 1024)"),
        ("ls", ("name", "path?"), "the files in a directory of a volume"),
        ("put", ("name", "local", "remote"), "copy a file from here onto a volume"),
        ("get", ("name", "remote", "local"), "copy a file from a volume to here"),
        ("rm", ("name", "path"), "remove a file or directory from a volume"),
        ("delete", ("name",), "remove a volume and everything on it"),
    ):
        command = volumes_sub.add_parser(action, help=text)
        for argument in arguments:
            if argument.endswith("?"):
                command.add_argument(argument.rstrip("?"), nargs="?", default="/")
            else:
                command.add_argument(argument)
        if action == "create":
            command.add_argument("--size", type=int, default=None, metavar="MIB")
        _client_options(command)
        command.set_defaults(command=cmd_volumes, action=action)

    schedules = sub.add_parser(
        "schedules", help="functions that run on their own (@remote(schedule=...))"
    )
    schedules_sub = schedules.add_subparsers(metavar="ACTION")
    schedule_list = schedules_sub.add_parser(
        "list", help="your schedules: timing, next due time, last firing"
    )
    _client_options(schedule_list)
    schedule_list.set_defaults(command=cmd_schedules_list)
    for action, text in (
        ("show", "a schedule and its latest firings (started, skipped, queued, catch-up)"),
        ("pause", "no more firings until resumed"),
        ("resume", "fire again from the next due time (those missed while paused are not made up)"),
        ("remove", "delete a schedule (the jobs it ran stay in history)"),
    ):
        schedule_action = schedules_sub.add_parser(action, help=text)
        schedule_action.add_argument("name", help="the schedule's name: its function's")
        _client_options(schedule_action)
        schedule_action.set_defaults(command=cmd_schedules_action, action=action)

    jobs = sub.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    _client_options(jobs)
    jobs.set_defaults(command=cmd_jobs)
    return parser


def _grid_commands(sub: argparse._SubParsersAction) -> None:
    """The grid's commands from the grid; without it, each is listed with the line that says how to install it."""
    try:
        from nanogrid_backend.cli import add_commands
    except ImportError:
        for name in GRID_COMMANDS:
            hint = sub.add_parser(
                name, help="(not installed: pip install 'nanogrid[grid]')", add_help=False
            )
            hint.set_defaults(command=_grid_missing)
        return
    add_commands(sub, client_options=_client_options, connect=_client, tour=_demo_tour)


def _grid_missing(args: argparse.Namespace) -> int:
    print(f"nanogrid: {GRID_MISSING}", file=sys.stderr)
    return 1


def _demo_tour(url: str, api_key: str) -> None:
    from nanogrid.demo import tour

    tour(url, api_key)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=None, help="controller URL (default: NANOGRID_URL, else the local grid)"
    )


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url or discover_url())


def cmd_deploy(args: argparse.Namespace) -> int:
    function = _client(args).upload(
        args.file,
        function_name=args.name,
        handler=args.handler,
        runtime=args.runtime,
        memory=args.memory,
        timeout=args.timeout,
    )
    print(json.dumps(function, indent=2))
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        print(f"nanogrid: --payload is not JSON: {exc}", file=sys.stderr)
        return 2
    client = _client(args)
    view = client.run(
        {"function_id": args.function_id, "payload": payload}, asynchronous=args.asynchronous
    )
    while not args.asynchronous and view["status"] in ("pending", "running"):
        view = client.status(view["job_id"], wait=30)
    print(json.dumps(view, indent=2))
    return 0 if view["status"] in ("completed", "pending", "running") else 1


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    health = client.health()
    status = client.system_status()
    print(f"grid      {client.url}  ({health['status']}, version {health['version']})")
    for problem in health.get("problems") or []:  # a grid older than this field says nothing
        print(f"problem   {problem}")
    print(f"runtimes  {', '.join(health['runtimes'])}")
    print(f"sandbox   {health['sandbox']}")
    print(f"queue     {status['queue_depth']} waiting")
    for worker in status["workers"]:
        pool = worker["pool"]
        print(
            f"worker    {worker['worker_id']}: {worker['slots']} slots, {pool['busy']} busy, "
            f"{pool['idle']} warm idle, {pool['stem_cells']} stem cells, "
            f"{pool['specialised']}/{pool['cap']} specialised"
        )
    print(
        "jobs      "
        + (", ".join(f"{n} {s}" for s, n in sorted(status["jobs"].items())) or "none yet")
    )
    # a grid older than the data plane's accounting says nothing
    if status.get("blobs") is not None:
        print(
            f"blobs     {status['blobs']['count']} stored, {status['blobs']['bytes'] / (1 << 20):.1f} MiB"
        )
    with contextlib.suppress(NanoGridError):  # a grid without volumes says nothing
        owned = client.request("GET", "/volumes").json()
        print(
            f"volumes   {len(owned)}, {sum(v['used_bytes'] for v in owned) / (1 << 20):.1f} MiB used of "
            f"{sum(v['size_mib'] for v in owned)} MiB"
        )
    try:
        models = client.models()
        print(
            f"AI node   {models['endpoint']}: answers; models {', '.join(models['models']) or 'none'}"
            f"{'; default ' + models['default'] if models['default'] else ''}"
        )
    except NanoGridError as exc:
        print(f"AI node   {getattr(exc, 'detail', exc)}")
    return 0


def job_row(job: dict[str, Any]) -> dict[str, str]:
    """One job as `nanogrid jobs` and `%nanogrid jobs` show it: function, status, duration, peak
    memory, why it failed."""
    ms, peak, error = (
        job.get("execution_time_ms"),
        job.get("peak_memory_bytes"),
        job.get("error") or {},
    )
    reason = ""
    if job["status"] in ("failed", "cancelled"):
        reason = (
            f"{error.get('type') or error.get('kind') or job['status']}: {error.get('message', '')}"
        )
        reason = reason.strip().rstrip(":").splitlines()[0][:120]
    return {
        "function": job.get("function_name") or job["function_id"],
        "status": job["status"],
        "duration": "" if ms is None else f"{ms:.1f} ms",
        "peak memory": "" if peak is None else f"{peak / (1 << 20):.1f} MiB",
        "when": time.strftime("%H:%M:%S", time.localtime(job["created_at"])),
        "failure": reason,
        "job": job["job_id"],
    }


def cmd_secrets_set(args: argparse.Namespace) -> int:
    values = {}
    for item in args.values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"nanogrid secrets set: {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        values[key] = value
    secret = _client(args).set_secret(args.name, values)
    print(f"secret {secret['name']}: {', '.join(secret['variables'])}")
    return 0


def cmd_secrets_list(args: argparse.Namespace) -> int:
    for secret in _client(args).secrets():
        print(f"{secret['name']:32} {', '.join(secret['variables'])}")
    return 0


def cmd_secrets_delete(args: argparse.Namespace) -> int:
    print(f"deleted secret {_client(args).delete_secret(args.name)['name']}")
    return 0


def cmd_volumes(args: argparse.Namespace) -> int:
    from nanogrid.volume import Volume, volumes

    client = _client(args)
    if args.action == "list":
        for info in volumes(client):
            print(
                f"{info['name']:32} {info['size_mib']:>8} MiB  {info['used_bytes'] / (1 << 20):10.1f} MiB used"
            )
        return 0
    volume = Volume(args.name, size_mib=getattr(args, "size", None), client=client)
    # only `create` and `put` make a volume; the others name an existing one
    volume._made = args.action != "put"
    if args.action == "create":
        info = volume.ensure()
        print(f"volume {info['name']}: {info['size_mib']} MiB")
    elif args.action == "ls":
        for entry in volume.listdir(args.path):
            print(
                f"{entry['kind']:5} {entry['size']:>14}  {entry['name']}{'/' if entry['kind'] == 'dir' else ''}"
            )
    elif args.action == "put":
        print(
            f"{args.local} -> {args.name}:{args.remote} ({volume.put(args.local, args.remote)} bytes)"
        )
    elif args.action == "get":
        print(
            f"{args.name}:{args.remote} -> {args.local} ({volume.get(args.remote, args.local)} bytes)"
        )
    elif args.action == "rm":
        volume.remove(args.path)
        print(f"removed {args.name}:{args.path}")
    else:
        print(f"deleted volume {volume.delete()['name']}")
    return 0


def cmd_schedules_list(args: argparse.Namespace) -> int:
    from nanogrid.schedule import schedules

    print(f"{'name':24} {'timing':36} {'state':8} {'next due (UTC)':20}  last firing")
    for schedule in schedules(_client(args)):
        print(_schedule_line(schedule.view))
    return 0


def cmd_schedules_action(args: argparse.Namespace) -> int:
    """``show``, ``pause``, ``resume`` or ``remove`` one schedule (a name that is not yours: the grid's 404, exit 1)."""
    from nanogrid.schedule import Schedule

    client = _client(args)
    schedule = Schedule(client, client.request("GET", f"/schedules/{args.name}").json())
    if args.action == "remove":
        schedule.remove()
        print(f"removed schedule {args.name}")
        return 0
    if args.action != "show":
        getattr(schedule, args.action)()
    print(_schedule_line(schedule.view))
    for firing in schedule.firings:
        print(
            f"  due {_utc(firing['due_time'])}  {firing['outcome']:8} {firing['lateness_s']:+7.3f} s  "
            f"{firing['job_id'] or '':36}  {firing['detail']}"
        )
    return 0


def _schedule_line(view: dict) -> str:
    timing = (
        f"{view['cron']} ({view['timezone']})" if view["cron"] else f"every {view['period_s']:g} s"
    )
    last = view["firings"][0] if view["firings"] else None
    when = f"{last['outcome']} {_utc(last['due_time'])}" if last else "-"
    return (
        f"{view['name'][:24]:24} {timing[:36]:36} {'paused' if view['paused'] else 'active':8} "
        f"{_utc(view['next_due']):20}  {when}"
    )


def _utc(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def cmd_jobs(args: argparse.Namespace) -> int:
    rows = [job_row(job) for job in _client(args).jobs(args.limit)]
    print(
        f"{'function':24} {'status':10} {'duration':>11} {'peak memory':>12}  {'when':8}  {'job':36}  failure"
    )
    for r in rows:
        print(
            f"{r['function'][:24]:24} {r['status']:10} {r['duration']:>11} {r['peak memory']:>12}  {r['when']:8}  "
            f"{r['job']:36}  {r['failure']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
