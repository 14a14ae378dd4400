"""Cuts streamed LLM text into speakable chunks, so synthesis can start before the reply ends.

A chunk ends at a sentence end: ``.``, ``!``, ``?`` or ``…`` (plus closing quotes or brackets)
followed by whitespace, or a newline. The whitespace is required, so ``3.`` at the end of the
text so far waits for the next delta: it may yet become ``3.5``. Abbreviations (``Dr.``,
``e.g.``), initials and list numbers (``1. First``) do not end a sentence. A run of text longer
than ``max_chars`` without a sentence end is cut at its last clause break, else its last space.
With ``first_clause``, the reply's first chunk may also end at its first clause break (``,``,
``;``, ``:`` or a dash, then whitespace) once it holds ``first_clause`` characters: the voice
starts after a short clause instead of a whole first sentence.

Chunks carry their exact span in the concatenated reply, so playback can be mapped back to text.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

TERMINALS = frozenset(".!?…")
CLOSERS = frozenset("\"')]}”’»")
OPENERS = "\"'([{“‘«"
CLAUSE_MARKS = frozenset(",;:")
DASHES = frozenset("-–")
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "etc", "approx",
    "a.m", "p.m", "u.s", "inc", "ltd", "co", "fig",
})


class Chunk(msgspec.Struct, frozen=True):
    """``text`` is ``reply[start:end]``: no leading or trailing whitespace."""

    text: str
    start: int
    end: int


class SentenceChunker:
    """Feed deltas with ``push``, end the reply with ``flush``; both return finished chunks.

    A sentence shorter than ``min_chars`` is joined to the next one rather than sent alone.
    """

    def __init__(self, max_chars: int = 160, min_chars: int = 1, first_clause: int = 0) -> None:
        if max_chars < 1 or min_chars < 1 or first_clause < 0:
            raise ValueError("max_chars and min_chars must be positive, first_clause >= 0")
        self.max_chars = max_chars
        self.min_chars = min_chars
        self.first_clause = first_clause  # 0: the first chunk is a sentence like the rest
        self._buf = ""
        self._offset = 0  # where _buf starts in the concatenated reply

    def push(self, delta: str) -> list[Chunk]:
        self._buf += delta
        out: list[Chunk] = []
        while (cut := self._next_cut()) is not None:
            self._emit(cut, out)
        return out

    def flush(self) -> list[Chunk]:
        out: list[Chunk] = []
        # push() already cut everything at max_chars; only a shorter tail can be left.
        self._emit(len(self._buf), out)
        return out

    def _next_cut(self) -> int | None:
        """Where the next chunk ends in the buffer, or None until more text arrives."""
        lead = len(self._buf) - len(self._buf.lstrip())
        if self.first_clause and self._offset == 0:
            clause = _clause_end(self._buf, lead + self.first_clause)
            sentence = next(iter(_sentence_ends(self._buf)), None)
            if clause is not None and (sentence is None or clause < sentence) and \
                    clause - lead <= self.max_chars:
                return clause
        for end in _sentence_ends(self._buf):
            if len(self._buf[:end].strip()) < self.min_chars:
                continue
            if len(self._buf[lead:end].rstrip()) <= self.max_chars:
                return end
            break
        if len(self._buf) - lead > self.max_chars:
            return lead + _long_cut(self._buf[lead:lead + self.max_chars + 1], self.max_chars)
        return None

    def _emit(self, cut: int, out: list[Chunk]) -> None:
        region = self._buf[:cut]
        start = len(region) - len(region.lstrip())
        end = len(region.rstrip())
        if end > start:
            out.append(Chunk(region[start:end], self._offset + start, self._offset + end))
        self._buf = self._buf[cut:]
        self._offset += cut


def _sentence_ends(buf: str) -> Iterator[int]:
    """Buffer indices where a sentence ends (after its punctuation), in order."""
    i, n = 0, len(buf)
    while i < n:
        ch = buf[i]
        if ch == "\n":
            yield i + 1
        elif ch in TERMINALS:
            run = i + 1
            while run < n and buf[run] in TERMINALS:
                run += 1
            end = run
            while end < n and buf[end] in CLOSERS:
                end += 1
            if end == n:
                return  # undecided: "3." may become "3.5", "Hi!" may gain a quote
            single_period = ch == "." and run == i + 1
            if buf[end].isspace() and not (single_period and _keeps_period(buf, i)):
                yield end
            i = end
            continue
        i += 1


def _keeps_period(buf: str, dot: int) -> bool:
    """Whether the period at ``dot`` belongs to an abbreviation, an initial or a list number."""
    word_start = dot
    while word_start > 0 and not buf[word_start - 1].isspace():
        word_start -= 1
    word = buf[word_start:dot].lstrip(OPENERS)
    if word.lower() in ABBREVIATIONS:
        return True
    if len(word) == 1 and word.isupper() and word != "I":
        return True  # an initial, as in "J. R. R. Tolkien"; "So am I." still ends
    # "1. Open the door": a number that opens the chunk is a list marker, not a sentence.
    return word.isdigit() and not buf[:word_start].strip()


def _clause_end(buf: str, at_least: int) -> int | None:
    """The end of the first clause of ``buf`` that reaches ``at_least`` characters: after a
    clause mark or a spaced dash followed by whitespace (None until there is one)."""
    for i in range(max(1, at_least - 1), len(buf) - 1):
        ch = buf[i]
        if buf[i + 1].isspace() and (ch in CLAUSE_MARKS or ch == "—" or
                                     (ch in DASHES and buf[i - 1] == " ")):
            return i + 1
    return None


def _long_cut(window: str, max_chars: int) -> int:
    """Where to cut a run with no sentence end: after the last clause break that leaves at
    most ``max_chars`` characters, else at the last space, else hard at ``max_chars``."""
    for i in range(min(len(window), max_chars + 1) - 2, -1, -1):
        ch, spaced = window[i], window[i + 1].isspace()
        spaced_dash = ch in DASHES and i > 0 and window[i - 1] == " "
        if ch == "—" or (spaced and (ch in CLAUSE_MARKS or spaced_dash)):
            return i + 1
    space = window.rfind(" ", 1, max_chars + 1)
    return space if space > 0 else max_chars
