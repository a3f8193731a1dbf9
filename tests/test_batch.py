"""`aircupy batch` on the real SmolLM2 (numpy backend): each record's body is what `aircupy serve` answers
to the same body (the server runs beside it on the same engine), errors included; and the command itself
through click's CliRunner: stdin input, resuming over a torn tail, duplicate ids, exit codes."""
from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from aircupy.cli import main
from aircupy.server import batch_file as bf
from aircupy.server.app import create_app
from aircupy.server.batch import run_batch
from aircupy.server.runner import ServerThread
from tests.helpers.engines import numpy_engine

MODEL = "smollm2"
N_CTX = 256
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]

# (url, body): generations kept to a token or two; the last five are refused by the server's own checks
CASES = {
    "chat": (CHAT, {"model": MODEL, "messages": HI, "max_tokens": 2, "temperature": 0, "logprobs": True,
                    "top_logprobs": 2}),
    "two-prompts": (COMP, {"prompt": ["Paris is", "1, 2,"], "max_tokens": 1,
                           "temperature": 0, "logprobs": 1}),
    "n2-seeded": (COMP, {"prompt": "Once", "max_tokens": 1, "n": 2, "seed": 5, "temperature": 0.9}),
    "no-messages": (CHAT, {"messages": []}),
    "too-long": (COMP, {"prompt": "hello " * 400, "max_tokens": 2}),
    "hot": (COMP, {"prompt": "hi", "temperature": 5}),
    "other-model": (COMP, {"prompt": "hi", "model": "gpt-4o"}),
    "not-an-object": (COMP, [1, 2]),
}


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return numpy_engine(smollm2_path, N_CTX)


def without_ids(body):
    """A body with the per-answer id and timestamp taken out (they differ between any two answers)."""
    if isinstance(body, dict):
        return {k: without_ids(v) for k, v in body.items() if k not in ("id", "created")}
    return body


def same_answer(a, b, path="body") -> None:
    """a == b, floats (logprobs) within 1e-4: the engine batches concurrent requests, and a batch's
    logits differ from one sequence's in summation order only (~1e-6 of their scale)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same_answer(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_answer(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_each_record_is_what_the_server_answers(engine, tmp_path):
    with ServerThread(create_app(engine, MODEL)) as url:
        served = {cid: httpx.post(url + path, content=json.dumps(body), timeout=120) for cid, (path, body)
                  in CASES.items()}
    data = b"\n".join(json.dumps({"custom_id": cid, "method": "POST", "url": path, "body": body}).encode()
                      for cid, (path, body) in CASES.items())
    with bf.Output(str(tmp_path / "o.jsonl"), overwrite=False) as out:
        s = run_batch(engine, bf.read_input(data), out, model_name=MODEL, max_concurrency=3)
    recs = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert set(recs) == set(CASES) and (s.ok, s.failed, s.rejected, s.interrupted) == (3, 5, 0, False)
    for cid, resp in served.items():
        rec = recs[cid]
        assert rec["error"] is None and rec["id"].startswith("batch_req_")
        assert rec["response"]["request_id"].startswith("req_")
        assert rec["response"]["status_code"] == resp.status_code, cid
        same_answer(without_ids(rec["response"]["body"]), without_ids(resp.json()), cid)
    # the answers are real ones: both choices of n=2, both prompts, logprobs in each API's shape
    assert [c["index"] for c in recs["n2-seeded"]["response"]["body"]["choices"]] == [0, 1]
    two = recs["two-prompts"]["response"]["body"]
    assert len(two["choices"]) == 2 and len(two["choices"][1]["logprobs"]["tokens"]) == 1
    chat = recs["chat"]["response"]["body"]["choices"][0]
    assert chat["message"]["content"] and len(chat["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert recs["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert recs["other-model"]["response"]["status_code"] == 404
    usage = [recs[c]["response"]["body"]["usage"] for c in ("chat", "two-prompts", "n2-seeded")]
    assert s.prompt_tokens == sum(u["prompt_tokens"] for u in usage)
    assert s.completion_tokens == sum(u["completion_tokens"] for u in usage) == 2 + 2 + 2


def test_a_streamed_body_is_refused_naming_stream(engine, tmp_path):
    data = json.dumps({"custom_id": "s", "method": "POST", "url": COMP,
                       "body": {"prompt": "hi", "max_tokens": 1, "stream": True}}).encode()
    with bf.Output(str(tmp_path / "o.jsonl"), overwrite=False) as out:
        s = run_batch(engine, bf.read_input(data), out, model_name=MODEL, max_concurrency=1)
    rec = json.loads((tmp_path / "o.jsonl").read_text())
    assert s.failed == 1 and rec["response"]["status_code"] == 400
    assert rec["response"]["body"]["error"]["param"] == "stream"


def req(cid, body, url=COMP) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def test_cli_reads_stdin_resumes_over_a_torn_tail_and_reports(smollm2_path, tmp_path):
    out = tmp_path / "out.jsonl"
    done = bf.request_record("a", 200, {"kept": True})       # a finished line of an earlier run
    out.write_bytes(json.dumps(done).encode() + b"\n" + b'{"id": "batch_req_x", "custom_id": "b", "resp')
    lines = [req("a", {"prompt": "never run", "max_tokens": 1}),
             req("b", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}, CHAT),
             "{oops", req("b", {"prompt": "again"}), req("c", {"prompt": "hi", "temperature": 9})]
    args = ["batch", "-", "-o", str(out), "--model", str(smollm2_path), "--backend", "numpy", "--n-ctx",
            str(N_CTX), "--max-concurrency", "2"]
    r = CliRunner().invoke(main, args, input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0] == done and len(recs) == 5                     # "a" untouched and not run again
    by = {(x["custom_id"], (x["error"] or {}).get("code")): x for x in recs[1:]}
    assert set(by) == {(None, "invalid_json"), ("b", bf.DUPLICATE), ("b", None), ("c", None)}
    b = by[("b", None)]["response"]
    assert b["status_code"] == 200 and b["body"]["object"] == "chat.completion"
    assert b["body"]["usage"]["completion_tokens"] == 1 and b["body"]["model"] == smollm2_path.stem
    assert by[("c", None)]["response"]["status_code"] == 400
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert "dropped a torn last line" in err and "resuming" in err
    assert "batch: 1 ok, 1 failed, 2 lines not requests | 1 already done | prompt" in err

    # Run again: everything is done, the model is not even loaded; OUTPUT as INPUT and a file that is
    # not batch output are one-line errors.
    again = CliRunner().invoke(main, ["batch", "-", "-o", str(out), "--model", "/nonexistent.gguf"],
                               input="\n".join(lines) + "\n")
    assert again.exit_code == 0 and "5 of 5 lines already done" in again.output
    assert out.read_text().count("\n") == 5
    same = CliRunner().invoke(main, ["batch", str(out), "-o", str(out)])
    assert same.exit_code == 2 and "OUTPUT is INPUT" in same.output
    (tmp_path / "notes.txt").write_text("hello\n")
    notes = CliRunner().invoke(main, ["batch", "-", "-o", str(tmp_path / "notes.txt")], input=lines[0])
    assert notes.exit_code == 2 and "not a batch output record" in notes.output
