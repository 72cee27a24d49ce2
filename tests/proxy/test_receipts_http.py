"""Signed receipts over HTTP: a charged call's X-ACF-Receipt verifies offline against the
served key document, and no receipt with one changed character does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from billing.receipts import RECEIPT_HEADER, WELL_KNOWN_PATH, ReceiptInvalid, verify_receipt
from tests.support.tollway import InProcess
from tests.support.upstream import Upstream

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


async def receipt_cli(receipt: str, keys: str) -> subprocess.CompletedProcess[str]:
    """`tollway receipt verify` as its own process; awaited, so the in-process server keeps serving."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    args = [sys.executable, "-m", "proxy.cli", "receipt", "verify", receipt, "--keys", keys]
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def changed(receipt: str, i: int) -> str:
    c = receipt[i]
    if c == ".":
        return receipt[:i] + "A" + receipt[i + 1 :]
    sub = ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)]
    return receipt[:i] + sub + receipt[i + 1 :]


async def test_charged_call_receipt_verifies_offline_and_tampering_fails(
    tollway: InProcess, upstream: Upstream, tmp_path
):
    tw = tollway
    p = await tw.key("prov", "provider")
    sid = await tw.service(p, upstream.url, price="0.25", free=1)
    buyer = await tw.key("buyer")
    await tw.credit("buyer", "1.00")

    ask = {"Prefer": "receipt"}  # a signature only for a client that asks (RFC 7240)
    st, _, free_h = await tw.call(sid, "echo/v1/thing?x=1", buyer, headers=ask)
    assert st == 200 and free_h["X-ACF-Free-Tier"] == "true"
    assert RECEIPT_HEADER not in free_h  # nothing charged, nothing to prove

    st, _, h = await tw.call(
        sid, "echo/v1/thing?x=1", buyer, method="POST", data=b"{}", headers=ask
    )
    assert st == 200 and h["X-ACF-Amount"] == "0.25"
    receipt = h[RECEIPT_HEADER]
    st, doc, _ = await tw.api("GET", WELL_KNOWN_PATH)
    assert st == 200 and doc["keys"]

    payload = verify_receipt(receipt, doc)
    row = await tw.rt.store.fetchrow(
        "SELECT * FROM usage_records WHERE id = $1", h["X-ACF-Usage-Id"]
    )
    assert row is not None and int(row["amount"]) == 250_000
    assert payload["usage_id"] == h["X-ACF-Usage-Id"]
    assert (payload["service_id"], payload["buyer_id"], payload["amount"], payload["asset"]) == (
        sid,
        "buyer",
        "250000",
        "USDC",
    )

    # Any one changed character (every position is tried) fails verification.
    for i in range(len(receipt)):
        with pytest.raises(ReceiptInvalid):
            verify_receipt(changed(receipt, i), doc)

    # The CLI, offline against a saved copy of the document, and against the served URL.
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(doc))
    ok = await receipt_cli(receipt, str(keys_file))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["usage_id"] == h["X-ACF-Usage-Id"]
    assert (await receipt_cli(receipt, tw.base + WELL_KNOWN_PATH)).returncode == 0
    bad = await receipt_cli(changed(receipt, len(receipt) // 3), str(keys_file))
    assert bad.returncode == 1 and "receipt invalid" in bad.stderr

    # Without asking, a charged call carries no signature (none is made).
    st, _, plain = await tw.call(sid, "echo/v1/thing?x=1", buyer)
    assert st == 200 and plain["X-ACF-Amount"] == "0.25" and RECEIPT_HEADER not in plain


async def test_a_receipt_states_only_a_committed_charge(tollway: InProcess, upstream: Upstream):
    """Review of issue 12: an upstream's own 499 is not served (nothing charged, no
    receipt), and a call that asks for a receipt is captured before its headers, so
    the receipt and the ledger agree even when the body then breaks off."""
    tw = tollway
    p = await tw.key("prov", "provider")
    sid = await tw.service(p, upstream.url, price="0.25")
    buyer = await tw.key("buyer")
    await tw.credit("buyer", "1.00")
    ask = {"Prefer": "receipt"}
    st, _, h = await tw.call(sid, "status/499", buyer, headers=ask)
    assert st == 499 and h["X-ACF-Amount"] == "0.00" and RECEIPT_HEADER not in h
    row = await tw.rt.store.fetchrow(
        "SELECT amount, outcome FROM usage_records WHERE id = $1", h["X-ACF-Usage-Id"]
    )
    assert row is not None and int(row["amount"]) == 0
    st, _, h = await tw.call(sid, "ok", buyer, headers=ask)
    assert st == 200 and RECEIPT_HEADER in h
    row = await tw.rt.store.fetchrow(
        "SELECT amount FROM usage_records WHERE id = $1", h["X-ACF-Usage-Id"]
    )
    assert row is not None and int(row["amount"]) == 250_000  # committed before the headers
