"""Streaming detokenization with stop strings.

Text is released only once it is final: a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and a
trailing piece that could be the start of a stop string are held back, so the streamed deltas always add up
to the non-streamed text, and a stop string never leaks out half-sent.

Decoding is incremental, as in vLLM and text-generation-inference; decoding all ids at every token would cost
n^2 / 2 ids over an output of n tokens. A step decodes ``ids[prefix_offset:]`` and the same window without its
unread ids, ``ids[prefix_offset:read_offset]``; the new text is the first's excess over the second. The window
reaches back a step because a decode is not the concatenation of the decodes of its parts: SentencePiece
decoders drop the leading space of the first token they see, and byte-level tokens make characters only
together. Both decodes start at the same token and so lose the same space. The offsets advance only when the
window gained text, so the next prefix window holds a token that reaches the decoder (not only skipped special
tokens, after which the first real token would lose its space in one decode but not the other). They start
at 0, 0: the first window starts where the full decode does. A window ending in U+FFFD waits for more ids and is
decoded again whole at each step: real text completes a character within 4 ids, only invalid bytes keep it
waiting.
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
        self.prefix_offset = self.read_offset = 0  # ids[:read_offset] are decoded for good, into text[:decoded]
        self.decoded = 0
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
        self._decode(final=False)
        if self.stop and may_stop:
            start = max(self.sent - max(len(s) for s in self.stop), self.floor, 0)
            hits = [(i, -len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                at, minus_length = min(hits)  # the earliest; of those starting there, the longest
                self.text = self.text[: at - minus_length if self.include_stop else at]
                self.prefix_offset = self.read_offset = len(self.ids)  # the output ended: nothing is pending
                self.decoded = len(self.text)
                return self._release(len(self.text)), True
        end = len(self.text)
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
        if self.tokenizer is not None and self.read_offset < len(self.ids):
            self._decode(final=True)
        return self._release(len(self.text))

    def _decode(self, final: bool) -> None:
        ids, decode = self.ids, self.tokenizer.decode
        prefix = decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        whole = decode(ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        new = whole[len(prefix):]
        if final or (len(whole) > len(prefix) and not whole.endswith("\ufffd")):
            self.text = self.text[:self.decoded] + new
            self.decoded = len(self.text)
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        else:
            # a character still incomplete (or nothing new yet): the window waits for more ids, but what
            # comes before the incomplete tail is final already, and stop strings must see it now
            self.text = self.text[:self.decoded] + new.rstrip("\ufffd")

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out
