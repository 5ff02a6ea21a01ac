"""Secrets sealed for veritech (libsodium sealed boxes, via PyNaCl).

A client seals each secret value with veritech's public key; only veritech can
open it. Veritech hands the opened values to the function and redacts every one
of them from output lines and the result before anything leaves veritech.
Plaintext lives only in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from veritech.errors import SecretError
from veritech.wire import SealedSecret

REDACTED = "[redacted]"


def key_id_of(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise SecretError(f"{what} is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class PublicKeyInfo:
    key_id: str
    public_key: str

    @classmethod
    def load(cls, path: Path) -> PublicKeyInfo:
        document = json.loads(path.read_text())
        return cls(document["key_id"], document["public_key"])


class Keyring:
    """Veritech's private key: opens sealed secrets addressed to it."""

    def __init__(self, private_key: PrivateKey) -> None:
        self._private_key = private_key
        self._box = SealedBox(private_key)
        public = bytes(private_key.public_key)
        self.public = PublicKeyInfo(key_id_of(public), _b64(public))

    @classmethod
    def generate(cls) -> Keyring:
        return cls(PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            document = json.loads(path.read_text())
            raw = _unb64(document["secret_key"], "secret_key")
            return cls(PrivateKey(raw))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecretError(f"cannot load key file {path}: {exc}") from exc

    def save(self, private_path: Path, public_path: Path) -> None:
        """Write the key pair; the private file is created with mode 0600."""
        secret = _b64(bytes(self._private_key))
        document = {**self._public_document(), "secret_key": secret}
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle)
        public_path.write_text(json.dumps(self._public_document()) + "\n")

    def _public_document(self) -> dict[str, str]:
        return {"key_id": self.public.key_id, "public_key": self.public.public_key}

    def open(self, name: str, secret: SealedSecret) -> str:
        if secret.key_id != self.public.key_id:
            raise SecretError(
                f"secret {name!r} is sealed for key {secret.key_id}, "
                f"but this veritech holds key {self.public.key_id}"
            )
        try:
            plain = self._box.decrypt(_unb64(secret.sealed, f"secret {name!r}"))
        except CryptoError as exc:
            raise SecretError(
                f"secret {name!r} could not be opened: it was altered or sealed "
                "for another key"
            ) from exc
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SecretError(f"secret {name!r} is not UTF-8 text") from exc

    def open_all(self, secrets: Mapping[str, SealedSecret]) -> dict[str, str]:
        return {name: self.open(name, sealed) for name, sealed in secrets.items()}


def seal(value: str, public: PublicKeyInfo) -> dict[str, str]:
    """Seal one secret value for the veritech holding ``public`` (client side)."""
    box = SealedBox(PublicKey(base64.b64decode(public.public_key)))
    return {"sealed": _b64(box.encrypt(value.encode("utf-8"))), "key_id": public.key_id}


class Redactor:
    """Replaces every secret value in strings, however deep in a JSON value."""

    def __init__(self, values: Iterable[str]) -> None:
        forms: set[str] = set()
        for value in values:
            # Output is split into lines, so each line of a multi-line secret
            # (a PEM key, say) is a secret of its own.
            for part in {value, *value.splitlines()}:
                if part:
                    forms.add(part)
                    # The JSON-escaped form is what appears when user code
                    # logs an object holding the secret.
                    forms.add(json.dumps(part, ensure_ascii=False)[1:-1])
                    forms.add(json.dumps(part)[1:-1])
        self._forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def text(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def value(self, value: Any) -> Any:
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.text(k): self.value(v) for k, v in value.items()}
        return value
