"""`aircupy batch` without a model: the file format (input lines, records, resuming an output file), the
runner's concurrency and clean stop over the fake engine, the Ctrl-C handler and the progress display."""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import pytest

from aircupy.console import BatchProgress, batch_summary
from aircupy.errors import AircupyError
from aircupy.server import batch_file as bf
from aircupy.server.batch import Summary, concurrency, first_interrupt_sets, run_batch
from tests.helpers.fake_engine import FakeEngine


def line(cid, url="/v1/completions", body=None, method="POST") -> bytes:
    return json.dumps({"custom_id": cid, "method": method, "url": url,
                       "body": body if body is not None else {"prompt": cid, "max_tokens": 2}}).encode()


# ---- input lines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, code, cid", [
    (b"not json", "invalid_json", None),
    (b'{"custom_id": "a", "x": NaN}', "invalid_json", None),          # NaN is not JSON, as in the server
    (b"\xff\xfe", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (b'{"method": "POST", "url": "/v1/completions", "body": {}}', "invalid_custom_id", None),
    (b'{"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}}', "invalid_custom_id", None),
    (b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/completions", "body": {}}', "invalid_custom_id",
     None),
    (line("a", method="GET"), "invalid_method", "a"),
    (line("a", url="/v1/embeddings"), "invalid_url", "a"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions"}', "invalid_body", "a"),
])
def test_a_line_that_is_no_request_is_rejected_with_its_reason(raw, code, cid):
    item = bf.parse_line(3, raw)
    assert isinstance(item, bf.Rejected) and (item.code, item.custom_id) == (code, cid)
    rec = item.record()
    assert rec["response"] is None and rec["custom_id"] == cid and rec["id"].startswith("batch_req_")
    assert rec["error"]["code"] == code and rec["error"]["message"].startswith("line 3: ")


def test_requests_keep_their_body_for_the_server_to_judge():
    chat = bf.parse_line(1, line("c", "/v1/chat/completions", {"messages": []}))
    comp = bf.parse_line(2, line("d", body={"prompt": 5}))
    odd = bf.parse_line(3, b'{"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": [1]}')
    assert (chat.kind, chat.body) == ("chat", {"messages": []}) and comp.kind == "completion"
    assert isinstance(odd, bf.Line) and odd.body == [1]   # not an object: the server's 400, when it runs


def test_read_input_skips_blank_lines_and_rejects_repeated_ids():
    data = b"\n".join([line("a"), b"", b"   ", line("b"), line("a"), line("a", url="/nope")]) + b"\n"
    items = bf.read_input(data)
    assert [(i.number, i.custom_id, type(i).__name__) for i in items] == [
        (1, "a", "Line"), (4, "b", "Line"), (5, "a", "Rejected"), (6, "a", "Rejected")]
    assert {items[2].code, items[3].code} == {bf.DUPLICATE}
    assert "repeats line 1" in items[2].message


# ---- resuming --------------------------------------------------------------------------------------

