"""The OpenAI Batch API's file format: input lines in, output records out, and resuming an output file.

Input, one JSON object a line (blank lines are skipped):
    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
Output, one line per input line, in the order the results finish:
    {"id": "batch_req_...", "custom_id": "a1",
     "response": {"status_code": 200, "request_id": "req_...", "body": <what `aircupy serve` answers>},
     "error": null}
A body the server refuses is still a response (status_code 400 or 404 and the server's error body), as
at OpenAI. A line that is not a request at all (not JSON, no custom_id, a method or url other than the
two above, a custom_id already used) has "response": null and "error": {"code", "message"}; its
custom_id is null when the line has none.

Resuming: `scan_output` reads an output file a previous run left, drops a torn last line (a write cut
short by a crash), and says what is done, so that `plan` skips those lines of the input. The keys: a
custom_id is done once any line but a duplicate_custom_id error carries it; its k-th repeat is done once
k such errors carry it; lines without a custom_id are written in input order before any request runs,
so the first m of them are done when the file holds m records with a null custom_id.
"""
from __future__ import annotations

import json
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

from aircupy.errors import AircupyError
from aircupy.server.protocol import APIError, decode_json

KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
DUPLICATE = "duplicate_custom_id"


@dataclass(frozen=True)
class Line:
    """A batch line ready to run: its request body goes through the server's validation when it runs."""
    number: int             # 1-based line number in the input
    custom_id: str
    kind: str               # "chat" | "completion"
    body: object            # the "body" value as decoded (checked to be an object when it runs)


@dataclass(frozen=True)
class Rejected:
    """A line that is no request the batch can run; written at once as an error record."""
    number: int
    custom_id: str | None
    code: str
    message: str

    def record(self) -> dict:
        return error_record(self.custom_id, self.code, f"line {self.number}: {self.message}")


def request_record(custom_id: str, status: int, body: dict) -> dict:
    return {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": "req_" + secrets.token_hex(12), "body": body},
            "error": None}


def error_record(custom_id: str | None, code: str, message: str) -> dict:
    return {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def parse_line(number: int, raw: bytes) -> Line | Rejected:
    """One input line -> a Line to run, or why it is not a request."""
    try:
        obj = decode_json(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Rejected(number, None, "invalid_json", f"not UTF-8 text ({e.reason} at byte {e.start})")
    except APIError as e:   # the server's words are about a body; this is a line
        return Rejected(number, None, "invalid_json", e.message.replace("JSON body", "JSON"))
    if not isinstance(obj, dict):
        return Rejected(number, None, "invalid_json", "a batch line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or not _unicode(cid):
        return Rejected(number, None, "invalid_custom_id", "custom_id must be a non-empty string (of valid "
                                                           "Unicode)")
    if obj.get("method") != "POST":
        return Rejected(number, cid, "invalid_method", f"method must be \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in KINDS:
        return Rejected(number, cid, "invalid_url", f"url {url!r} is not supported (use "
                                                    f"{' or '.join(KINDS)})")
    if "body" not in obj:
        return Rejected(number, cid, "invalid_body", "body is required")
    return Line(number, cid, KINDS[url], obj["body"])


def _unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:   # JSON may escape a lone UTF-16 surrogate
        return False


def read_input(data: bytes) -> list[Line | Rejected]:
    """Every non-blank line of an input file, a later use of a custom_id rejected as a duplicate."""
    out: list[Line | Rejected] = []
    first: dict[str, int] = {}
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        item = parse_line(i, raw)
        cid = item.custom_id
        if cid is not None and cid in first:
            item = Rejected(i, cid, DUPLICATE, f"custom_id {cid!r} repeats line {first[cid]}; only the first "
                                               "line with a custom_id is run")
        elif cid is not None:
            first[cid] = i
        out.append(item)
    return out


@dataclass
class Done:
    """What an output file already holds, by the keys described in the module docstring."""
    ids: set[str] = field(default_factory=set)
    repeats: Counter = field(default_factory=Counter)   # custom_id -> duplicate errors written
    anonymous: int = 0                                  # records with a null custom_id
    records: int = 0
    torn_bytes: int = 0                                 # a torn last line dropped from the file

    def add(self, rec: dict) -> None:
        self.records += 1
        cid, err = rec.get("custom_id"), rec.get("error")
        if cid is None:
            self.anonymous += 1
        elif isinstance(err, dict) and err.get("code") == DUPLICATE:
            self.repeats[cid] += 1
        else:
            self.ids.add(cid)


def scan_output(path: str) -> Done:
    """Read what a previous run wrote to `path` and cut a torn last line off it. A complete line that is
    not a batch record means the file is something else: an error, and the file is left as it is."""
    done = Done()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1     # everything after the last newline is a torn write
    for i, raw in enumerate(data[:keep].split(b"\n")[:-1], 1):
        try:
            rec = decode_json(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, APIError):
            rec = None
        if not (isinstance(rec, dict) and "custom_id" in rec and "id" in rec and
                (rec["custom_id"] is None or isinstance(rec["custom_id"], str))):
            raise AircupyError(f"{path} line {i} is not a batch output record: resume needs the output of an "
                               "earlier `aircupy batch` run (--overwrite starts the file over)")
        done.add(rec)
    if keep < len(data):
        done.torn_bytes = len(data) - keep
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return done


def plan(items: list[Line | Rejected], done: Done) -> list[Line | Rejected]:
    """The items of the input that `done` does not hold yet, in input order."""
    out, repeats, anonymous = [], Counter(), 0
    for item in items:
        cid = item.custom_id
        if cid is None:
            anonymous += 1
            if anonymous <= done.anonymous:
                continue
        elif isinstance(item, Rejected) and item.code == DUPLICATE:
            repeats[cid] += 1
            if repeats[cid] <= done.repeats[cid]:
                continue
        elif cid in done.ids:
            continue
        out.append(item)
    return out


class Output:
    """Appends records to the output file, one whole line per write, each flushed to disk (fsync) before
    the next: a crash leaves at most one torn line, which the next run's scan_output drops."""

    def __init__(self, path: str, overwrite: bool):
        existed = os.path.exists(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_APPEND)
        self.fd = os.open(path, flags, 0o644)
        if not existed:   # the new file's name is durable too, not only its lines
            d = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(d)
            finally:
                os.close(d)

    def write(self, rec: dict) -> None:
        text = json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            data = memoryview(text.encode("utf-8"))
        except UnicodeEncodeError:   # a lone surrogate in generated text: escaped, still one valid line
            data = memoryview((json.dumps(rec, separators=(",", ":")) + "\n").encode("ascii"))
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
