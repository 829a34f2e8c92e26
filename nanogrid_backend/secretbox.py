"""Secrets: named sets of environment variables, encrypted at rest, decrypted only by a worker loading a sandbox.

The cipher is built from the standard library alone (no third-party crypto in the runtime dependencies):
HMAC-SHA256 as a pseudo-random function in counter mode for the keystream, and encrypt-then-MAC with a
second HMAC-SHA256 key over the version, nonce, owner, name and ciphertext. Both keys are derived from one
32-byte master key with HMAC (HKDF's expand step with distinct labels). A 128-bit random nonce per
encryption means a keystream is never reused; the tag is checked in constant time before anything is
decrypted, and binding owner and name means a ciphertext copied to another owner's or name's row does not
open. The master key lives outside the registry (``NANOGRID_SECRETS_KEY``, or ``secrets.key`` in the data dir,
0600), so a registry file, backup or dump holds no readable secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets as random_source
import struct
from pathlib import Path

from nanogrid_contract.errors import NanoGridError

KEY_ENV = "NANOGRID_SECRETS_KEY"
KEY_FILE = "secrets.key"
VERSION = b"\x01"
NONCE_BYTES, TAG_BYTES, BLOCK_BYTES = 16, 32, 32
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VARIABLE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_SECRET_BYTES = 64 * 1024


class SecretError(NanoGridError):
    """A secret cannot be stored or opened; the message says why and what to do."""


class SecretBox:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise SecretError(
                f"the secrets key must be 32 bytes, not {len(master_key)} ({KEY_ENV} is base64 of 32 bytes)"
            )
        self._enc = hmac.new(master_key, b"nanogrid secrets: encryption", hashlib.sha256).digest()
        self._mac = hmac.new(
            master_key, b"nanogrid secrets: authentication", hashlib.sha256
        ).digest()
        # controller/links.py
        self.link_key = hmac.new(master_key, b"nanogrid: output links", hashlib.sha256).digest()

    @classmethod
    def load(cls, data_dir: Path) -> SecretBox:
        """The grid's key: ``NANOGRID_SECRETS_KEY`` (the same on every machine of a grid), else the data dir's file."""
        if os.environ.get(KEY_ENV):
            try:
                return cls(base64.b64decode(os.environ[KEY_ENV], validate=True))
            except (binascii.Error, ValueError):
                raise SecretError(
                    f'{KEY_ENV} is not base64: make one with `python -c "import os, base64; '
                    'print(base64.b64encode(os.urandom(32)).decode())"`'
                ) from None
        path = data_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(random_source.token_bytes(32))
        return cls(path.read_bytes())

    def seal(self, plaintext: bytes, owner: str, name: str) -> bytes:
        nonce = random_source.token_bytes(NONCE_BYTES)
        body = _xor(plaintext, self._keystream(nonce, len(plaintext)))
        return VERSION + nonce + body + self._tag(nonce, owner, name, body)

    def open(self, sealed: bytes, owner: str, name: str) -> bytes:
        if len(sealed) < 1 + NONCE_BYTES + TAG_BYTES or sealed[:1] != VERSION:
            raise SecretError(f"secret {name!r} is not in a format this grid wrote; set it again")
        nonce, body, tag = (
            sealed[1 : 1 + NONCE_BYTES],
            sealed[1 + NONCE_BYTES : -TAG_BYTES],
            sealed[-TAG_BYTES:],
        )
        if not hmac.compare_digest(tag, self._tag(nonce, owner, name, body)):
            raise SecretError(
                f"secret {name!r} does not open with this machine's key: every machine of a grid "
                f"needs the same {KEY_ENV} (or the same {KEY_FILE}); set the secret again if it was lost"
            )
        return _xor(body, self._keystream(nonce, len(body)))

    def _keystream(self, nonce: bytes, size: int) -> bytes:
        blocks = (
            hmac.new(self._enc, nonce + struct.pack(">Q", i), hashlib.sha256).digest()
            for i in range((size + BLOCK_BYTES - 1) // BLOCK_BYTES)
        )
        return b"".join(blocks)[:size]

    def _tag(self, nonce: bytes, owner: str, name: str, body: bytes) -> bytes:
        bound = b"".join(
            struct.pack(">I", len(part)) + part for part in (owner.encode(), name.encode())
        )
        return hmac.new(self._mac, VERSION + nonce + bound + body, hashlib.sha256).digest()


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def check_secret(name: str, values: dict[str, str]) -> None:
    """Refuse names and variables a sandbox could not use (a clear message instead of a broken environment)."""
    if not NAME_PATTERN.match(name):
        raise SecretError(
            f"secret name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    if not values:
        raise SecretError(f"secret {name!r} needs at least one KEY=VALUE")
    for key, value in values.items():
        if not VARIABLE_PATTERN.match(key):
            raise SecretError(
                f"{key!r} is not an environment variable name (letters, digits, '_'; not first a digit)"
            )
        if not isinstance(value, str) or "\0" in value:
            raise SecretError(f"the value of {key} must be text without NUL characters")
    if sum(len(k) + len(v) for k, v in values.items()) > MAX_SECRET_BYTES:
        raise SecretError(
            f"secret {name!r} is over {MAX_SECRET_BYTES // 1024} KiB; keep large data in a file or store"
        )
