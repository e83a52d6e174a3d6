"""Model sources: the embedded default's cache folder, pass-through ids and fingerprints.

The real conversion runs in tests/test_embedded.py (slow); here the cache is a temp folder.
"""

from __future__ import annotations

import shutil

import pytest

from pipeline import digest, models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRACE_CACHE", str(tmp_path))
    return tmp_path


def test_cache_follows_retrace_cache(cache):
    assert models.embedded_dir().parent == cache / "models"
    assert models.embedded_dir().name.startswith("gemma-3-270m-q4_k_m-")


def test_unprepared_embedded_says_how_to_prepare(cache):
    with pytest.raises(FileNotFoundError, match="run `retrace models prepare`"):
        models.resolve_model_path("embedded")


def test_half_converted_folder_is_not_prepared(cache):
    # A conversion killed before its marker was written must not be used.
    folder = models.embedded_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        models.resolve_model_path("embedded")
    (folder / "retrace_model.json").write_text("{}")
    assert models.resolve_model_path("embedded") == str(folder)
    assert models.prepare_embedded() == folder  # already prepared: no work


def test_hub_ids_and_folders_pass_through(tmp_path):
    assert models.resolve_model_path("google/gemma-2-27b-it", "main") == "google/gemma-2-27b-it"
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.model_id("google/gemma-2-27b-it", "abc") == "google/gemma-2-27b-it@abc"
    assert models.model_id("embedded") == models.EMBEDDED_ID


def test_fingerprint_tracks_every_file_by_content(tiny_model_dir, tmp_path, cache):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    base = models.fingerprint(str(folder))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    with_template = models.fingerprint(str(folder))
    assert with_template != base
    # Weights saved over with other bytes of the same size are other weights.
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models.fingerprint(str(folder)) != with_template
    assert models.fingerprint("google/gemma-2-27b-it", "r1") == {
        "model": "google/gemma-2-27b-it",
        "revision": "r1",
    }
    assert models.fingerprint("embedded")["source_sha256"]


def test_an_unchanged_folder_is_not_read_again(tiny_model_dir, tmp_path, cache, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    first = models.fingerprint(str(folder))

    def no_reading(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(digest, "sha256_file", no_reading)
    assert models.fingerprint(str(folder)) == first  # size, mtime and inode still match
    (folder / "config.json").write_text("{}")
    with pytest.raises(AssertionError, match="config.json again"):
        models.fingerprint(str(folder))
