"""billing.rails.x402 with payments signed by the official x402 Python client.

The chain is in-process (eth-tester) behind the local JSON-RPC node; the
facilitator-mode tests run a small facilitator HTTP server in the test whose
/verify and /settle use our local processor: it stands in for the external
facilitator service, speaking the real x402 facilitator protocol.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequiredV1,
    SettleResponse,
    VerifyResponse,
)

from billing.errors import BillingError, PaymentConflict, PaymentRejected
from billing.rails.evm import EvmClient
from billing.rails.x402 import (
    ExactEvmRail,
    FacilitatorX402Processor,
    LocalX402Processor,
    build_offer,
    decode_payment_header,
    payment_from_headers,
    response_header_name,
)
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer

NAME, VERSION = "USD Coin", "2"
BASE_SEPOLIA = 84532
PRICE = 10_000  # 0.01 USDC
RESOURCE = "http://127.0.0.1/svc/echo"


@pytest.fixture(scope="module")
def usdc(chain: EvmChain) -> str:
    """Token signed over eth-tester's own chain id: v2 network eip155:131277322940537."""
    return chain.deploy_token(NAME, VERSION)


@pytest.fixture(scope="module")
def usdc_base_sepolia(chain: EvmChain) -> str:
    """Token whose EIP-712 domain pins 84532, so v1 clients can pay it as base-sepolia."""
    return chain.deploy_token(NAME, VERSION, domain_chain_id=BASE_SEPOLIA)


@pytest.fixture(scope="module")
def merchant() -> str:
    return Account.create().address


@pytest.fixture(scope="module")
def rails(chain: EvmChain, usdc: str, usdc_base_sepolia: str, merchant: str) -> list[ExactEvmRail]:
    return [
        ExactEvmRail(
            chain_id=chain.chain_id,
            asset=usdc,
            pay_to=merchant,
            token_name=NAME,
            token_version=VERSION,
        ),
        ExactEvmRail(
            chain_id=BASE_SEPOLIA,
            asset=usdc_base_sepolia,
            pay_to=merchant,
            token_name=NAME,
            token_version=VERSION,
        ),
    ]


@pytest.fixture(scope="module")
def gas_key(chain: EvmChain) -> str:
    return chain.new_account().key.hex()


@pytest.fixture
async def evm(node: JsonRpcServer, gas_key: str) -> AsyncIterator[EvmClient]:
    c = EvmClient(node.url, gas_key=gas_key, poll_interval=0.02)
    yield c
    await c.close()


@pytest.fixture
def processor(rails: list[ExactEvmRail], evm: EvmClient, chain: EvmChain) -> LocalX402Processor:
    # Both rails' tokens live on the one test chain.
    return LocalX402Processor(rails, {chain.chain_id: evm, BASE_SEPOLIA: evm})


@pytest.fixture
def payer(chain: EvmChain, usdc: str, usdc_base_sepolia: str) -> LocalAccount:
    acct = Account.create()  # needs no ether: the gas key pays settlement
    chain.mint(usdc, acct.address, 1_000_000)
    chain.mint(usdc_base_sepolia, acct.address, 1_000_000)
    return acct


def official_client(account: LocalAccount) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, account)
    # Our test token is not one of the client's known assets.
    client.set_spend_controls(False)
    return client


async def pay_v2(account: LocalAccount, rails: list[ExactEvmRail], amount: int = PRICE) -> str:
    """The PAYMENT-SIGNATURE header the official client sends for our 402 (v2)."""
    offer = build_offer(rails, amount=amount, resource_url=RESOURCE)
    payment_required = decode_payment_required_header(offer.payment_required_header)
    payload = await official_client(account).create_payment_payload(payment_required)
    return encode_payment_signature_header(payload)


async def pay_v1(account: LocalAccount, rails: list[ExactEvmRail], amount: int = PRICE) -> str:
    """The X-PAYMENT header the official client sends for our 402 JSON body (v1)."""
    offer = build_offer(rails, amount=amount, resource_url=RESOURCE)
    body = json.loads(json.dumps(offer.v1_body))  # as it crosses the wire
    payload = await official_client(account).create_payment_payload(
        PaymentRequiredV1.model_validate(body)
    )
    return encode_payment_signature_header(payload)


