"""Ed25519 keys that sign run bundles (``kiln keys``, ``kiln export --sign``).

A key is ``NAME.key`` (the private key, PKCS#8 PEM, readable by its owner only)
and ``NAME.pub`` (the raw public key, base64) in the keys folder (``KILN_KEYS``,
else ``$XDG_CONFIG_HOME/kiln/keys`` or ``~/.config/kiln/keys``). A public key
there, made here or added with ``kiln keys add``, is a key this machine knows: a
bundle it signed verifies as "signed by NAME". A key is named in messages by its
fingerprint, the first 16 hex digits of the sha256 of its raw public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import ConfigError, ValidationError
from kiln.record.values import check_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    fingerprint: str
    public_key: str  # raw, base64
    private: bool  # whether this machine holds its private key


def keys_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where keys live: ``KILN_KEYS``, else the user's config folder."""
    env = os.environ if environ is None else environ
    if env.get("KILN_KEYS"):
        return Path(env["KILN_KEYS"]).expanduser().absolute()
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "kiln" / "keys"


def fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def create_key(folder: Path, name: str) -> Key:
    """A new key pair named ``name``; refused if one of that name exists."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    check_name("name", name)
    if (folder / f"{name}.key").exists() or (folder / f"{name}.pub").exists():
        raise ValidationError("name", f"a key named {name!r} exists already in {folder}")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return add_key(folder, name, base64.b64encode(raw).decode())


def add_key(folder: Path, name: str, public_key: str) -> Key:
    """Know a public key (someone else's, given as base64) by ``name``."""
    check_name("name", name)
    raw = _raw_public(public_key, "public_key")
    pub = folder / f"{name}.pub"
    if pub.exists() and pub.read_text().strip() != public_key.strip():
        raise ValidationError("name", f"a key named {name!r} exists already in {folder}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pub.write_text(public_key.strip() + "\n")
    return Key(name, fingerprint(raw), public_key.strip(), (folder / f"{name}.key").exists())


def list_keys(folder: Path) -> list[Key]:
    """The keys this machine knows, by name."""
    keys = []
    for pub in sorted(folder.glob("*.pub")):
        try:
            text = pub.read_text().strip()
            raw = _raw_public(text, pub.name)
        except (OSError, ValidationError):
            continue  # not a key of ours: not listed, never trusted
        keys.append(Key(pub.stem, fingerprint(raw), text, pub.with_suffix(".key").exists()))
    return keys


def sign(folder: Path, name: str, message: bytes) -> dict[str, str]:
    """A signature of ``message`` by key ``name``, with the public key to check it."""
    from cryptography.hazmat.primitives import serialization

    path = folder / f"{name}.key"
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(k.name for k in list_keys(folder) if k.private) or "none"
        raise ConfigError(
            "--sign",
            f"no private key {name!r} in {folder} (yours: {known}); "
            "make one with `kiln keys create NAME`",
        ) from None
    private: Ed25519PrivateKey = serialization.load_pem_private_key(pem, None)  # type: ignore[assignment]
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {
        "algorithm": "ed25519",
        "public_key": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(private.sign(message)).decode(),
    }


def check_signature(signature: Any, message: bytes) -> str:
    """The fingerprint of the key that signed ``message``; ValueError if it did not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(signature, dict) or signature.get("algorithm") != "ed25519":
        raise ValueError("the signature is not an ed25519 signature of this format")
    raw = _raw_public(signature.get("public_key"), "public_key")
    try:
        sig = base64.b64decode(str(signature.get("signature")), validate=True)
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
    except (InvalidSignature, binascii.Error, ValueError):
        raise ValueError("the signature does not match the bundle: it was changed") from None
    return fingerprint(raw)


def _raw_public(text: object, field: str) -> bytes:
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValidationError(field, "is not an ed25519 public key", allowed="32 bytes, base64")
    return raw
