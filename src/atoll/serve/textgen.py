"""Text in, text out: a prompt's completion streamed as text, with stop strings.

Wraps `atoll.model.generate` (token ids, KV cache) with a stage's `TextTokenizer`. Text is released
as soon as it is final: a token that ends inside a multi-byte character waits for the rest of
it, and text that might be the start of a stop string waits until it is not. A stop string is
never part of the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from atoll.errors import AtollError
from atoll.model import Transformer, generate
from atoll.rundir.tokenizer import TextTokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt; `temperature` 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class TextStream:
    """Turns generated token ids into final text, holding back what may still change."""

    def __init__(self, tokenizer: TextTokenizer, *, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # the token ends inside a character: wait for its other bytes
        # A stop string cannot start before `emitted`: text that could begin one is held back.
        hits = [(i, s) for s in self.stop if (i := text.find(s, self.emitted)) >= 0]
        if hits:
            end = min(hits)[0]
            out = text[self.emitted : end]
            self.emitted = end
            self.stopped = True
            return out
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = max(self.emitted, len(text) - hold)
        out = text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """The held-back text, once generation ended without reaching a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        out = text[self.emitted :]
        self.emitted = len(text)
        return out


@dataclass
class Completion:
    """One completion as it is generated: iterate for text pieces; then `finish_reason`
    ("stop": end-of-text token or a stop string; "length": max_new_tokens or the model's
    context) and `num_tokens` are set."""

    pieces: Iterator[str]
    finish_reason: str | None = None
    num_tokens: int = 0

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def text(self) -> str:
        return "".join(self.pieces)


def complete(
    model: Transformer,
    tokenizer: TextTokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    cancelled: Callable[[], bool] | None = None,
) -> Completion:
    """Start generating after `prompt_ids`; returns a `Completion` to iterate (lazily, on the
    caller's thread). Raises AtollError now for a prompt or settings `generate` refuses.
    `cancelled` is polled between tokens; when it returns True generation stops early."""
    tokens = generate(
        model,
        prompt_ids,
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        stop_token_ids=tokenizer.eos_ids,
        seed=params.seed,
    )
    result = Completion(iter(()))

    def pieces() -> Iterator[str]:
        stream = TextStream(tokenizer, stop=params.stop)
        reason = "length"
        for token in tokens:
            result.num_tokens += 1
            if token in tokenizer.eos_ids:
                reason = "stop"
                break
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                reason = "stop"
                break
            if cancelled is not None and cancelled():
                reason = "cancelled"
                break
        tail = stream.flush()
        if tail:
            yield tail
        result.finish_reason = reason

    result.pieces = pieces()
    return result


def encode_prompt(tokenizer: TextTokenizer, prompt: str, *, max_tokens: int) -> list[int]:
    """The ids of `prompt` (with the stage's BOS). Raises AtollError beyond `max_tokens`."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a fresh document
    if len(ids) > max_tokens:
        raise AtollError(f"the prompt has {len(ids)} tokens; at most {max_tokens} are allowed")
    return ids
