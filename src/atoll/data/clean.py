"""Text cleaning: Unicode normalization, whitespace, markup, and PII masking.

Pure functions over strings, run inside the pipeline's worker processes. `clean_text` never
drops a document; filters (`atoll.data.filters`) decide that. Markup cleanup keeps every word
of the prose and of code samples: it removes the syntax around them (HTML tags, reStructuredText
roles and metadata directives, Markdown link syntax), because a model should learn the text,
not the typesetting.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Literal

from atoll.data.config import CleanSection, PiiSection

Markup = Literal["none", "auto", "html", "markdown", "rst"]

# One translation table: characters that carry no text (zero-width spaces and joiners, the BOM,
# soft hyphens, control characters other than tab and newline) go; unusual spaces (no-break,
# en/em; the ideographic space is kept, it is Chinese typography) become plain spaces.
_TRANSLATE: dict[int, int | None] = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_TRANSLATE.update(dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F], None))
_TRANSLATE.update(dict.fromkeys([0xA0, *range(0x2000, 0x200B), 0x202F, 0x205F], ord(" ")))
_BLANK_RUNS = re.compile(r"\n{3,}")

# ---------------------------------------------------------------- markup

_HTML_DROP_BLOCKS = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", flags=re.IGNORECASE | re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", flags=re.DOTALL)
_HTML_BLOCK_TAG = re.compile(
    r"</?(p|div|br|li|ul|ol|h[1-6]|tr|table|section|article|pre|blockquote)\b[^>]*>", flags=re.IGNORECASE
)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")

_RST_ROLE = re.compile(r":[A-Za-z][\w:+.-]*:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}\s*$", flags=re.MULTILINE)
# Directives whose whole block is metadata for the typesetter, not text.
_RST_META_DIRECTIVES = {
    "index",
    "toctree",
    "raw",
    "highlight",
    "module",
    "currentmodule",
    "sectionauthor",
    "moduleauthor",
    "only",
    "include",
    "literalinclude",
    "image",
    "figure",
    "contents",
    "tabularcolumns",
    "kernel-doc",
    "kernel-feat",
    "kernel-abi",
    "kernel-include",
    "testsetup",
    "testcleanup",
    "audit-event",
    "opcode",
}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
# After directives are handled, any other ".. " line is a comment, a link target or a
# substitution definition: markup only. Footnotes (".. [1] text") keep their text.
_RST_COMMENT_OR_LABEL = re.compile(r"^\s*\.\.(\s+(?!\[).*)?$")
_RST_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[[^\]]+\]\s*")

_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_MD_HEADING = re.compile(r"^#{1,6}\s+", flags=re.MULTILINE)


def guess_markup(name: str, text: str) -> Markup:
    """The markup of a document, from its file name when it says, else from the text."""
    lower = name.lower().removesuffix(".gz").removesuffix(".zst")
    if lower.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if lower.endswith((".md", ".markdown")):
        return "markdown"
    if lower.endswith((".rst", ".rst.txt")):
        return "rst"
    head = text[:2000].lower()
    if "<html" in head or "<body" in head or head.count("</p>") >= 2:
        return "html"
    return "none"


def strip_html(text: str) -> str:
    """Visible text of an HTML document: scripts and styles removed, block tags become line breaks."""
    text = _HTML_DROP_BLOCKS.sub("", text)
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_BLOCK_TAG.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    return html.unescape(text)


def strip_rst(text: str) -> str:
    """reStructuredText as plain text: roles and literals keep their words, heading adornments,
    comments, labels and metadata directives (index, toctree, raw, ...) with their indented
    blocks go, and other directives keep their argument (`.. function:: open(file)` -> `open(file)`)."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: lines indented deeper than this go
    for line in text.split("\n"):
        stripped = line.lstrip()
        if skip_indent is None and not stripped.startswith(("..", ":")):
            out.append(line)  # the common case: an ordinary line, no regex needed
            continue
        indent = len(line) - len(stripped)
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
            if not stripped.startswith(("..", ":")):
                out.append(line)
                continue
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            name = directive.group(2).split(":")[-1]
            if name in _RST_META_DIRECTIVES:
                skip_indent = indent
                continue
            argument = directive.group(3).strip()
            if argument:
                out.append(directive.group(1) + argument)
            continue
        footnote = _RST_FOOTNOTE.match(line)
        if footnote:
            out.append(footnote.group(1) + line[footnote.end() :])
            continue
        if _RST_COMMENT_OR_LABEL.match(line):
            skip_indent = indent
            continue
        if stripped.startswith(":") and stripped.count(":") >= 2 and out and not out[-1].strip():
            # a field list right after a directive line (":maxdepth: 1") is an option
            continue
        out.append(line)
    text = "\n".join(out)
    text = _RST_ADORNMENT.sub("", text)
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    return _RST_STRONG.sub(r"\1", text)


