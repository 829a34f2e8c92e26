"""Settings: one object (GridConfig), one precedence, and every documented variable reaching every command.

What must never happen: a variable the docs (README.md and docs/) document that a command quietly ignores (as
`nanogrid aws bootstrap` once ignored DYNAMODB_TABLE and made its own table), a layer that wins
over the one that should (a file over the environment, the environment over a flag), or a bad
value that starts a grid with a default instead of saying what was wrong.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest

import nanogrid.cli
import nanogrid_backend.aws
import nanogrid_backend.embedded
import nanogrid_backend.grid
from nanogrid.client import Client
from nanogrid.errors import ConfigError, NanoGridError
from nanogrid_backend.config import CHOICES, SEED_NAMES, GridConfig
from nanogrid_backend.secretbox import SecretBox, SecretError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DOCS_VARIABLES = set(
    re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", "\n".join(page.read_text() for page in DOCS))
)

SETTING_OF = {f"NANOGRID_{f.name.upper()}": f.name for f in fields(GridConfig)} | {
    v: k for k, v in SEED_NAMES.items()
}
CLIENT_VARIABLES = {
    "NANOGRID_URL",
    "NANOGRID_API_KEY",
    "NANOGRID_TIMEOUT",
}  # read by every command that talks to a grid
SANDBOX_VARIABLES = (
    "set by the grid inside a sandbox for the seed platform's functions (test_seed_contract.py)"
)
NOT_COMMAND_SETTINGS = {
    "NANOGRID_CONFIG": "the settings file itself: test_the_config_file_variable_reaches_every_grid_command",
    "NANOGRID_SECRETS_KEY": "the grid's secrets key, from the environment only, never a settings file: "
    "test_the_secrets_key_variable_is_the_same_key_on_every_machine",
    "NANOGRID_OUTPUT_DIR": "set by the grid inside a sandbox, read by nanogrid.output_dir()",
    "NANOGRID_CHANNEL": "set by the grid inside a Docker sandbox, read once by the bootstrap, which removes it",
    "JOB_ID": SANDBOX_VARIABLES,
    "FUNCTION_ID": SANDBOX_VARIABLES,
    "MEMORY_MB": SANDBOX_VARIABLES,
    "OUTPUT_DIR": SANDBOX_VARIABLES,
    "PAYLOAD_FILE": SANDBOX_VARIABLES,
    "DB_USER": "a user's secret in the docs' example",
    "DB_PASSWORD": "a user's secret in the docs' example",
    "NANOGRID_UPDATE_SCREENSHOT": "the test suite's",
    "NANOGRID_TUTORIAL_AI_ENDPOINT": "the tutorial notebook's",
    "AWS_ENDPOINT_URL": "boto3's own setting",
    "AWS_ENDPOINT_URL_SQS": "boto3's own setting",
    "STACK_GLOBAL": "a pickle opcode, in the architecture page's design notes",
}
OS_CONSTANTS = ("O_", "RLIMIT_")  # open(2) flags and resource limits the docs name: not variables

# Which settings each command uses. The grid's own commands use them all.
GRID_COMMANDS = [["up"], ["controller"], ["worker"]]
BOOTSTRAP_USES = {
    "queue_url",
    "dlq_url",
    "code_bucket",
    "data_bucket",
    "dynamodb_table",
    "sqs_visibility_s",
}
KEYS_USES = {
    "data_dir",
    "dynamodb_table",
}  # keys live in the registry: SQLite in the data dir, or DynamoDB
QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/team-queue"


class Reached(NanoGridError):
    """Raised by a stand-in once it has seen what the command would have started with."""


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No setting from the developer's shell leaks in; the data dir is a temporary one."""
    for name in os.environ:
        if name in SETTING_OF or name in CLIENT_VARIABLES or name == "NANOGRID_CONFIG":
            monkeypatch.delenv(name)
    monkeypatch.setenv("NANOGRID_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


@pytest.fixture()
def started(clean_env: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stand-ins for what each command starts; they record what they were given instead."""
    seen: dict[str, Any] = {}

    def serve(config: GridConfig, **kwargs: Any) -> None:
        seen["config"] = config

    def grid(config: GridConfig, role: str = "all") -> None:
        seen["config"] = config
        raise Reached(role)

    def bootstrap(names: dict[str, str], visibility_s: int = 30) -> dict[str, str]:
        seen["names"], seen["visibility_s"] = names, visibility_s
        return {}

    def make_registry(config: GridConfig) -> None:
        seen["config"] = config
        raise Reached("registry")

    clean_env.setattr(nanogrid_backend.embedded, "serve", serve)
    clean_env.setattr(nanogrid_backend.grid, "Grid", grid)
    clean_env.setattr(nanogrid_backend.aws, "bootstrap", bootstrap)
    clean_env.setattr(nanogrid_backend.grid, "make_registry", make_registry)
    return seen


def example(name: str, default: object, tmp_path: Path) -> Any:
    """A valid value for a setting that differs from its default."""
    if name in CHOICES:
        return next(choice for choice in CHOICES[name] if choice != default)
    if name in ("queue_url", "dlq_url"):
        return QUEUE_URL.replace("team-queue", f"team-{name}")
    if isinstance(default, Path):
        return (tmp_path / f"{name}-from-env").resolve()
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, float):
        return default + 1.5
    if isinstance(default, list):  # a list setting: comma-separated in its variable
        return ["10.9.0.0/16", "127.0.0.0/8"]
    return f"{name}-from-env"


def test_every_variable_the_docs_name_is_accounted_for():
    """A variable added to the docs must be a setting, a client variable, or say here why it is neither."""
    unknown = {
        name
        for name in DOCS_VARIABLES
        - SETTING_OF.keys()
        - CLIENT_VARIABLES
        - NOT_COMMAND_SETTINGS.keys()
        if not name.startswith(OS_CONSTANTS)
    }
    assert unknown == set(), f"documented but unknown to the settings: {sorted(unknown)}"
    assert {"DYNAMODB_TABLE", "S3_CODE_BUCKET", "SQS_QUEUE_URL", "NANOGRID_URL"} <= DOCS_VARIABLES


@pytest.mark.parametrize("variable", sorted(SETTING_OF))
def test_every_setting_variable_reaches_every_command_that_uses_it(
    variable, started, clean_env, tmp_path
):
    name = SETTING_OF[variable]
    default = getattr(GridConfig(), name)
    value = example(name, default, tmp_path)
    clean_env.setenv(variable, ",".join(value) if isinstance(value, list) else str(value))
    for command in GRID_COMMANDS:
        started.clear()
        nanogrid.cli.main(command)
        assert getattr(started["config"], name) == value, (command, variable)
    if name in BOOTSTRAP_USES:
        started.clear()
        assert nanogrid.cli.main(["aws", "bootstrap"]) == 0
        reached = {
            "queue": started["names"]["queue"],
            "dlq": started["names"]["dlq"],
            "code_bucket": started["names"]["code_bucket"],
            "data_bucket": started["names"]["data_bucket"],
            "dynamodb_table": started["names"]["table"],
            "sqs_visibility_s": started["visibility_s"],
        }
        expected = value.rsplit("/", 1)[-1] if name.endswith("_url") else value
        assert (
            reached["queue" if name == "queue_url" else "dlq" if name == "dlq_url" else name]
            == expected
        )
    if name in KEYS_USES:
        for action in (["list"], ["create", "alice"], ["revoke", "1a2b3c4d"]):
            started.clear()
            nanogrid.cli.main(["keys", *action])
            assert getattr(started["config"], name) == value, (action, variable)


def test_the_config_file_variable_reaches_every_grid_command(started, clean_env, tmp_path):
    settings = tmp_path / "grid.toml"
    settings.write_text(
        f'workers = 3\ndynamodb_table = "from-file"\ndata_dir = "{tmp_path / "file-data"}"\n'
    )
    clean_env.setenv("NANOGRID_CONFIG", str(settings))
    clean_env.delenv("NANOGRID_DATA_DIR")
    for command in GRID_COMMANDS:
        nanogrid.cli.main(command)
        assert started["config"].workers == 3 and started["config"].dynamodb_table == "from-file"
    nanogrid.cli.main(["aws", "bootstrap"])
    assert started["names"]["table"] == "from-file"
    nanogrid.cli.main(["keys", "list"])
    assert started["config"].data_dir == tmp_path / "file-data"


def test_flags_reach_aws_bootstrap_over_the_environment(started, clean_env):
    clean_env.setenv("DYNAMODB_TABLE", "from-env")
    clean_env.setenv("SQS_QUEUE_URL", QUEUE_URL)
    nanogrid.cli.main(
        ["aws", "bootstrap", "--table", "from-flag", "--queue", "flag-queue", "--visibility", "45"]
    )
    assert started["names"]["table"] == "from-flag" and started["names"]["queue"] == "flag-queue"
    assert started["visibility_s"] == 45


@pytest.mark.parametrize("command", [["jobs"], ["invoke", "fn-1", "--async"]])
def test_the_grid_url_and_key_reach_every_client_command(command, clean_env, capsys):
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(
            200,
            json=[] if request.url.path == "/v1/jobs" else {"job_id": "job-1", "status": "pending"},
        )

    class Recorded(Client):
        def __init__(self, url: str, api_key: str | None = None, **kwargs: Any) -> None:
            super().__init__(url, api_key, transport=httpx.MockTransport(answer))

    clean_env.setattr(nanogrid.cli, "Client", Recorded)
    clean_env.setenv("NANOGRID_URL", "http://grid.example:9999")
    clean_env.setenv("NANOGRID_API_KEY", "ng_from_env")
    clean_env.setenv("NANOGRID_TIMEOUT", "12.5")
    assert nanogrid.cli.main(command) == 0
    assert sent and all(r.url.host == "grid.example" and r.url.port == 9999 for r in sent)
    assert all(r.headers["x-api-key"] == "ng_from_env" for r in sent)
    assert all(r.extensions["timeout"]["connect"] == 12.5 for r in sent)


def test_a_bad_client_timeout_is_refused_with_its_name(clean_env):
    clean_env.setenv("NANOGRID_TIMEOUT", "soon")
    with pytest.raises(
        ConfigError, match="NANOGRID_TIMEOUT is a number of seconds, e.g. 30, not 'soon'"
    ):
        Client("http://grid.example:9999")


def test_the_secrets_key_variable_is_the_same_key_on_every_machine(clean_env, tmp_path):
    """Two machines' grids with one NANOGRID_SECRETS_KEY open each other's secrets; a bad key is one line."""
    clean_env.setenv("NANOGRID_SECRETS_KEY", base64.b64encode(bytes(range(32))).decode())
    sealed = SecretBox.load(tmp_path / "machine-a").seal(b"hunter2", "alice", "db")
    assert SecretBox.load(tmp_path / "machine-b").open(sealed, "alice", "db") == b"hunter2"
    assert not (
        tmp_path / "machine-b" / "secrets.key"
    ).exists()  # no key of its own next to the registry
    clean_env.setenv("NANOGRID_SECRETS_KEY", "not base64!")
    with pytest.raises(SecretError, match="NANOGRID_SECRETS_KEY is not base64"):
        SecretBox.load(tmp_path / "machine-a")


# -- precedence and bad values ----------------------------------------------------------------------------------------


def test_precedence_is_defaults_then_file_then_environment_then_flags(clean_env, tmp_path):
    settings = tmp_path / "grid.toml"
    settings.write_text("workers = 3\nstem_cells = 4\nidle_ttl_s = 9.5\n")
    assert GridConfig.load().workers == GridConfig().workers  # defaults
    from_file = GridConfig.load(settings)
    assert (from_file.workers, from_file.stem_cells, from_file.idle_ttl_s) == (3, 4, 9.5)
    clean_env.setenv("NANOGRID_WORKERS", "5")
    from_env = GridConfig.load(settings)
    assert (from_env.workers, from_env.stem_cells) == (5, 4)  # the environment wins where it speaks
    from_flags = GridConfig.load(
        settings, workers=7, stem_cells=None
    )  # an unset flag (None) is no override
    assert (from_flags.workers, from_flags.stem_cells) == (7, 4)


def test_nanogrid_names_win_over_the_seed_names(clean_env):
    clean_env.setenv("DYNAMODB_TABLE", "seed-table")
    assert GridConfig.load().dynamodb_table == "seed-table"
    clean_env.setenv("NANOGRID_DYNAMODB_TABLE", "own-table")
    assert GridConfig.load().dynamodb_table == "own-table"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("NANOGRID_WORKERS", "two", "NANOGRID_WORKERS: 'two' is not a whole number"),
        ("NANOGRID_WORKERS", "2.5", "NANOGRID_WORKERS: '2.5' is not a whole number"),
        ("NANOGRID_IDLE_TTL_S", "soon", "NANOGRID_IDLE_TTL_S: 'soon' is not a number"),
        (
            "NANOGRID_SANDBOX",
            "vm",
            "NANOGRID_SANDBOX: must be one of auto, docker, process, not 'vm'",
        ),
        ("NANOGRID_WORKERS", "0", "NANOGRID_WORKERS: must be at least 1, not 0"),
        ("NANOGRID_PORT", "70000", "NANOGRID_PORT: must be 0..65535"),
        ("REDIS_PORT", "six", "REDIS_PORT: 'six' is not a whole number"),
    ],
)
def test_a_bad_value_names_where_it_came_from(clean_env, variable, value, says):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        GridConfig.load()
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("wrokers = 3\n", "unknown setting 'wrokers'"),
        ("workers = \n", "is not valid TOML"),
        ('workers = "many"\n', "workers in"),
    ],
)
def test_a_bad_config_file_is_refused_with_its_name(clean_env, tmp_path, text, says):
    settings = tmp_path / "grid.toml"
    settings.write_text(text)
    with pytest.raises(ConfigError, match=says) as info:
        GridConfig.load(settings)
    assert str(settings) in str(info.value)
