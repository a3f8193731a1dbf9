"""StopMatcher: stop strings across piece boundaries, never emitted, minimal hold-back."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from aircupy.engine.stop import StopMatcher


def run(pieces, stops):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.push(p))
        if m.stopped:
            break
    else:
        out.append(m.flush())
    return "".join(out), m


def test_stop_string_split_over_three_pieces():
    text, m = run(["Hello", " wor", "ld\n", "\nUs", "er: hi"], ["\n\nUser"])
    assert text == "Hello world" and m.stopped and m.matched == "\n\nUser"


def test_hold_back_only_what_could_start_a_stop():
    m = StopMatcher(["\n\n"])
    assert m.push("abc\n") == "abc"    # "\n" may become "\n\n"
    assert m.push("x") == "\nx"        # it did not: released with the next piece
    assert m.push("y\n") == "y"
    assert m.flush() == "\n" and not m.stopped


def test_earliest_stop_wins_and_nothing_after_a_stop():
    m = StopMatcher(["END", "b"])
    assert m.push("aaEND b") == "aa" and m.matched == "END"
    assert m.push("more") == "" and m.flush() == ""


def test_no_stops_passes_everything_through():
    m = StopMatcher([])
    assert m.push("a\n") == "a\n" and m.flush() == ""


def test_stop_at_the_very_start_emits_nothing():
    text, m = run(["##", "# rest"], ["###"])
    assert text == "" and m.stopped


alphabet = st.sampled_from("ab\n ")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
def test_matches_the_obvious_definition_for_any_split(text, cuts, stops):
    """Generation stops at the first piece after which the text holds a stop string; the output is
    that text up to the earliest occurrence. (A longer stop string that would have started earlier,
    had generation gone on, never completes: text='aba' in pieces 'ab', 'a' with stops 'b' and 'aba'
    stops at 'b' and gives 'a'.)"""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    expected, stopped = text, False
    for b in bounds[1:]:
        hits = [i for i in (text[:b].find(s) for s in stops) if i >= 0]
        if hits:
            expected, stopped = text[: min(hits)], True
            break
    out, m = run(pieces, stops)
    assert out == expected and m.stopped == stopped


def test_a_shorter_stop_completed_first_wins():
    out, m = run(["ab", "a"], ["b", "aba"])
    assert out == "a" and m.matched == "b"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet, max_size=30), stops=st.lists(st.text(alphabet, min_size=1, max_size=4),
                                                          min_size=1, max_size=3))
def test_emitted_text_never_holds_more_than_needed(text, stops):
    # Piece by piece (one char each): what has been emitted plus the held tail is all the text so far,
    # and the held tail is always shorter than the longest stop string.
    m = StopMatcher(stops)
    emitted = ""
    for i, ch in enumerate(text):
        emitted += m.push(ch)
        if m.stopped:
            break
        held = text[: i + 1][len(emitted):]
        assert text[: i + 1].startswith(emitted) and len(held) < max(map(len, stops))
