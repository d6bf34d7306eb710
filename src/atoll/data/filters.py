"""Quality filters in the spirit of Gopher (quality and repetition) and C4.

`apply_filters` returns the (possibly line-filtered) text, or the name of the first rule that
removed the document, e.g. "gopher_quality.min_stop_words". Thresholds live in
`atoll.data.config.FiltersSection`; every rule is documented there. Repetition statistics are
computed with numpy over the words' hashes, never with Python loops over n-grams.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from atoll.data.config import C4Section, FiltersSection, GopherQualitySection, GopherRepetitionSection
from atoll.data.text import CHINESE_STOP_WORDS, CJK_LANGUAGES, GOPHER_STOP_WORDS, TextView

_BULLETS = ("-", "*", "\u2022", "\u2023", "\u25cf", "\u25e6", "\u2043", "\u2219", "\u00b7")
_JS_HINTS = ("enable", "browser", "disabled", "turn on", "support")
_POLICY = (
    "terms of use",
    "terms of service",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u3002", "\uff01", "\uff1f")
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f](?:\s|$)")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def c4_lines(text: str, cfg: C4Section, line_counts: Counter[str]) -> str:
    """Apply C4's line rules; count dropped lines by rule in `line_counts`."""
    if not (cfg.min_words_per_line or cfg.require_terminal_punct):
        # Only keyword rules are on: skip the line loop when no keyword is in the document.
        lower_doc = text.lower()
        if not (
            (cfg.drop_javascript_lines and "javascript" in lower_doc)
            or (cfg.drop_policy_lines and any(p in lower_doc for p in _POLICY))
        ):
            return text
    kept = []
    for line in text.split("\n"):
        lower = line.lower()
        stripped = line.strip()
        if cfg.drop_javascript_lines and "javascript" in lower and any(h in lower for h in _JS_HINTS):
            line_counts["c4.javascript_line"] += 1
            continue
        if cfg.drop_policy_lines and any(p in lower for p in _POLICY):
            line_counts["c4.policy_line"] += 1
            continue
        if stripped and cfg.min_words_per_line and len(stripped.split()) < cfg.min_words_per_line:
            line_counts["c4.short_line"] += 1
            continue
        if stripped and cfg.require_terminal_punct and not stripped.endswith(_TERMINAL):
            line_counts["c4.no_terminal_punct"] += 1
            continue
        kept.append(line)
    return "\n".join(kept).strip("\n")


def c4_document(text: str, cfg: C4Section) -> str | None:
    """The C4 document rule that removes `text`, or None."""
    lower = text.lower()
    if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
        return "c4.lorem_ipsum"
    if cfg.drop_curly_brace and "{" in text:
        return "c4.curly_brace"
    if cfg.min_sentences and len(_SENTENCE_END.findall(text)) < cfg.min_sentences:
        return "c4.min_sentences"
    return None


def gopher_quality(view: TextView, lang: str, cfg: GopherQualitySection) -> str | None:
    """The Gopher quality rule that removes the document, or None."""
    n = len(view.words)
    if n < cfg.min_words:
        return "gopher_quality.min_words"
    if n > cfg.max_words:
        return "gopher_quality.max_words"
    if lang not in CJK_LANGUAGES:
        mean = float(view.word_lengths.sum()) / n
        if mean < cfg.min_mean_word_length:
            return "gopher_quality.min_mean_word_length"
        if mean > cfg.max_mean_word_length:
            return "gopher_quality.max_mean_word_length"
    text = view.text
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "gopher_quality.max_symbol_word_ratio"
    lines = [line.strip() for line in view.lines if line.strip()]
    if lines:
        if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines:
            return "gopher_quality.max_bullet_lines"
        if sum(line.endswith(("...", "\u2026")) for line in lines) / len(lines) > cfg.max_ellipsis_lines:
            return "gopher_quality.max_ellipsis_lines"
    # A word is letters and digits, so one that is not all digits has a letter.
    alpha = n - sum(c for w, c in view.counts.items() if w.isdigit())
    if alpha / n < cfg.min_alpha_words:
        return "gopher_quality.min_alpha_words"
    stop_words = CHINESE_STOP_WORDS if lang == "zh" else GOPHER_STOP_WORDS
    if cfg.min_stop_words and view.count_of(stop_words) < cfg.min_stop_words:
        return "gopher_quality.min_stop_words"
    return None


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    if not items or not total_chars:
        return 0.0, 0.0
    return dup / len(items), dup_chars / total_chars


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of `n` consecutive word hashes (len(hashes) - n + 1 of them)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = hashes[:count].copy()
    for j in range(1, n):
        out = out * _MIX + hashes[j : j + count]  # wraps modulo 2**64 by design
    return out


