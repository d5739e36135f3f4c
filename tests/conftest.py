"""Shared fixtures: a throw-away pseudonymisation key for every test (never the user's own in
~/.config/ctpa-vq), and a saved untrained `tiny` model for the command-line tests."""

from __future__ import annotations

import pytest
import torch

from ctpa_vq import VQGAN3D

from ctpa_vq.data.privacy import KEY_FILE_ENV


@pytest.fixture(autouse=True)
def _pseudonym_key_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path_factory.getbasetemp() / "pseudonym.key"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved untrained `tiny` model (seed 0)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    VQGAN3D.from_preset("tiny").save_pretrained(path)
    return path