def _b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def _tamper(header: str, fn: Any) -> str:
    data = json.loads(base64.b64decode(header))
    fn(data)
    return _b64(data)


async def _rejected(coro: Any, code: str, exc_type: type[BillingError] = PaymentRejected) -> None:
    with pytest.raises(exc_type) as info:
        await coro
    assert info.value.code == code, f"{info.value.code}: {info.value.message}"


# -- offers -------------------------------------------------------------------------


def test_offer_has_v2_header_and_v1_body(
    rails: list[ExactEvmRail], chain: EvmChain, usdc: str, usdc_base_sepolia: str, merchant: str
) -> None:
    offer = build_offer(rails, amount=PRICE, resource_url=RESOURCE, description="echo")
    v2 = json.loads(base64.b64decode(offer.payment_required_header))
    assert v2["x402Version"] == 2
    assert v2["resource"]["url"] == RESOURCE
    assert [
        (a["scheme"], a["network"], a["asset"], a["amount"], a["payTo"]) for a in v2["accepts"]
    ] == [
        ("exact", f"eip155:{chain.chain_id}", usdc, str(PRICE), merchant),
        ("exact", "eip155:84532", usdc_base_sepolia, str(PRICE), merchant),
    ]
    assert v2["accepts"][0]["extra"] == {"name": NAME, "version": VERSION}
    assert v2["accepts"][0]["maxTimeoutSeconds"] > 0

    v1 = offer.v1_body
    assert v1["x402Version"] == 1
    # eth-tester's chain id has no v1 name; the 84532-pinned token is base-sepolia.
    assert [
        (a["network"], a["asset"], a["maxAmountRequired"], a["payTo"], a["resource"])
        for a in v1["accepts"]
    ] == [("base-sepolia", usdc_base_sepolia, str(PRICE), merchant, RESOURCE)]
    assert V1_NETWORK_CHAIN_IDS["base-sepolia"] == BASE_SEPOLIA


def test_header_decoding() -> None:
    for bad in [
        "",
        "%%%not-base64",
        _b64([1, 2]),
        _b64({"x402Version": 3}),
        _b64({"x402Version": 2, "payload": {}}),
    ]:
        with pytest.raises(PaymentRejected):
            decode_payment_header(bad)
    assert payment_from_headers({}) is None


# -- local verify + settle with the official client ---------------------------------


async def test_v2_official_client_pays_and_settles(
    processor: LocalX402Processor, chain: EvmChain, usdc: str, merchant: str, payer: LocalAccount
) -> None:
    header = await pay_v2(payer, processor.rails)
    payment = payment_from_headers({"PAYMENT-SIGNATURE": header})
    assert isinstance(payment, PaymentPayload)
    before = chain.token_balance(usdc, merchant)

    verified = await processor.verify(payment, amount=PRICE)
    assert verified.version == 2
    assert verified.payer == payer.address
    assert verified.amount == PRICE
    assert verified.asset == usdc
    assert verified.network == f"eip155:{chain.chain_id}"
    assert verified.nonce.startswith("0x") and len(verified.nonce) == 66
    assert payer.address.lower() in verified.reservation_key
    assert chain.token_balance(usdc, merchant) == before  # verify moves nothing

    settlement = await processor.settle(verified)
    assert chain.receipt(settlement.transaction)["status"] == 1
    assert chain.token_balance(usdc, merchant) == before + PRICE
    assert chain.token_balance(usdc, payer.address) == 1_000_000 - PRICE

    assert settlement.header_name == response_header_name(2) == "PAYMENT-RESPONSE"
    response = decode_payment_response_header(settlement.header_value)
    assert response.success is True
    assert response.transaction == settlement.transaction
    assert response.payer == payer.address
    assert response.network == f"eip155:{chain.chain_id}"

    # The same header again: the nonce is spent on chain.
    await _rejected(
        processor.verify(decode_payment_header(header), amount=PRICE),
        "nonce_already_used",
        PaymentConflict,
    )
    await _rejected(processor.settle(verified), "nonce_already_used", PaymentConflict)
    assert chain.token_balance(usdc, merchant) == before + PRICE


