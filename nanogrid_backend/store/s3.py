"""AWS S3: code packages in the code bucket, outputs streamed to the user-data bucket, presigned URLs."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from nanogrid_backend.store.base import BlobSpace, BlobStore, Expired, QuotaExceeded

URL_EXPIRY_S = 3600
UPLOAD_URL_EXPIRY_S = (
    300  # a blob upload URL is used at once; S3 checks it when the upload starts, not when it ends
)
SPACE_CACHE_S = 60.0  # blob space is a listing of the prefix: asked again at most this often


class S3Store(BlobStore):
    """Outputs at ``outputs/{job_id}/{name}``; next to them an empty ``owners/{owner}/{job_id}/{size}-{hash}`` object
    per file, so an owner's usage is one listing and retention finds a job's age and owner.

    Quotas are checked against that listing when a file is saved, so workers saving at the same moment may
    together pass an owner's quota by what they save at once. Bucket lifecycle rules can expire both prefixes too.
    """

    def __init__(
        self,
        code_bucket: str,
        data_bucket: str,
        *,
        quota: Callable[[str], int | None] | None = None,
        owner_of: Callable[[str], str] | None = None,
    ) -> None:
        self.code_bucket = code_bucket
        self.data_bucket = data_bucket
        self.s3 = boto3.client("s3")
        self._quota = quota or (lambda owner: None)
        self._owner_of = owner_of or (lambda job_id: "")
        # prefix -> (when listed, what it held)
        self._spaces: dict[str, tuple[float, BlobSpace]] = {}
        self._spaces_lock = threading.Lock()
        self._signer: Any = None  # a client that signs upload URLs with SigV4 (made on first use)
        # boto3's default session does not make clients safely on many threads
        self._signer_lock = threading.Lock()
        # key -> when an upload URL was given out for it (not yet seen)
        self._uploading: dict[str, float] = {}

    def put_package(self, function_id: str, data: bytes) -> None:
        self.s3.put_object(
            Bucket=self.code_bucket, Key=f"functions/{function_id}/code.zip", Body=data
        )

    def get_package(self, function_id: str) -> bytes:
        try:
            return self.s3.get_object(
                Bucket=self.code_bucket, Key=f"functions/{function_id}/code.zip"
            )["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(function_id) from None
            raise

    def delete_package(self, function_id: str) -> None:
        self.s3.delete_object(Bucket=self.code_bucket, Key=f"functions/{function_id}/code.zip")

    def put_blob(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.data_bucket, Key=key, Body=data)
        self._changed(key)

    def get_blob(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.data_bucket, Key=key)["Body"].read()

    def put_blob_file(self, key: str, source: Path) -> None:
        self.s3.upload_file(str(source), self.data_bucket, key)  # multipart above boto3's threshold
        source.unlink(missing_ok=True)
        self._changed(key)

    def open_blob(self, key: str) -> Iterator[bytes]:
        try:
            body = self.s3.get_object(Bucket=self.data_bucket, Key=key)["Body"]
        except ClientError:
            raise FileNotFoundError(key) from None
        return body.iter_chunks(1 << 20)

    def blob_size(self, key: str, touch: bool = False) -> int | None:
        try:
            size = int(self.s3.head_object(Bucket=self.data_bucket, Key=key)["ContentLength"])
        except ClientError:
            return None
        # uploaded to a URL given out here, and confirmed by this HEAD: counted from now
        if key in self._uploading:
            with self._spaces_lock:
                self._uploading.pop(key, None)
            self._changed(key)
        return size

    def delete_blob(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.data_bucket, Key=key)
        self._changed(key)

    def blob_upload_url(
        self, key: str, size: int, sha256: str, expires_in: int = UPLOAD_URL_EXPIRY_S
    ) -> tuple[str, dict[str, str], int]:
        """A presigned PUT of exactly ``size`` bytes whose SHA-256 is ``sha256`` to ``key``, the headers the upload
        must carry (they are signed: S3 refuses the request without them or with other values), and its lifetime.

        SigV4 signs ``content-length`` and ``x-amz-checksum-sha256`` (the older SigV2 signs neither), so real
        S3 refuses a body of another length or other bytes (BadDigest) at upload. Emulators may not check
        (moto does not); the workers hash every blob they fetch anyway (nanogrid_backend/store/blobs.py).
        """
        with self._signer_lock:
            if self._signer is None:
                self._signer = boto3.client("s3", config=Config(signature_version="s3v4"))
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        url = self._signer.generate_presigned_url(
            "put_object",
            ExpiresIn=expires_in,
            HttpMethod="PUT",
            Params={
                "Bucket": self.data_bucket,
                "Key": key,
                "ContentLength": size,
                "ChecksumSHA256": checksum,
            },
        )
        # so that the confirming HEAD updates the blob space (it bypasses _changed otherwise)
        with self._spaces_lock:
            now = time.monotonic()
            for stale in [k for k, t in self._uploading.items() if t < now - expires_in - 60]:
                del self._uploading[stale]
            self._uploading[key] = now
        return url, {"content-length": str(size), "x-amz-checksum-sha256": checksum}, expires_in

    def _changed(self, key: str) -> None:
        """A blob written or deleted here: the spaces that count it are listed again when next asked (another
        process's changes show within SPACE_CACHE_S)."""
        with self._spaces_lock:
            for prefix in [p for p in self._spaces if key.startswith(p)]:
                del self._spaces[prefix]

    def blob_space(self, prefix: str) -> BlobSpace:
        with self._spaces_lock:
            cached = self._spaces.get(prefix)
        if cached is not None and time.monotonic() - cached[0] < SPACE_CACHE_S:
            return cached[1]
        count = size = 0
        for item in self._keys(prefix):
            count, size = count + 1, size + int(item.get("Size", 0))
        with self._spaces_lock:
            self._spaces[prefix] = (time.monotonic(), BlobSpace(count, size))
        return BlobSpace(count, size)

    def _keys(self, prefix: str) -> Iterator[dict]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.data_bucket, Prefix=prefix
        ):
            yield from page.get("Contents", [])

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(
                Bucket=self.data_bucket,
                Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
            )

    def usage(self, owner: str) -> int:
        return sum(
            int(item["Key"].rsplit("/", 1)[1].split("-", 1)[0])
            for item in self._keys(f"owners/{owner}/")
        )

    def save_output(self, job_id: str, name: str, source: Path, owner: str | None = None) -> int:
        if owner is None:
            owner = self._owner_of(job_id)
        size = source.lstat().st_size  # the apparent size: a sparse file counts in full
        quota = self.quota_of(owner)
        if quota is not None:
            used = self.usage(owner)
            if used + size > quota:
                index = list(self._keys(f"owners/{owner}/{job_id}/"))
                kept = sum(int(item["Key"].rsplit("/", 1)[1].split("-", 1)[0]) for item in index)
                self._delete(
                    [item["Key"] for item in index]
                    + [item["Key"] for item in self._keys(f"outputs/{job_id}/")]
                )
                raise QuotaExceeded(owner, used - kept, kept + size, quota)
        # upload_file streams from disk and switches to multipart uploads for big files
        self.s3.upload_file(str(source), self.data_bucket, f"outputs/{job_id}/{name}")
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        self.s3.put_object(
            Bucket=self.data_bucket, Key=f"owners/{owner}/{job_id}/{size}-{digest}", Body=b""
        )
        source.unlink()
        return size

    def expire(self, before: float) -> Expired:
        """Delete the outputs of jobs whose first file was saved before ``before``."""
        expired = Expired()
        jobs: dict[tuple[str, str], list[dict]] = {}
        for item in self._keys("owners/"):
            _, owner, job_id, _ = item["Key"].split("/", 3)
            jobs.setdefault((owner, job_id), []).append(item)
        for (_owner, job_id), index in jobs.items():
            if min(item["LastModified"].timestamp() for item in index) >= before:
                continue
            outputs = [item["Key"] for item in self._keys(f"outputs/{job_id}/")]
            self._delete(outputs + [item["Key"] for item in index])
            expired.jobs += 1
            expired.bytes += sum(
                int(item["Key"].rsplit("/", 1)[1].split("-", 1)[0]) for item in index
            )
        old_blobs = [
            item for item in self._keys("data/") if item["LastModified"].timestamp() < before
        ]
        # the data plane's blobs (nanogrid_backend/store/blobs.py)
        self._delete([item["Key"] for item in old_blobs])
        expired.blobs += len(old_blobs)
        expired.bytes += sum(int(item.get("Size", 0)) for item in old_blobs)
        return expired

    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        try:
            body = self.s3.get_object(Bucket=self.data_bucket, Key=f"outputs/{job_id}/{name}")[
                "Body"
            ]
        except ClientError:
            raise FileNotFoundError(name) from None
        return body.iter_chunks(1 << 20)

    def output_url(self, job_id: str, name: str) -> str | None:
        return self.s3.generate_presigned_url(
            "get_object",
            ExpiresIn=URL_EXPIRY_S,
            Params={"Bucket": self.data_bucket, "Key": f"outputs/{job_id}/{name}"},
        )
