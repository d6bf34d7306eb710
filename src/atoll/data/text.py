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
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import xxhash

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_KANA = "\u3040-\u30ff"
_HANGUL = "\uac00-\ud7af"
WORD = re.compile(rf"[{_HAN}]|[^\W_{_HAN}]+(?:['\u2019][^\W_{_HAN}]+)*")
_KANA_RE = re.compile(rf"[{_KANA}]")
_HANGUL_RE = re.compile(rf"[{_HANGUL}]")
_LATIN_RE = re.compile(r"[a-z]")

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


def word_hashes(words: list[str]) -> np.ndarray:
    """Stable uint64 hashes of `words` (xxh64, seed 0), cached per process: vocabulary is
    Zipfian, so most words are looked up, not hashed."""
    cache = _HASH_CACHE
    if len(cache) > _HASH_CACHE_MAX:
        cache.clear()
    get = cache.get

    def miss(w: str) -> int:
        h = cache[w] = xxhash.xxh64_intdigest(w.encode("utf-8"))
        return h

    # `or` treats a hash of 0 as a miss: harmless, it is recomputed.
    return np.array([get(w) or miss(w) for w in words], dtype=np.uint64)


@dataclass
class TextView:
    """A cleaned document's words and lines, computed once and shared by language
    identification, filters and MinHash."""

    text: str
    words: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.words = WORD.findall(self.text.lower())

    @cached_property
    def hashes(self) -> np.ndarray:
        return word_hashes(self.words)

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
    han = kana = hangul = latin = stop = 0
    for w in words:
        c = w[0]
        if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff":
            han += 1
        elif "\u3040" <= c <= "\u30ff":
            kana += 1
        elif "\uac00" <= c <= "\ud7af":
            hangul += 1
        elif "a" <= c <= "z":
            latin += 1
            if w in ENGLISH_STOP_WORDS:
                stop += 1
    total = len(words)
    cjk = han + kana + hangul
    if cjk >= 0.3 * total:
        score = cjk / total
        if kana >= 0.1 * cjk:
            return "ja", score
        if hangul > han:
            return "ko", score
        return "zh", score
    if latin == 0:
        return "unknown", 0.0
    share = stop / latin
    if share >= 0.08:
        return "en", min(1.0, share / 0.25)
    return "other", min(1.0, 1.0 - share / 0.08)
