"""MinHash signatures and duplicate decisions."""

from __future__ import annotations

import numpy as np

from atoll.data.config import NearDedupSection
from atoll.data.dedup import deduplicate, permutations, signature
from atoll.data.text import TextView
from tests.data.corpus import edit_words, english_document


def test_signature_estimates_jaccard_without_bias() -> None:
    rng = np.random.default_rng(0)
    cfg = NearDedupSection(num_perm=128, ngram=1)
    perms = permutations(cfg.num_perm, cfg.seed)
    errors = []
    for _ in range(60):
        n = int(rng.integers(50, 800))
        common = rng.integers(0, 2**63, size=n // 2, dtype=np.uint64)
        a = np.concatenate([common, rng.integers(0, 2**63, size=n - n // 2, dtype=np.uint64)])
        b = np.concatenate([common, rng.integers(0, 2**63, size=n - n // 2, dtype=np.uint64)])
        true = len(common) / (2 * n - len(common))
        errors.append(float(np.mean(signature(a, cfg, perms) == signature(b, cfg, perms))) - true)
    assert abs(np.mean(errors)) < 0.02
    assert np.std(errors) < 0.06  # theory: sqrt(J(1-J)/128) ~ 0.04


def test_signature_edge_cases() -> None:
    cfg = NearDedupSection()
    perms = permutations(cfg.num_perm, cfg.seed)
    empty = signature(np.empty(0, dtype=np.uint64), cfg, perms)
    assert empty.dtype == np.uint32 and len(empty) == cfg.num_perm
    short = TextView("two words").hashes
    assert np.array_equal(signature(short, cfg, perms), signature(short, cfg, perms))


def test_deduplicate_exact_and_near_keeps_first() -> None:
    cfg = NearDedupSection()
    perms = permutations(cfg.num_perm, cfg.seed)
    texts = [english_document(i, sentences=30) for i in range(6)]
    texts.append(texts[1])  # exact copy of 1
    texts.append(edit_words(texts[2], seed=9, edits=2))  # near copy of 2
    texts.append(edit_words(texts[3], seed=9, edits=80))  # heavily edited: a different document
    items = [(t.encode(), signature(TextView(t).hashes, cfg, perms)) for t in texts]
    outcome = deduplicate(items, exact=True, near=cfg)
    assert outcome.removed == {6: "exact", 7: "near"}
    assert outcome.matches == {6: 1, 7: 2}
    assert outcome.similarity[7] >= cfg.threshold
    assert deduplicate(items, exact=False, near=NearDedupSection(enabled=False)).removed == {}
    only_exact = deduplicate(items, exact=True, near=NearDedupSection(enabled=False))
    assert only_exact.removed == {6: "exact"}
