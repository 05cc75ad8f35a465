"""The official CloudEvents Python SDK on both ends of the mesh's event path.

    python cloudevents_sdk.py produce          prints the requests to POST to a sidecar's /events
    python cloudevents_sdk.py check < deliv    parses what the subscriber received (JSON list of
                                               {"headers": {...}, "body_b64": "..."}) with the SDK
                                               and compares it, attribute for attribute and byte
                                               for byte, with what was produced
    python cloudevents_sdk.py replayed < page  the same for the topic read back as CloudEvents JSON
                                               (a sidecar's GET /events/{topic}, which is what
                                               `meshctl events replay -o json` prints)
"""

import base64
import datetime
import json
import sys

from cloudevents.conversion import to_binary, to_json, to_structured
from cloudevents.http import CloudEvent, from_http, from_json

TOPIC = "sdk-events"


def events():
    """(event, how it is sent) — every mode, optional and extension attributes, odd data."""
    # Explicit times (the SDK would stamp each construction with its own), to the millisecond.
    base = {"source": "/sdk/test", "topic": TOPIC, "time": "2026-03-04T05:06:07.891Z"}
    return [
        (CloudEvent({**base, "type": "sdk.structured", "id": "s-1", "subject": "k1",
                     "dataschema": "https://example.com/schema.json",
                     "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                     "myext": "v1", "time": "2026-01-02T05:04:05.678+02:00"},
                    {"q": "Rain?", "n": 1}), "structured"),
        (CloudEvent({**base, "type": "sdk.binary", "id": "b-1", "datacontenttype": "application/octet-stream",
                     "myext": "v2"}, bytes([0, 1, 2, 250, 255])), "binary"),
        (CloudEvent({**base, "type": "sdk.text", "id": "t-1", "datacontenttype": "text/plain"},
                    "hello, plain text"), "structured"),
        (CloudEvent({**base, "type": "sdk.bytes", "id": "d-1", "datacontenttype": "image/png"},
                    bytes([137, 80, 78, 71, 0, 7])), "structured"),
        (CloudEvent({**base, "type": "sdk.batch", "id": "batch-1", "subject": "k2"}, {"i": 1}), "batch"),
        (CloudEvent({**base, "type": "sdk.batch", "id": "batch-2", "subject": "k2"}, {"i": 2}), "batch"),
    ]


def produce():
    requests, batch = [], []
    for event, how in events():
        if how == "batch":
            batch.append(json.loads(to_json(event)))
            continue
        headers, body = (to_binary if how == "binary" else to_structured)(event)
        requests.append({"headers": dict(headers), "body_b64": base64.b64encode(body).decode()})
    requests.append({"headers": {"content-type": "application/cloudevents-batch+json"},
                     "body_b64": base64.b64encode(json.dumps(batch).encode()).decode()})
    print(json.dumps(requests))


def instant(t):
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))


def compare(received):
    """Every produced event against what arrived (by id); exits non-zero naming differences."""
    problems = []
    for sent, _ in events():
        got = received.get(sent["id"])
        if got is None:
            problems.append(f"{sent['id']}: not delivered")
            continue
        for name, value in sent.get_attributes().items():
            if name == "time":
                if instant(got["time"]) != instant(value):
                    problems.append(f"{sent['id']}: time {got['time']} is not {value}")
            elif got.get(name) != value:
                problems.append(f"{sent['id']}: {name} {got.get(name)!r} is not {value!r}")
        as_bytes = lambda d: d.encode() if isinstance(d, str) else d  # text arrives as bytes
        if as_bytes(got.data) != as_bytes(sent.data):
            problems.append(f"{sent['id']}: data {got.data!r} is not {sent.data!r}")
    print(json.dumps({"checked": len(events()), "problems": problems}))
    sys.exit(1 if problems else 0)


def check():
    received = {}
    for d in json.load(sys.stdin):
        e = from_http(d["headers"], base64.b64decode(d["body_b64"]))
        received[e["id"]] = e
    compare(received)


def replayed():
    received = {}
    for d in json.load(sys.stdin)["events"]:
        e = from_json(json.dumps(d))
        received[e["id"]] = e
    compare(received)


if __name__ == "__main__":
    {"produce": produce, "check": check, "replayed": replayed}[sys.argv[1]]()
