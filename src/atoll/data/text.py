"""One pass over a cleaned document that every later step shares: words, their stable hashes,
and the language.

Words are runs of letters and digits (an apostrophe inside a word is kept, "'tis" and "don't"
are one word); punctuation and markup are never words. A CJK ideograph is a word by itself,
since Chinese and Japanese do not separate words with spaces. Words are lower-cased. Their
64-bit hashes (xxh64, stable across processes and runs) feed both the repetition filter and
MinHash, so each word is hashed once.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import xxhash

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_KANA = "\u3040-\u30ff"
_HANGUL = "\uac00-\ud7af"
WORD = re.compile(rf"[{_HAN}]|[^\W_{_HAN}]+(?:['\u2019][^\W_{_HAN}]+)*")
# The same words for ASCII text, twice as fast (no Unicode classes to test).
ASCII_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_CJK_RE = re.compile(rf"[{_HAN}{_KANA}{_HANGUL}]+")
_HAN_RE = re.compile(rf"[{_HAN}]")
_KANA_WORD_RE = re.compile(rf"[{_KANA}]+")
_HANGUL_WORD_RE = re.compile(rf"[{_HANGUL}]+")

CJK_LANGUAGES = frozenset({"zh", "ja", "ko"})

# Frequent English function words. Used to tell English from other Latin-script text and
# (the first eight, Gopher's list) by the stop-word rule.
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
ENGLISH_STOP_WORDS = GOPHER_STOP_WORDS | frozenset(
    "a an is are was were been it its this these those in on at by for from as or not no but if "
    "then than so i you he she we they me my your his her our their him them what which who when "
    "where how all any can will would shall should may might must do does did has had there here "
    "into out up about more most such only also".split()
)
# Frequent Chinese function characters, the stop-word rule's list for zh.
CHINESE_STOP_WORDS = frozenset("的了是在和有不这中为也就与及或对其而但")

_HASH_CACHE: dict[str, int] = {}
_HASH_CACHE_MAX = 1 << 20


def word_hashes(words: list[str], vocabulary: Iterable[str] | None = None) -> np.ndarray:
    """Stable uint64 hashes of `words` (xxh64, seed 0), cached per process: vocabulary is
    Zipfian, so most words are looked up, not hashed. `vocabulary` (the distinct words, when
    the caller has them) saves building a set."""
    cache = _HASH_CACHE
    if len(cache) > _HASH_CACHE_MAX:
        cache.clear()
    distinct = vocabulary if vocabulary is not None else set(words)
    for w in [w for w in distinct if w not in cache]:
        cache[w] = xxhash.xxh64_intdigest(w.encode("utf-8"))
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


@dataclass
class TextView:
    """A cleaned document's words and lines, computed once and shared by language
    identification, filters and MinHash."""

    text: str
    words: list[str] = field(init=False)

    def __post_init__(self) -> None:
        lower = self.text.lower()
        self.words = (ASCII_WORD if lower.isascii() else WORD).findall(lower)

    @cached_property
    def counts(self) -> Counter[str]:
        """How often each word occurs: rules over stop words or digits loop over the
        vocabulary, not over every word."""
        return Counter(self.words)

    @cached_property
    def hashes(self) -> np.ndarray:
        return word_hashes(self.words, self.counts.keys())

    def count_of(self, vocabulary: frozenset[str]) -> int:
        """Occurrences of words from `vocabulary` (a stop-word list)."""
        get = self.counts.get
        return sum(get(w, 0) for w in vocabulary)

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")


def identify_language(view: TextView) -> tuple[str, float]:
    """(language, score in [0, 1]) of a document: "zh", "ja", "ko", "en", "other" or "unknown".

    Script first: when CJK words (each ideograph, each kana or hangul run) are at least 30% of
    the words, the text is Japanese if it has kana, Korean if hangul dominates, else Chinese;
    the score is the CJK share. Otherwise the English stop-word share of the Latin words
    decides (English prose is about 40% stop words, code-heavy documentation 15%, French or
    German under 5%): "en" when it is at least 8%, with score min(1, share / 0.25).
    """
    words = view.words
    if not words:
        return "unknown", 0.0
    han = kana = hangul = 0
    if not view.text.isascii():
        cjk_text = "".join(_CJK_RE.findall(view.text))
        if cjk_text:
            han = len(_HAN_RE.findall(cjk_text))
            kana = len(_KANA_WORD_RE.findall(cjk_text))
            hangul = len(_HANGUL_WORD_RE.findall(cjk_text))
    latin = len(words) - han - kana - hangul
    stop = view.count_of(ENGLISH_STOP_WORDS)
    total = len(words)
    cjk = han + kana + hangul
    if cjk >= 0.3 * total:
        score = cjk / total
        if kana >= 0.1 * cjk:
            return "ja", score
        if hangul > han:
            return "ko", score
        return "zh", score
    if latin <= 0:
        return "unknown", 0.0
    share = stop / latin
    if share >= 0.08:
        return "en", min(1.0, share / 0.25)
    return "other", min(1.0, 1.0 - share / 0.08)