async def test_v1_official_client_pays_and_settles(
    processor: LocalX402Processor,
    chain: EvmChain,
    usdc_base_sepolia: str,
    merchant: str,
    payer: LocalAccount,
) -> None:
    header = await pay_v1(payer, processor.rails)
    payment = payment_from_headers({"X-PAYMENT": header})
    assert isinstance(payment, PaymentPayloadV1)
    assert payment.network == "base-sepolia"
    before = chain.token_balance(usdc_base_sepolia, merchant)

    verified = await processor.verify(payment, amount=PRICE, resource_url=RESOURCE)
    assert (verified.version, verified.payer, verified.asset, verified.network) == (
        1,
        payer.address,
        usdc_base_sepolia,
        "base-sepolia",
    )
    settlement = await processor.settle(verified)
    assert chain.token_balance(usdc_base_sepolia, merchant) == before + PRICE
    assert settlement.header_name == "X-PAYMENT-RESPONSE"
    response = decode_payment_response_header(settlement.header_value)
    assert (response.success, response.network, response.payer) == (
        True,
        "base-sepolia",
        payer.address,
    )

    await _rejected(
        processor.verify(decode_payment_header(header), amount=PRICE),
        "nonce_already_used",
        PaymentConflict,
    )


# -- rejections ---------------------------------------------------------------------------


async def test_bad_signature_is_rejected(
    processor: LocalX402Processor, payer: LocalAccount
) -> None:
    header = await pay_v2(payer, processor.rails)

    def flip(d: dict[str, Any]) -> None:
        sig = bytearray.fromhex(d["payload"]["signature"][2:])
        sig[5] ^= 0x01
        d["payload"]["signature"] = "0x" + sig.hex()

    await _rejected(
        processor.verify(decode_payment_header(_tamper(header, flip)), amount=PRICE),
        "invalid_signature",
    )

    # Someone else's valid signature claiming to be from the payer.
    thief = Account.create()
    stolen = await pay_v2(thief, processor.rails)

    def claim_payer(d: dict[str, Any]) -> None:
        d["payload"]["authorization"]["from"] = payer.address

    await _rejected(
        processor.verify(decode_payment_header(_tamper(stolen, claim_payer)), amount=PRICE),
        "invalid_signature",
    )

    # Fields changed after signing (validBefore pushed out) break the signature.
    def extend(d: dict[str, Any]) -> None:
        a = d["payload"]["authorization"]
        a["validBefore"] = str(int(a["validBefore"]) + 1000)

    await _rejected(
        processor.verify(decode_payment_header(_tamper(header, extend)), amount=PRICE),
        "invalid_signature",
    )


async def test_wrong_amount_is_rejected(processor: LocalX402Processor, payer: LocalAccount) -> None:
    cheap = await pay_v2(payer, processor.rails, amount=PRICE - 1)
    await _rejected(processor.verify(decode_payment_header(cheap), amount=PRICE), "wrong_amount")
    # "exact" also refuses overpaying.
    dear = await pay_v2(payer, processor.rails, amount=PRICE + 1)
    await _rejected(processor.verify(decode_payment_header(dear), amount=PRICE), "wrong_amount")


async def test_wrong_recipient_is_rejected(
    processor: LocalX402Processor, rails: list[ExactEvmRail], payer: LocalAccount
) -> None:
    elsewhere = [
        ExactEvmRail(
            chain_id=r.chain_id,
            asset=r.asset,
            pay_to=Account.create().address,
            token_name=NAME,
            token_version=VERSION,
        )
        for r in rails
    ]
    header = await pay_v2(payer, elsewhere)
    await _rejected(
        processor.verify(decode_payment_header(header), amount=PRICE), "wrong_recipient"
    )
    header = await pay_v1(payer, elsewhere)
    await _rejected(
        processor.verify(decode_payment_header(header), amount=PRICE), "wrong_recipient"
    )


