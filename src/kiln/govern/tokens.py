"""Opaque bearer tokens: ``kiln_<id>_<secret>``.

The id (12 hex) is visible, so a token can be named in listings, logs and the audit
log without being usable; the secret (256 random bits) is stored only as its
SHA-256 (a slow hash adds nothing to a secret this long) and compared in constant
time. A token that does not parse is refused before the store is asked.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "kiln_"
_TOKEN = re.compile(r"kiln_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def new_token() -> tuple[str, str, str]:
    """(id, the secret's hash, the whole token to hand out once)."""
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return token_id, digest(secret), f"{PREFIX}{token_id}_{secret}"


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    found = _TOKEN.fullmatch(token)
    return None if found is None else (found.group(1), found.group(2))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)
