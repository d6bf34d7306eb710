"""Token-by-token sampling from a `Transformer`, streamed as a generator.

Greedy when `temperature == 0`; otherwise temperature, top-k and top-p (nucleus) sampling, with
an optional CTRL-style repetition penalty.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch

from atoll.errors import AtollError
from atoll.model.llama import KVCache, Transformer


def generate(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids: Collection[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids continuing `prompt_ids`, one at a time.

    Stops early after yielding a token in `stop_token_ids` (the stop token is yielded), or when
    the sequence reaches the model's `max_seq_len`. `seed` makes sampling reproducible with a
    private generator; without it the global torch RNG is used. Each forward runs under
    `torch.no_grad()` in eval mode, and the model's training flag is restored after it, so
    the caller's state is untouched between yields. Blocks on one device-to-host copy per token.

    Raises `AtollError` (when the generator is created) for an empty or too long prompt, ids out of
    the vocabulary, or out-of-range sampling settings.
    """
    cfg = model.cfg
    _check_args(
        prompt_ids,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    return _generate(
        model,
        list(prompt_ids),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_token_ids=frozenset(stop_token_ids),
        seed=seed,
        use_cache=use_cache,
    )


def _check_args(
    prompt_ids: list[int],
    *,
    vocab_size: int,
    max_seq_len: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> None:
    if not prompt_ids:
        raise AtollError("prompt_ids is empty; pass at least one token (e.g. the BOS id)")
    if len(prompt_ids) > max_seq_len:
        raise AtollError(
            f"prompt has {len(prompt_ids)} tokens but model.max_seq_len is {max_seq_len}; shorten the prompt"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise AtollError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if max_new_tokens < 0:
        raise AtollError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise AtollError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise AtollError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise AtollError(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        raise AtollError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")


def _generate(
    model: Transformer,
    ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stop_token_ids: frozenset[int],
    seed: int | None,
    use_cache: bool,
) -> Iterator[int]:
    device = model.embed.weight.device
    generator: torch.Generator | None = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache = model.new_cache() if use_cache else None
    pending = ids  # tokens the model has not seen yet (all of them without a cache)

    for _ in range(max_new_tokens):
        if len(ids) >= model.cfg.max_seq_len:
            return
        tokens = torch.tensor([pending], dtype=torch.long, device=device)
        logits = _last_logits(model, tokens, cache=cache)
        logits = _penalize_repeats(logits, ids, penalty=repetition_penalty)
        token = _sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        ids.append(token)
        pending = [token] if cache is not None else ids
        yield token
        if token in stop_token_ids:
            return


def _last_logits(model: Transformer, tokens: torch.Tensor, *, cache: KVCache | None) -> torch.Tensor:
    # Eval mode and no_grad only around the call: a generator must not leave global grad mode
    # (thread-local) or the model's mode changed while it is suspended at a yield.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(tokens, cache=cache)[0, -1].float()  # (V,)
    finally:
        model.train(was_training)


def _penalize_repeats(logits: torch.Tensor, ids: list[int], *, penalty: float) -> torch.Tensor:
    """Make every token already in `ids` less likely: positive logits / penalty, negative * it."""
    if penalty == 1.0:
        return logits
    seen = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """One token id from 1-D logits (V,)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[0]:
        kth_best = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
