"""data.cache: the checksummed cache refuses edited files and follows $GLOWQ_CACHE."""
import warnings

from glowq_fx.data import cache
from glowq_fx.data.cache import read_checked, write_checked


def test_checksummed_cache_rejects_edited_files(tmp_path):
    path = write_checked(tmp_path / "a" / "x.txt", b"hello")
    assert read_checked(path) == b"hello"
    path.write_bytes(b"hellO")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_checked(path) is None
    assert "does not match its checksum" in str(caught[0].message)
    assert read_checked(tmp_path / "missing.txt") is None


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GLOWQ_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GLOWQ_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "glowq"
