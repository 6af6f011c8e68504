"""Per-request decoding settings and the text state of a generation (torch-free, no model).

:class:`SamplingParams` validates and holds one request's ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop`` and ``n``; :class:`StreamState` turns each row's sampled tokens into
text, applies stop strings on the decoded text and yields the deltas a stream sends (holding back
text that could still become a stop string). Both serve the continuous batch
(:mod:`maas.batching.continuous`) and the plain ``generate`` path (:mod:`maas.models.text_generator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maas.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 16
MAX_N = 8
#: Temperatures below this are treated as 0 (greedy): dividing logits by a near-zero
#: temperature overflows to inf/NaN. vLLM uses the same kind of threshold.
GREEDY_BELOW_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request.

    Attributes:
        max_tokens: New tokens per choice at most (≥ 0; 0 generates nothing); None = up to the
            context window.
        temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_p: Nucleus sampling mass, in [0, 1]; 0 keeps only the most likely token, so it
            decodes greedily whatever the temperature.
        seed: Seeds torch's RNG for this request's group, making sampling repeatable.
        stop: Strings that end the text (cut before the first occurrence), at most 4.
        n: Choices per prompt, 1..8.
    """

    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1

    @classmethod
    def from_params(cls, params: dict) -> "SamplingParams":
        """Validate raw params. Raises InvalidRequest naming the field."""
        max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 0):
            raise InvalidRequest(f"max_tokens must be an integer ≥ 0, got {max_tokens!r}", param="max_tokens")
        temperature = params.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {temperature!r}", param="temperature")
        top_p = params.get("top_p", 1.0)
        if top_p is None:
            top_p = 1.0
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 <= top_p <= 1:
            raise InvalidRequest(f"top_p must be between 0 and 1, got {top_p!r}", param="top_p")
        if temperature < GREEDY_BELOW_TEMPERATURE or top_p == 0:
            temperature, top_p = 0.0, 1.0  # only the most likely token survives: greedy
        seed = params.get("seed")
        if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise InvalidRequest(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed!r}",
                                 param="seed")
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop must be a string or a list of at most 4 strings", param="stop")
        stop = tuple(s for s in stop if s)  # an empty stop string would cut every text at once: ignored
        n = params.get("n", 1)
        if not _is_int(n) or not 1 <= n <= MAX_N:
            raise InvalidRequest(f"n must be an integer from 1 to {MAX_N}, got {n!r}", param="n")
        return cls(max_tokens, float(temperature), float(top_p), seed, stop, n)


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string. Returns ``(text, stopped)``."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StreamState:
    """Per-row incremental detokenisation (the continuous batcher keeps one per request).

    ``text(row)`` is always ``decode(tokens)`` cut at a stop string, so the concatenated deltas
    of a finished row equal the non-streamed text. Until a row finishes, a tail that could begin
    a stop string and an incomplete UTF-8 character (``\ufffd`` at the end) are held back;
    everything else goes out at the step that produced it (holding back the last word, as an
    earlier version did, delayed the first text of a SmolLM2 stream by ~3 steps).
    """

    def __init__(self, tokenizer, eos: set[int], stop: tuple[str, ...], rows: int):
        self.tokenizer, self.eos, self.stop = tokenizer, eos, stop
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.emitted = [0] * rows
        self.finish: list[str | None] = [None] * rows
        self.eos_seen = [0] * rows
        self.reported = [False] * rows
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add_token(self, row: int, tok: int) -> None:
        """Append one generated token to ``row``; EOS or a completed stop string finish it."""
        if self.finish[row] is not None:
            return
        if tok in self.eos:
            self.finish[row], self.eos_seen[row] = "stop", 1
            return
        self.tokens[row].append(tok)  # the token completing a stop string counts, as in decode()
        if self.stop:
            _, stopped = apply_stop(self._text(row), self.stop)
            if stopped:
                self.finish[row] = "stop"

    def _text(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def text(self, row: int) -> str:
        """The row's text so far, cut before a stop string."""
        return apply_stop(self._text(row), self.stop)[0]

    def row_tokens(self, row: int) -> int:
        """Tokens generated for ``row``, counting EOS and the token that completed a stop string."""
        return len(self.tokens[row]) + self.eos_seen[row]

    def deltas(self, final: bool) -> list[dict]:
        """Text produced since the last call, per row that has something to say.

        A row's last event carries its ``finish_reason``; ``final`` marks unfinished rows as
        ``length`` (generation ended at ``max_tokens``, the context window or the deadline).
        """
        events = []
        for row in range(len(self.tokens)):
            if self.reported[row]:
                continue
            if final and self.finish[row] is None:
                self.finish[row] = "length"
            text = self.text(row)
            done = self.finish[row] is not None
            end = len(text)
            if not done:
                end -= self.hold  # a tail that may be the start of a stop string waits
                while end > self.emitted[row] and text[end - 1] == "\ufffd":
                    end -= 1  # half a UTF-8 character (byte-level BPE): wait for the rest
            delta = text[self.emitted[row] : end] if end > self.emitted[row] else ""
            self.emitted[row] = max(self.emitted[row], end)
            if delta or done:
                events.append({"index": row, "text": delta, "finish_reason": self.finish[row] if done else None})
                self.reported[row] = done
        return events

    def completion_tokens(self) -> int:
        return sum(len(t) + e for t, e in zip(self.tokens, self.eos_seen))
