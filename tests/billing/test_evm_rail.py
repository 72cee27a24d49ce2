"""billing.rails.evm against the in-process chain, reached over real HTTP JSON-RPC."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from billing.errors import PaymentConflict, PaymentRejected, PayoutFailed
from billing.rails.evm import Eip3009Authorization, EvmClient
from tests.support.evm_chain import EvmChain, eip3009_digest
from tests.support.jsonrpc_server import JsonRpcServer

TOKEN_NAME = "USD Coin"
TOKEN_VERSION = "2"


@pytest.fixture(scope="module")
def usdc(chain: EvmChain) -> str:
    return chain.deploy_token(TOKEN_NAME, TOKEN_VERSION)


@pytest.fixture(scope="module")
def other_token(chain: EvmChain) -> str:
    return chain.deploy_token("Other Coin", "1", symbol="OTH")


@pytest.fixture(scope="module")
def hot_wallet(chain: EvmChain, usdc: str) -> LocalAccount:
    acct = chain.new_account()
    chain.mint(usdc, acct.address, 1_000_000_000)
    return acct


@pytest.fixture(scope="module")
def gas_wallet(chain: EvmChain) -> LocalAccount:
    return chain.new_account()


@pytest.fixture
async def client(
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    hot_wallet: LocalAccount,
    gas_wallet: LocalAccount,
) -> AsyncIterator[EvmClient]:
    c = EvmClient(
        node.url,
        expected_chain_id=chain.chain_id,
        hot_wallet_key=hot_wallet.key.hex(),
        gas_key=gas_wallet.key.hex(),
        payout_token=usdc,
        poll_interval=0.02,
    )
    yield c
    await c.close()


@pytest.fixture
def payer(chain: EvmChain, usdc: str, other_token: str) -> LocalAccount:
    acct = chain.new_account()
    chain.mint(usdc, acct.address, 50_000_000)
    chain.mint(other_token, acct.address, 50_000_000)
    return acct


@pytest.fixture
def merchant() -> str:
    return Account.create().address


async def _reject(coro: Any, code: str) -> None:
    with pytest.raises(PaymentRejected) as info:
        await coro
    assert info.value.code == code, info.value.message


async def test_real_transfer_verifies(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    invoice_created = chain.block_timestamp()
    chain.mine_blocks(1)  # the payment lands in a later block than the invoice
    tx = chain.transfer_token(usdc, payer, merchant, 2_500_000)
    got = await client.verify_token_transfer(
        tx,
        token=usdc,
        pay_to=merchant,
        min_amount=2_500_000,
        not_before_unix=invoice_created,
        min_confirmations=1,
    )
    assert got.amount == 2_500_000
    assert got.payer == payer.address
    assert got.pay_to == merchant
    assert got.tx_hash == tx.lower()
    assert got.block_number == chain.receipt(tx)["blockNumber"]
    assert got.block_time > invoice_created


async def test_confirmations_are_counted(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    tx = chain.transfer_token(usdc, payer, merchant, 1_000)
    kwargs: dict[str, Any] = {
        "token": usdc,
        "pay_to": merchant,
        "min_amount": 1_000,
        "not_before_unix": 0,
        "min_confirmations": 3,
    }
    await _reject(client.verify_token_transfer(tx, **kwargs), "insufficient_confirmations")
    chain.mine_blocks(2)
    assert (await client.verify_token_transfer(tx, **kwargs)).amount == 1_000


async def test_foreign_token_is_rejected(
    client: EvmClient,
    chain: EvmChain,
    usdc: str,
    other_token: str,
    payer: LocalAccount,
    merchant: str,
) -> None:
    tx = chain.transfer_token(other_token, payer, merchant, 5_000_000)
    await _reject(
        client.verify_token_transfer(
            tx, token=usdc, pay_to=merchant, min_amount=1, not_before_unix=0, min_confirmations=1
        ),
        "wrong_token",
    )


async def test_native_coin_is_rejected(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    tx = chain.send_native(payer, merchant, 10**18)
    await _reject(
        client.verify_token_transfer(
            tx, token=usdc, pay_to=merchant, min_amount=1, not_before_unix=0, min_confirmations=1
        ),
        "wrong_token",
    )


async def test_too_small_is_rejected(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    tx = chain.transfer_token(usdc, payer, merchant, 999_999)
    await _reject(
        client.verify_token_transfer(
            tx,
            token=usdc,
            pay_to=merchant,
            min_amount=1_000_000,
            not_before_unix=0,
            min_confirmations=1,
        ),
        "amount_too_small",
    )


async def test_wrong_recipient_is_rejected(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    tx = chain.transfer_token(usdc, payer, Account.create().address, 1_000_000)
    await _reject(
        client.verify_token_transfer(
            tx,
            token=usdc,
            pay_to=merchant,
            min_amount=1_000_000,
            not_before_unix=0,
            min_confirmations=1,
        ),
        "wrong_recipient",
    )


async def test_failed_tx_is_rejected(
    client: EvmClient, chain: EvmChain, usdc: str, merchant: str
) -> None:
    broke = chain.new_account()  # has ether for gas but no tokens: transfer reverts
    tx = chain.transfer_token(usdc, broke, merchant, 1_000_000, gas=100_000)
    assert chain.receipt(tx)["status"] == 0
    await _reject(
        client.verify_token_transfer(
            tx,
            token=usdc,
            pay_to=merchant,
            min_amount=1_000_000,
            not_before_unix=0,
            min_confirmations=1,
        ),
        "tx_failed",
    )


async def test_tx_before_invoice_is_rejected(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    tx = chain.transfer_token(usdc, payer, merchant, 1_000_000)
    tx_time = chain.block_timestamp(chain.receipt(tx)["blockNumber"])
    # An invoice minted at (or after) the block that holds the payment.
    await _reject(
        client.verify_token_transfer(
            tx,
            token=usdc,
            pay_to=merchant,
            min_amount=1_000_000,
            not_before_unix=tx_time,
            min_confirmations=1,
        ),
        "tx_before_invoice",
    )


async def test_unknown_and_malformed_hashes(client: EvmClient, usdc: str, merchant: str) -> None:
    kwargs: dict[str, Any] = {
        "token": usdc,
        "pay_to": merchant,
        "min_amount": 1,
        "not_before_unix": 0,
        "min_confirmations": 1,
    }
    await _reject(client.verify_token_transfer("0x" + "ab" * 32, **kwargs), "tx_not_found")
    await _reject(client.verify_token_transfer("0x1234", **kwargs), "invalid_tx_hash")


async def test_send_token_pays_out(
    client: EvmClient, chain: EvmChain, usdc: str, hot_wallet: LocalAccount
) -> None:
    dest = Account.create().address
    before = chain.token_balance(usdc, hot_wallet.address)
    tx = await client.send_token(dest, 1_234_567)
    assert chain.receipt(tx)["status"] == 1
    assert chain.token_balance(usdc, dest) == 1_234_567
    assert chain.token_balance(usdc, hot_wallet.address) == before - 1_234_567
    assert await client.token_balance(usdc, dest) == 1_234_567


async def test_concurrent_payouts_take_distinct_nonces(
    client: EvmClient, chain: EvmChain, usdc: str
) -> None:
    import asyncio

    dests = [Account.create().address for _ in range(5)]
    hashes = await asyncio.gather(*(client.send_token(d, 10 + i) for i, d in enumerate(dests)))
    assert len(set(hashes)) == 5
    assert [chain.token_balance(usdc, d) for d in dests] == [10, 11, 12, 13, 14]


async def test_send_token_failure_raises_payout_failed(
    client: EvmClient, usdc: str, hot_wallet: LocalAccount, chain: EvmChain
) -> None:
    too_much = chain.token_balance(usdc, hot_wallet.address) + 1
    with pytest.raises(PayoutFailed):
        await client.send_token(Account.create().address, too_much)


def _sign_authorization(
    token: str,
    signer: LocalAccount,
    to: str,
    value: int,
    *,
    domain_chain_id: int,
    valid_after: int = 0,
    valid_before: int | None = None,
    primary: str = "TransferWithAuthorization",
) -> tuple[Eip3009Authorization, bytes]:
    auth = Eip3009Authorization(
        from_address=signer.address,
        to=to,
        value=value,
        valid_after=valid_after,
        valid_before=valid_before if valid_before is not None else int(time.time()) + 3600,
        nonce=os.urandom(32),
    )
    digest = eip3009_digest(
        token,
        name=TOKEN_NAME,
        version=TOKEN_VERSION,
        domain_chain_id=domain_chain_id,
        from_=auth.from_address,
        to=auth.to,
        value=auth.value,
        valid_after=auth.valid_after,
        valid_before=auth.valid_before,
        nonce=auth.nonce,
        primary=primary,
    )
    sig = Account.unsafe_sign_hash(digest, signer.key)
    return auth, bytes(sig.signature)


async def test_transfer_with_authorization_settles_once(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    auth, sig = _sign_authorization(usdc, payer, merchant, 750_000, domain_chain_id=chain.chain_id)
    assert await client.authorization_state(usdc, payer.address, auth.nonce) is False
    sent = await client.transfer_with_authorization(usdc, auth, sig)
    assert chain.receipt(sent.tx_hash)["status"] == 1
    assert chain.token_balance(usdc, merchant) == 750_000
    assert await client.authorization_state(usdc, payer.address, auth.nonce) is True
    with pytest.raises(PaymentConflict) as info:
        await client.transfer_with_authorization(usdc, auth, sig)
    assert info.value.code == "nonce_already_used"
    assert chain.token_balance(usdc, merchant) == 750_000


async def test_transfer_with_authorization_rejects_bad_signature_and_expiry(
    client: EvmClient, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    auth, sig = _sign_authorization(usdc, payer, merchant, 1_000, domain_chain_id=chain.chain_id)
    tampered = Eip3009Authorization(
        auth.from_address, auth.to, 2_000, auth.valid_after, auth.valid_before, auth.nonce
    )
    await _reject(client.transfer_with_authorization(usdc, tampered, sig), "invalid_signature")
    # Signed for another chain's domain: the token must not accept it here.
    auth, sig = _sign_authorization(usdc, payer, merchant, 1_000, domain_chain_id=84532)
    await _reject(client.transfer_with_authorization(usdc, auth, sig), "invalid_signature")
    auth, sig = _sign_authorization(
        usdc,
        payer,
        merchant,
        1_000,
        domain_chain_id=chain.chain_id,
        valid_before=chain.block_timestamp() - 1,
    )
    await _reject(client.transfer_with_authorization(usdc, auth, sig), "authorization_expired")
    assert chain.token_balance(usdc, merchant) == 0


def test_token_accepts_bytes_signature_form_and_receive(
    chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    # The x402 client hands out a 65-byte signature; USDC v2 also takes it whole.
    auth, sig = _sign_authorization(usdc, payer, merchant, 3_000, domain_chain_id=chain.chain_id)
    relayer = chain.new_account()
    fn = chain.token(usdc).get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    with chain.lock:
        tx = fn(
            auth.from_address,
            auth.to,
            auth.value,
            auth.valid_after,
            auth.valid_before,
            auth.nonce,
            sig,
        ).build_transaction(
            {"from": relayer.address, "nonce": chain.w3.eth.get_transaction_count(relayer.address)}
        )
        tx_hash = chain._send(relayer, dict(tx))
    assert chain.receipt(tx_hash)["status"] == 1
    assert chain.token_balance(usdc, merchant) == 3_000
    assert chain.authorization_state(usdc, payer.address, auth.nonce)

    # receiveWithAuthorization: only the payee may submit it.
    payee = chain.new_account()
    auth, sig = _sign_authorization(
        usdc,
        payer,
        payee.address,
        4_000,
        domain_chain_id=chain.chain_id,
        primary="ReceiveWithAuthorization",
    )
    v, r, s = sig[64], sig[:32], sig[32:64]
    args = (
        auth.from_address,
        auth.to,
        auth.value,
        auth.valid_after,
        auth.valid_before,
        auth.nonce,
        v,
        r,
        s,
    )
    bad = chain._call_tx(relayer, usdc, "receiveWithAuthorization", *args, gas=200_000)
    assert chain.receipt(bad)["status"] == 0
    good = chain._call_tx(payee, usdc, "receiveWithAuthorization", *args)
    assert chain.receipt(good)["status"] == 1
    assert chain.token_balance(usdc, payee.address) == 4_000


def test_only_owner_mints(chain: EvmChain, usdc: str) -> None:
    stranger = chain.new_account()
    tx = chain._call_tx(stranger, usdc, "mint", stranger.address, 10**9, gas=100_000)
    assert chain.receipt(tx)["status"] == 0
    assert chain.token_balance(usdc, stranger.address) == 0
    assert chain.token(usdc).functions.decimals().call() == 6


_OTHER_PROCESS = r"""
import asyncio, json, sys
from billing.rails.evm import EvmClient