async def test_time_window_is_enforced(
    rails: list[ExactEvmRail], evm: EvmClient, chain: EvmChain, payer: LocalAccount
) -> None:
    header = await pay_v2(payer, rails)
    payment = decode_payment_header(header)
    clients = {chain.chain_id: evm, BASE_SEPOLIA: evm}
    later = LocalX402Processor(rails, clients, clock=lambda: time.time() + 3600)
    await _rejected(later.verify(payment, amount=PRICE), "authorization_expired")
    # v1 clients sign validAfter = now - 600; a clock before that sees "not yet valid".
    v1_payment = decode_payment_header(await pay_v1(payer, rails))
    earlier = LocalX402Processor(rails, clients, clock=lambda: time.time() - 3600)
    await _rejected(
        earlier.verify(v1_payment, amount=PRICE, resource_url=RESOURCE),
        "authorization_not_yet_valid",
    )


async def test_unoffered_payment_and_poor_payer_are_rejected(
    processor: LocalX402Processor, rails: list[ExactEvmRail], chain: EvmChain, payer: LocalAccount
) -> None:
    header = await pay_v2(payer, rails)

    def network(d: dict[str, Any]) -> None:
        d["accepted"]["network"] = "eip155:8453"

    def asset(d: dict[str, Any]) -> None:
        d["accepted"]["asset"] = Account.create().address

    def scheme(d: dict[str, Any]) -> None:
        d["accepted"]["scheme"] = "upto"

    for fn, code in [
        (network, "no_matching_requirement"),
        (asset, "no_matching_requirement"),
        (scheme, "unsupported_scheme"),
    ]:
        await _rejected(
            processor.verify(decode_payment_header(_tamper(header, fn)), amount=PRICE), code
        )

    poor = Account.create()
    chain.mint(rails[0].asset, poor.address, PRICE - 1)
    await _rejected(
        processor.verify(decode_payment_header(await pay_v2(poor, rails)), amount=PRICE),
        "insufficient_balance",
    )


# -- facilitator mode -------------------------------------------------------------------


def _rail_from_requirements(version: int, req: dict[str, Any]) -> tuple[ExactEvmRail, int]:
    network = req["network"]
    chain_id = (
        V1_NETWORK_CHAIN_IDS[network] if version == 1 else int(network.removeprefix("eip155:"))
    )
    amount = int(req["maxAmountRequired"] if version == 1 else req["amount"])
    extra = req.get("extra") or {}
    rail = ExactEvmRail(
        chain_id=chain_id,
        asset=req["asset"],
        pay_to=req["payTo"],
        token_name=extra["name"],
        token_version=extra["version"],
    )
    return rail, amount


