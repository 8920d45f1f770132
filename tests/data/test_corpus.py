"""data.corpus: dump parsing, markup stripping, the packaged texts."""
import bz2

import pytest

from glowq_fx.data import corpus
from glowq_fx.data.cache import MissingResourceError
from tests_helpers import or_skip

DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Alpha</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">'''Alpha''' is a [[Greek alphabet|letter]].{{Infobox|x=1}}
== History ==
It came first.&lt;ref&gt;A source.&lt;/ref&gt;
[[File:A.png|thumb|A caption]]</text></revision></page>
  <page><title>Beta</title><ns>0</ns><id>2</id><redirect title="Alpha" />
    <revision><text>#REDIRECT [[Alpha]]</text></revision></page>
  <page><title>Talk:Alpha</title><ns>1</ns><id>3</id>
    <revision><text>Discussion.</text></revision></page>
</mediawiki>"""


def test_dump_parsing_keeps_articles_and_strips_markup():
    pytest.importorskip("mwparserfromhell")
    docs = corpus.parse_wikipedia_dump(bz2.compress(DUMP.encode()))
    assert len(docs) == 1  # the redirect and the talk page are not articles
    doc = docs[0]
    assert doc.startswith("Alpha\n\nAlpha is a letter.")
    assert "History" in doc and "It came first." in doc
    for markup in ("[[", "{{", "'''", "Infobox", "A source", "<ref", "thumb"):
        assert markup not in doc


def test_load_text_reads_files_and_names_bad_input(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("some text", encoding="utf-8")
    assert corpus.load_text(str(f)) == "some text"
    with pytest.raises(ValueError, match="neither a built-in text"):
        corpus.load_text(str(tmp_path / "nope.txt"))


def test_unobtainable_wheel_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("GLOWQ_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "GENSIM", "gensim==0.0.0.does-not-exist")
    monkeypatch.setattr(corpus, "_installed_gensim_file", lambda member: None)
    with pytest.raises(MissingResourceError, match="pip download --no-deps gensim==0.0.0.does-not-exist"):
        corpus.news_text()


def test_real_texts_from_the_gensim_wheel():
    wiki = or_skip(corpus.wikipedia_text)
    news = or_skip(corpus.news_text)
    docs = wiki.split("\n\n")
    assert len(wiki) > 2_000_000 and "Anarchism" in docs[0]
    # markup residue: malformed tables that mwparserfromhell leaves as text (0.23% of the characters
    # when written); more would mean the stripping broke
    residue = [ln for ln in wiki.splitlines() if ln.startswith(("|", "!", "{|")) or "[[" in ln or "{{" in ln]
    assert sum(map(len, residue)) < 0.005 * len(wiki)
    assert len([d for d in news.split(corpus.DOC_SEPARATOR) if d]) == 300  # lee_background.cor: 300 articles
    assert not set(news.split(corpus.DOC_SEPARATOR)[:5]) & set(docs)  # calibration text is not evaluation text
    assert corpus.wikipedia_text() == wiki  # second read: from the checksummed cache, identical
