"""Stop strings matched on decoded text across token boundaries, never emitted.

Tokens decode to pieces of text; a stop string may span several pieces ("\\n\\nUser" may come as "\\n",
"\\nUs", "er"). StopMatcher takes the pieces in order and returns what is safe to show now: it holds
back the longest tail of the text that could still grow into a stop string, and when a stop string
appears it returns the text before its first occurrence and reports the stop.

Why the hold-back is exact: the emitted text never contains the start of a stop occurrence, because any
such start would leave a tail that is a prefix of a stop string longer than the one held back.
"""
from __future__ import annotations


class StopMatcher:
    """Feed decoded pieces with push(); call flush() at the end if no stop string was found."""

    def __init__(self, stops=()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""          # text not yet emitted: a possible beginning of a stop string
        self.stopped = False
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        """Text that can be emitted after `piece`; after a stop, the text before it (then "" forever)."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        buf = self._held + piece
        hit = self._earliest(buf)
        if hit is not None:
            pos, stop = hit
            self.stopped, self.matched, self._held = True, stop, ""
            return buf[:pos]
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, when generation ended for another reason (it was no stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _earliest(self, buf: str) -> tuple[int, str] | None:
        # Earliest start wins; at the same start the longer stop string (it contains the shorter one's
        # cut point or ends later, and either way the emitted text is the same: buf[:pos]).
        best = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest
