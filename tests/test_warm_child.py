"""The page-cache warmer's child process (aircupy/stream/_warm_child.py), driven through its
stdin/stdout protocol: the order it reads pieces in, under its pace and the consumers' waits."""
import os
import subprocess
import sys

import pytest

import aircupy.stream._warm_child as warm_child

PIECE = 1000


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(100 * PIECE))
    return path


class Child:
    """The child over the whole file, pieces of PIECE bytes, a lead of two pieces."""

    def __init__(self, path, near_bytes):
        self.p = subprocess.Popen(
            [sys.executable, "-I", "-S", warm_child.__file__, str(path), str(PIECE),
             str(2 * PIECE), "1", str(near_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.send(f"R 0 {100 * PIECE}", "G")

    def send(self, *lines):
        self.p.stdin.write("".join(line + "\n" for line in lines).encode())
        self.p.stdin.flush()

    def read(self, n):
        """The next n pieces reported, in the order read."""
        out = []
        for _ in range(n):
            k, nbytes = self.p.stdout.readline().split()
            assert int(nbytes) == PIECE
            out.append(int(k))
        return out

    def close(self):
        self.p.stdin.close()
        assert self.p.wait(timeout=10) == 0
        rest = self.p.stdout.read()
        self.p.stdout.close()
        return rest


def test_a_wait_near_the_cursor_is_read_in_turn_a_far_one_next(data_file):
    """Near (within 10 pieces): the cursor reads on to it, pace lifted, nothing out of order.
    Far: read next. Then the pace holds again (nothing more until the consumers report reads)."""
    c = Child(data_file, near_bytes=10 * PIECE)
    assert c.read(2) == [0, 1]                # the lead: two pieces ahead of nothing consumed
    c.send("D 6")
    assert c.read(5) == [2, 3, 4, 5, 6]
    c.send("D 50")
    assert c.read(1) == [50]
    c.send(f"C {8 * PIECE}")                  # eight pieces consumed: the lead allows 2 more
    assert c.read(2) == [7, 8]
    assert c.close() == b""                   # paced again: stopped with nothing more read


def test_without_near_every_wait_is_read_next(data_file):
    c = Child(data_file, near_bytes=0)
    assert c.read(2) == [0, 1]
    c.send("D 6", "D 4")
    assert c.read(2) == [6, 4]
    assert c.close() == b""
