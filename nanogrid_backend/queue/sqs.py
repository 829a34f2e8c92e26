"""AWS SQS: long polling, visibility extended while a job runs, deleted only once its result is stored.

Delivery is at least once: a worker that dies mid-job leaves its message to reappear after the
visibility timeout, and the redrive policy sends one that keeps failing to the dead-letter queue.
Payloads over SQS's size limit travel through the blob store and the message carries a reference.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import deque

import boto3

from nanogrid_backend.models import JobMessage
from nanogrid_backend.queue.base import JobQueue
from nanogrid_backend.store.base import BlobStore

INLINE_PAYLOAD_BYTES = 192 << 10  # SQS takes 256 KiB a message; leave room for the envelope


class SQSQueue(JobQueue):
    redelivers = True

    def __init__(
        self, queue_url: str, store: BlobStore, visibility_s: int = 30, dlq_url: str = ""
    ) -> None:
        self.url = queue_url
        self.dlq_url = dlq_url
        self.store = store
        self.visibility_s = visibility_s
        self.sqs = boto3.client("sqs")
        self._buffer: deque[JobMessage] = deque()
        self._lock = threading.Lock()

    def put(self, messages: list[JobMessage]) -> None:
        entries = [{"Id": str(i), "MessageBody": self._encode(m)} for i, m in enumerate(messages)]
        for start in range(0, len(entries), 10):
            batch = entries[start : start + 10]
            response = self.sqs.send_message_batch(QueueUrl=self.url, Entries=batch)
            if response.get("Failed"):
                raise RuntimeError(
                    f"SQS refused {len(response['Failed'])} messages: {response['Failed'][0]}"
                )

    def _encode(self, message: JobMessage) -> str:
        body = {
            "job_id": message.job_id,
            "function_id": message.function_id,
            "format": message.payload_format,
            "timeout_s": message.timeout_s,
            "memory_mib": message.memory_mib,
            "model": message.model,
            "owner": message.owner,
            "trigger": message.trigger,
            "created_at": message.created_at,
        }
        if len(message.payload) > INLINE_PAYLOAD_BYTES:
            self.store.put_blob(f"payloads/{message.job_id}", message.payload)
            body["payload_ref"] = f"payloads/{message.job_id}"
        else:
            body["payload"] = base64.b64encode(message.payload).decode()
        return json.dumps(body)

    def get(self, timeout: float, want: int = 1) -> JobMessage | None:
        """One message; with ``want`` > 1, up to that many are fetched at once and the rest kept for the next calls
        (the worker asks for as many as it has idle slots, and keeps their visibility extended)."""
        with self._lock:
            if self._buffer:
                return self._buffer.popleft()
        messages = self._receive(self.url, timeout, count=max(1, min(10, want)))
        if not messages:
            return None
        with self._lock:
            self._buffer.extend(messages[1:])
        return messages[0]

    def waiting_here(self) -> list[JobMessage]:
        with self._lock:
            return list(self._buffer)

    def dead_letters(self) -> list[JobMessage]:
        return self._receive(self.dlq_url, 0, count=10) if self.dlq_url else []

    def ack_dead(self, message: JobMessage) -> None:
        self.sqs.delete_message(QueueUrl=self.dlq_url, ReceiptHandle=message.receipt)

    def release(self, message: JobMessage) -> None:
        self.sqs.change_message_visibility(
            QueueUrl=self.url, ReceiptHandle=message.receipt, VisibilityTimeout=0
        )

    def _receive(self, url: str, timeout: float, count: int = 1) -> list[JobMessage]:
        response = self.sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=max(0 if url != self.url else 1, min(20, round(timeout))),
            VisibilityTimeout=self.visibility_s,
            AttributeNames=["ApproximateReceiveCount"],
        )
        messages = []
        for raw in response.get("Messages", []):
            body = json.loads(raw["Body"])
            payload = (
                self.store.get_blob(body["payload_ref"])
                if "payload_ref" in body
                else base64.b64decode(body["payload"])
            )
            messages.append(
                JobMessage(
                    body["job_id"],
                    body["function_id"],
                    body["format"],
                    payload,
                    body["timeout_s"],
                    body["memory_mib"],
                    model=body.get("model"),
                    receipt=raw["ReceiptHandle"],
                    owner=body.get("owner", ""),
                    trigger=body.get("trigger", "call"),
                    created_at=body.get("created_at"),
                    receive_count=int(raw["Attributes"].get("ApproximateReceiveCount", 1)),
                )
            )
        return messages

    def ack(self, message: JobMessage) -> None:
        self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt)

    def extend(self, message: JobMessage, seconds: float) -> None:
        self.sqs.change_message_visibility(
            QueueUrl=self.url, ReceiptHandle=message.receipt, VisibilityTimeout=int(seconds)
        )

    def depth(self) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        return int(attributes["Attributes"]["ApproximateNumberOfMessages"])
