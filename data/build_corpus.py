"""Rebuild the small English + Russian corpus shipped in `data/corpus/` from Debian packages.

English: the World English Bible (public domain, `sword-text-web`); Russian: the LibreOffice help (MPL-2.0,
`libreoffice-help-ru`). Run `albert-data build-corpus` (as root it installs the packages with apt-get).
"""

import gzip
import html
import json
import logging
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

logger = logging.getLogger(__name__)

DEBIAN_PACKAGES = ("sword-text-web", "libsword-utils", "libreoffice-help-ru")
SWORD_MODULE = "engWEB2015eb"
LIBREOFFICE_HELP_DIR = Path("/usr/share/libreoffice/help/ru/text")
NUM_SHARDS = 4
# The help pages outnumber the Bible chapters; cap the Russian text so both languages weigh about the same.
RUSSIAN_MAX_CHARS = 2_600_000
MIN_DOCUMENT_CHARS = 200

_VERSE_HEADER = re.compile(r"^\$\$\$(?P<book>.+?) (?P<chapter>\d+):(?P<verse>\d+)$")
_NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)
# Word-level OSIS tags sit inside running text and vanish; structural ones (lines, paragraphs) separate words.
_INLINE_TAG = re.compile(r"</?(?:w|q|seg|name|rdg|transChange|hi|foreign|divineName)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\u00a0]+")


def ensure_debian_packages() -> None:
    """Install the source packages with apt-get when they are missing (needs root and a Debian mirror)."""
    if shutil.which("mod2imp") and LIBREOFFICE_HELP_DIR.is_dir():
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"the corpus is built from the Debian packages {' '.join(DEBIAN_PACKAGES)}; install them")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES], check=True)


def bible_chapters() -> list[str]:
    """The World English Bible as one document per chapter, footnotes and markup removed."""
    dump = subprocess.run(["mod2imp", SWORD_MODULE], check=True, capture_output=True, text=True).stdout
    chapters: dict[tuple[str, str], list[str]] = {}
    key = None
    for line in dump.splitlines():
        header = _VERSE_HEADER.match(line)
        if header:
            key = (header["book"], header["chapter"]) if header["verse"] != "0" else None
            continue
        if key is None or line.startswith("$$$"):
            continue
        verse = _clean_markup(_NOTE.sub(" ", line))
        if verse:
            chapters.setdefault(key, []).append(verse)
    return [" ".join(verses) for verses in chapters.values()]


def _clean_markup(fragment: str) -> str:
    text = _TAG.sub(" ", _INLINE_TAG.sub("", fragment))
    return _SPACES.sub(" ", html.unescape(text)).strip()


class _HelpPageText(HTMLParser):
    """Collects the visible text of a LibreOffice help page's `DisplayArea`, one block element per line."""

    _BLOCKS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th", "div", "tr", "br", "pre"})
    _HIDDEN = frozenset({"script", "style", "noscript"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._current: list[str] = []
        self._display_depth = 0  # >0 while inside <div id="DisplayArea">
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        if tag == "div" and (self._display_depth or ("id", "DisplayArea") in attrs):
            self._display_depth += 1
        if tag in self._BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self._hidden_depth:
            self._hidden_depth -= 1
        if tag in self._BLOCKS:
            self._flush()
        if tag == "div" and self._display_depth:
            self._display_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._display_depth and not self._hidden_depth:
            self._current.append(data)

    def _flush(self) -> None:
        line = _SPACES.sub(" ", "".join(self._current).replace("\n", " ")).strip()
        if line:
            self.lines.append(line)
        self._current = []


def help_pages(root: Path = LIBREOFFICE_HELP_DIR) -> list[str]:
    """Each LibreOffice help page as one document of paragraphs, in a stable (sorted) order."""
    pages = []
    for path in sorted(root.rglob("*.html")):
        parser = _HelpPageText()
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        pages.append("\n".join(parser.lines))
    return pages


def build_corpus(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write the shuffled, deduplicated documents of both languages as `NUM_SHARDS` jsonl.gz shards."""
    ensure_debian_packages()
    english = [doc for doc in bible_chapters() if len(doc) >= MIN_DOCUMENT_CHARS]
    russian = _cap_chars(
        _unique(doc for doc in help_pages() if len(doc) >= MIN_DOCUMENT_CHARS), RUSSIAN_MAX_CHARS, seed
    )
    documents = [{"text": doc, "lang": "en"} for doc in english] + [{"text": doc, "lang": "ru"} for doc in russian]
    random.Random(seed).shuffle(documents)  # interleave the languages so any prefix of a shard holds both
    logger.info(
        "English: %d chapters, %d chars; Russian: %d pages, %d chars",
        len(english),
        sum(map(len, english)),
        len(russian),
        sum(map(len, russian)),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.jsonl.gz"):
        stale.unlink()
    shards = []
    for index in range(NUM_SHARDS):
        path = out_dir / f"bundled-{index:02d}.jsonl.gz"
        lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents[index::NUM_SHARDS])
        # mtime=0 makes a rebuild byte-identical, so `git diff` shows whether the sources changed.
        with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as sink:
            sink.write(lines.encode("utf-8"))
        shards.append(path)
    return shards


def _unique(documents) -> list[str]:
    seen, unique = set(), []
    for doc in documents:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return unique


def _cap_chars(documents: list[str], max_chars: int, seed: int) -> list[str]:
    """A seeded random subset of the documents holding at most `max_chars` characters."""
    chosen, total = [], 0
    for doc in random.Random(seed).sample(documents, len(documents)):
        if total + len(doc) <= max_chars:
            chosen.append(doc)
            total += len(doc)
    return chosen