async def main(url, token, owner, hashes, pay_to):
    c = EvmClient(url, poll_interval=0.02)
    out = {"meta": (await c.token_metadata(token)).name, "verified": []}
    for _ in range(20):  # hammer the node while the test process writes to the chain
        out["balance"] = await c.token_balance(token, owner)
    for h in hashes:
        t = await c.verify_token_transfer(h, token=token, pay_to=pay_to, min_amount=1,
                                          not_before_unix=0, min_confirmations=1)
        out["verified"].append(t.amount)
    await c.close()
    print(json.dumps(out))

asyncio.run(main(*json.loads(sys.argv[1])))
"""


async def test_node_serves_another_process_concurrently(
    node: JsonRpcServer, chain: EvmChain, usdc: str, payer: LocalAccount, merchant: str
) -> None:
    import asyncio
    import json
    import sys

    hashes = [chain.transfer_token(usdc, payer, merchant, 100 + i) for i in range(3)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _OTHER_PROCESS,
        json.dumps([node.url, usdc, payer.address, hashes, merchant]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    # Meanwhile this process keeps writing to the same chain through the lock.
    other = chain.new_account()
    for _ in range(10):
        chain.mint(usdc, other.address, 1)
        await asyncio.sleep(0)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["meta"] == TOKEN_NAME
    assert result["verified"] == [100, 101, 102]
    assert chain.token_balance(usdc, other.address) == 10


def test_node_runs_as_its_own_process() -> None:
    """``python -m tests.support.jsonrpc_server`` for a proxy started outside pytest."""
    import asyncio
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.jsonrpc_server", "--token-domain-chain-id", "84532"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert set(info["tokens"]) == {str(info["chain_id"]), "84532"}

        async def check() -> tuple[int, str]:
            c = EvmClient(info["url"], expected_chain_id=info["chain_id"])
            try:
                meta = await c.token_metadata(info["tokens"]["84532"])
                return await c.chain_id(), meta.version
            finally:
                await c.close()

        assert asyncio.run(check()) == (info["chain_id"], "2")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


async def test_payouts_from_two_processes_take_distinct_nonces(
    node: JsonRpcServer, chain: EvmChain, usdc: str, hot_wallet: LocalAccount, tmp_path
) -> None:
    """`--workers N` share one hot wallet: nonces are allocated across processes (a
    host-wide lock, and the node's refusal of a taken nonce retried), so concurrent
    payouts from two processes all land."""
    import asyncio
    import json
    import sys

    dests = [[Account.create().address for _ in range(5)] for _ in range(2)]
    script = (
        "import asyncio, json, sys\n"
        "from billing.rails.evm import EvmClient\n"
        "async def main():\n"
        "    c = EvmClient(sys.argv[1], hot_wallet_key=sys.argv[2], payout_token=sys.argv[3],"
        " poll_interval=0.02)\n"
        "    dests = json.loads(sys.argv[4])\n"
        "    out = await asyncio.gather(*(c.send_token(d, 100) for d in dests),"
        " return_exceptions=True)\n"
        "    await c.close()\n"
        "    print(json.dumps([str(x) for x in out]))\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            node.url,
            hot_wallet.key.hex(),
            usdc,
            json.dumps(d),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for d in dests
    ]
    outs = [await p.communicate() for p in procs]
    hashes = [h for out, _ in outs for h in json.loads(out)]
    assert all(h.startswith("0x") for h in hashes), (hashes, [e for _, e in outs])
    assert len(set(hashes)) == 10
    assert all(chain.token_balance(usdc, d) == 100 for group in dests for d in group)