def strip_markdown(text: str) -> str:
    """Markdown as plain text: heading markers, link and image syntax go; their words stay."""
    text = _HTML_COMMENT.sub("", text)
    text = _MD_IMAGE.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    return _MD_HEADING.sub("", text)


def strip_markup(text: str, markup: Markup, *, name: str = "") -> str:
    """Remove `markup` (`auto`: guessed from `name` and the text) from `text`."""
    kind = guess_markup(name, text) if markup == "auto" else markup
    if kind == "html":
        return strip_html(text)
    if kind == "rst":
        return strip_rst(text)
    if kind == "markdown":
        return strip_markdown(text)
    return text


# ---------------------------------------------------------------- PII

# Each pattern starts with a character class (no look-behind), which lets the regex engine
# skip quickly to candidates; boundaries are checked on the match instead.
_EMAIL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?:/\d{1,2})?")
_H = r"[0-9A-Fa-f]{1,4}"
# Full IPv6 (8 groups) or compressed with "::" and at least three groups in all.
_IPV6 = re.compile(rf"(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,6}}:(?:{_H}:){{0,5}}{_H}|(?:{_H}:){{2,6}}:)")
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]*:")
_PHONE = re.compile(
    r"[+(\d](?:"
    r"(?<=\+)\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}"  # +86 138 0013 8000
    r"|(?<=\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{2}[.-]\d{3}[.-]\d{4}"  # 555-123-4567
    r"|(?<=1)[3-9]\d{9}"  # a Chinese mobile number
    r")"
)


def _bounded(text: str, m: re.Match[str], *, before: str, after: str) -> bool:
    """True when the match is not glued to a word: the characters around it are not word
    characters nor in `before` / `after`."""
    start, end = m.span()
    if start > 0 and (text[start - 1].isalnum() or text[start - 1] in before):
        return False
    return not (end < len(text) and (text[end].isalnum() or text[end] in after))


def _substitute(
    pattern: re.Pattern[str], text: str, token: str, ok: Callable[[re.Match[str]], bool]
) -> tuple[str, int]:
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        if ok(m):
            count += 1
            return token
        return m.group(0)

    return pattern.sub(repl, text), count


def _valid_ipv4(text: str, m: re.Match[str]) -> bool:
    address = m.group(0).split("/")[0]
    if not all(int(octet) <= 255 and (octet == "0" or not octet.startswith("0")) for octet in address.split(".")):
        return False
    # "1.2.3.4.5" (a version) and "v1.2.3.4" are not addresses.
    return _bounded(text, m, before="._", after="_") and not (
        m.end() + 1 < len(text) and text[m.end()] == "." and text[m.end() + 1].isdigit()
    )


def mask_pii(text: str, cfg: PiiSection, counts: Counter[str]) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers with `<email>`, `<ip>`,
    `<phone>` (as enabled in `cfg`); add how many of each were replaced to `counts`."""
    if cfg.email and "@" in text:
        text, n = _substitute(_EMAIL, text, "<email>", lambda m: _bounded(text, m, before=".+-_%", after="-_"))
        counts["email"] += n
    if cfg.ip:
        if "." in text:
            current = text
            text, n = _substitute(_IPV4, text, "<ip>", lambda m: _valid_ipv4(current, m))
            counts["ip"] += n
        if _IPV6_HINT.search(text):
            current = text
            text, n = _substitute(
                _IPV6,
                text,
                "<ip>",
                lambda m: any(c.isdigit() for c in m.group(0)) and _bounded(current, m, before=":_", after=":_"),
            )
            counts["ip"] += n
    if cfg.phone:
        current = text
        text, n = _substitute(_PHONE, text, "<phone>", lambda m: _bounded(current, m, before="+_.-", after="_-"))
        counts["phone"] += n
    return text


# ---------------------------------------------------------------- the whole step


def normalize_whitespace(text: str) -> str:
    """Unix line ends, no control or invisible characters, ordinary spaces, no trailing
    spaces, at most one blank line in a row, no leading or trailing blank lines. Indentation
    (code) is kept."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() or not text.isprintable():
        text = text.translate(_TRANSLATE)
    text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


def clean_text(text: str, cfg: CleanSection, *, markup: Markup = "none", name: str = "", counts: Counter[str]) -> str:
    """Normalize Unicode, remove markup, normalize whitespace and mask PII, in that order.

    `counts` receives PII replacements by kind. Deterministic and idempotent on its output
    for the same settings (apart from markup removal, which is applied once).
    """
    if cfg.normalize != "none":
        text = unicodedata.normalize(cfg.normalize, text)
    text = strip_markup(text, markup, name=name)
    text = normalize_whitespace(text)
    return mask_pii(text, cfg.pii, counts)
