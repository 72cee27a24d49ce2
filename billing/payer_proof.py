"""Who made a payment: the payer an invoice is bound to, and the proof that binds it.

Every EVM invoice shares one ``payTo`` (the deposit address), so "a transfer
to payTo arrived" says nothing about whose invoice it pays. We bind each
invoice to its payer instead of minting a deposit address per invoice:

- the 402 is asked for with ``X-Wallet-Address``: the address the buyer will
  pay from, written on the invoice;
- the retry carries ``X-Payer-Signature``: that address's signature over
  :func:`invoice_message` (EIP-191 ``personal_sign`` on EVM; CIP-8 / CIP-30
  ``signData`` on Cardano, with the COSE key in ``X-Payer-Key``);
- the chain must show the transfer was sent by that same address: on EVM the
  transaction's own sender, who is also the token's ``from``; on Cardano an
  input spent from the address's payment credential.

So a stranger cannot pay their invoice with someone else's transfer (the
sender is not theirs), nor name the victim's address on their own invoice
(they cannot sign for it). One scheme on both chains; a per-invoice address
would need key derivation and sweeping on each, and a per-invoice amount
leaks into prices and can collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from billing.errors import BillingError, PaymentRejected

_EVM_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HEX_RE = re.compile(r"^(0x)?[0-9a-fA-F]+$")


@dataclass(frozen=True, slots=True)
class PayerProof:
    """What the retry carries to show it comes from the invoice's payer."""

    signature: str | None
    key: str | None = None  # the COSE key of a CIP-8 signature (Cardano)


def wallet_owner(partner: str, payer: str) -> str:
    """The owner id of a wallet's own balance: claimed only with that wallet's signature."""
    return f"{partner}:{payer}"


def invoice_message(invoice_id: str, payer: str) -> str:
    """What the payer signs to pay (or draw from) an invoice."""
    return f"Tollway invoice payment\ninvoice: {invoice_id}\npayer: {payer}"


def normalize_payer(chain: str, address: str | None) -> str:
    """The payer address as stored on an invoice; raises a 400 for a malformed one."""
    if not address or not isinstance(address, str):
        raise BillingError(
            "send X-Wallet-Address: the address you will pay from (invoices are bound to their payer)",
            code="wallet_address_required",
            status=400,
        )
    address = address.strip()
    if chain.startswith("cardano"):
        from billing.rails.cardano_identity import normalize_cardano_address

        normalized = normalize_cardano_address(address)
        if normalized is None:
            raise BillingError(
                "X-Wallet-Address is not a Cardano address",
                code="invalid_wallet_address",
                status=400,
            )
        return normalized
    if not _EVM_ADDRESS_RE.match(address):
        raise BillingError(
            "X-Wallet-Address is not an EVM address", code="invalid_wallet_address", status=400
        )
    return address.lower()


def check_payer_signature(chain: str, invoice_id: str, payer: str, proof: PayerProof) -> None:
    """Refuse (402) unless ``proof`` is ``payer``'s signature over the invoice message."""
    sig = proof.signature
    if not sig:
        raise PaymentRejected(
            "send X-Payer-Signature: the paying address's signature of the invoice message",
            code="payer_signature_required",
        )
    message = invoice_message(invoice_id, payer)
    if chain.startswith("cardano"):
        from billing.rails.cardano_identity import verify_cip8

        ok = verify_cip8(payer, message, sig.strip(), (proof.key or "").strip() or None)
    else:
        ok = recover_personal_sign(message, sig.strip()) == payer.lower()
    if not ok:
        raise PaymentRejected(
            "X-Payer-Signature is not the invoice payer's signature of the invoice message",
            code="invalid_payer_signature",
        )


def recover_personal_sign(message: str, signature: str) -> str | None:
    """The lower-case address that EIP-191 signed ``message``, or None if it does not recover."""
    if len(signature) > 200 or not _HEX_RE.match(signature):
        return None
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        return str(
            Account.recover_message(encode_defunct(text=message), signature=signature)
        ).lower()
    except Exception:  # malformed signature of any kind
        return None
