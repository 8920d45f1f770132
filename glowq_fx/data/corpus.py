"""Evaluation and calibration text that comes from a package, never from a dataset hub.

- ``wikipedia_text()``: the English Wikipedia articles (2016 dump excerpt) in gensim 4.4.0's test
  data, markup stripped with mwparserfromhell, one article per document (title line, then body),
  documents joined by blank lines. About 2.9 MB of text, comparable to WikiText-2's test split.
- ``news_text()``: the 300 news articles of ``lee_background.cor`` from the same wheel, used as
  calibration text distinct from the evaluation text.

gensim itself is never imported or installed: its wheel is fetched with ``pip download --no-deps``
(the package registry is the one network glowq-fx uses) and the two files are read out of it. The
cleaned text is cached under ``cache_dir()/text`` with a checksum.
"""
from __future__ import annotations

import bz2
import importlib.util
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from glowq_fx.data.cache import MissingResourceError, cache_dir, read_checked, write_checked

GENSIM = "gensim==4.4.0"
TEST_DATA = "gensim/test/test_data/"
WIKIPEDIA_MEMBER = TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBER = TEST_DATA + "lee_background.cor"
TEXT_VERSION = 1  # bump when the cleaning changes, so cached text is rebuilt


def _installed_gensim_file(member: str) -> bytes | None:
    """The file from an installed gensim, located without importing it."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / member
    return path.read_bytes() if path.is_file() else None


def gensim_wheel() -> Path:
    """gensim 4.4.0's wheel in ``cache_dir()/wheels``, downloaded there (without dependencies) once."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob("gensim-4.4.0-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, GENSIM]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("gensim-4.4.0-*.whl"))
        if done.returncode != 0 or not got:
            raise MissingResourceError(
                f"the evaluation text comes from the {GENSIM} wheel, and `pip download` could not fetch it:\n"
                f"{done.stderr.strip()[-2000:]}\n"
                f"Fetch it by hand with `python -m pip download --no-deps {GENSIM} -d {wheels}` "
                "(or `pip install gensim==4.4.0`) and run again."
            )
        return Path(got[0].replace(wheels / got[0].name))


def _gensim_file(member: str) -> bytes:
    data = _installed_gensim_file(member)
    if data is not None:
        return data
    wheel = gensim_wheel()
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise MissingResourceError(f"{wheel} is not a usable {GENSIM} wheel ({exc}); delete it and run again") from None


def _require_mwparserfromhell():
    try:
        import mwparserfromhell
    except ImportError:
        raise MissingResourceError("stripping Wikipedia markup needs mwparserfromhell: "
                                   "`pip install mwparserfromhell` (or `pip install glowq-fx[data]`)") from None
    return mwparserfromhell


def wiki_to_text(markup: str) -> str:
    """Plain text of one article's wikitext: templates, tables, references and files dropped,
    links reduced to their labels, headings kept as lines, runs of blank lines collapsed."""
    mw = _require_mwparserfromhell()
    code = mw.parse(markup)
    for tag in code.filter_tags(recursive=False):  # <ref>, <gallery>, tables: not prose
        if str(tag.tag).strip().lower() in ("ref", "gallery", "table", "math", "timeline", "imagemap"):
            code.remove(tag)
    text = code.strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if re.fullmatch(r"(thumb|left|right|\d+px)\|.*", line):  # captions of images strip_code leaves
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse_wikipedia_dump(raw_bz2: bytes) -> list[str]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML export, as plain text."""
    docs = []
    with bz2.open(io.BytesIO(raw_bz2)) as f:
        for _, elem in ElementTree.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            text = elem.find("{*}revision/{*}text")
            if (ns is not None and ns.text == "0" and elem.find("{*}redirect") is None
                    and text is not None and text.text):
                body = wiki_to_text(text.text)
                if body:
                    docs.append(f"{elem.findtext('{*}title')}\n\n{body}")
            elem.clear()
    return docs


def _cached_text(name: str, build) -> str:
    path = cache_dir() / "text" / f"{name}-v{TEXT_VERSION}.txt"
    data = read_checked(path)
    if data is None:
        data = build().encode("utf-8")
        write_checked(path, data)
    return data.decode("utf-8")


DOC_SEPARATOR = "\n\n"


def wikipedia_text() -> str:
    """The Wikipedia evaluation text (documents separated by ``DOC_SEPARATOR``)."""
    return _cached_text("wikipedia", lambda: DOC_SEPARATOR.join(parse_wikipedia_dump(_gensim_file(WIKIPEDIA_MEMBER))))


def news_text() -> str:
    """The news calibration text: one article per paragraph."""
    def build() -> str:
        lines = _gensim_file(NEWS_MEMBER).decode("utf-8").splitlines()
        return DOC_SEPARATOR.join(line.strip() for line in lines if line.strip())
    return _cached_text("news", build)


TEXTS = {"wikipedia": wikipedia_text, "news": news_text}


def load_text(name_or_path: str) -> str:
    """``"wikipedia"``, ``"news"`` or the path of a UTF-8 text file."""
    if name_or_path in TEXTS:
        return TEXTS[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"{name_or_path!r} is neither a built-in text ({', '.join(TEXTS)}) nor a text file")
    return path.read_text(encoding="utf-8")
