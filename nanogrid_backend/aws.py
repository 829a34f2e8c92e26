"""``nanogrid aws bootstrap``: create whatever is missing under the configured names (Terraform's names).

Endpoints come from boto3's standard settings (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_SQS, ...), so the
same command works against AWS or any service speaking its protocol.
"""

from __future__ import annotations

import json

import boto3
from botocore.exceptions import ClientError

from nanogrid_backend.registry.dynamodb import create_table

DEFAULTS = {
    "queue": "nanogrid-task-queue",
    "dlq": "nanogrid-task-dlq",
    "code_bucket": "nanogrid-code-bucket",
    "data_bucket": "nanogrid-user-data",
    "table": "NanoGridFunctions",
}
MAX_RECEIVES = 3  # deliveries before a message goes to the dead-letter queue


def bootstrap(names: dict[str, str], visibility_s: int = 30) -> dict[str, str]:
    """Create the queue and its dead-letter queue, both buckets and the table; returns the settings."""
    names = {**DEFAULTS, **{k: v for k, v in names.items() if v}}
    sqs = boto3.client("sqs")
    dlq_url = sqs.create_queue(
        QueueName=names["dlq"], Attributes={"MessageRetentionPeriod": "1209600"}
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url = sqs.create_queue(
        QueueName=names["queue"],
        Attributes={
            "VisibilityTimeout": str(visibility_s),
            "ReceiveMessageWaitTimeSeconds": "20",
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVES)}
            ),
        },
    )["QueueUrl"]
    s3 = boto3.client("s3")
    region = s3.meta.region_name
    for bucket in (names["code_bucket"], names["data_bucket"]):
        try:
            kwargs = (
                {}
                if region == "us-east-1"
                else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            )
            s3.create_bucket(Bucket=bucket, **kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
    try:
        create_table(names["table"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
    return {
        "SQS_QUEUE_URL": queue_url,
        "SQS_DLQ_URL": dlq_url,
        "S3_CODE_BUCKET": names["code_bucket"],
        "S3_USER_DATA_BUCKET": names["data_bucket"],
        "DYNAMODB_TABLE": names["table"],
    }
