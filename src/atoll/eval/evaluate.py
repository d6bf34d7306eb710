"""`evaluate_stages`: several stages on several held-out sets, checked for overlap first."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from atoll.errors import AtollError
from atoll.eval.heldout import load_heldout, overlap, training_hashes
from atoll.eval.perplexity import encode_heldout, score
from atoll.rundir.lineage import classify_stage, model_config_of, stage_record
from atoll.rundir.load import load_stage

log = logging.getLogger(__name__)


def evaluate_stages(
    runs: list[Path],
    data: list[tuple[str, Path]],
    *,
    seq_len: int | None = None,
    max_tokens: int = 50_000,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    allow_overlap: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Loss and perplexity of every stage in `runs` on every held-out set in `data` (name, path).

    Before any model is loaded, each set is checked against the training documents of each
    stage and its ancestors (by hash); an overlap raises AtollError unless `allow_overlap`.
    Models are loaded one at a time. Returns the results record (see bench/results/finetune.json).
    """
    names = [n for n, _ in data]
    if len(set(names)) != len(names):
        raise AtollError(f"held-out set names must differ: {names}")
    if not runs or not data:
        raise AtollError("give at least one run and one --data NAME=PATH")
    sets = [load_heldout(name, path) for name, path in data]
    checked: dict[str, list[str]] = {s.name: [] for s in sets}
    for run in runs:
        trained = training_hashes(run)
        for s in sets:
            found = overlap(s, trained)
            if found and not allow_overlap:
                raise AtollError(
                    f"held-out set {s.name!r} ({s.source}): {found} of its {len(s.examples)} documents "
                    f"were trained on by {run} or its ancestors; "
                    "evaluate on text none of them saw (or pass --allow-overlap to measure anyway)"
                )
            if found:
                log.warning("held-out set %s: %d documents were trained on by %s or its ancestors", s.name, found, run)
            checked[s.name].extend(c for c in trained.checked if c not in checked[s.name])
        for unknown in trained.unknown:
            log.warning("overlap not checked against %s", unknown)
    contexts = [model_config_of(classify_stage(r)).max_seq_len for r in runs]
    seq = min([seq_len or 1024, *contexts])
    results: dict[str, Any] = {
        "command": command,
        "seq_len": seq,
        "max_tokens": max_tokens,
        "sets": {
            s.name: {"source": s.source, "documents": len(s.examples), "overlap_checked_against": checked[s.name]}
            for s in sets
        },
        "stages": [],
    }
    for run in runs:
        model, tokenizer = load_stage(run, device=device)
        full = stage_record(run)
        rec: dict[str, Any] = {
            k: full.get(k) for k in ("stage", "method", "parent", "trainable_params", "tokens", "steps", "path")
        }
        rec.update(ppl={}, loss={}, scored_tokens={})
        for s in sets:
            tokens, mask = encode_heldout(s.examples, tokenizer, seq_len=seq, max_tokens=max_tokens)
            result = score(model, tokens, mask, num_documents=len(s.examples), batch_size=batch_size)
            rec["ppl"][s.name] = result.ppl
            rec["loss"][s.name] = result.loss
            rec["scored_tokens"][s.name] = result.tokens
            log.info(
                "%s on %s: loss %.4f, perplexity %.2f (%d tokens)",
                rec["stage"],
                s.name,
                result.loss,
                result.ppl,
                result.tokens,
            )
        results["stages"].append(rec)
        del model
        gc.collect()
    return results
