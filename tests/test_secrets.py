"""Secrets and per-function environment variables, from the attacker's side.

What must never happen: a secret's value in the registry file, a registry backup, a job view, a job list, the
grid's log or a secrets listing; a secret reaching a function that did not name it, or another owner's function;
a ciphertext that opens after being moved to another owner's or name's row.
"""

from __future__ import annotations

import hashlib
import logging
import os

import httpx
import pytest

import nanogrid
from nanogrid.function import RemoteFunction
from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.keys import create_key
from nanogrid_backend.models import SecretRecord
from nanogrid_backend.secretbox import SecretBox, SecretError

pytestmark = pytest.mark.integration

VALUE = "s3cr3t-value-that-must-not-leak-4f1c"


def on(client: nanogrid.Client, **options: object):  # noqa: ANN201
    """@remote with an explicit client (one per owner in these tests)."""
    return lambda fn: RemoteFunction(fn, client=client, **options)


def test_sealed_secrets_open_only_with_their_key_owner_and_name() -> None:
    box = SecretBox(os.urandom(32))
    sealed = box.seal(VALUE.encode(), "alice", "db")
    assert VALUE.encode() not in sealed
    assert box.open(sealed, "alice", "db") == VALUE.encode()
    for owner, name in (("bob", "db"), ("alice", "other")):
        with pytest.raises(SecretError):
            box.open(sealed, owner, name)
    tampered = sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
    with pytest.raises(SecretError):
        box.open(tampered, "alice", "db")
    with pytest.raises(SecretError):
        SecretBox(os.urandom(32)).open(sealed, "alice", "db")
    assert box.seal(VALUE.encode(), "alice", "db") != sealed  # a fresh nonce each time


def test_a_secret_reaches_only_the_function_that_names_it_and_never_a_view(
    docker_grid: EmbeddedGrid, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)
    shown = client.set_secret("db", {"DB_PASSWORD": VALUE, "DB_USER": "app"})
    assert shown["variables"] == ["DB_PASSWORD", "DB_USER"] and VALUE not in str(shown)
    assert VALUE not in str(client.secrets())

    @on(client, secrets=["db"], env={"MODE": "test"})
    def read_env() -> (
        dict
    ):  # a digest of the password: a function returning its secret would store it itself
        import hashlib
        import os

        return {
            "DB_PASSWORD": hashlib.sha256(os.environ["DB_PASSWORD"].encode()).hexdigest(),
            "DB_USER": os.environ.get("DB_USER"),
            "MODE": os.environ.get("MODE"),
        }

    @on(client)
    def read_env_without() -> dict:
        import os

        return {k: os.environ.get(k) for k in ("DB_PASSWORD", "DB_USER", "MODE")}

    digest = hashlib.sha256(VALUE.encode()).hexdigest()
    assert read_env.remote() == {"DB_PASSWORD": digest, "DB_USER": "app", "MODE": "test"}
    assert read_env_without.remote() == {"DB_PASSWORD": None, "DB_USER": None, "MODE": None}

    registry_file = docker_grid.config.data_dir / "registry.sqlite3"
    for path in [registry_file, *registry_file.parent.glob("registry.sqlite3*")]:
        assert VALUE.encode() not in path.read_bytes(), path
    assert VALUE not in str(client.jobs(50)) and VALUE not in caplog.text

    other_key, _ = create_key(docker_grid.grid.registry, "secrets-other-owner")
    other = nanogrid.connect(docker_grid.url, api_key=other_key)

    @on(other, secrets=["db"])
    def steal() -> str | None:
        import os

        return os.environ.get("DB_PASSWORD")

    with pytest.raises(nanogrid.errors.JobFailed) as refused:  # the other owner has no secret "db"
        steal.remote()
    assert "db" in str(refused.value) and VALUE not in str(refused.value)
    assert other.secrets() == []


def test_a_ciphertext_copied_to_another_owner_does_not_open(docker_grid: EmbeddedGrid) -> None:
    """An operator's slip (or an attacker with write access to the registry) moving a row to another owner."""
    registry = docker_grid.grid.registry
    key, _ = create_key(registry, "secrets-copier")
    client = nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)
    client.set_secret("copied", {"TOKEN": VALUE})
    sealed = registry.get_secret(
        "local", "copied"
    )  # the embedded grid's own key belongs to owner "local"
    registry.put_secret(
        SecretRecord("secrets-copier", "copied", sealed.ciphertext, sealed.variables)
    )
    thief = nanogrid.connect(docker_grid.url, api_key=key)

    @on(thief, secrets=["copied"])
    def read() -> str | None:
        import os

        return os.environ.get("TOKEN")

    with pytest.raises(nanogrid.errors.JobFailed) as refused:
        read.remote()
    assert "does not open" in str(refused.value)


def test_secret_routes_refuse_bad_names_and_never_return_values(docker_grid: EmbeddedGrid) -> None:
    with httpx.Client(
        base_url=docker_grid.url + "/v1", headers={"x-api-key": docker_grid.api_key}
    ) as http:
        assert http.put("/secrets/bad name", json={"values": {"A": "b"}}).status_code == 422
        assert http.put("/secrets/ok", json={"values": {"1BAD": "b"}}).status_code == 422
        assert http.put("/secrets/ok", json={"values": {}}).status_code == 422
        stored = http.put("/secrets/ok", json={"values": {"A": VALUE}})
        assert stored.status_code == 200 and VALUE not in stored.text
        assert http.delete("/secrets/ok").json()["name"] == "ok"
        assert http.delete("/secrets/ok").status_code == 404
