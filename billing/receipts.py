"""Signed receipts: an ed25519 signature over what one charged call cost.

Every charged call gets an ``X-ACF-Receipt`` header. A buyer (or an auditor)
can check it offline against the public key document served at
``/.well-known/tollway-receipt-keys.json``, without trusting or reaching us.

Receipt wire format (one header value, ASCII only)::

    base64url(payload_json) "." base64url(signature)

* base64url is RFC 4648 section 5 without ``=`` padding, and must be the
  canonical encoding (unused trailing bits zero), so that no two receipt strings
  decode to the same bytes: otherwise a changed character could still verify.
* ``payload_json`` is canonical JSON (sorted keys, ``,``/``:`` separators, ASCII
  only). The signature is over these exact bytes; verifiers never re-serialize
  before checking, so the check is byte-stable across languages.
* Payload fields (version 1)::

    {"amount": "1500",         # decimal string, smallest unit of the asset
     "asset": "USDC",
     "buyer_id": "...", "kid": "<16 hex>", "req": "<sha256 hex>",
     "service_id": "...", "ts": 1700000000, "usage_id": "...", "v": 1}

  ``amount`` is a string (like x402 amounts) because receipts are read by
  JavaScript clients too, and integers above 2**53 lose precision there.

Key directory::

    <dir>/keyring.json   {"version": 1, "active": "<kid>",
                          "keys": [{"kid", "public_key", "created_at", "status",
                                    ["retired_at"]}]}
    <dir>/<kid>.key      the 32-byte ed25519 seed as hex, mode 0600

``kid`` is the first 16 hex characters of sha256(raw 32-byte public key).
Public keys are also kept in keyring.json so that a retired key's ``.key`` file
may be deleted (it is never needed again: verification only uses the public
half) while its receipts remain verifiable.

This module is billing-layer code: no aiohttp.web. The proxy sets the header and
serves ``public_keys_document()``; ``receipt_verify_main`` backs the
``tollway receipt verify`` command.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from billing.errors import BillingError

try:  # POSIX only; on other platforms concurrent first use is not guarded.
    import fcntl
except ImportError:  # pragma: no cover - not exercised on Linux
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RECEIPT_HEADER = "X-ACF-Receipt"
WELL_KNOWN_PATH = "/.well-known/tollway-receipt-keys.json"
ALG = "Ed25519"
PAYLOAD_VERSION = 1
KEYRING_FILE = "keyring.json"
KEYRING_VERSION = 1

STATUS_ACTIVE = "active"
STATUS_RETIRED = "retired"
# A key an operator marks "revoked" in the published document (e.g. after a
# leak) no longer verifies anything: receipts under it could be forged.
STATUS_REVOKED = "revoked"

# A header value far larger than any receipt we make is rejected before any
# decoding work, so the verifier cannot be made to chew on megabytes.
MAX_RECEIPT_CHARS = 8192
# Cap on a public key document fetched by the CLI.
MAX_KEYS_DOCUMENT_BYTES = 1 << 20

_PAYLOAD_FIELDS = frozenset(
    {"v", "kid", "usage_id", "service_id", "buyer_id", "amount", "asset", "ts", "req"}
)
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_KID_RE = re.compile(r"[0-9a-f]{16}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_AMOUNT_RE = re.compile(r"0|[1-9][0-9]*")


class ReceiptInvalid(BillingError):
    """A receipt failed verification; ``reason`` says why, in plain words."""

    status = 400
    code = "receipt_invalid"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class KeyringError(Exception):
    """The key directory is inconsistent; refusing beats silently minting a new key
    (which would make every receipt issued so far unverifiable against a fresh document)."""


# --------------------------------------------------------------------------- encoding


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode_strict(text: str, what: str) -> bytes:
    """Decode unpadded base64url, accepting only the one canonical spelling.

    The standard decoder ignores stray characters and the unused low bits of the
    last character; both would let a modified receipt string verify.
    """
    if not text or _B64URL_RE.fullmatch(text) is None:
        raise ReceiptInvalid(f"{what} is not unpadded base64url")
    if len(text) % 4 == 1:
        raise ReceiptInvalid(f"{what} has an impossible base64url length")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ReceiptInvalid(f"{what} is not valid base64url: {exc}") from None
    if _b64url_encode(raw) != text:
        raise ReceiptInvalid(f"{what} is not canonically base64url-encoded")
    return raw


def _canonical_json(obj: Any) -> bytes:
    # One spelling per value: this is what makes verification byte-stable.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def key_id(public_key: bytes) -> str:
    """The kid of a raw 32-byte ed25519 public key: 16 hex chars of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


