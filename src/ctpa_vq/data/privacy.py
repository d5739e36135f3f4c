"""Pseudonyms for patient identifiers: a keyed hash (HMAC-SHA256) with a key the user keeps.

Prepared datasets, logs and printed tables carry ``pseudonym(name)`` instead of a patient id or
a file path. Without the key nobody can go from a pseudonym back to a name, not even by hashing
guessed names (which a plain hash would allow); with it, the user recomputes the pseudonym of a
name they hold (``PseudonymKey.load().pseudonym("patient07")``) to find its rows.

The key is 32 random bytes, hex-encoded, in a file: ``$CTPA_VQ_KEY_FILE`` if set, else
``$XDG_CONFIG_HOME/ctpa-vq/pseudonym.key`` (``~/.config/...``). It is created (mode 0600) on
first use, with a message saying where; keep it to map pseudonyms back, and use the same key
for every dataset that must share pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

KEY_FILE_ENV = "CTPA_VQ_KEY_FILE"
_KEY_BYTES = 32
PSEUDONYM_HEX = 16  # 64 bits: collisions need about 4e9 identifiers


def default_key_path() -> Path:
    """``$CTPA_VQ_KEY_FILE``, else ``$XDG_CONFIG_HOME/ctpa-vq/pseudonym.key`` (default ``~/.config``)."""
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "ctpa-vq" / "pseudonym.key"


@dataclass(frozen=True)
class PseudonymKey:
    """The secret key of the keyed hash, and where it is kept."""

    secret: bytes
    path: Path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, create: bool = True) -> "PseudonymKey":
        """Read the key at ``path`` (default :func:`default_key_path`); create it there if missing.

        Raises:
            FileNotFoundError: no key at ``path`` and ``create`` is False.
            ValueError: the file does not hold a hex key of at least 16 bytes.
        """
        path = Path(path).expanduser() if path is not None else default_key_path()
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"{path}: no pseudonymisation key")
            return cls._create(path)
        try:
            text = path.read_text(encoding="ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a pseudonymisation key (not text: expected at least 32 hex digits on "
                             "one line)") from None
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) < 16:
            raise ValueError(f"{path}: not a pseudonymisation key (expected at least 32 hex digits on one line)")
        return cls(secret, path)

    @classmethod
    def _create(cls, path: Path) -> "PseudonymKey":
        secret = secrets.token_bytes(_KEY_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once never overwrite each other's key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path, create=False)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
        print(f"ctpa-vq: created a pseudonymisation key at {path}; keep it (and keep it private) to map "
              f"pseudonyms back to patients, and set {KEY_FILE_ENV} to use another key", file=sys.stderr)
        return cls(secret, path)

    def pseudonym(self, identifier: str) -> str:
        """``"p"`` + the first 16 hex digits of HMAC-SHA256(key, identifier); stable for a given key."""
        digest = hmac.new(self.secret, identifier.encode("utf-8"), hashlib.sha256).hexdigest()
        return "p" + digest[:PSEUDONYM_HEX]
