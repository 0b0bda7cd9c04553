"""The DynamoDB store: one table shared by every deployment and section.

Single-table design (keys `pk` S, `sk` S; TTL attribute `expires_at`, epoch seconds):

- latest section:     pk `<deployment>#latest`, sk `<section>`;
- history entry:      pk `<deployment>#history#<section>`,
                      sk `<checked_at RFC 3339 with microseconds>#<random>`, `expires_at` set;
- dismissed sections: pk `<deployment>#latest`, sk `#settings#dismissed`.

All latest sections of a deployment and its settings share one partition, so `snapshot()` is
one Query, and so is `readiness_snapshot()`, all that readiness reads: it projects each latest
item's `summary` (small JSON, `model.SectionSummary`) and leaves the bodies on the server.
(Section names never start with `#`.) History sort keys are fixed-width UTC timestamps, so
they order by time and `since` is a key condition.
The section body is JSON rather than a DynamoDB map: DynamoDB has no floats (boto3 would hand
back Decimals) and JSON round-trips every nested value exactly. It is stored zlib-compressed
in the binary attribute `bodyz` (fewer write units, further from the 400 KB item limit);
items written before that carry the JSON text in `body`, and are still read. A latest item
written before summaries has no `summary`: readiness reads its body instead, once per request,
until the next put replaces it.

A put reads the latest item's summary (GetItem, projected) to carry its run-length record of
recent results forward, then writes the new latest conditionally on the item being unchanged
since, so two writers cannot lose each other's result from the record; a writer that lost
the race reads again (_LATEST_ATTEMPTS in all).

boto3 is imported here and nowhere else on the API's path: the API function's cold start
should not pay for it unless the store really is DynamoDB.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from deployhealth.model import (
    FUTURE_TOLERANCE_SECONDS,
    Section,
    SectionSummary,
    moves_latest,
    rfc3339,
    summarize,
)
from deployhealth.store import ReadinessSnapshot, Snapshot, StoreUnavailable

logger = logging.getLogger(__name__)

# Short timeouts and one retry: the API answers readiness probes from this store, and a
# probe that hangs on a dead endpoint is worse than a prompt "store unavailable" (503).
_CONFIG = Config(
    connect_timeout=2,
    read_timeout=3,
    retries={"total_max_attempts": 2, "mode": "standard"},
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DISMISSED_SK = "#settings#dismissed"
# A stored section is far smaller; the cap only bounds what a damaged item can cost.
_MAX_BODY_BYTES = 16 * 1024 * 1024
# Conditional writes of the latest item before giving up on an exact record: each failed
# one means another writer's result landed in between, so more than a few only happens
# when many writers race on one section (one check function writes each).
_LATEST_ATTEMPTS = 3


class DynamoDBStore:
    def __init__(
        self,
        table: str,
        deployment: str,
        retention_days: float,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.description = f"dynamodb://{table}"
        self._table = table
        self._deployment = deployment
        self._retention = timedelta(days=retention_days)
        self._latest_pk = f"{deployment}#latest"
        with self._translate():
            # A session of our own: boto3's default session is not safe to create clients
            # from in several threads, and the scheduler and the server both open stores.
            session = boto3.session.Session()
            self._client: Any = session.client(
                "dynamodb", region_name=region, endpoint_url=endpoint_url, config=_CONFIG
            )

    # --- the ResultStore protocol ---------------------------------------------------

    def put(self, name: str, section: Section) -> None:
        # Compressed: DynamoDB bills a write per started KB, and a section's JSON (node reports,
        # proxy lists) repeats its keys: a 2.6 KB derp section becomes one write unit, not three.
        body = zlib.compress(json.dumps(section.to_stored()).encode(), 6)
        checked_at = _epoch_decimal(section.checked_at)
        expires_at = math.ceil(
            (section.checked_at.astimezone(UTC) + self._retention - _EPOCH).total_seconds()
        )
        # The random suffix keeps two results checked in the same microsecond apart.
        sk = f"{rfc3339(section.checked_at)}#{secrets.token_hex(4)}"
        with self._translate():
            self._client.put_item(
                TableName=self._table,
                Item={
                    "pk": {"S": self._history_pk(name)},
                    "sk": {"S": sk},
                    "bodyz": {"B": body},
                    "checked_at": {"N": checked_at},
                    "expires_at": {"N": str(expires_at)},
                },
            )
            self._put_latest(name, section, body, checked_at)

    def _put_latest(self, name: str, section: Section, body: bytes, checked_at: str) -> None:
        """Make `section` latest if it moves latest forward, its summary carried on."""
        key = {"pk": {"S": self._latest_pk}, "sk": {"S": name}}
        item = {**key, "bodyz": {"B": body}, "checked_at": {"N": checked_at}}
        new = float(Decimal(checked_at))
        summary = ""
        for _ in range(_LATEST_ATTEMPTS):
            now = time.time()
            current = self._client.get_item(
                TableName=self._table,
                Key=key,
                ConsistentRead=True,
                ProjectionExpression="checked_at, #s",
                ExpressionAttributeNames={"#s": "summary"},
            ).get("Item")
            if current is not None and not moves_latest(
                new, float(Decimal(current["checked_at"]["N"])), now
            ):
                return  # a newer result is latest: this late one only joins history
            previous: SectionSummary | None = None
            values: dict[str, Any] = {}
            if current is None:
                condition = "attribute_not_exists(pk)"
            elif "summary" in current:
                previous = SectionSummary.from_stored(current["summary"]["S"])
                condition = "checked_at = :was AND #s = :summary"
                values = {":was": current["checked_at"], ":summary": current["summary"]}
            else:
                # Written before summaries: its body says what it was.
                previous = self._summary_from_body(name)
                condition = "checked_at = :was AND attribute_not_exists(#s)"
                values = {":was": current["checked_at"]}
            summary = summarize(name, section, previous, now=now).to_stored()
            try:
                self._client.put_item(
                    TableName=self._table,
                    Item={**item, "summary": {"S": summary}},
                    # The item as read: a writer that slipped in between fails this.
                    ConditionExpression=condition,
                    ExpressionAttributeNames={"#s": "summary"} if "#s" in condition else {},
                    **({"ExpressionAttributeValues": values} if values else {}),
                )
                return
            except ClientError as exc:
                if _error_code(exc) != "ConditionalCheckFailedException":
                    raise
        # Still racing: keep the promise that matters (latest moves forward only) and accept
        # that the run-length record may miss the results that landed meanwhile.
        logger.warning(
            "result store %s: %d writers raced on the latest %s result; its hysteresis record "
            "may miss a result", self.description, _LATEST_ATTEMPTS, name,
        )
        try:
            self._client.put_item(
                TableName=self._table,
                Item={**item, "summary": {"S": summary}},
                ConditionExpression=(
                    "attribute_not_exists(pk) OR checked_at < :new OR checked_at > :future"
                ),
                ExpressionAttributeValues={
                    ":new": {"N": checked_at},
                    ":future": {"N": str(time.time() + FUTURE_TOLERANCE_SECONDS)},
                },
            )
        except ClientError as exc:
            # A newer result is already latest: this late one only joins history.
            if _error_code(exc) != "ConditionalCheckFailedException":
                raise

    def _summary_from_body(self, name: str) -> SectionSummary | None:
        """The summary of a latest item stored before summaries, from its body (one GetItem)."""
        item = self._client.get_item(
            TableName=self._table,
            Key={"pk": {"S": self._latest_pk}, "sk": {"S": name}},
            ConsistentRead=True,
        ).get("Item")
        return None if item is None else summarize(name, _section(item))

    def readiness_snapshot(self) -> ReadinessSnapshot:
        summaries: dict[str, SectionSummary] = {}
        dismissed: tuple[str, ...] | None = None
        with self._translate():
            for item in self._query(
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": {"S": self._latest_pk}},
                # Summaries and the setting only: the bodies stay on the server.
                ProjectionExpression="sk, #s, #v",
                ExpressionAttributeNames={"#s": "summary", "#v": "value"},
                ConsistentRead=True,
            ):
                sk = item["sk"]["S"]
                if sk == _DISMISSED_SK:
                    dismissed = tuple(json.loads(item["value"]["S"]))
                elif sk.startswith("#"):
                    continue
                elif "summary" in item:
                    summaries[sk] = SectionSummary.from_stored(item["summary"]["S"])
                else:
                    old = self._summary_from_body(sk)
                    if old is not None:
                        summaries[sk] = old
        return ReadinessSnapshot(summaries, dismissed)

    def snapshot(self) -> Snapshot:
        latest: dict[str, Section] = {}
        dismissed: tuple[str, ...] | None = None
        with self._translate():
            for item in self._query(
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": {"S": self._latest_pk}},
                ConsistentRead=True,
            ):
                sk = item["sk"]["S"]
                if sk == _DISMISSED_SK:
                    dismissed = tuple(json.loads(item["value"]["S"]))
                elif not sk.startswith("#"):
                    latest[sk] = _section(item)
        return Snapshot(latest, dismissed)

    def latest(self) -> dict[str, Section]:
        return self.snapshot().latest

    def history(
        self, name: str, *, limit: int = 50, since: datetime | None = None
    ) -> list[Section]:
        if limit <= 0:
            return []
        now = datetime.now(UTC)
        # The retention window bounds the key range, so expired items that TTL has not yet
        # deleted (it may take days) are not even read; the expires_at filter also hides
        # items written under a shorter retention than this reader's.
        floor = now - self._retention
        if since is not None and since > floor:
            floor = since
        out: list[Section] = []
        with self._translate():
            for item in self._query(
                KeyConditionExpression="pk = :pk AND sk >= :floor",
                FilterExpression="expires_at > :now",
                ExpressionAttributeValues={
                    ":pk": {"S": self._history_pk(name)},
                    ":floor": {"S": rfc3339(floor)},
                    ":now": {"N": _epoch_decimal(now)},
                },
                ScanIndexForward=False,
                # Limit counts items read before the filter; _query pages on when some were
                # filtered out, and we stop as soon as we have enough.
                Limit=limit,
            ):
                out.append(_section(item))
                if len(out) >= limit:
                    break
        return out

    def dismissed(self) -> tuple[str, ...] | None:
        with self._translate():
            response = self._client.get_item(
                TableName=self._table,
                Key={"pk": {"S": self._latest_pk}, "sk": {"S": _DISMISSED_SK}},
                ConsistentRead=True,
            )
        item = response.get("Item")
        if item is None:
            return None
        return tuple(json.loads(item["value"]["S"]))

    def set_dismissed(self, sections: Sequence[str]) -> bool:
        value = json.dumps(list(sections))
        with self._translate():
            try:
                # Compare and put in one conditional write, so two concurrent PUTs of the
                # same value cannot both report a change.
                self._client.put_item(
                    TableName=self._table,
                    Item={
                        "pk": {"S": self._latest_pk},
                        "sk": {"S": _DISMISSED_SK},
                        "value": {"S": value},
                    },
                    ConditionExpression="attribute_not_exists(pk) OR #v <> :v",
                    ExpressionAttributeNames={"#v": "value"},
                    ExpressionAttributeValues={":v": {"S": value}},
                )
            except ClientError as exc:
                if _error_code(exc) == "ConditionalCheckFailedException":
                    return False
                raise
        return True

    def close(self) -> None:
        self._client.close()

    # --- for tests, the demo and the bench --------------------------------------------

    def create_table(self) -> None:
        """Create the table as template.yaml does (on-demand, TTL on `expires_at`).

        Idempotent, for local endpoints; in AWS the template owns the table.
        """
        with self._translate():
            try:
                self._client.create_table(
                    TableName=self._table,
                    AttributeDefinitions=[
                        {"AttributeName": "pk", "AttributeType": "S"},
                        {"AttributeName": "sk", "AttributeType": "S"},
                    ],
                    KeySchema=[
                        {"AttributeName": "pk", "KeyType": "HASH"},
                        {"AttributeName": "sk", "KeyType": "RANGE"},
                    ],
                    BillingMode="PAY_PER_REQUEST",
                )
            except ClientError as exc:
                if _error_code(exc) != "ResourceInUseException":
                    raise
            self._client.get_waiter("table_exists").wait(
                TableName=self._table, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
            )
            ttl = self._client.describe_time_to_live(TableName=self._table)
            if ttl["TimeToLiveDescription"]["TimeToLiveStatus"] not in ("ENABLED", "ENABLING"):
                self._client.update_time_to_live(
                    TableName=self._table,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
                )

    # --- helpers ----------------------------------------------------------------------

    def _history_pk(self, name: str) -> str:
        return f"{self._deployment}#history#{name}"

    def _query(self, **request: Any) -> Iterator[dict[str, Any]]:
        """Items of a Query, following LastEvaluatedKey (one request at normal sizes)."""
        while True:
            response = self._client.query(TableName=self._table, **request)
            yield from response.get("Items", [])
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn every boto3/botocore failure into StoreUnavailable with a short reason.

        Neither botocore's exception texts nor ours carry credentials; the traceback is
        dropped so that nothing of the request (signed headers included) can be printed.
        """
        try:
            yield
        except ClientError as exc:
            raise StoreUnavailable(self.description, self._client_reason(exc)) from None
        except BotoCoreError as exc:
            raise StoreUnavailable(self.description, f"{type(exc).__name__}: {exc}") from None

    def _client_reason(self, exc: ClientError) -> str:
        code = _error_code(exc)
        if code == "ResourceNotFoundException":
            return f"table {self._table!r} does not exist"
        # Authorization messages quote role ARNs, account ids and canonical requests; the
        # code says enough, and the reason may end up on a public /readyz.
        if any(word in code for word in ("AccessDenied", "Unrecognized", "Token", "Signature")):
            return f"{code}: check the function's credentials and IAM policy"
        message = str(exc.response.get("Error", {}).get("Message", ""))[:200]
        return f"{code}: {message}" if message else code


def _section(item: dict[str, Any]) -> Section:
    if "bodyz" in item:
        # zlib-compressed JSON; bounded, so a corrupt or hostile item cannot balloon in memory.
        inflater = zlib.decompressobj()
        text = inflater.decompress(item["bodyz"]["B"], _MAX_BODY_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"a stored section inflates past {_MAX_BODY_BYTES} bytes")
        return Section.from_stored(json.loads(text))
    # Items written before compression (plain JSON text).
    return Section.from_stored(json.loads(item["body"]["S"]))


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "ClientError"))


def _epoch_decimal(moment: datetime) -> str:
    """Epoch seconds with exact microseconds, as DynamoDB's N text (no float rounding)."""
    micros = (moment.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return format(Decimal(micros).scaleb(-6), "f")
