"""benchmarks/real_ct.py: a clear message when the real volumes cannot be fetched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_ct  # noqa: E402


def test_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CTPA_VQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if PyPI were unreachable
    with pytest.raises(real_ct.RealCTUnavailable) as err:
        real_ct.load_real_ct("lung1")
    message = str(err.value)
    assert "Offline?" in message and str(tmp_path / "cache") in message and real_ct.SDIST_FILE in message
