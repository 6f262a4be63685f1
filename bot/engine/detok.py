"""Incremental detokenization and stop strings.

Llama's tokenizer spells rare characters as byte tokens (``<0xE3>``), and
byte-level BPE tokenizers split them across tokens too, so a Japanese
character can span several tokens. :class:`IncrementalDecoder` decodes a
growing window of ids and holds back text that still ends in an incomplete
UTF-8 sequence; ``\\ufffd`` reaches the caller only if the model really
produced invalid bytes (then it shows at :meth:`IncrementalDecoder.flush`, or
once later valid text follows it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns token ids, pushed one at a time, into text pieces."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is decoded for context
        self._read = 0  # ids before this were already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back, invalid bytes included."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        seen = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if not final and (len(full) <= len(seen) or full.endswith(REPLACEMENT)):
            return ""
        piece = full[len(seen) :]
        self._prefix, self._read = self._read, len(self._ids)
        return piece


class StopFilter:
    """Cuts the text at the first stop string and holds back any tail that
    could still become one, so a stop string is never shown, even in part.

    A stop string that starts with a letter counts only at the start of the
    reply or after white space (``USER:`` opening a new turn, not ``MYUSER:``
    inside a word); markup such as ``</s>`` counts anywhere (``8</s>``).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._text = ""
        self._sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add generated text; return the part that is now safe to show."""
        if self.stopped:
            return ""
        self._text += piece
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._text) - self._held_tail())

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self._text))

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        out = self._text[self._sent : end]
        self._sent = end
        return out

    def _find_stop(self) -> int | None:
        best: int | None = None
        for stop in self._stops:
            # Released text holds no stop string (it would have stopped) and no
            # start of one (that is held back): search only what is new.
            start = self._sent
            while (i := self._text.find(stop, start)) != -1:
                if i == 0 or self._text[i - 1].isspace() or not stop[0].isalnum():
                    best = i if best is None else min(best, i)
                    break
                start = i + 1
        if best is None:
            return None
        # Drop the white space that led up to the stop string as well.
        return len(self._text[:best].rstrip())

    def _held_tail(self) -> int:
        """Length of the longest suffix that is a proper prefix of a stop
        string (plus the white space before it), which must wait."""
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._text)), 0, -1):
                if self._text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        if hold == 0:
            # Trailing white space may be followed by a stop string.
            return len(self._text) - len(self._text.rstrip())
        body = self._text[: len(self._text) - hold]
        return len(self._text) - len(body.rstrip())