def gopher_repetition(view: TextView, cfg: GopherRepetitionSection) -> str | None:
    """The Gopher repetition rule that removes the document, or None.

    Repeated lines and paragraphs count occurrences after the first. The top n-gram fraction
    is (occurrences x characters of the most frequent n-gram) / characters in all words; the
    duplicate n-gram fraction is the share of word characters covered by occurrences of an
    n-gram after its first.
    """
    lines = [line.strip() for line in view.lines if line.strip()]
    counted = [line for line in lines if len(line) >= cfg.min_line_chars]
    dup_lines = sum(1 for _ in counted) - len(set(counted))
    if lines and dup_lines / len(lines) > cfg.max_dup_line_frac:
        return "gopher_repetition.dup_line_frac"
    _, line_chars = _dup_fractions(counted)
    if line_chars > cfg.max_dup_line_char_frac:
        return "gopher_repetition.dup_line_char_frac"
    paragraphs = [p.strip() for p in view.text.split("\n\n") if p.strip()]
    para_frac, para_chars = _dup_fractions([p for p in paragraphs if len(p) >= cfg.min_line_chars])
    if para_frac > cfg.max_dup_para_frac:
        return "gopher_repetition.dup_para_frac"
    if para_chars > cfg.max_dup_para_char_frac:
        return "gopher_repetition.dup_para_char_frac"

    hashes = view.hashes
    lengths = view.word_lengths
    total = int(lengths.sum())
    if total == 0:
        return None
    cum = np.concatenate([[0], np.cumsum(lengths)])
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        grams = ngram_hashes(hashes, n)
        if len(grams) < 2:
            continue
        values, counts = np.unique(grams, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] < 2:
            continue
        start = int(np.flatnonzero(grams == values[top])[0])
        chars = int(cum[start + n] - cum[start])
        if counts[top] * chars / total > limit:
            return f"gopher_repetition.top_{n}gram_char_frac"
    # A position covered by a repeated (n+1)-gram is covered by a repeated n-gram, so the
    # covered share never grows with n: once it is under every remaining limit, stop.
    dup_limits = sorted(cfg.max_dup_ngram_char_frac.items())
    for i, (n, limit) in enumerate(dup_limits):
        grams = ngram_hashes(hashes, n)
        if len(grams) < 2:
            break
        order = np.argsort(grams, kind="stable")
        ordered = grams[order]
        repeat = order[1:][ordered[1:] == ordered[:-1]]  # start positions of later occurrences
        if len(repeat) == 0:
            break
        cover = np.zeros(len(hashes) + 1, dtype=np.int64)
        np.add.at(cover, repeat, 1)
        np.add.at(cover, repeat + n, -1)
        covered = np.cumsum(cover[:-1]) > 0
        frac = float(lengths[covered].sum()) / total
        if frac > limit:
            return f"gopher_repetition.dup_{n}gram_char_frac"
        if frac <= min(lim for _, lim in dup_limits[i:]):
            break
    return None


def apply_filters(
    view: TextView, lang: str, score: float, cfg: FiltersSection, line_counts: Counter[str]
) -> tuple[TextView, str | None]:
    """Run every enabled filter in order: length, language, C4 (lines, then document), Gopher
    quality, Gopher repetition. Returns the document's view (a new one if C4 dropped lines)
    and the removing rule's name, or None if it is kept."""
    if len(view.text) < cfg.min_chars:
        return view, "min_chars"
    keep = cfg.language.keep
    if (keep and lang not in keep) or score < cfg.language.min_score:
        return view, "language"
    if cfg.c4.enabled:
        text = c4_lines(view.text, cfg.c4, line_counts)
        if text != view.text:
            view = TextView(text)
            if len(text) < cfg.min_chars:
                return view, "min_chars"
        reason = c4_document(view.text, cfg.c4)
        if reason:
            return view, reason
    if cfg.gopher_quality.enabled:
        reason = gopher_quality(view, lang, cfg.gopher_quality)
        if reason:
            return view, reason
    if cfg.gopher_repetition.enabled:
        reason = gopher_repetition(view, cfg.gopher_repetition)
        if reason:
            return view, reason
    return view, None
