"""Streaming detokenization with stop strings.

Text is released only once it is final: a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and a
trailing piece that could be the start of a stop string are held back, so the streamed deltas always add up
to the non-streamed text, and a stop string never leaks out half-sent.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list, include_stop: bool = False, skip_special_tokens: bool = True):
        if stop and tokenizer is None:
            from ..errors import GraftingError
            raise GraftingError("stop strings need the engine's tokenizer")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.include_stop, self.skip_special_tokens = include_stop, skip_special_tokens
        self.ids: list = []
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.floor = 0  # stop strings count from here on: text released while they could not stop is final

    def add(self, token: int, may_stop: bool = True) -> tuple[str, bool]:
        """Add one token; returns (newly final text, whether a stop string ended the output). ``may_stop``
        False (before ``min_tokens``): a stop string does not end the output, and once released its text is
        kept even if a later stop string would overlap it."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if self.stop and may_stop:
            start = max(self.sent - max(len(s) for s in self.stop), self.floor, 0)
            hits = [(i, -len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                at, minus_length = min(hits)  # the earliest; of those starting there, the longest
                self.text = self.text[: at - minus_length if self.include_stop else at]
                return self._release(len(self.text)), True
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in self.stop:  # the longest tail that could still grow into a stop string
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if self.text[end - k:end] == s[:k]:
                    hold = k
                    break
        released = self._release(end - hold)
        if not may_stop:
            self.floor = self.sent
        return released, False

    def flush(self) -> str:
        """Everything not yet released (the output ended)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out
