"""AWS S3: code packages in the code bucket, outputs streamed to the user-data bucket, presigned URLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from backend.store.base import BlobStore

URL_EXPIRY_S = 3600


class S3Store(BlobStore):
    def __init__(self, code_bucket: str, data_bucket: str) -> None:
        self.code_bucket = code_bucket
        self.data_bucket = data_bucket
        self.s3 = boto3.client("s3")

    def put_package(self, function_id: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.code_bucket, Key=f"functions/{function_id}/code.zip", Body=data)

    def get_package(self, function_id: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.code_bucket, Key=f"functions/{function_id}/code.zip")["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(function_id) from None
            raise

    def delete_package(self, function_id: str) -> None:
        self.s3.delete_object(Bucket=self.code_bucket, Key=f"functions/{function_id}/code.zip")

    def put_blob(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.data_bucket, Key=key, Body=data)

    def get_blob(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.data_bucket, Key=key)["Body"].read()

    def save_output(self, job_id: str, name: str, source: Path) -> int:
        size = source.stat().st_size
        # upload_file streams from disk and switches to multipart uploads for big files
        self.s3.upload_file(str(source), self.data_bucket, f"outputs/{job_id}/{name}")
        source.unlink()
        return size

    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        try:
            body = self.s3.get_object(Bucket=self.data_bucket, Key=f"outputs/{job_id}/{name}")["Body"]
        except ClientError:
            raise FileNotFoundError(name) from None
        return body.iter_chunks(1 << 20)

    def output_url(self, job_id: str, name: str) -> str | None:
        return self.s3.generate_presigned_url("get_object", ExpiresIn=URL_EXPIRY_S,
                                              Params={"Bucket": self.data_bucket, "Key": f"outputs/{job_id}/{name}"})
