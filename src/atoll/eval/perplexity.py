"""Loss and perplexity of a model on a held-out set.

Documents are tokenized as fine-tuning tokenizes them (one stream with an end-of-text token
after each document, cut into windows of `seq_len + 1` at stride `seq_len`); instructions count
their responses only. Perplexity is exp(mean loss per target token). Stages that share a
tokenizer (every stage of one chain) are scored on exactly the same targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atoll.errors import AtollError
from atoll.finetune.data import Example, encode_instruct, encode_text
from atoll.model.loss import masked_loss_sum
from atoll.rundir.tokenizer import TextTokenizer


@dataclass(frozen=True)
class SetScore:
    loss: float
    ppl: float
    tokens: int  # targets scored
    documents: int


def encode_heldout(
    examples: list[Example], tokenizer: TextTokenizer, *, seq_len: int, max_tokens: int, prompt_format: str = "chat"
) -> tuple[np.ndarray, np.ndarray]:
    """Token windows and loss masks of a held-out set, cut to the first `max_tokens` targets."""
    parts = []
    text = [e for e in examples if not e.is_instruct]
    instruct = [e for e in examples if e.is_instruct]
    if text:
        parts.append(encode_text(text, tokenizer, seq_len=seq_len))
    if instruct:
        tokens, mask, _ = encode_instruct(instruct, tokenizer, seq_len=seq_len, prompt_format=prompt_format)
        parts.append((tokens, mask))
    if not parts:
        raise AtollError("the held-out set is empty")
    tokens = np.concatenate([p[0] for p in parts])
    mask = np.concatenate([p[1] for p in parts])
    counts = np.cumsum(mask.sum(axis=1))
    rows = int(np.searchsorted(counts, max_tokens, side="left")) + 1
    tokens, mask = tokens[:rows], mask[:rows].copy()
    excess = int(mask.sum()) - max_tokens
    if excess > 0:  # trim the last row so exactly max_tokens targets count
        last = np.flatnonzero(mask[-1])
        mask[-1, last[len(last) - excess :]] = False
    return tokens, mask


@torch.no_grad()
def score(
    model: nn.Module, tokens: np.ndarray, mask: np.ndarray, *, num_documents: int, batch_size: int = 8
) -> SetScore:
    """Mean masked loss of `model` (eval mode, on its device) over the windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        tok = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))
        msk = torch.from_numpy(mask[start : start + batch_size])
        total += float(masked_loss_sum(model, tok, msk, device=device))
        count += int(msk.sum())
    if count == 0:
        raise AtollError("the held-out set has no token to score")
    loss = total / count
    return SetScore(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=count, documents=num_documents)
