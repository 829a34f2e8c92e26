"""Short-lived signed links to output files, so a browser opens them without the API key.

A job view's output URLs carry ``expires`` and ``sig``: an HMAC over the job, the file's name,
its owner and the expiry, with a key derived from the grid's secrets key (shared by every
controller of a grid). A link opens that one file of that one job until it expires; any change
to it (another name, a later expiry) makes the signature wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import time

LINK_TTL_S = 900


class LinkSigner:
    def __init__(self, key: bytes, ttl_s: float = LINK_TTL_S) -> None:
        self.key = key
        self.ttl_s = ttl_s

    def query(self, job_id: str, name: str, owner: str, now: float | None = None) -> str:
        """The ``expires=...&sig=...`` to append to the file's URL."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return f"expires={expires}&sig={self._sign(job_id, name, owner, expires)}"

    def check(self, job_id: str, name: str, owner: str, expires: int, sig: str) -> str | None:
        """None if the link is good; else why it is not."""
        if not hmac.compare_digest(self._sign(job_id, name, owner, expires), sig):
            return "this link is not valid for this file"
        if expires < time.time():
            return "this link has expired; show the job again for a fresh one"
        return None

    def _sign(self, job_id: str, name: str, owner: str, expires: int) -> str:
        message = "\0".join((job_id, name, owner, str(expires))).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()
