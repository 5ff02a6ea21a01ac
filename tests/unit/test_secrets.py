"""Sealed secrets and their redaction."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from veritech.errors import SecretError
from veritech.secrets import REDACTED, Keyring, PublicKeyInfo, Redactor, seal
from veritech.wire import SealedSecret


def sealed(value: str, keyring: Keyring) -> SealedSecret:
    return SealedSecret(**seal(value, keyring.public))


def test_seal_and_open_roundtrip() -> None:
    keyring = Keyring.generate()

    secret = sealed("pässwörd 🔑", keyring)

    assert secret.key_id == keyring.public.key_id
    assert "pässwörd" not in secret.sealed
    assert keyring.open("db", secret) == "pässwörd 🔑"


def test_sealing_twice_gives_different_ciphertexts() -> None:
    keyring = Keyring.generate()

    assert sealed("same", keyring).sealed != sealed("same", keyring).sealed


def test_open_all() -> None:
    keyring = Keyring.generate()

    opened = keyring.open_all({"a": sealed("1", keyring), "b": sealed("2", keyring)})

    assert opened == {"a": "1", "b": "2"}


def test_secret_for_another_key_id_is_refused() -> None:
    ours, theirs = Keyring.generate(), Keyring.generate()

    with pytest.raises(SecretError) as raised:
        ours.open("token", sealed("x", theirs))

    assert str(raised.value) == (
        f"secret 'token' is sealed for key {theirs.public.key_id}, "
        f"but this veritech holds key {ours.public.key_id}"
    )


def test_tampered_ciphertext_is_refused() -> None:
    keyring = Keyring.generate()
    secret = sealed("value", keyring)
    raw = bytearray(base64.b64decode(secret.sealed))
    raw[-1] ^= 1
    tampered = SealedSecret(
        sealed=base64.b64encode(bytes(raw)).decode(), key_id=secret.key_id
    )

    with pytest.raises(SecretError) as raised:
        keyring.open("token", tampered)

    assert str(raised.value) == (
        "secret 'token' could not be opened: it was altered or sealed for another key"
    )


def test_key_id_claimed_falsely_is_refused() -> None:
    ours, theirs = Keyring.generate(), Keyring.generate()
    forged = SealedSecret(
        sealed=seal("x", theirs.public)["sealed"], key_id=ours.public.key_id
    )

    with pytest.raises(SecretError, match="could not be opened"):
        ours.open("token", forged)


def test_ciphertext_that_is_not_base64_is_refused() -> None:
    keyring = Keyring.generate()
    bad = SealedSecret(sealed="not base64!", key_id=keyring.public.key_id)

    with pytest.raises(SecretError) as raised:
        keyring.open("token", bad)

    assert str(raised.value) == "secret 'token' is not valid base64"


def test_saved_keys_load_back_and_the_private_file_is_private(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    private, public = tmp_path / "v.key", tmp_path / "v.pub"

    keyring.save(private, public)

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "secret_key" not in json.loads(public.read_text())
    loaded = Keyring.load(private)
    assert loaded.public == keyring.public
    assert PublicKeyInfo.load(public) == keyring.public
    assert loaded.open("x", SealedSecret(**seal("v", PublicKeyInfo.load(public)))) == (
        "v"
    )


def test_save_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    private, public = tmp_path / "v.key", tmp_path / "v.pub"
    Keyring.generate().save(private, public)

    with pytest.raises(FileExistsError):
        Keyring.generate().save(private, public)


def test_loading_a_key_file_without_a_key_is_a_secret_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.key"
    path.write_text('{"key_id": "x"}')

    with pytest.raises(SecretError) as raised:
        Keyring.load(path)

    assert str(raised.value) == f"cannot load key file {path}: 'secret_key'"


def test_loading_a_key_that_is_not_base64_is_a_secret_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.key"
    path.write_text('{"secret_key": "!!"}')

    with pytest.raises(SecretError) as raised:
        Keyring.load(path)

    assert str(raised.value) == "secret_key is not valid base64"


def test_redactor_replaces_plain_text() -> None:
    redactor = Redactor(["s3cr3t"])

    assert redactor.text("token=s3cr3t; again s3cr3t") == (
        f"token={REDACTED}; again {REDACTED}"
    )
    assert redactor


def test_redactor_replaces_json_escaped_forms() -> None:
    secret = 'a"b\\c\nd\té'
    redactor = Redactor([secret])
    logged_ascii = json.dumps({"pw": secret})
    logged_utf8 = json.dumps({"pw": secret}, ensure_ascii=False)

    assert redactor.text(logged_ascii) == f'{{"pw": "{REDACTED}"}}'
    assert redactor.text(logged_utf8) == f'{{"pw": "{REDACTED}"}}'


def test_redactor_replaces_each_line_of_a_multi_line_secret() -> None:
    redactor = Redactor(["-----BEGIN-----\nABCDEF\n-----END-----"])

    assert redactor.text("ABCDEF") == REDACTED
    assert redactor.text("key: -----BEGIN-----") == f"key: {REDACTED}"


def test_redactor_prefers_the_longest_secret() -> None:
    redactor = Redactor(["abc", "abcdef"])

    assert redactor.text("xabcdefx") == f"x{REDACTED}x"


def test_redactor_walks_json_values_keys_included() -> None:
    redactor = Redactor(["pw1"])

    value = redactor.value({"pw1": ["a pw1", {"n": 1, "b": True, "s": "pw1"}, None]})

    assert value == {
        REDACTED: [f"a {REDACTED}", {"n": 1, "b": True, "s": REDACTED}, None]
    }


def test_empty_redactor_changes_nothing() -> None:
    redactor = Redactor(["", ""])
    value = {"a": ["b"]}

    assert not redactor
    assert redactor.value(value) is value
    assert redactor.text("anything") == "anything"
