"""Every test pseudonymises with a throw-away key, never the user's own (~/.config/ctpa-vq)."""

from __future__ import annotations

import pytest

from ctpa_vq.privacy import KEY_FILE_ENV


@pytest.fixture(autouse=True)
def _pseudonym_key_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path_factory.getbasetemp() / "pseudonym.key"))
