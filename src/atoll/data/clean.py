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
from typing import Literal

from atoll.data.config import CleanSection, PiiSection

Markup = Literal["none", "auto", "html", "markdown", "rst"]

# Characters that carry no text: zero-width spaces and joiners, the BOM, soft hyphens.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
# Control characters other than tab and newline (\r is handled first).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Unusual spaces (no-break, en/em, ideographic is kept: it is Chinese typography).
_ODD_SPACE = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", flags=re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")

# ---------------------------------------------------------------- markup

_HTML_DROP_BLOCKS = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", flags=re.IGNORECASE | re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", flags=re.DOTALL)
_HTML_BLOCK_TAG = re.compile(r"</?(p|div|br|li|ul|ol|h[1-6]|tr|table|section|article|pre|blockquote)\b[^>]*>", flags=re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")

_RST_ROLE = re.compile(r":[A-Za-z][\w:+.-]*:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}\s*$", flags=re.MULTILINE)
# Directives whose whole block is metadata for the typesetter, not text.
_RST_META_DIRECTIVES = {
    "index", "toctree", "raw", "highlight", "module", "currentmodule", "sectionauthor", "moduleauthor",
    "only", "include", "literalinclude", "image", "figure", "contents", "tabularcolumns", "kernel-doc",
    "kernel-feat", "kernel-abi", "kernel-include", "testsetup", "testcleanup", "audit-event", "opcode",
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
        indent = len(line) - len(stripped)
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
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

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?:/\d{{1,2}})?(?![\w.]*\w)")
_H = r"[0-9A-Fa-f]{1,4}"
# Full IPv6 (8 groups) or compressed with "::" and at least three groups in all.
_IPV6 = re.compile(
    rf"(?<![\w:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,6}}:(?:{_H}:){{0,5}}{_H}|(?:{_H}:){{2,6}}:)(?![\w:])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}"  # international
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567
    r"|1[3-9]\d{9}"  # a Chinese mobile number
    r")(?![\w])"
)


def _ipv6_like(match: re.Match[str]) -> bool:
    # "::" alone or C++ "a::b" are not addresses: require a hex digit group and a colon pair or 7 colons.
    s = match.group(0)
    return any(c.isdigit() for c in s) and s.count(":") >= 2


def mask_pii(text: str, cfg: PiiSection, counts: Counter[str]) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers with `<email>`, `<ip>`,
    `<phone>` (as enabled in `cfg`); add how many of each were replaced to `counts`."""
    if cfg.email and "@" in text:
        text, n = _EMAIL.subn("<email>", text)
        counts["email"] += n
    if cfg.ip:
        if "." in text:
            text, n = _IPV4.subn("<ip>", text)
            counts["ip"] += n
        if "::" in text or text.count(":") >= 7:
            found = 0

            def repl(m: re.Match[str]) -> str:
                nonlocal found
                if _ipv6_like(m):
                    found += 1
                    return "<ip>"
                return m.group(0)

            text = _IPV6.sub(repl, text)
            counts["ip"] += found
    if cfg.phone:
        text, n = _PHONE.subn("<phone>", text)
        counts["phone"] += n
    return text


# ---------------------------------------------------------------- the whole step


def normalize_whitespace(text: str) -> str:
    """Unix line ends, no control or invisible characters, ordinary spaces, no trailing
    spaces, at most one blank line in a row, no leading or trailing blank lines. Indentation
    (code) is kept."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
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
