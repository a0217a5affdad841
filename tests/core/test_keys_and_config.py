"""Key files, key ids, strict JSON and the config schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeseal.core.config import Config, load_config
from edgeseal.core.encoding import parse_json_object
from edgeseal.core.errors import ConfigError, KeyFileError
from edgeseal.core.keys import (
    SoftwareSigner,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_pem,
    verify_raw_signature,
    write_private_key,
)


def test_key_ids_are_stable_digests_of_the_public_key():
    key = generate_private_key()
    pub = load_public_key(public_key_pem(key.public_key()))
    assert key_id(pub) == key_id(key.public_key())
    assert len(key_id(pub)) == 64
    assert key_id(generate_private_key().public_key()) != key_id(pub)


def test_private_keys_are_written_0600_and_encrypted_with_a_passphrase(tmp_path: Path):
    key = generate_private_key()
    write_private_key(tmp_path / "k", key, passphrase=b"s3cret")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "k").read_bytes()
    loaded = load_private_key(tmp_path / "k", passphrase=b"s3cret")
    assert key_id(loaded.public_key()) == key_id(key.public_key())
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(tmp_path / "k", passphrase=b"guess")
    with pytest.raises(KeyFileError, match="encrypted"):
        load_private_key(tmp_path / "k", passphrase=None)


def test_world_readable_private_keys_are_refused(tmp_path: Path):
    write_private_key(tmp_path / "k", generate_private_key(), passphrase=None)
    (tmp_path / "k").chmod(0o604)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(tmp_path / "k", passphrase=None)


def test_a_missing_or_garbage_key_file_is_a_key_file_error(tmp_path: Path):
    with pytest.raises(KeyFileError, match="does not exist"):
        load_private_key(tmp_path / "nope", passphrase=None)
    (tmp_path / "junk").write_bytes(b"not a key")
    (tmp_path / "junk").chmod(0o600)
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "junk", passphrase=None)


def test_non_p256_public_keys_are_refused():
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        load_public_key(public_key_pem(other))  # type: ignore[arg-type]


def test_raw_signatures_verify_and_tampered_ones_do_not():
    signer = SoftwareSigner(generate_private_key())
    sig = signer.sign(b"message")
    assert len(sig) == 64
    assert verify_raw_signature(signer.public_key, sig, b"message")
    assert not verify_raw_signature(signer.public_key, sig, b"messagf")
    assert not verify_raw_signature(signer.public_key, sig[:-1], b"message")


def test_strict_json_refuses_duplicate_keys_and_nan():
    with pytest.raises(ValueError, match="duplicate"):
        parse_json_object(b'{"a":1,"a":2}', "doc")
    with pytest.raises(ValueError):
        parse_json_object(b'{"a":NaN}', "doc")
    with pytest.raises(ValueError, match="object"):
        parse_json_object(b"[1]", "doc")


def test_config_defaults_and_overrides():
    assert load_config() == Config()
    cfg = load_config(
        text="[bundle]\nchunk_bytes = 65536\n[runtime]\nproviders = ['CPUExecutionProvider']\n"
    )
    assert cfg.bundle.chunk_bytes == 65536
    assert cfg.limits.max_manifest_bytes == 16 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[bundel]\n", "unknown table"),
        ("[bundle]\nchunk_byte = 1\n", "unknown key bundle.chunk_byte"),
        ("[bundle]\nchunk_bytes = '1 MiB'\n", "must be a int"),
        ("[bundle]\nchunk_bytes = 10\n", "between"),
        ("[limits]\nmax_recipients = -1\n", "positive"),
        ("[device]\nkey_store = 'usb'\n", "software, tpm or pkcs11"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_the_offending_key(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(text=text)


def test_symbolic_dimensions_are_bounded_by_their_calibrated_size():
    """A model with a free width: calibrated at 32 wide, a call may carry max_rows rows at
    profile_dim_factor (4) times that width, never a width thousands of times larger."""
    import numpy as np
    import pytest

    from edgeseal.core.manifest import TensorSpec
    from edgeseal.core.profile import InputTooLargeError, compile_profile, make_profile

    spec = TensorSpec("x", "float32", ("N", 3, "W"))
    calib = np.random.default_rng(1).standard_normal((16, 3, 32)).astype(np.float32)
    checks = compile_profile(make_profile({"x": calib}), [spec], max_rows=8, range_margin=0)
    assert checks.max_elements == 8 * 3 * 128
    checks.check({"x": calib[:8]})
    checks.check({"x": np.zeros((1, 3, 1024), np.float32)})  # wider, within the bound
    with pytest.raises(InputTooLargeError):
        checks.check({"x": np.zeros((1, 3, 1 << 20), np.float32)})
    capped = compile_profile({}, [spec], max_rows=8, max_elements=1000)
    assert capped.max_elements == 1000  # no calibrated size: the configured cap
    with pytest.raises(InputTooLargeError):
        capped.check({"x": np.zeros((1, 3, 400), np.float32)})
