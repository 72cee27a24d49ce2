"""Invoice payments checked on their chain: EVM token transfers and Cardano transactions.

Each check proves three things before an invoice is paid: the payment pays
the invoice's terms, it was made after the invoice, and it was sent by the
invoice's payer (``billing.payer_proof``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from billing.errors import BillingError, PaymentPending
from ledger.db import Row
from ledger.journal import now_ms

if TYPE_CHECKING:
    from billing.invoices import InvoiceBook


async def verify_on_chain(
    book: InvoiceBook, inv: Row, payment: str, payer: str
) -> tuple[str, str, int, int]:
    """Check the payment on its chain, sent by ``payer``, made after the invoice;
    returns (rail, unique tx reference, amount received, when it was paid in ms:
    its block's time, or when Tollway submitted it for this invoice)."""
    chain = inv["chain"]
    if chain.startswith("eip155:"):
        if book.evm is None or book.evm_client is None:
            raise BillingError(
                "EVM payments are not configured", code="unsupported_chain", status=400
            )
        t = await book.evm_client.verify_token_transfer(
            payment,
            token=inv["token"],
            pay_to=inv["pay_to"],
            min_amount=int(inv["amount"]),
            # Block times have one-second resolution: a transfer in the
            # invoice's own second counts as after it.
            not_before_unix=int(inv["created_at"]) // 1000 - 1,
            min_confirmations=book.evm.confirmations,
            sender=payer,
        )
        return chain, t.tx_hash.lower(), int(t.amount), int(t.block_time) * 1000
    if book.cardano is None or book.cardano_rail is None:
        raise BillingError(
            "Cardano payments are not configured", code="unsupported_chain", status=400
        )
    from billing.rails.cardano import CardanoAsset, ExpectedPayment, RequiredOutput
    from billing.rails.cardano_identity import normalize_cardano_address

    unit = inv["token"]
    asset = CardanoAsset.lovelace() if unit == "lovelace" else CardanoAsset.from_unit(unit)
    splits = tuple(
        RequiredOutput(o["address"], asset, int(o["amount"])) for o in json.loads(inv["outputs"])
    )
    expected = ExpectedPayment(inv["pay_to"], asset, int(inv["amount"]), splits)
    confirmations = book.cardano.confirmations
    if len(payment) == 64 and all(c in "0123456789abcdefABCDEF" for c in payment):
        confirmed = await book.cardano_rail.verify_tx_hash(
            payment,
            expected,
            confirmations,
            not_before_unix=int(inv["created_at"]) // 1000 - 1,
            payer=payer,
        )
        tx_id, outputs = confirmed.tx_id, confirmed.outputs
        paid_at = int(confirmed.block_time) * 1000
        if inv["submitted_tx"] and str(inv["submitted_tx"]) == str(tx_id).lower():
            paid_at = min(paid_at, int(inv["submitted_at"]))
    else:
        tx_id, outputs = await book.cardano_rail.verify_and_submit(payment, expected, payer=payer)
        paid_at = now_ms()
        # Submitted by us while the invoice was open: it pays the invoice when it
        # confirms, however late (the buyer's retry may come after the expiry).
        await book.store.execute(
            "UPDATE invoices SET submitted_tx = $2, submitted_at = $3"
            " WHERE id = $1 AND status = 'open' AND expires_at >= $3",
            inv["id"],
            str(tx_id).lower(),
            paid_at,
        )
        if confirmations > 0:
            # In the mempool is not on chain: it counts once confirmed, by its hash.
            raise PaymentPending(
                f"transaction {tx_id} was submitted; retry with X-Payment: {tx_id}"
                f" once it has {confirmations} confirmation(s)",
                tx_id=str(tx_id).lower(),
                retry_after_seconds=20,
            )
    # Addresses compared as the rail's output check compares them, whatever the spelling.
    pay_to = normalize_cardano_address(str(inv["pay_to"])) or inv["pay_to"]
    received = sum(
        o.amount_of(asset)
        for o in outputs
        if (normalize_cardano_address(o.address) or o.address) == pay_to
    )
    return chain, str(tx_id).lower(), int(received), paid_at