def write_records(path, recs, tail=b""):
    with open(path, "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in recs) + tail)


def test_scan_output_counts_what_is_done_and_cuts_a_torn_tail(tmp_path):
    out = tmp_path / "out.jsonl"
    recs = [bf.request_record("a", 200, {}), bf.error_record("a", bf.DUPLICATE, "x"),
            bf.error_record(None, "invalid_json", "x"), bf.request_record("b", 400, {})]
    write_records(out, recs, tail=b'{"id": "batch_req_1", "custom_id": "c", "respo')
    size = out.stat().st_size
    done = bf.scan_output(str(out))
    assert done.ids == {"a", "b"} and done.repeats == {"a": 1} and done.anonymous == 1 and done.records == 4
    assert done.torn_bytes == len(b'{"id": "batch_req_1", "custom_id": "c", "respo')
    assert out.stat().st_size == size - done.torn_bytes and out.read_bytes().endswith(b"\n")
    assert [json.loads(x) for x in out.read_text().splitlines()] == recs
    assert bf.scan_output(str(tmp_path / "absent.jsonl")).records == 0


def test_scan_output_refuses_a_file_that_is_not_batch_output_and_leaves_it(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_bytes(b"my notes\nmore")
    with pytest.raises(AircupyError, match="line 1 is not a batch output record"):
        bf.scan_output(str(out))
    assert out.read_bytes() == b"my notes\nmore"


def test_plan_skips_done_ids_repeats_and_anonymous_lines_in_order():
    items = bf.read_input(b"\n".join([b"junk1", line("a"), line("a"), line("a"), b"junk2", line("b"), line("c")]))
    done = bf.Done(ids={"a", "c"}, repeats={"a": 1}, anonymous=1)
    left = bf.plan(items, done)
    assert [(i.number, i.custom_id) for i in left] == [(4, "a"), (5, None), (6, "b")]
    assert bf.plan(items, bf.Done()) == items


def test_output_appends_whole_lines_and_escapes_a_lone_surrogate(tmp_path):
    path = tmp_path / "o.jsonl"
    with bf.Output(str(path), overwrite=False) as out:
        out.write({"custom_id": "a", "text": "é"})
        out.write({"custom_id": "b", "text": "\ud800"})
    with bf.Output(str(path), overwrite=False) as out:
        out.write({"custom_id": "c"})
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["custom_id"] for x in lines[:-1]] == ["a", "b", "c"]
    assert json.loads(lines[0])["text"] == "é" and json.loads(lines[1])["text"] == "\ud800"
    with bf.Output(str(path), overwrite=True) as out:
        out.write({"custom_id": "d"})
    assert [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] == ["d"]


# ---- the runner over the fake engine ---------------------------------------------------------------

class ConcurrentFake(FakeEngine):
    """FakeEngine (which batches, like the Engine) counting the most sequences it ran at once."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.most = 0

    def _step(self, req):
        self.most = max(self.most, self.stats()["running"])
        super()._step(req)


def run(engine, items, path, **kw):
    with bf.Output(str(path), overwrite=False) as out:
        return run_batch(engine, items, out, model_name="fake", **kw)


def test_run_keeps_max_concurrency_requests_in_flight(tmp_path):
    eng = ConcurrentFake(delay=0.02)
    items = bf.read_input(b"\n".join(line(f"r{i}", body={"prompt": "p", "max_tokens": 5}) for i in range(12)))
    s = run(eng, items, tmp_path / "o.jsonl", max_concurrency=4)
    assert eng.most == 4 and (s.ok, s.failed, s.pending, s.interrupted) == (12, 0, 0, False)
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in recs) == sorted(f"r{i}" for i in range(12))
    assert all(r["response"]["body"]["choices"][0]["text"] == "abcde" for r in recs)
    assert s.completion_tokens == 60 and s.prompt_tokens == 12


def test_concurrency_defaults_to_the_engines_max_num_seqs():
    class WithSeqs:
        max_num_seqs = 7
    assert (concurrency(WithSeqs(), None), concurrency(WithSeqs(), 3), concurrency(object(), None)) == (7, 3, 64)


def test_stop_writes_every_finished_line_and_a_rerun_resumes(tmp_path):
    """The stop (the first Ctrl-C) cancels the request in flight after its token and starts no other; what
    finished is on disk, and a second run on the same file runs exactly the rest."""
    eng = FakeEngine(delay=0.01)
    data = b"\n".join([b"junk"] + [line(f"r{i}", body={"prompt": "p", "max_tokens": 20}) for i in range(4)])
    path = tmp_path / "o.jsonl"
    stop = threading.Event()

    class StopAfterFirst:
        def show(self, done, failed, tokens, force=False):
            if done >= 1:
                stop.set()
        notice = close = lambda *a, **k: None

    s = run(eng, bf.read_input(data), path, max_concurrency=2, stop=stop, progress=StopAfterFirst())
    assert s.interrupted and s.ok >= 1 and s.ok + s.pending == 4 and s.rejected == 1
    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(written) == 1 + s.ok and written[0]["custom_id"] is None
    assert ("closed", "p") in eng.log                # the request in flight was cut short, not finished
    todo = bf.plan(bf.read_input(data), bf.scan_output(str(path)))
    assert len(todo) == s.pending and all(isinstance(i, bf.Line) for i in todo)
    s2 = run(eng, todo, path, max_concurrency=2)
    assert s2.ok == s.pending and not s2.interrupted
    ids = [json.loads(x)["custom_id"] for x in path.read_text().splitlines()]
    assert sorted(i for i in ids if i) == ["r0", "r1", "r2", "r3"] and ids.count(None) == 1


def test_the_first_ctrl_c_sets_stop_and_the_second_interrupts():
    stop, before = threading.Event(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), first_interrupt_sets(stop):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)     # the handler runs between bytecodes of the main thread
        assert stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


# ---- progress ----------------------------------------------------------------------------------------

class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere():
    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = BatchProgress(10, stream=stream, interval=3600, redraw=0)
        p.show(4, 1, 100)
        p.show(5, 1, 120)        # a log gets a line per interval only
        p.notice("stopping")
        p.close()
    assert "\r[#########---------------] 4/10 requests (1 failed) |" in tty.getvalue()
    assert "5/10 requests" in tty.getvalue() and "tokens/s | ETA" in tty.getvalue()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("batch: 4/10 requests (1 failed) |") and lines[1] == "stopping"
    assert "\r" not in log.getvalue()


def test_summary_names_counts_tokens_and_rates():
    s = Summary(ok=3, failed=1, rejected=2, skipped=5, pending=4, prompt_tokens=30, completion_tokens=20,
                seconds=2.0, interrupted=True)
    text = batch_summary(s)
    for part in ("3 ok, 1 failed, 2 lines not requests", "5 already done", "4 not run (interrupted",
                 "prompt 30 + completion 20 tokens in 2.0 s", "10.0 tokens/s generated", "25.0 with the prompts"):
        assert part in text


def test_a_failed_write_stops_the_workers_and_is_raised(tmp_path):
    class Full(bf.Output):
        def write(self, rec):
            raise OSError(28, "No space left on device")

    stop = threading.Event()
    items = bf.read_input(b"\n".join(line(f"r{i}") for i in range(3)))
    with Full(str(tmp_path / "o.jsonl"), overwrite=False) as out, pytest.raises(OSError, match="No space"):
        run_batch(FakeEngine(), items, out, model_name="fake", max_concurrency=2, stop=stop)
    assert stop.is_set()


def test_cli_says_a_missing_output_directory_before_loading_a_model(tmp_path):
    from click.testing import CliRunner

    from aircupy.cli import main
    r = CliRunner().invoke(main, ["batch", "-", "-o", str(tmp_path / "no" / "o.jsonl"), "--model",
                                  "/nonexistent.gguf"], input=line("a").decode())
    assert r.exit_code == 2 and f"no such file: {tmp_path / 'no'}" in r.output
    empty = CliRunner().invoke(main, ["batch", "-", "-o", str(tmp_path / "o.jsonl")], input="")
    assert empty.exit_code == 0 and "batch: 0 ok, 0 failed" in empty.output
