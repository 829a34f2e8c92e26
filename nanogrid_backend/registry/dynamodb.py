"""AWS DynamoDB: functions, jobs and API keys in one table (``pk`` = ``fn#…``, ``job#…``, ``key#…``).

Jobs move PENDING -> RUNNING -> final through conditional updates, so a duplicate delivery can
neither run a finished job again nor overwrite its first result.

Item shapes are versioned: every item written carries ``item_version``. An item without it (written
before versioning) or of an older version lacks the attributes added since, and reads with the
dataclass defaults; attributes the code does not know (an item from a newer controller during a rolling
upgrade) are ignored. So a new field needs a default in nanogrid_backend/models.py, and a bump of ITEM_VERSION
below with a line saying what it added; never rename or repurpose an attribute. Job items expire through the
table's TTL attribute ``expires_at``. Listing scans the table: fine for a team's grid; a
global secondary index on (owner, created_at) is the next step for a busy one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import MISSING, fields
from decimal import Decimal
from typing import Any

import boto3
from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from nanogrid_backend.models import (
    FINAL_STATES,
    PENDING,
    RUNNING,
    ApiKey,
    FiringRecord,
    FunctionRecord,
    JobRecord,
    ScheduleRecord,
    SecretRecord,
)
from nanogrid_backend.registry import windows
from nanogrid_backend.registry.base import (
    FunctionStats,
    HistoryEntry,
    Registry,
    RegistryError,
    VolumeRegistry,
)

JSON_FIELDS = {"error", "output_files", "ai_usage", "variables"}
INT_FIELDS = {
    "memory_mib",
    "package_size",
    "peak_memory_bytes",
    "baseline_memory_bytes",
    "memory_limit_mib",
    "rate_burst",
    "attempt",
}
JOB_TTL_S = 30 * 24 * 3600  # the invocation history's retention
STALE_CLAIM_S = 60.0  # a schedule still on a due time claimed this long ago: its claimer stopped before moving it
# 1: the first versioned shape (jobs with ai_usage, keys with admin and per-owner limits)
# 2: jobs with attempt and retry_of; metrics counter items (``stat#…``) and webhook items (``hook#…``)
# 3: functions with description and stable_id; secret items (``secret#owner#name``)
# 4: jobs with trigger; schedule items (``sched#…``) and firing items (``firing#<schedule>#<due time>``)
ITEM_VERSION = 4
VERSION_ATTRIBUTE = "item_version"


def _to_item(values: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {VERSION_ATTRIBUTE: ITEM_VERSION}
    for name, value in values.items():
        if value is None:
            continue
        if name in JSON_FIELDS:
            item[name] = json.dumps(value)
        elif isinstance(value, float):
            item[name] = Decimal(repr(value))
        elif isinstance(value, bytes):
            if value:
                item[name] = value
        else:
            item[name] = value
    return item


def _volume(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "owner": str(item["owner"]),
        "name": str(item["name"]),
        "size_mib": int(item["size_mib"]),
        "created_at": float(item["created_at"]),
    }


def _from_item(cls: type, item: dict[str, Any]) -> Any:
    """A record from an item of any version: attributes added since it was written take their defaults."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in item:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RegistryError(
                    f"registry item {item.get('pk')} has no {f.name!r}: it was not written by NanoGrid"
                )
            continue
        value = item[f.name]
        if f.name in JSON_FIELDS:
            value = json.loads(value)
        elif isinstance(value, Decimal):
            value = int(value) if f.name in INT_FIELDS else float(value)
        elif hasattr(value, "value") and isinstance(value.value, bytes):  # boto3's Binary
            value = value.value
        values[f.name] = value
    return cls(**values)


