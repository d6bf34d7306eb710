"""Cleaning, language identification and the quality filters, on small hand-made texts."""

from __future__ import annotations

from collections import Counter

import numpy as np

from atoll.data.clean import clean_text, mask_pii, normalize_whitespace, strip_html, strip_markup, strip_rst
from atoll.data.config import (
    C4Section,
    CleanSection,
    FiltersSection,
    GopherQualitySection,
    GopherRepetitionSection,
    PiiSection,
)
from atoll.data.filters import apply_filters, c4_document, c4_lines, gopher_quality, gopher_repetition, ngram_hashes
from atoll.data.text import TextView, identify_language, word_hashes
from tests.data.corpus import chinese_document, english_document


def test_whitespace_and_unicode() -> None:
    assert normalize_whitespace("a\u00a0b  \r\n\n\n\nc\u200b\x07 \n") == "a b\n\nc"
    assert normalize_whitespace("    indented code\n") == "    indented code"
    counts: Counter[str] = Counter()
    assert clean_text("Cafe\u0301", CleanSection(), counts=counts) == "Caf\u00e9"  # NFC
    assert clean_text("\uff21", CleanSection(normalize="NFKC"), counts=counts) == "A"


def test_markup_keeps_words() -> None:
    html = (
        "<html><head><style>p {x}</style></head><body><p>Hello &amp; <b>bye</b></p><script>x()</script></body></html>"
    )
    assert strip_html(html).split() == ["Hello", "&", "bye"]
    rst = (
        ".. SPDX-License-Identifier: GPL-2.0\n\n.. _label:\n\nTitle\n=====\n\n.. index:: hidden\n   more hidden\n\n"
        "Use :func:`~os.open` and ``len(x)`` with **care**.\n\n.. function:: open(file)\n\n   Opens a file.\n"
    )
    text = strip_rst(rst)
    assert "hidden" not in text and "SPDX" not in text and "=====" not in text and "label" not in text
    assert "Use os.open and len(x) with care." in text
    assert "open(file)" in text and "Opens a file." in text
    assert strip_markup("see [the docs](http://x) ![img](y.png)", "markdown") == "see the docs img"
    assert strip_markup("<p>a</p><p>b</p><p>c</p>", "auto").split() == ["a", "b", "c"]


def test_pii_is_masked_and_counted() -> None:
    counts: Counter[str] = Counter()
    text = (
        "Mail john.doe@example.com or call (555) 123-4567, +86 138 0013 8000 or 555-123-4567. "
        "Hosts 192.168.1.10 and 2001:db8::1 answer. Not: 999.1.1.1, std::vector, 2023-01-15, user@localhost."
    )
    out = mask_pii(text, PiiSection(), counts)
    assert counts == Counter({"email": 1, "phone": 3, "ip": 2})
    assert "<email>" in out and "example.com" not in out and "192.168" not in out
    for kept in ("999.1.1.1", "std::vector", "2023-01-15", "user@localhost"):
        assert kept in out
    assert mask_pii(text, PiiSection(email=False, ip=False, phone=False), Counter()) == text


def test_language_identification() -> None:
    assert identify_language(TextView(english_document(1)))[0] == "en"
    assert identify_language(TextView(chinese_document(1)))[0] == "zh"
    french = "Le chat est sur la table et il mange une souris avec plaisir dans la maison de mon oncle."
    assert identify_language(TextView(french))[0] == "other"
    assert identify_language(TextView("カタカナとひらがなの文章です。日本語"))[0] == "ja"
    assert identify_language(TextView("!!! ..."))[0] == "unknown"


def test_words_exclude_punctuation_and_hashes_are_stable() -> None:
    view = TextView("Don't stop -- the #1 'tis NET!  计算")
    assert view.words == ["don't", "stop", "the", "1", "tis", "net", "计", "算"]
    assert word_hashes(["a", "b"]).tolist() == word_hashes(["a", "b"]).tolist()
    assert word_hashes(["a"])[0] != word_hashes(["b"])[0]


def test_gopher_quality_rules() -> None:
    cfg = GopherQualitySection()
    assert gopher_quality(TextView(english_document(2)), "en", cfg) is None
    assert gopher_quality(TextView("too short to keep"), "en", cfg) == "gopher_quality.min_words"
    numbers = " ".join(str(i) for i in range(100)) + " the and of"
    assert gopher_quality(TextView(numbers), "en", cfg) in (
        "gopher_quality.min_alpha_words",
        "gopher_quality.min_mean_word_length",
    )
    hashy = " ".join(f"#tag{i} word" for i in range(60)) + " the and"
    assert gopher_quality(TextView(hashy), "en", cfg) == "gopher_quality.max_symbol_word_ratio"
    bullets = "\n".join(f"- item number {i} of the list" for i in range(60))
    assert gopher_quality(TextView(bullets), "en", cfg) == "gopher_quality.max_bullet_lines"
    no_stop = " ".join(f"alpha{i} beta{i} gamma{i}" for i in range(30))
    assert gopher_quality(TextView(no_stop), "en", cfg) == "gopher_quality.min_stop_words"
    assert gopher_quality(TextView(chinese_document(3)), "zh", cfg) is None  # no word-length rule for zh


def test_gopher_repetition_rules() -> None:
    cfg = GopherRepetitionSection()
    assert gopher_repetition(TextView(english_document(4)), cfg) is None
    spam = "\n".join(["Buy cheap watches online today now"] * 10 + [english_document(5)])
    assert gopher_repetition(TextView(spam), cfg) is not None
    # Dialogue: short speaker lines repeat all the time and are structure, not repetition.
    dialogue = "\n\n".join(
        f"HAMLET\n{english_document(i, sentences=3).strip()}\n\nHORATIO\nIt is so, my lord {i}." for i in range(12)
    )
    assert gopher_repetition(TextView(dialogue), cfg) is None
    looped = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    assert gopher_repetition(TextView(looped), cfg) is not None


def test_ngram_hashes() -> None:
    h = np.array([1, 2, 3, 1, 2, 3], dtype=np.uint64)
    grams = ngram_hashes(h, 3)
    assert len(grams) == 4 and grams[0] == grams[3] and grams[0] != grams[1]
    assert len(ngram_hashes(h, 7)) == 0


def test_c4_rules() -> None:
    cfg = C4Section()
    lines: Counter[str] = Counter()
    text = "A line of text.\nPlease enable JavaScript in your browser.\nRead our privacy policy.\nShort"
    assert c4_lines(text, cfg, lines) == "A line of text.\nShort"
    assert lines == Counter({"c4.javascript_line": 1, "c4.policy_line": 1})
    strict = C4Section(min_words_per_line=3, require_terminal_punct=True)
    assert c4_lines("One two three four.\nno end here at all\nShort.", strict, Counter()) == "One two three four."
    assert c4_document("Lorem ipsum dolor sit amet", cfg) == "c4.lorem_ipsum"
    assert c4_document("int main() { return 0; }", cfg) is None
    assert c4_document("int main() { return 0; }", C4Section(drop_curly_brace=True)) == "c4.curly_brace"


def test_apply_filters_order_and_language() -> None:
    cfg = FiltersSection()
    lines: Counter[str] = Counter()
    view = TextView(english_document(6))
    assert apply_filters(view, "en", 1.0, cfg, lines)[1] is None
    assert apply_filters(view, "other", 1.0, cfg, lines)[1] == "language"
    assert apply_filters(TextView("tiny"), "en", 1.0, cfg, lines)[1] == "min_chars"
    keep_all = FiltersSection(language={"keep": []})
    assert apply_filters(view, "other", 1.0, keep_all, lines)[1] is None
