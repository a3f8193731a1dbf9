"""Benchmark the HTTP server under concurrent chat clients: time to first token and aggregate tokens/s.

    python -m bench.bench_serve --model PATH.gguf --clients 1 8 32 64 --tokens 64 [--backend cuda]
        [--server-arg=--max-num-seqs=64] [--json OUT]

Starts `aircupy serve` on a free local port (a subprocess, as a user runs it), waits for /health, then
per client count opens that many concurrent streaming /v1/chat/completions requests (httpx, one
connection each; a distinct short user message per client, max_tokens --tokens, temperature 0,
ignore_eos so every stream has the same length) released together. Per client count:
  ttft_p50 / ttft_p90 / ttft_max   request sent -> first content chunk
  tok_s                            completion tokens of all clients / wall time of the round
  e2e_p50                          request sent -> last chunk
A warm-up round with the largest count precedes the measured rounds. The server's /metrics after the
run is saved beside the records (running/waiting, KV blocks, prefix-cache hits).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client, url: str, i: int, tokens: int) -> dict:
    body = {"stream": True, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Request {i}: tell me a story about the number {i * 7919 % 1000}."}]}
    t0 = time.perf_counter()
    first = None
    n = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
            if delta.get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
    return dict(ttft=first if first is not None else float("nan"), e2e=time.perf_counter() - t0, chunks=n)


async def _round(url: str, clients: int, tokens: int) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(_one(client, url, i, tokens) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = np.array([r["ttft"] for r in rs])
    e2e = np.array([r["e2e"] for r in rs])
    return dict(clients=clients, tokens=tokens, wall_s=wall, tok_s=clients * tokens / wall,
                ttft_p50=float(np.median(ttft)), ttft_p90=float(np.percentile(ttft, 90)),
                ttft_max=float(ttft.max()), e2e_p50=float(np.median(e2e)),
                chunks_min=int(min(r["chunks"] for r in rs)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--server-arg", action="append", default=[], help="passed to `aircupy serve`")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "aircupy", "serve", "--model", a.model, "--backend", a.backend,
           "--port", str(port)] + a.server_arg
    log = open(os.environ.get("BENCH_SERVE_LOG", "/tmp/bench_serve_server.log"), "w")
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if srv.poll() is not None:
                raise SystemExit(f"server exited ({srv.returncode}); log in {log.name}")
            time.sleep(0.5)
        asyncio.run(_round(url, max(a.clients), min(a.tokens, 16)))            # warm-up
        for n in a.clients:
            r = asyncio.run(_round(url, n, a.tokens))
            r.update(model=os.path.basename(a.model), backend=a.backend, server_args=a.server_arg)
            print(f"clients {n:4d}: {r['tok_s']:9.1f} tok/s  ttft p50 {r['ttft_p50'] * 1e3:7.1f} ms  "
                  f"p90 {r['ttft_p90'] * 1e3:7.1f} ms  max {r['ttft_max'] * 1e3:7.1f} ms  "
                  f"e2e p50 {r['e2e_p50']:6.2f} s", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
        try:
            metrics = httpx.get(url + "/metrics", timeout=5).text
            if a.json:
                with open(a.json + ".metrics.txt", "w") as f:
                    f.write(metrics)
        except httpx.HTTPError:
            pass
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    main()
