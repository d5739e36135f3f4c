"""benchmarks/real_ct.py: NRRD into the canonical (D, H, W) layout, and a clear message offline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

nrrd = pytest.importorskip("nrrd")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_ct  # noqa: E402


def test_lps_nrrd_becomes_canonical_ras_zyx(tmp_path):
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)  # (x, y, z) as NRRD stores it
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.75, 2.0]),
              "space origin": np.array([10.0, 20.0, 30.0])}  # fmt: skip
    nrrd.write(str(tmp_path / "ct.nrrd"), data, header)
    ct = real_ct.read_nrrd_ct(tmp_path / "ct.nrrd")
    # LPS -> RAS flips x and y; the canonical array is (z, y, x)
    expected = data[::-1, ::-1, :].transpose(2, 1, 0)
    np.testing.assert_array_equal(ct.hu, expected)
    assert ct.spacing == (2.0, 0.75, 0.5)
    assert ct.hu.dtype == np.int16


def test_a_2d_nrrd_is_refused_by_name(tmp_path):
    nrrd.write(str(tmp_path / "slice.nrrd"), np.zeros((4, 3), dtype=np.int16))
    with pytest.raises(ValueError, match="slice.nrrd"):
        real_ct.read_nrrd_ct(tmp_path / "slice.nrrd")


def test_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CTPA_VQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if PyPI were unreachable
    with pytest.raises(real_ct.RealCTUnavailable) as err:
        real_ct.load_real_ct("lung1")
    message = str(err.value)
    assert "Offline?" in message and str(tmp_path / "cache") in message and real_ct.SDIST_FILE in message
