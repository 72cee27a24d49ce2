"""Signed receipts: offline verification, tamper detection, rotation, persistence, CLI."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing.receipts import (
    ReceiptInvalid,
    ReceiptSigner,
    receipt_verify_main,
    request_hash,
    verify_receipt,
)

REPO = Path(__file__).resolve().parents[2]
# The project's virtualenv interpreter, as an operator would run the CLI.
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
if not VENV_PYTHON.exists():  # e.g. CI installs into another environment
    VENV_PYTHON = Path(sys.executable)
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def signer(tmp_path: Path) -> ReceiptSigner:
    return ReceiptSigner(tmp_path / "keys")


def _req_hash() -> str:
    return request_hash("POST", "/proxy/svc-1/v1/chat?stream=1", hashlib.sha256(b"{}").hexdigest())


def _sign(signer: ReceiptSigner, usage_id: str = "use_01", amount: int = 1500) -> str:
    return signer.sign(
        usage_id=usage_id,
        service_id="svc-1",
        buyer_id="buyer-7",
        amount_units=amount,
        asset="USDC",
        timestamp_unix=1_700_000_000,
        request_hash_hex=_req_hash(),
    )


def test_sign_then_verify_offline_with_only_the_public_document(signer: ReceiptSigner) -> None:
    receipt = _sign(signer)
    # Round-trip the document through JSON text, as a buyer fetching it would, and
    # drop the signer: verification needs nothing else.
    doc = json.loads(json.dumps(signer.public_keys_document()))
    kid = signer.active_kid
    del signer

    payload = verify_receipt(receipt, doc)
    assert payload == {
        "v": 1,
        "kid": kid,
        "usage_id": "use_01",
        "service_id": "svc-1",
        "buyer_id": "buyer-7",
        "amount": "1500",
        "asset": "USDC",
        "ts": 1_700_000_000,
        "req": _req_hash(),
    }
    # Fits one header: ASCII, no separators a header parser would split on.
    assert receipt.isascii() and all(c in B64URL_ALPHABET + "." for c in receipt)


def test_payload_is_canonical_json(signer: ReceiptSigner) -> None:
    payload_part = _sign(signer).split(".")[0]
    raw = _unb64(payload_part)
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()


def test_amount_larger_than_js_safe_integers_survives(signer: ReceiptSigner) -> None:
    amount = 45_000_000_000_000_000  # all ADA in lovelace: above 2**53
    payload = verify_receipt(_sign(signer, amount=amount), signer.public_keys_document())
    assert int(payload["amount"]) == amount


def test_public_keys_document_shape(signer: ReceiptSigner) -> None:
    doc = signer.public_keys_document()
    assert doc == signer.jwks()
    [key] = doc["keys"]
    assert key["kid"] == signer.active_kid
    assert key["alg"] == "Ed25519"
    assert key["status"] == "active"
    assert isinstance(key["created_at"], int)
    pub = _unb64(key["x"])
    assert len(pub) == 32
    assert key["kid"] == hashlib.sha256(pub).hexdigest()[:16]
    assert "d" not in key and not any("seed" in k or "private" in k for k in key)


def test_changing_any_character_of_the_receipt_fails(signer: ReceiptSigner) -> None:
    doc = signer.public_keys_document()
    samples = [_sign(signer, usage_id=f"use_{i}", amount=i * 37 + 1) for i in range(3)]
    tried = 0
    for receipt in samples:
        verify_receipt(receipt, doc)
        for pos, original in enumerate(receipt):
            # Every other base64url character and the separator, at every position:
            # this includes the spellings that differ only in the unused low bits of
            # the last character of each part, which a lax decoder would accept.
            for replacement in B64URL_ALPHABET + ".":
                if replacement == original:
                    continue
                tampered = receipt[:pos] + replacement + receipt[pos + 1 :]
                with pytest.raises(ReceiptInvalid):
                    verify_receipt(tampered, doc)
                tried += 1
            for junk in ("=", " x", "\x00", "é"):
                with pytest.raises(ReceiptInvalid):
                    verify_receipt(receipt[:pos] + junk + receipt[pos + 1 :], doc)
    # Each position saw all 64 alternatives (63 other letters plus the separator).
    assert tried == sum(len(r) for r in samples) * 64


def test_changing_any_decoded_byte_fails(signer: ReceiptSigner) -> None:
    doc = signer.public_keys_document()
    receipt = _sign(signer)
    payload_part, sig_part = receipt.split(".")
    payload, sig = _unb64(payload_part), _unb64(sig_part)
    for i in range(len(payload)):
        for flip in (0x01, 0x80, 0xFF):
            changed = bytearray(payload)
            changed[i] ^= flip
            with pytest.raises(ReceiptInvalid):
                verify_receipt(_b64(bytes(changed)) + "." + sig_part, doc)
    for i in range(len(sig)):
        for flip in (0x01, 0x80, 0xFF):
            changed = bytearray(sig)
            changed[i] ^= flip
            with pytest.raises(ReceiptInvalid, match="bad signature|signature"):
                verify_receipt(payload_part + "." + _b64(bytes(changed)), doc)


def test_re_serialized_payload_with_same_meaning_is_rejected(signer: ReceiptSigner) -> None:
    # Same JSON value, different bytes: the signature no longer covers it, and we
    # also refuse non-canonical spellings up front.
    doc = signer.public_keys_document()
    payload_part, sig_part = _sign(signer).split(".")
    pretty = json.dumps(json.loads(_unb64(payload_part)), indent=1).encode()
    with pytest.raises(ReceiptInvalid, match="canonical"):
        verify_receipt(_b64(pretty) + "." + sig_part, doc)


def test_rotation_keeps_old_receipts_verifiable(signer: ReceiptSigner) -> None:
    old_kid = signer.active_kid
    old_receipt = _sign(signer, usage_id="before")

    new_kid = signer.rotate()
    assert new_kid == signer.active_kid != old_kid
    new_receipt = _sign(signer, usage_id="after")

    doc = signer.public_keys_document()
    statuses = {k["kid"]: k["status"] for k in doc["keys"]}
    assert statuses == {new_kid: "active", old_kid: "retired"}
    assert doc["keys"][0]["kid"] == new_kid

    assert verify_receipt(old_receipt, doc)["kid"] == old_kid
    assert verify_receipt(new_receipt, doc)["kid"] == new_kid

    signer.rotate()
    doc3 = signer.public_keys_document()
    assert len(doc3["keys"]) == 3
    assert verify_receipt(old_receipt, doc3)["usage_id"] == "before"
    assert verify_receipt(new_receipt, doc3)["usage_id"] == "after"


def test_unknown_kid_fails(tmp_path: Path) -> None:
    ours = ReceiptSigner(tmp_path / "ours")
    theirs = ReceiptSigner(tmp_path / "theirs")
    receipt = _sign(theirs)
    with pytest.raises(ReceiptInvalid, match="unknown key id"):
        verify_receipt(receipt, ours.public_keys_document())


def test_document_pairing_kid_with_another_key_fails(tmp_path: Path) -> None:
    ours = ReceiptSigner(tmp_path / "ours")
    theirs = ReceiptSigner(tmp_path / "theirs")
    receipt = _sign(theirs)
    # Someone swaps the public key under our kid for theirs: the kid no longer
    # derives from the key, so the document is refused.
    doc = ours.public_keys_document()
    doc["keys"][0]["kid"] = theirs.active_kid
    with pytest.raises(ReceiptInvalid, match="does not match its kid"):
        verify_receipt(receipt, doc)


def test_revoked_key_fails(signer: ReceiptSigner) -> None:
    receipt = _sign(signer)
    doc = signer.public_keys_document()
    doc["keys"][0]["status"] = "revoked"
    with pytest.raises(ReceiptInvalid, match="revoked"):
        verify_receipt(receipt, doc)


@pytest.mark.parametrize(
    "bad",
    ["", "no-dot", "a.b.c", ".", "abc.", ".abc", "x" * 9000, "AAAA.AAAA"],
)
def test_malformed_receipts_fail_with_reason(signer: ReceiptSigner, bad: str) -> None:
    with pytest.raises(ReceiptInvalid) as info:
        verify_receipt(bad, signer.public_keys_document())
    assert info.value.reason


def test_malformed_documents_fail(signer: ReceiptSigner) -> None:
    receipt = _sign(signer)
    for doc in ({}, {"keys": "x"}, {"keys": [1]}, {"keys": [{"kid": "a"}]}):
        with pytest.raises(ReceiptInvalid):
            verify_receipt(receipt, doc)  # type: ignore[arg-type]


def test_keyring_persists_across_reload(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    first = ReceiptSigner(key_dir)
    kid0 = first.active_kid
    receipt0 = _sign(first)
    kid1 = first.rotate()

    reopened = ReceiptSigner(key_dir)
    assert reopened.active_kid == kid1
    assert reopened.kids() == [kid1, kid0]
    assert reopened.public_keys_document()["keys"] == first.public_keys_document()["keys"]
    # The reopened signer signs with the same key, not a freshly minted one.
    receipt1 = _sign(reopened)
    doc = first.public_keys_document()
    assert verify_receipt(receipt1, doc)["kid"] == kid1
    assert verify_receipt(receipt0, doc)["kid"] == kid0

    # File format: <kid>.key with the seed hex, mode 0600; keyring.json names the active key.
    ring = json.loads((key_dir / "keyring.json").read_text())
    assert ring["active"] == kid1
    for kid in (kid0, kid1):
        key_file = key_dir / f"{kid}.key"
        assert len(bytes.fromhex(key_file.read_text().strip())) == 32
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_other_process_rotation_shows_in_document(tmp_path: Path) -> None:
    # Two workers share the key directory; one rotates. The other's published
    # document must list the new key, or the first worker's receipts would not verify.
    a = ReceiptSigner(tmp_path / "keys")
    b = ReceiptSigner(tmp_path / "keys")
    assert a.active_kid == b.active_kid
    new_kid = a.rotate()
    receipt = _sign(a)
    assert verify_receipt(receipt, b.public_keys_document())["kid"] == new_kid
    assert b.active_kid == new_kid


def test_retired_key_file_may_be_deleted(tmp_path: Path) -> None:
    signer = ReceiptSigner(tmp_path / "keys")
    old_kid = signer.active_kid
    receipt = _sign(signer)
    signer.rotate()
    (tmp_path / "keys" / f"{old_kid}.key").unlink()
    reopened = ReceiptSigner(tmp_path / "keys")
    assert verify_receipt(receipt, reopened.public_keys_document())["kid"] == old_kid


def test_refuses_key_files_without_keyring(tmp_path: Path) -> None:
    signer = ReceiptSigner(tmp_path / "keys")
    (tmp_path / "keys" / "keyring.json").unlink()
    with pytest.raises(Exception, match="keyring.json"):
        ReceiptSigner(tmp_path / "keys")
    del signer


def test_sign_rejects_bad_inputs(signer: ReceiptSigner) -> None:
    good = {
        "usage_id": "u",
        "service_id": "s",
        "buyer_id": "b",
        "amount_units": 1,
        "asset": "USDC",
        "timestamp_unix": 1,
        "request_hash_hex": _req_hash(),
    }
    for field, value in (
        ("usage_id", ""),
        ("amount_units", -1),
        ("amount_units", 1.5),
        ("amount_units", True),
        ("timestamp_unix", -5),
        ("request_hash_hex", "abc"),
    ):
        with pytest.raises(ValueError):
            signer.sign(**{**good, field: value})  # type: ignore[arg-type]


def test_request_hash_binds_each_part() -> None:
    body = hashlib.sha256(b"hello").hexdigest()
    base = request_hash("POST", "/a?b=1", body)
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == request_hash("post", "/a?b=1", body.upper())
    assert base != request_hash("GET", "/a?b=1", body)
    assert base != request_hash("POST", "/a?b=2", body)
    assert base != request_hash("POST", "/a?b=1", hashlib.sha256(b"bye").hexdigest())
    assert base != request_hash("POST", "/a?b=1", None)
    with pytest.raises(ValueError):
        request_hash("POST", "/", "not-a-digest")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_setup(tmp_path: Path, signer: ReceiptSigner) -> tuple[str, str, Path]:
    receipt = _sign(signer)
    doc_path = tmp_path / "tollway-receipt-keys.json"
    doc_path.write_text(json.dumps(signer.public_keys_document()))
    tampered = receipt[:10] + ("A" if receipt[10] != "A" else "B") + receipt[11:]
    return receipt, tampered, doc_path


def test_cli_in_process(
    cli_setup: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    receipt, tampered, doc_path = cli_setup
    assert receipt_verify_main([receipt, "--keys", str(doc_path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["usage_id"] == "use_01"

    assert receipt_verify_main([tampered, "--keys", str(doc_path)]) == 1
    err = capsys.readouterr().err
    assert "receipt invalid" in err

    assert receipt_verify_main([receipt, "--keys", str(doc_path.parent / "missing.json")]) == 1
    assert "cannot read key document" in capsys.readouterr().err

    assert receipt_verify_main([receipt]) == 2  # --keys is required


@pytest.fixture
def served_document(cli_setup: tuple[str, str, Path]) -> Iterator[str]:
    """A real local HTTP server serving the key document, as the proxy would."""
    _, _, doc_path = cli_setup
    body = doc_path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/.well-known/tollway-receipt-keys.json":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_with_keys_url(
    cli_setup: tuple[str, str, Path], served_document: str, capsys: pytest.CaptureFixture[str]
) -> None:
    receipt, tampered, _ = cli_setup
    url = served_document + "/.well-known/tollway-receipt-keys.json"
    assert receipt_verify_main([receipt, "--keys", url]) == 0
    assert json.loads(capsys.readouterr().out)["amount"] == "1500"
    assert receipt_verify_main([tampered, "--keys", url]) == 1
    assert receipt_verify_main([receipt, "--keys", served_document + "/nope"]) == 1
    assert "cannot read key document" in capsys.readouterr().err


def _run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from billing.receipts import receipt_verify_main; "
        "sys.exit(receipt_verify_main(sys.argv[1:]))"
    )
    return subprocess.run(
        [str(VENV_PYTHON), "-c", code, *args],
        check=False,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_as_subprocess(cli_setup: tuple[str, str, Path]) -> None:
    receipt, tampered, doc_path = cli_setup
    ok = _run_cli(receipt, "--keys", str(doc_path))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["buyer_id"] == "buyer-7"

    bad = _run_cli(tampered, "--keys", str(doc_path))
    assert bad.returncode == 1
    assert "receipt invalid" in bad.stderr and bad.stdout == ""

    from_stdin = _run_cli("-", "--keys", str(doc_path), stdin=receipt + "\n")
    assert from_stdin.returncode == 0, from_stdin.stderr


def test_workers_opening_an_empty_directory_agree_on_one_key(tmp_path: Path) -> None:
    # `--workers N` starts N processes on the same key directory at once; they must
    # all end up with the one first key, not each mint their own.
    key_dir = tmp_path / "keys"
    code = (
        "import sys; from billing.receipts import ReceiptSigner; "
        "print(ReceiptSigner(sys.argv[1]).active_kid)"
    )
    procs = [
        subprocess.Popen(
            [str(VENV_PYTHON), "-c", code, str(key_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    kids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(kids) == 1
    assert kids == {ReceiptSigner(key_dir).active_kid}
    assert len(list(key_dir.glob("*.key"))) == 1
