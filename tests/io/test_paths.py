import os

import pytest

from edkm.errors import InputError
from edkm.io.paths import cache_dir, existing_path, set_offline_env


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDKM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDKM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "edkm"


def test_offline_env_keeps_a_users_choice(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    set_offline_env()
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_existing_path(tmp_path):
    assert existing_path(tmp_path, "folder") == tmp_path
    with pytest.raises(InputError, match=r"^data path '.*nope' does not exist \(hint\)$"):
        existing_path(tmp_path / "nope", "data path", " (hint)")