class DynamoDBRegistry(Registry, VolumeRegistry):
    def __init__(self, table_name: str) -> None:
        self.table = boto3.resource("dynamodb").Table(table_name)

    # functions
    def put_function(self, function: FunctionRecord) -> None:
        self.table.put_item(
            Item={
                "pk": f"fn#{function.function_id}",
                "kind": "function",
                **_to_item(function.to_dict()),
            }
        )

    def get_function(self, function_id: str) -> FunctionRecord | None:
        item = self.table.get_item(Key={"pk": f"fn#{function_id}"}, ConsistentRead=True).get("Item")
        return _from_item(FunctionRecord, item) if item else None

    def list_functions(self, owner: str | None = None) -> list[FunctionRecord]:
        condition = Attr("kind").eq("function")
        if owner is not None:
            condition &= Attr("owner").eq(owner)
        items = self._scan(condition)
        return sorted(
            (_from_item(FunctionRecord, i) for i in items), key=lambda f: f.created_at, reverse=True
        )

    def delete_function(self, function_id: str) -> bool:
        old = self.table.delete_item(Key={"pk": f"fn#{function_id}"}, ReturnValues="ALL_OLD")
        return "Attributes" in old

    # jobs
    def create_jobs(self, jobs: list[JobRecord]) -> None:
        with self.table.batch_writer() as batch:
            for job in jobs:
                values = {
                    f.name: getattr(job, f.name) for f in fields(JobRecord) if f.name != "payload"
                }
                batch.put_item(
                    Item={
                        "pk": f"job#{job.job_id}",
                        "kind": "job",
                        "expires_at": int(job.created_at + JOB_TTL_S),
                        **_to_item(values),
                    }
                )

    def mark_running(
        self, job_id: str, worker_id: str, started_at: float, retry: bool = False
    ) -> bool:
        # A redelivered message (its worker died) may take over a job left RUNNING.
        allowed = Attr("status").is_in([PENDING, RUNNING]) if retry else Attr("status").eq(PENDING)
        try:
            self.table.update_item(
                Key={"pk": f"job#{job_id}"},
                UpdateExpression="SET #s = :running, worker_id = :w, started_at = :t",
                ConditionExpression=Attr("pk").exists() & allowed,
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":running": RUNNING,
                    ":w": worker_id,
                    ":t": Decimal(repr(started_at)),
                },
            )
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise

    def finish_job(self, job: JobRecord) -> bool:
        skip = {"job_id", "function_id", "payload", "created_at", "owner", "trigger"}
        values = _to_item(
            {f.name: getattr(job, f.name) for f in fields(JobRecord) if f.name not in skip}
        )
        # Placeholders of our own (#f, :f): boto3's condition builder takes #n… and :v… for itself.
        names = {f"#f{i}": name for i, name in enumerate(values)}
        try:
            self.table.update_item(
                Key={"pk": f"job#{job.job_id}"},
                UpdateExpression="SET " + ", ".join(f"#f{i} = :f{i}" for i in range(len(values))),
                ConditionExpression=Attr("pk").exists() & ~Attr("status").is_in(list(FINAL_STATES)),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={f":f{i}": v for i, v in enumerate(values.values())},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False  # already final: the first result wins
            raise
        self._count(job)
        return True

    def record_attempt(self, attempt: JobRecord) -> None:
        self.create_jobs([attempt])
        self._count(attempt)

    def _count(self, job: JobRecord) -> None:
        """Add the call to its minute and hour counter items (one ADD each; the items expire with the history)."""
        by_slot: dict[tuple[int, int], list[windows.Counter]] = {}
        for counter in windows.counters_for(job):
            by_slot.setdefault((counter.resolution, counter.slot), []).append(counter)
        for (resolution, slot), counters in by_slot.items():
            names, values, adds = {}, {}, []
            for i, c in enumerate(counters):
                for field, amount in (
                    ("n", 1),
                    ("f", c.failed),
                    ("c", c.cold),
                    ("t", c.value or 0.0),
                ):
                    names[f"#a{i}{field}"] = f"c#{c.metric}#{c.bucket}#{field}"
                    values[f":a{i}{field}"] = (
                        Decimal(repr(float(amount))) if field == "t" else amount
                    )
                    adds.append(f"#a{i}{field} :a{i}{field}")
            self.table.update_item(
                Key={"pk": f"stat#{job.function_id}#{resolution}#{slot}"},
                UpdateExpression="SET #kind = :kind, expires_at = :exp ADD " + ", ".join(adds),
                ExpressionAttributeNames={**names, "#kind": "kind"},
                ExpressionAttributeValues={
                    **values,
                    ":kind": "stat",
                    ":exp": int((slot + 1) * resolution + JOB_TTL_S),
                },
            )

    def list_history(
        self,
        owner: str,
        function_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
        text_cap: int = 2048,
    ) -> list[HistoryEntry]:
        condition = Attr("kind").eq("job") & Attr("owner").eq(owner)
        if function_id is not None:
            condition &= Attr("function_id").eq(function_id)
        if status:
            condition &= Attr("status").eq(status)
        jobs = sorted(
            (_from_item(JobRecord, i) for i in self._scan(condition)),
            key=lambda j: (j.created_at, j.job_id),
            reverse=True,
        )
        entries = []
        for job in jobs:
            if before is not None and (job.created_at, job.job_id) >= before:
                continue
            sizes = len(job.stdout), len(job.stderr)
            job.stdout, job.stderr, job.result, job.payload = (
                job.stdout[:text_cap],
                job.stderr[:text_cap],
                None,
                b"",
            )
            entries.append(HistoryEntry(job, *sizes))
            if len(entries) == limit:
                break
        return entries

    def function_windows(
        self, function_id: str, now: float | None = None, names: tuple[str, ...] | None = None
    ) -> dict[str, dict[str, Any]]:
        """From the counter items of the slots the windows cover (batch reads, 100 items a request)."""
        now = time.time() if now is None else now
        found = {}
        for name in names or tuple(windows.WINDOWS):
            resolution, first = windows.first_slot(name, now)
            keys = [
                {"pk": f"stat#{function_id}#{resolution}#{slot}"}
                for slot in range(first, int(now // resolution) + 1)
            ]
            sums: dict[tuple[str, int], list[float]] = {}
            for item in self._batch_get(keys):
                for attribute, value in item.items():
                    if attribute.startswith("c#"):
                        _, metric, bucket, field = attribute.split("#")
                        row = sums.setdefault((metric, int(bucket)), [0, 0, 0, 0.0])
                        row["nfct".index(field)] += float(value)
            rows = [
                (m, b, int(n), int(f), int(c), t, windows.bucket_upper(b))
                for (m, b), (n, f, c, t) in sums.items()
            ]
            found[name] = windows.summarise(rows, first * resolution)
        return found

    def function_timeline(
        self, function_id: str, window: str, now: float | None = None
    ) -> list[tuple[int, int, int]]:
        now = time.time() if now is None else now
        resolution, first = windows.first_slot(window, now)
        keys = [
            {"pk": f"stat#{function_id}#{resolution}#{slot}"}
            for slot in range(first, int(now // resolution) + 1)
        ]
        found = []
        for item in self._batch_get(keys):
            sums = [0, 0]
            for attribute, value in item.items():
                if attribute.startswith(f"c#{windows.DURATION}#") and attribute.endswith(
                    ("#n", "#f")
                ):
                    sums["nf".index(attribute[-1])] += int(value)
            found.append((int(str(item["pk"]).rsplit("#", 1)[1]) * resolution, sums[0], sums[1]))
        return sorted(p for p in found if p[1])

    def _batch_get(self, keys: list[dict[str, str]]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        # the resource's client: it reads and writes Python values, not typed ones
        resource = self.table.meta.client
        for start in range(0, len(keys), 100):
            request = {self.table.name: {"Keys": keys[start : start + 100]}}
            while request:
                page = resource.batch_get_item(RequestItems=request)
                items.extend(page["Responses"].get(self.table.name, []))
                request = page.get("UnprocessedKeys") or {}
        return items

    def prune_history(self, before: float) -> int:
        return 0  # job and counter items expire through the table's TTL (expires_at)

    # webhooks (nanogrid_backend/notify.py)
    def put_webhook(self, hook: dict[str, Any]) -> None:
        self.table.put_item(
            Item={
                "pk": f"hook#{hook['hook_id']}",
                "kind": "webhook",
                **{
                    k: json.dumps(v)
                    if k in ("events", "threshold")
                    else Decimal(repr(v))
                    if isinstance(v, float)
                    else v
                    for k, v in hook.items()
                    if v is not None
                },
            }
        )

    def list_webhooks(self, owner: str | None = None) -> list[dict[str, Any]]:
        condition = Attr("kind").eq("webhook")
        if owner is not None:
            condition &= Attr("owner").eq(owner)
        hooks = [
            {
                "function_id": None,
                "threshold": None,
                **{k: v for k, v in item.items() if k not in ("pk", "kind")},
            }
            for item in self._scan(condition)
        ]
        for hook in hooks:
            hook["events"] = json.loads(hook["events"])
            hook["threshold"] = (
                json.loads(hook["threshold"]) if isinstance(hook["threshold"], str) else None
            )
            hook["created_at"] = float(hook["created_at"])
        return sorted(hooks, key=lambda h: h["created_at"])

    def delete_webhook(self, owner: str, hook_id: str) -> bool:
        try:
            self.table.delete_item(
                Key={"pk": f"hook#{hook_id}"}, ConditionExpression=Attr("owner").eq(owner)
            )
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise

    def note_attempt(self, job_id: str, error: dict) -> None:
        self.table.update_item(
            Key={"pk": f"job#{job_id}"},
            UpdateExpression="SET #e = :e",
            ExpressionAttributeNames={"#e": "error"},
            ExpressionAttributeValues={":e": json.dumps(error)},
        )

    def get_job(self, job_id: str) -> JobRecord | None:
        item = self.table.get_item(Key={"pk": f"job#{job_id}"}, ConsistentRead=True).get("Item")
        return _from_item(JobRecord, item) if item else None

    def list_jobs(
        self, limit: int = 50, status: str | None = None, owner: str | None = None
    ) -> list[JobRecord]:
        condition = Attr("kind").eq("job")
        if status:
            condition &= Attr("status").eq(status)
        if owner is not None:
            condition &= Attr("owner").eq(owner)
        jobs = sorted(
            (_from_item(JobRecord, i) for i in self._scan(condition)),
            key=lambda j: j.created_at,
            reverse=True,
        )
        return jobs if limit < 0 else jobs[:limit]

    def count_jobs(self, owner: str | None = None) -> dict[str, int]:
        condition = Attr("kind").eq("job")
        if owner is not None:
            condition &= Attr("owner").eq(owner)
        counts: dict[str, int] = {}
        for item in self._scan(
            condition, ProjectionExpression="#s", ExpressionAttributeNames={"#s": "status"}
        ):
            counts[item["status"]] = counts.get(item["status"], 0) + 1
        return counts

    def function_stats(
        self, owner: str | None = None, buckets_ms: tuple[float, ...] = ()
    ) -> list[FunctionStats]:
        condition = (
            Attr("kind").eq("job")
            & Attr("status").is_in(list(FINAL_STATES))
            & Attr("started_at").exists()
        )
        if owner is not None:
            condition &= Attr("owner").eq(owner)
        names = {
            "#s": "status",
            "#f": "function_id",
            "#a": "started_at",
            "#z": "finished_at",
            "#e": "execution_time_ms",
        }
        stats: dict[tuple[str, str], FunctionStats] = {}
        for item in self._scan(
            condition, ProjectionExpression=", ".join(names), ExpressionAttributeNames=names
        ):
            key = (item["function_id"], item["status"])
            row = stats.setdefault(
                key,
                FunctionStats(*key, 0, 0.0, 0.0, 0, [0] * len(buckets_ms), [0] * len(buckets_ms)),
            )
            total = (
                float(item.get("finished_at", item["started_at"])) - float(item["started_at"])
            ) * 1000
            row.count += 1
            row.total_ms += total
            row.total_buckets = [
                n + (total <= b) for n, b in zip(row.total_buckets, buckets_ms, strict=True)
            ]
            if "execution_time_ms" in item:
                handler = float(item["execution_time_ms"])
                row.handler_ms += handler
                row.handler_count += 1
                row.handler_buckets = [
                    n + (handler <= b) for n, b in zip(row.handler_buckets, buckets_ms, strict=True)
                ]
        return list(stats.values())

    # secrets
    def put_secret(self, secret: SecretRecord) -> None:
        self.table.put_item(
            Item={
                "pk": f"secret#{secret.owner}#{secret.name}",
                "kind": "secret",
                **_to_item({f.name: getattr(secret, f.name) for f in fields(SecretRecord)}),
            }
        )

    def get_secret(self, owner: str, name: str) -> SecretRecord | None:
        item = self.table.get_item(Key={"pk": f"secret#{owner}#{name}"}, ConsistentRead=True).get(
            "Item"
        )
        return _from_item(SecretRecord, item) if item else None

    def list_secrets(self, owner: str) -> list[SecretRecord]:
        items = self._scan(Attr("kind").eq("secret") & Attr("owner").eq(owner))
        return sorted((_from_item(SecretRecord, i) for i in items), key=lambda s: s.name)

    def delete_secret(self, owner: str, name: str) -> bool:
        old = self.table.delete_item(Key={"pk": f"secret#{owner}#{name}"}, ReturnValues="ALL_OLD")
        return "Attributes" in old

    # volumes (nanogrid_backend/volume_sync.py): records as dicts, names per owner
    def put_volume(self, volume: dict[str, Any]) -> None:
        """A new volume's record; RegistryError if another controller made one of that name meanwhile."""
        try:
            self.table.put_item(
                Item={
                    "pk": f"volume#{volume['owner']}#{volume['name']}",
                    "kind": "volume",
                    **_to_item({k: volume[k] for k in ("owner", "name", "size_mib", "created_at")}),
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
        except self.table.meta.client.exceptions.ConditionalCheckFailedException:
            raise RegistryError(
                f"volume {volume['name']!r} was just made by another request"
            ) from None

    def get_volume(self, owner: str, name: str) -> dict[str, Any] | None:
        item = self.table.get_item(Key={"pk": f"volume#{owner}#{name}"}, ConsistentRead=True).get(
            "Item"
        )
        return _volume(item) if item else None

    def list_volumes(self, owner: str) -> list[dict[str, Any]]:
        items = self._scan(Attr("kind").eq("volume") & Attr("owner").eq(owner))
        return sorted((_volume(item) for item in items), key=lambda v: v["name"])

    def delete_volume(self, owner: str, name: str) -> bool:
        old = self.table.delete_item(Key={"pk": f"volume#{owner}#{name}"}, ReturnValues="ALL_OLD")
        return "Attributes" in old

    # API keys
    def put_key(self, key: ApiKey) -> None:
        self.table.put_item(
            Item={
                "pk": f"key#{key.key_id}",
                "kind": "key",
                **_to_item({f.name: getattr(key, f.name) for f in fields(ApiKey)}),
            }
        )

    def get_key(self, key_id: str) -> ApiKey | None:
        item = self.table.get_item(Key={"pk": f"key#{key_id}"}, ConsistentRead=True).get("Item")
        return _from_item(ApiKey, item) if item else None

    def list_keys(self) -> list[ApiKey]:
        return sorted(
            (_from_item(ApiKey, i) for i in self._scan(Attr("kind").eq("key"))),
            key=lambda k: k.created_at,
        )

    # schedules (nanogrid_backend/schedules.py)
    def put_schedule(self, schedule: ScheduleRecord) -> None:
        self.table.put_item(
            Item={
                "pk": f"sched#{schedule.schedule_id}",
                "kind": "schedule",
                **_to_item({f.name: getattr(schedule, f.name) for f in fields(ScheduleRecord)}),
            }
        )

    def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        item = self.table.get_item(Key={"pk": f"sched#{schedule_id}"}, ConsistentRead=True).get(
            "Item"
        )
        return _from_item(ScheduleRecord, item) if item else None

    def list_schedules(self, owner: str | None = None) -> list[ScheduleRecord]:
        condition = Attr("kind").eq("schedule")
        if owner is not None:
            condition &= Attr("owner").eq(owner)
        return sorted(
            (_from_item(ScheduleRecord, i) for i in self._scan(condition, ConsistentRead=True)),
            key=lambda s: s.name,
        )

    def delete_schedule(self, schedule_id: str) -> bool:
        old = self.table.delete_item(Key={"pk": f"sched#{schedule_id}"}, ReturnValues="ALL_OLD")
        with self.table.batch_writer() as batch:
            for item in self._scan(
                Attr("kind").eq("firing") & Attr("schedule_id").eq(schedule_id),
                ProjectionExpression="pk",
            ):
                batch.delete_item(Key={"pk": item["pk"]})
        return "Attributes" in old

    def set_schedule_paused(self, schedule_id: str, paused: bool, next_due: float) -> bool:
        return self._update_if(
            f"sched#{schedule_id}",
            "SET #paused = :p, #next_due = :n, #updated_at = :u",
            Attr("pk").exists(),
            {":p": paused, ":n": Decimal(repr(next_due)), ":u": Decimal(repr(time.time()))},
        )

    def claim_firing(self, firing: FiringRecord, next_due: float, job: JobRecord | None) -> bool:
        """The conditional put of the firing item is the claim; the job and the schedule's move follow it (items one at
        a time: moto, the tests' DynamoDB, runs concurrent transactions unsafely). A scheduler that stopped between the
        claim and the move leaves the schedule on a claimed due time: the next one moves it on once that claim is
        STALE_CLAIM_S old (its run, if its job was never written, is lost)."""
        item = {
            "pk": f"firing#{firing.schedule_id}#{firing.due_time!r}",
            "kind": "firing",
            "expires_at": int(firing.fired_at + JOB_TTL_S),
            **_to_item({f.name: getattr(firing, f.name) for f in fields(FiringRecord)}),
        }
        pk, due = f"sched#{firing.schedule_id}", Decimal(repr(next_due))
        try:
            self.table.put_item(Item=item, ConditionExpression=Attr("pk").not_exists())
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            claimed = (
                self.table.get_item(Key={"pk": item["pk"]}, ConsistentRead=True).get("Item") or {}
            )
            if float(claimed.get("fired_at", firing.fired_at)) < firing.fired_at - STALE_CLAIM_S:
                self._update_if(
                    pk,
                    "SET #next_due = :n",
                    Attr("next_due").eq(Decimal(repr(firing.due_time))),
                    {":n": due},
                )
            return False
        values: dict[str, Any] = {}
        if job is not None:
            self.create_jobs([job])
            values[":j"] = job.job_id
        if firing.outcome == "queued":
            values[":w"] = Decimal(repr(firing.due_time))
        marks = ", ".join(
            f"#{name} = {value}"
            for name, value in (("last_job_id", ":j"), ("waiting_due", ":w"))
            if value in values
        )
        if (
            not self._update_if(
                pk,
                "SET #next_due = :n" + (", " + marks if marks else ""),
                Attr("next_due").lte(due),
                {":n": due, **values},
            )
            and marks
        ):
            # already moved further on
            self._update_if(pk, "SET " + marks, Attr("pk").exists(), values)
        return True

    def start_waiting_firing(self, schedule_id: str, due_time: float, job: JobRecord) -> bool:
        if not self._update_if(
            f"firing#{schedule_id}#{due_time!r}",
            "SET #outcome = :s, #job_id = :j",
            Attr("outcome").eq("queued"),
            {":s": "started", ":j": job.job_id},
        ):
            return False
        self.create_jobs([job])
        self.table.update_item(
            Key={"pk": f"sched#{schedule_id}"},
            UpdateExpression="SET #j = :j REMOVE #w",
            ExpressionAttributeNames={"#j": "last_job_id", "#w": "waiting_due"},
            ExpressionAttributeValues={":j": job.job_id},
        )
        return True

    def list_firings(self, schedule_id: str, limit: int = 20) -> list[FiringRecord]:
        items = self._scan(
            Attr("kind").eq("firing") & Attr("schedule_id").eq(schedule_id), ConsistentRead=True
        )
        firings = sorted(
            (_from_item(FiringRecord, i) for i in items), key=lambda f: f.due_time, reverse=True
        )[:limit]
        for firing in firings:
            firing.missed = int(firing.missed)
        return firings

    def _update_if(self, pk: str, update: str, condition: Any, values: dict[str, Any]) -> bool:
        """``update`` (attributes written ``#name``) if the item meets ``condition``; False if it does not."""
        names = {f"#{name}": name for name in re.findall(r"#(\w+)", update)}
        try:
            self.table.update_item(
                Key={"pk": pk},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise

    def _scan(self, condition: Any, **options: Any) -> list[dict[str, Any]]:
        items, kwargs = [], {"FilterExpression": condition, **options}
        while True:
            page = self.table.scan(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def create_table(table_name: str) -> None:
    """The table the registry expects, with TTL on job items (what Terraform's registry module makes)."""
    client = boto3.client("dynamodb")
    client.create_table(
        TableName=table_name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    )
    client.get_waiter("table_exists").wait(TableName=table_name)
    client.update_time_to_live(
        TableName=table_name,
        TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
    )
