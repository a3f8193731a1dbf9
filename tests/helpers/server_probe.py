"""Probing a running server from tests: raw sockets, /metrics counts, waiting, a health check."""
from __future__ import annotations

import socket
import time

import httpx


def healthy(url: str) -> None:
    """The server still answers a normal request after the abuse."""
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"


def metric_count(url: str, endpoint: str, status: int) -> int:
    want = f'aircupy_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(want):
            return int(line.split()[-1])
    return 0


def raw_exchange(url: str, data: bytes, read: bool = True) -> bytes:
    """Send raw bytes on a fresh connection; return what the server answers before it closes (read=False:
    close at once, without waiting for an answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
