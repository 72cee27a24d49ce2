"""Who a Cardano address is: its payment credential, and proof of holding its key.

An invoice is bound to its payer (``billing.payer_proof``); on Cardano the
payer is identified by the *payment key hash* of their address, not by the
address string. The same key has a mainnet and a testnet spelling, with or
without a stake part, and every one of them is the same person; a script
credential has no key and so can neither sign a CIP-8 message nor be a payer.

The proof is a CIP-30 ``signData`` result: a COSE_Sign1 (CIP-8) over the
invoice message, with the COSE_Key beside it (or the key in the ``kid``
header, as ``pycardano.cip.cip8.sign`` makes without ``attach_cose_key``).
Everything here takes untrusted header text and never raises on it.
"""

from __future__ import annotations

import hashlib
import re

from pycardano import Address, Network, VerificationKeyHash

__all__ = [
    "address_key",
    "normalize_cardano_address",
    "parse_address",
    "parse_network",
    "payment_key_hash",
    "verify_cip8",
]

_HEX = re.compile(r"^[0-9a-fA-F]+$")
# Shelley addresses are at most 57 bytes; bech32 of that is ~110 characters.
_MAX_ADDRESS_CHARS = 256
# A signData result over our ~120-character message is a few hundred bytes.
_MAX_SIGNATURE_HEX = 8_192
_MAX_KEY_HEX = 512


def parse_address(addr: str) -> Address:
    """A bech32 (or hex bytes) address; ValueError if pycardano cannot read it."""
    try:
        if len(addr) <= _MAX_ADDRESS_CHARS and len(addr) % 2 == 0 and _HEX.match(addr):
            # CIP-30 wallets hand out addresses as hex of their raw bytes.
            return Address.from_primitive(bytes.fromhex(addr))
        return Address.from_primitive(addr)
    except Exception as exc:  # pycardano raises several types for bad bech32
        raise ValueError(f"not a Cardano address: {addr[:120]!r}") from exc


def address_key(addr: str) -> bytes | str:
    """Canonical comparison key for an address: its raw bytes.

    Comparing bytes (not strings) makes the check independent of bech32 spelling;
    the header byte inside carries the network, so a testnet address never
    matches a mainnet one. Addresses pycardano cannot parse compare as text and
    so can only match an identical string, which no invoice will contain.
    """
    try:
        return bytes(parse_address(addr).to_primitive())
    except ValueError:
        return addr


def parse_network(network: str | Network) -> Network:
    """``mainnet`` -> MAINNET; ``preprod``/``preview``/``testnet`` (any case, with or without
    a ``cardano-`` prefix as in the invoice's ``chain``) -> TESTNET."""
    if isinstance(network, Network):
        return network
    name = network.strip().lower().removeprefix("cardano-").removeprefix("cardano:")
    if name == "mainnet":
        return Network.MAINNET
    if name in {"testnet", "preprod", "preview", "sanchonet"}:
        return Network.TESTNET
    raise ValueError(f"unknown Cardano network: {network!r}")


def payment_key_hash(address: str) -> bytes | None:
    """The 28-byte payment key hash of ``address``; None for garbage or a script credential."""
    if not isinstance(address, str):
        return None
    try:
        parsed = parse_address(address.strip())
    except ValueError:
        return None
    part = parsed.payment_part
    if not isinstance(part, VerificationKeyHash):
        return None  # a script or Byron address: no key of its own to sign with
    return bytes(part.payload)


def normalize_cardano_address(address: str) -> str | None:
    """The canonical bech32 spelling of a payer address, or None if it cannot be a payer.

    None also for well-formed addresses whose payment credential is not a key
    (scripts, reward addresses, Byron): they can never produce the CIP-8
    signature that binds an invoice, so refusing them at the 402 is clearer
    than refusing every retry.
    """
    if payment_key_hash(address) is None:
        return None
    return str(parse_address(address.strip()))


def verify_cip8(address: str, message: str, signature_hex: str, key_hex: str | None) -> bool:
    """True only if ``signature_hex`` is ``address``'s CIP-8 signature of exactly ``message``.

    ``signature_hex`` is the COSE_Sign1 of a CIP-30 ``signData`` (tagged or
    not), ``key_hex`` its COSE_Key, or None when the key is in the ``kid``
    header. The key that signed must hash to ``address``'s payment credential:
    the address in the COSE header is the signer's claim and proves nothing.
    """
    expected = payment_key_hash(address)
    if expected is None or not isinstance(message, str) or not isinstance(signature_hex, str):
        return False
    sig = signature_hex.strip().lower()
    key = key_hex.strip().lower() if isinstance(key_hex, str) and key_hex.strip() else None
    if sig.startswith("d2"):
        sig = sig[2:]  # pycardano adds the COSE_Sign1 tag itself
    if not sig or len(sig) > _MAX_SIGNATURE_HEX or len(sig) % 2 or not _HEX.match(sig):
        return False
    if key is not None and (len(key) > _MAX_KEY_HEX or len(key) % 2 or not _HEX.match(key)):
        return False
    try:
        vkey = _signing_key(sig, key)
        if vkey is None or hashlib.blake2b(vkey, digest_size=28).digest() != expected:
            return False
        from pycardano.cip import cip8

        result = cip8.verify({"signature": sig, "key": key} if key else sig)
        return bool(result["verified"]) and result["message"] == message
    except Exception:  # hostile COSE/CBOR raises many types; any of them is "not signed"
        return False


def _signing_key(sig_hex: str, key_hex: str | None) -> bytes | None:
    """The raw ed25519 public key ``cip8.verify`` will check the signature with."""
    from cose.headers import KID
    from cose.keys import CoseKey
    from cose.keys.keyparam import OKPKpX
    from cose.messages import CoseMessage

    if key_hex is not None:
        vkey = CoseKey.decode(bytes.fromhex(key_hex))[OKPKpX]
    else:
        vkey = CoseMessage.decode(bytes.fromhex("d2" + sig_hex)).phdr[KID]
    # 32 bytes: a plain ed25519 key. Longer (an extended key with its chain code)
    # hashes differently from the address credential, so it cannot match anyway.
    return vkey if isinstance(vkey, bytes) and len(vkey) == 32 else None
