import logging
import os
import warnings

import pytest

warnings.filterwarnings("ignore")
logging.getLogger("torchrec").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory; none touches ~/.cache."""
    monkeypatch.setenv("FASTPLAN_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