def facilitator_app(clients: dict[int, EvmClient]) -> web.Application:
    """A minimal x402 facilitator: POST /verify and /settle with the spec's JSON bodies."""

    async def _verified(request: web.Request) -> tuple[Any, Any, str]:
        body = await request.json()
        version = int(body["x402Version"])
        rail, amount = _rail_from_requirements(version, body["paymentRequirements"])
        payment = (PaymentPayloadV1 if version == 1 else PaymentPayload).model_validate(
            body["paymentPayload"]
        )
        local = LocalX402Processor([rail], clients)
        verified = await local.verify(
            payment, amount=amount, resource_url=body["paymentRequirements"].get("resource", "")
        )
        return local, verified, rail.network if version == 2 else rail.v1_network or ""

    async def verify(request: web.Request) -> web.Response:
        try:
            _, verified, _ = await _verified(request)
        except (PaymentRejected, PaymentConflict) as exc:
            code = (
                "invalid_exact_evm_nonce_already_used"
                if exc.code == "nonce_already_used"
                else exc.code
            )
            return web.json_response(
                VerifyResponse(
                    is_valid=False,
                    invalid_reason=code,
                    invalid_message=exc.message,
                ).model_dump(by_alias=True, exclude_none=True)
            )
        return web.json_response(
            VerifyResponse(is_valid=True, payer=verified.payer).model_dump(
                by_alias=True, exclude_none=True
            )
        )

    async def settle(request: web.Request) -> web.Response:
        network = ""
        try:
            local, verified, network = await _verified(request)
            settled = await local.settle(verified)
        except (PaymentRejected, PaymentConflict) as exc:
            code = (
                "invalid_exact_evm_nonce_already_used"
                if exc.code == "nonce_already_used"
                else exc.code
            )
            return web.json_response(
                SettleResponse(
                    success=False,
                    error_reason=code,
                    error_message=exc.message,
                    transaction="",
                    network=network,
                ).model_dump(by_alias=True, exclude_none=True)
            )
        return web.json_response(
            SettleResponse(
                success=True,
                transaction=settled.transaction,
                network=settled.network,
                payer=settled.payer,
                amount=str(settled.amount),
            ).model_dump(by_alias=True, exclude_none=True)
        )

    app = web.Application()
    app.router.add_post("/verify", verify)
    app.router.add_post("/settle", settle)
    return app


@pytest.fixture
async def facilitator(
    aiohttp_server: Any, node: JsonRpcServer, chain: EvmChain
) -> AsyncIterator[FacilitatorX402Processor]:
    # The facilitator pays settlement gas from its own key, as a real one would.
    fac_evm = EvmClient(node.url, gas_key=chain.new_account().key.hex(), poll_interval=0.02)
    server = await aiohttp_server(facilitator_app({chain.chain_id: fac_evm, BASE_SEPOLIA: fac_evm}))
    yield server
    await fac_evm.close()


@pytest.fixture
async def remote(
    facilitator: Any, rails: list[ExactEvmRail]
) -> AsyncIterator[FacilitatorX402Processor]:
    proc = FacilitatorX402Processor(str(facilitator.make_url("/")).rstrip("/"), rails)
    yield proc
    await proc.close()


@pytest.mark.parametrize("version", [2, 1])
async def test_facilitator_mode_verifies_and_settles(
    remote: FacilitatorX402Processor,
    chain: EvmChain,
    merchant: str,
    payer: LocalAccount,
    version: int,
) -> None:
    header = await (pay_v2 if version == 2 else pay_v1)(payer, remote.rails)
    payment = decode_payment_header(header)
    token = remote.rails[0 if version == 2 else 1].asset
    before = chain.token_balance(token, merchant)

    verified = await remote.verify(payment, amount=PRICE, resource_url=RESOURCE)
    assert (verified.version, verified.payer, verified.amount, verified.asset) == (
        version,
        payer.address,
        PRICE,
        token,
    )
    settlement = await remote.settle(verified)
    assert chain.receipt(settlement.transaction)["status"] == 1
    assert chain.token_balance(token, merchant) == before + PRICE
    response = decode_payment_response_header(settlement.header_value)
    assert response.success and response.payer == payer.address

    await _rejected(
        remote.verify(decode_payment_header(header), amount=PRICE, resource_url=RESOURCE),
        "nonce_already_used",
        PaymentConflict,
    )


async def test_facilitator_mode_rejections(
    remote: FacilitatorX402Processor, payer: LocalAccount
) -> None:
    header = await pay_v2(payer, remote.rails)

    def flip(d: dict[str, Any]) -> None:
        sig = bytearray.fromhex(d["payload"]["signature"][2:])
        sig[7] ^= 0x01
        d["payload"]["signature"] = "0x" + sig.hex()

    # The signature is the facilitator's to check here.
    await _rejected(
        remote.verify(decode_payment_header(_tamper(header, flip)), amount=PRICE),
        "invalid_signature",
    )
    # Amount and recipient are checked on our side before the facilitator is asked.
    await _rejected(remote.verify(decode_payment_header(header), amount=PRICE * 2), "wrong_amount")