# --------------------------------------------------------------------------- request hash


def request_hash(method: str, path_qs: str, body_sha256_hex: str | None) -> str:
    """sha256 hex of the request a receipt is bound to.

    ``path_qs`` should be the raw request target as received (path plus query,
    still percent-encoded, e.g. aiohttp's ``request.raw_path``), so the buyer can
    recompute it from what they sent. ``body_sha256_hex`` is None when the body
    was streamed through unhashed; that is encoded distinctly from any digest.
    The parts are framed as a JSON array so no choice of path can collide with
    another split of method/path/body.
    """
    if not method or not isinstance(method, str):
        raise ValueError("method must be a non-empty string")
    if not isinstance(path_qs, str):
        raise TypeError("path_qs must be a string")
    body: str | None = None
    if body_sha256_hex is not None:
        body = body_sha256_hex.lower()
        if _HEX64_RE.fullmatch(body) is None:
            raise ValueError("body_sha256_hex must be 64 hex characters")
    framed = _canonical_json(["tollway-request-v1", method.upper(), path_qs, body])
    return hashlib.sha256(framed).hexdigest()


# --------------------------------------------------------------------------- keyring


@dataclass(frozen=True)
class _KeyInfo:
    kid: str
    public_key: bytes
    created_at: int
    status: str
    retired_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kid": self.kid,
            "public_key": _b64url_encode(self.public_key),
            "created_at": self.created_at,
            "status": self.status,
        }
        if self.retired_at is not None:
            out["retired_at"] = self.retired_at
        return out


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Write to a temp file in the same directory and rename over the target, so a
    # crash never leaves a half-written keyring that would fail to load.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ReceiptSigner:
    """A keyring of ed25519 keys: one active signing key plus retired ones.

    Opening a directory loads the keyring, or creates the directory and a first
    key if there is none. Only the active SigningKey is held (in memory, built
    once) because ``sign`` runs on every charged call; retired keys are kept as
    public keys for the document only.
    """

    def __init__(self, key_dir: str | os.PathLike[str]):
        self.key_dir = Path(key_dir)
        # (kid, SigningKey) in one attribute, replaced in one assignment, so a
        # sign() racing a rotate() never pairs one key's kid with another's signature.
        self._active: tuple[str, SigningKey]
        self._keys: list[_KeyInfo]
        self._keyring_stamp: tuple[int, int, int] | None = None
        with self._locked():
            if not (self.key_dir / KEYRING_FILE).exists():
                self._create_first_key()
            self._load()

    # -- locking and persistence

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize create/rotate across processes sharing the directory.

        With ``--workers N`` every worker opens the same directory at start; without
        the lock two could each mint a "first" key and one's receipts would be
        signed by a key missing from the published document.
        """
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.key_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.key_dir / KEYRING_FILE)
        except FileNotFoundError:
            return None
        # os.replace gives a new inode, so this changes on every save.
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _create_first_key(self) -> None:
        stray = sorted(p.name for p in self.key_dir.glob("*.key"))
        if stray:
            raise KeyringError(
                f"{self.key_dir} has key files {stray} but no {KEYRING_FILE}; "
                "restore keyring.json rather than starting a new keyring"
            )
        seed, info = self._new_key(STATUS_ACTIVE)
        self._write_seed(info.kid, seed)
        self._save(info.kid, [info])

    @staticmethod
    def _new_key(status: str) -> tuple[bytes, _KeyInfo]:
        sk = SigningKey.generate()
        pub = bytes(sk.verify_key)
        return bytes(sk), _KeyInfo(key_id(pub), pub, int(time.time()), status)

    def _write_seed(self, kid: str, seed: bytes) -> None:
        path = self.key_dir / f"{kid}.key"
        # O_EXCL with mode 0600 at creation: the seed is never, even briefly,
        # readable by others, and an existing key file is never overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(seed.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _save(self, active_kid: str, keys: list[_KeyInfo]) -> None:
        doc = {
            "version": KEYRING_VERSION,
            "active": active_kid,
            "keys": [k.to_json() for k in keys],
        }
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        _write_atomic(self.key_dir / KEYRING_FILE, data, 0o600)

    def _load(self) -> None:
        path = self.key_dir / KEYRING_FILE
        stamp = self._stamp()
        try:
            doc = json.loads(path.read_text())
            active = doc["active"]
            entries = doc["keys"]
            if doc.get("version") != KEYRING_VERSION:
                raise KeyringError(f"{path}: unsupported keyring version {doc.get('version')!r}")
            keys = [
                _KeyInfo(
                    kid=e["kid"],
                    public_key=base64.urlsafe_b64decode(e["public_key"] + "=="),
                    created_at=int(e["created_at"]),
                    status=e["status"],
                    retired_at=e.get("retired_at"),
                )
                for e in entries
            ]
        except KeyringError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyringError(f"{path} is unreadable or malformed: {exc}") from exc
        for k in keys:
            if len(k.public_key) != 32 or key_id(k.public_key) != k.kid:
                raise KeyringError(f"{path}: key {k.kid!r} does not match its public key")
        by_kid = {k.kid: k for k in keys}
        if active not in by_kid or by_kid[active].status != STATUS_ACTIVE:
            raise KeyringError(f"{path}: active key {active!r} is not listed as active")
        if sum(k.status == STATUS_ACTIVE for k in keys) != 1:
            raise KeyringError(f"{path}: exactly one key must be active")

        seed_path = self.key_dir / f"{active}.key"
        try:
            seed = bytes.fromhex(seed_path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise KeyringError(f"cannot read the active key seed {seed_path}: {exc}") from exc
        if len(seed) != 32:
            raise KeyringError(f"{seed_path}: the seed must be 32 bytes")
        if os.stat(seed_path).st_mode & 0o077:
            # Warn, not refuse: secret volumes (e.g. Kubernetes) often mount 0644.
            log.warning("receipt key %s is readable by group/others", seed_path)
        sk = SigningKey(seed)
        if bytes(sk.verify_key) != by_kid[active].public_key:
            raise KeyringError(f"{seed_path} does not hold the key listed for kid {active}")

        # Swap in complete state at the end, so a failed reload leaves the old
        # keyring in use.
        self._active = (active, sk)
        self._keys = keys
        self._keyring_stamp = stamp

    # -- public API

    @property
    def active_kid(self) -> str:
        return self._active[0]

    def kids(self) -> list[str]:
        """All kids, active first, then retired newest first."""
        return [k.kid for k in self._ordered_keys()]

    def reload(self) -> None:
        """Re-read the directory (another process may have rotated)."""
        with self._locked():
            self._load()

    def refresh_if_changed(self) -> bool:
        """Reload if keyring.json changed on disk since we read it; one stat() call."""
        if self._stamp() == self._keyring_stamp:
            return False
        self.reload()
        return True

    def rotate(self) -> str:
        """Make a new active key; the previous ones stay as retired. Returns the new kid."""
        with self._locked():
            # Start from what is on disk, not from memory: another worker may have
            # rotated already, and its key must not drop out of the keyring.
            self._load()
            now = int(time.time())
            seed, new = self._new_key(STATUS_ACTIVE)
            keys = [
                _KeyInfo(k.kid, k.public_key, k.created_at, STATUS_RETIRED, now)
                if k.status == STATUS_ACTIVE
                else k
                for k in self._keys
            ]
            keys.append(new)
            # Seed file first, then the keyring that points at it: a crash in
            # between leaves an unused key file, never a keyring naming a missing seed.
            self._write_seed(new.kid, seed)
            self._save(new.kid, keys)
            self._load()
            return new.kid

    def sign(
        self,
        usage_id: str,
        service_id: str,
        buyer_id: str,
        amount_units: int,
        asset: str,
        timestamp_unix: int,
        request_hash_hex: str,
    ) -> str:
        """The ``X-ACF-Receipt`` header value for one charged call."""
        for name, value in (
            ("usage_id", usage_id),
            ("service_id", service_id),
            ("buyer_id", buyer_id),
            ("asset", asset),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        # bool is an int subclass; True as an amount is a bug, not a charge of 1.
        if not isinstance(amount_units, int) or isinstance(amount_units, bool) or amount_units < 0:
            raise ValueError("amount_units must be a non-negative int (smallest unit)")
        if (
            not isinstance(timestamp_unix, int)
            or isinstance(timestamp_unix, bool)
            or timestamp_unix < 0
        ):
            raise ValueError("timestamp_unix must be a non-negative int")
        req = request_hash_hex.lower() if isinstance(request_hash_hex, str) else ""
        if _HEX64_RE.fullmatch(req) is None:
            raise ValueError("request_hash_hex must be 64 hex characters")
        kid, sk = self._active  # one read: see __init__
        payload = _canonical_json(
            {
                "v": PAYLOAD_VERSION,
                "kid": kid,
                "usage_id": usage_id,
                "service_id": service_id,
                "buyer_id": buyer_id,
                "amount": str(amount_units),
                "asset": asset,
                "ts": timestamp_unix,
                "req": req,
            }
        )
        signature = sk.sign(payload).signature
        return _b64url_encode(payload) + "." + _b64url_encode(signature)

    def _ordered_keys(self) -> list[_KeyInfo]:
        active = [k for k in self._keys if k.status == STATUS_ACTIVE]
        others = sorted(
            (k for k in self._keys if k.status != STATUS_ACTIVE),
            key=lambda k: (k.created_at, k.kid),
            reverse=True,
        )
        return active + others

    def public_keys_document(self) -> dict[str, Any]:
        """The JSON for ``/.well-known/tollway-receipt-keys.json``.

        Shaped as a JWK Set (kty OKP, crv Ed25519, ``x`` = base64url public key;
        "Ed25519" is also the fully-specified JOSE alg name), plus created_at and
        status, so generic JOSE tooling can read it too. It picks up a rotation
        done by another process sharing the key directory.
        """
        self.refresh_if_changed()
        keys = []
        for k in self._ordered_keys():
            entry: dict[str, Any] = {
                "kid": k.kid,
                "kty": "OKP",
                "crv": "Ed25519",
                "alg": ALG,
                "use": "sig",
                "x": _b64url_encode(k.public_key),
                "created_at": k.created_at,
                "status": k.status,
            }
            if k.retired_at is not None:
                entry["retired_at"] = k.retired_at
            keys.append(entry)
        return {"active_kid": self.active_kid, "keys": keys}

    def jwks(self) -> dict[str, Any]:
        """Alias of ``public_keys_document()``."""
        return self.public_keys_document()


# --------------------------------------------------------------------------- verification


def _verify_keys(public_keys_document: Any) -> dict[str, tuple[VerifyKey, str]]:
    """kid -> (VerifyKey, status) from a public key document, checking its shape."""
    if not isinstance(public_keys_document, dict) or not isinstance(
        public_keys_document.get("keys"), list
    ):
        raise ReceiptInvalid('public key document has no "keys" list')
    out: dict[str, tuple[VerifyKey, str]] = {}
    for entry in public_keys_document["keys"]:
        if not isinstance(entry, dict):
            raise ReceiptInvalid("public key document has a key entry that is not an object")
        kid, x = entry.get("kid"), entry.get("x")
        if not isinstance(kid, str) or not isinstance(x, str):
            raise ReceiptInvalid('public key document has a key without "kid" or "x"')
        if entry.get("alg", ALG) not in (ALG, "EdDSA") or entry.get("crv", "Ed25519") != "Ed25519":
            continue  # not ours to use; a receipt naming it fails as unknown kid
        try:
            pub = _b64url_decode_strict(x, f"public key {kid}")
        except ReceiptInvalid as exc:
            raise ReceiptInvalid(f"public key document: {exc.reason}") from None
        # The kid is derived from the key, so a document pairing a kid with some
        # other key (by error or by tampering) is caught here.
        if len(pub) != 32 or key_id(pub) != kid:
            raise ReceiptInvalid(f"public key document: key {kid} does not match its kid")
        out[kid] = (VerifyKey(pub), str(entry.get("status", STATUS_ACTIVE)))
    return out


def _check_payload(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise ReceiptInvalid("payload is not a JSON object")
    if payload.get("v") != PAYLOAD_VERSION:
        raise ReceiptInvalid(f"unsupported receipt version {payload.get('v')!r}")
    keys = set(payload)
    if keys != _PAYLOAD_FIELDS:
        missing, extra = sorted(_PAYLOAD_FIELDS - keys), sorted(keys - _PAYLOAD_FIELDS)
        raise ReceiptInvalid(f"payload fields wrong (missing {missing}, unexpected {extra})")
    for name in ("usage_id", "service_id", "buyer_id", "asset"):
        if not isinstance(payload[name], str) or not payload[name]:
            raise ReceiptInvalid(f"payload {name} is not a non-empty string")
    if not isinstance(payload["kid"], str) or _KID_RE.fullmatch(payload["kid"]) is None:
        raise ReceiptInvalid("payload kid is not 16 lowercase hex characters")
    if not isinstance(payload["amount"], str) or _AMOUNT_RE.fullmatch(payload["amount"]) is None:
        raise ReceiptInvalid("payload amount is not a decimal integer string")
    ts = payload["ts"]
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise ReceiptInvalid("payload ts is not a non-negative integer")
    if not isinstance(payload["req"], str) or _HEX64_RE.fullmatch(payload["req"]) is None:
        raise ReceiptInvalid("payload req is not a 64-character lowercase hex digest")


def verify_receipt(receipt: str, public_keys_document: dict[str, Any]) -> dict[str, Any]:
    """Verify a receipt offline against a public key document; return its payload.

    Pure: needs no signer, key directory or network. Raises ReceiptInvalid with
    the reason on any malformation, unknown or revoked kid, or bad signature.
    The returned payload is exactly what was signed (``amount`` is a string).
    """
    if not isinstance(receipt, str):
        raise ReceiptInvalid("receipt is not a string")
    receipt = receipt.strip()  # tolerate a trailing newline from copy/paste or a shell
    if len(receipt) > MAX_RECEIPT_CHARS:
        raise ReceiptInvalid(f"receipt is longer than {MAX_RECEIPT_CHARS} characters")
    parts = receipt.split(".")
    if len(parts) != 2:
        raise ReceiptInvalid('receipt must be two base64url parts joined by "."')
    payload_bytes = _b64url_decode_strict(parts[0], "payload")
    signature = _b64url_decode_strict(parts[1], "signature")
    if len(signature) != 64:
        raise ReceiptInvalid(f"signature is {len(signature)} bytes, expected 64")
    try:
        payload = json.loads(payload_bytes.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ReceiptInvalid("payload is not ASCII JSON") from None
    # Only the canonical spelling is accepted, so a receipt has exactly one form.
    try:
        canonical = _canonical_json(payload)
    except (TypeError, ValueError):
        raise ReceiptInvalid("payload is not canonical JSON") from None
    if canonical != payload_bytes:
        raise ReceiptInvalid("payload is not canonical JSON")
    _check_payload(payload)

    keys = _verify_keys(public_keys_document)
    kid = payload["kid"]
    if kid not in keys:
        raise ReceiptInvalid(f"unknown key id {kid}: not in the public key document")
    verify_key, status = keys[kid]
    if status == STATUS_REVOKED:
        raise ReceiptInvalid(f"key {kid} is revoked")
    try:
        verify_key.verify(payload_bytes, signature)
    except BadSignatureError:
        raise ReceiptInvalid(f"bad signature for key {kid}") from None
    return payload


# --------------------------------------------------------------------------- CLI


def _load_keys_document(source: str) -> dict[str, Any]:
    """Read the public key document from a file path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        req = urllib.request.Request(source, headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=15) as resp:
            data = resp.read(MAX_KEYS_DOCUMENT_BYTES + 1)
    else:
        with open(source, "rb") as fh:
            data = fh.read(MAX_KEYS_DOCUMENT_BYTES + 1)
    if len(data) > MAX_KEYS_DOCUMENT_BYTES:
        raise ValueError(f"key document is larger than {MAX_KEYS_DOCUMENT_BYTES} bytes")
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise TypeError("key document is not a JSON object")
    return doc


def receipt_verify_main(argv: Sequence[str] | None = None) -> int:
    """``tollway receipt verify <receipt> --keys <file-or-URL>``.

    Prints the payload as JSON on stdout and returns 0 if the receipt verifies;
    prints the reason on stderr and returns 1 if it does not or the key document
    cannot be read; returns 2 on a usage error (argparse convention).
    ``<receipt>`` may be ``-`` to read it from stdin.
    """
    parser = argparse.ArgumentParser(
        prog="tollway receipt verify",
        description="Verify a Tollway signed receipt offline against a public key document.",
    )
    parser.add_argument("receipt", help=f"the {RECEIPT_HEADER} header value, or - for stdin")
    parser.add_argument(
        "--keys",
        required=True,
        help=f"file or http(s) URL of the public key document ({WELL_KNOWN_PATH})",
    )
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # the hosting CLI wants a return code, not an exit
        return int(exc.code or 0)

    receipt = sys.stdin.read() if args.receipt == "-" else args.receipt
    try:
        doc = _load_keys_document(args.keys)
    except (OSError, urllib.error.URLError, ValueError, TypeError) as exc:
        print(f"cannot read key document {args.keys}: {exc}", file=sys.stderr)
        return 1
    try:
        payload = verify_receipt(receipt, doc)
    except ReceiptInvalid as exc:
        print(f"receipt invalid: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0
