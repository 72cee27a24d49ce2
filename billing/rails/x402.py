"""x402 "exact" payments on EVM (EIP-3009): offers, header codecs, verify and settle.

Protocol logic only; the proxy reads and writes the headers, the ledger
reserves ``(payer, nonce)`` and records money. The wire models and header
codecs are the ``x402`` package's (``PaymentRequired``, ``PaymentRequirements``,
their V1 forms, ``PaymentPayload``, ``SettleResponse``, the base64 header
helpers and ``HTTPFacilitatorClient``), so what we send is exactly what the
official clients parse.

Verification never trusts the client's copy of the requirements or its claims
about itself: the payment is matched against the offers *we* build for this
call, the signed authorization must carry our recipient and our exact amount,
and the payer is whoever the EIP-712 signature recovers to.

Two processors share one interface (``verify`` then ``settle``):

* ``LocalX402Processor`` checks the signature with eth_account, reads nonce and
  balance from the token, and settles with our gas key;
* ``FacilitatorX402Processor`` hands verify and settle to an external x402
  facilitator over HTTP, after the same local matching.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import is_address, to_checksum_address
from pydantic import ValidationError
from x402.http.constants import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
)
from x402.http.facilitator_client import (
    FacilitatorConfig,
    FacilitatorResponseError,
    HTTPFacilitatorClient,
)
from x402.http.utils import encode_payment_required_header, encode_payment_response_header
from x402.mechanisms.evm.constants import ERR_NONCE_ALREADY_USED, SCHEME_EXACT
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    SettleResponse,
)

from billing.errors import PaymentConflict, PaymentRejected, UpstreamRailError
from billing.rails.evm import Eip3009Authorization, EvmClient

__all__ = [
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "X_PAYMENT_HEADER",
    "X_PAYMENT_RESPONSE_HEADER",
    "ExactEvmRail",
    "FacilitatorX402Processor",
    "LocalX402Processor",
    "VerifiedX402Payment",
    "X402Offer",
    "X402Settlement",
    "build_offer",
    "decode_payment_header",
    "payment_from_headers",
    "payment_response_header",
    "response_header_name",
    "v1_network_name",
]

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"

# A signed EIP-3009 payload is well under 2 KiB; bound what we base64-decode.
MAX_PAYMENT_HEADER_BYTES = 16 * 1024

# secp256k1n / 2: the token refuses the malleable high-s twin, so do we.
_HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_HEX32_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX_SIG_RE = re.compile(r"^0x[0-9a-fA-F]{130}$")

_CHAIN_ID_TO_V1_NAME: dict[int, str] = {cid: name for name, cid in V1_NETWORK_CHAIN_IDS.items()}

_EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_TRANSFER_WITH_AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


def v1_network_name(chain_id: int) -> str | None:
    """x402 v1's name for ``chain_id`` (``84532`` -> ``base-sepolia``), if it has one."""
    return _CHAIN_ID_TO_V1_NAME.get(chain_id)


@dataclass(frozen=True)
class ExactEvmRail:
    """One EIP-3009 token we accept through x402.

    ``chain_id`` is the chain the offer names and the EIP-712 domain signs over;
    for a real token that is the chain it lives on. ``token_name`` and
    ``token_version`` must equal the token's EIP-712 domain
    (``EvmClient.token_metadata`` reads them).
    """

    chain_id: int
    asset: str
    pay_to: str
    token_name: str
    token_version: str
    decimals: int = 6
    max_timeout_seconds: int = 300

    def __post_init__(self) -> None:
        for what in ("asset", "pay_to"):
            value = getattr(self, what)
            if not is_address(value):
                raise ValueError(f"ExactEvmRail.{what} is not an address: {value!r}")
            object.__setattr__(self, what, to_checksum_address(value))

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"

    @property
    def v1_network(self) -> str | None:
        return v1_network_name(self.chain_id)

    @property
    def extra(self) -> dict[str, Any]:
        return {"name": self.token_name, "version": self.token_version}

    def requirements_v2(self, amount: int) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=SCHEME_EXACT,
            network=self.network,
            asset=self.asset,
            amount=str(amount),
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra=self.extra,
        )

    def requirements_v1(
        self,
        amount: int,
        *,
        resource_url: str,
        description: str = "",
        mime_type: str = "application/json",
    ) -> PaymentRequirementsV1 | None:
        if self.v1_network is None:
            return None
        return PaymentRequirementsV1(
            scheme=SCHEME_EXACT,
            network=self.v1_network,
            max_amount_required=str(amount),
            resource=resource_url,
            description=description,
            mime_type=mime_type,
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            asset=self.asset,
            extra=self.extra,
        )


# -- offers ----------------------------------------------------------------------


@dataclass(frozen=True)
class X402Offer:
    """What a 402 answer carries for x402 clients of both versions."""

    v2: PaymentRequired
    v1: PaymentRequiredV1

    @property
    def payment_required_header(self) -> str:
        """Value of the v2 ``PAYMENT-REQUIRED`` header (base64 JSON)."""
        return encode_payment_required_header(self.v2)

    @property
    def v1_body(self) -> dict[str, Any]:
        """The JSON body for v1 clients: ``{"x402Version": 1, "error", "accepts": [...]}``."""
        return self.v1.model_dump(by_alias=True, exclude_none=True)


def build_offer(
    rails: Sequence[ExactEvmRail],
    *,
    amount: int,
    resource_url: str,
    description: str = "",
    mime_type: str = "application/json",
    error: str = "payment required",
) -> X402Offer:
    """Offers for ``amount`` smallest units on every rail (v1: rails with a v1 name)."""
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError("amount must be a positive integer in smallest units")
    v2 = PaymentRequired(
        x402_version=2,
        error=error,
        resource=ResourceInfo(
            url=resource_url, description=description or None, mime_type=mime_type or None
        ),
        accepts=[r.requirements_v2(amount) for r in rails],
    )
    v1_accepts = []
    seen_v1: set[str] = set()
    for r in rails:
        req = r.requirements_v1(
            amount, resource_url=resource_url, description=description, mime_type=mime_type
        )
        # v1 payloads name only the network, not the asset: offering two tokens
        # on one v1 network would make the payment ambiguous.
        if req is not None and req.network not in seen_v1:
            seen_v1.add(req.network)
            v1_accepts.append(req)
    v1 = PaymentRequiredV1(x402_version=1, error=error, accepts=v1_accepts)
    return X402Offer(v2=v2, v1=v1)


# -- header codecs -----------------------------------------------------------------


def _b64_json(value: str) -> dict[str, Any]:
    if not isinstance(value, str) or not value.strip():
        raise PaymentRejected("empty payment header", code="invalid_payment_header")
    if len(value) > MAX_PAYMENT_HEADER_BYTES:
        raise PaymentRejected("payment header too large", code="invalid_payment_header")
    raw = value.strip()
    raw += "=" * (-len(raw) % 4)
    try:
        # Standard alphabet per spec; URL-safe is tolerated for lenient clients.
        decoded = base64.b64decode(raw.replace("-", "+").replace("_", "/"), validate=True)
        data = json.loads(decoded)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise PaymentRejected(
            "payment header is not base64 JSON", code="invalid_payment_header"
        ) from exc
    if not isinstance(data, dict):
        raise PaymentRejected("payment header is not a JSON object", code="invalid_payment_header")
    return data


def decode_payment_header(value: str) -> PaymentPayload | PaymentPayloadV1:
    """Decode a ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1) header value.

    The version inside the payload decides the model; either header may carry
    either version because clients in the wild mix them.
    """
    data = _b64_json(value)
    version = data.get("x402Version")
    try:
        if version == 2:
            return PaymentPayload.model_validate(data)
        if version == 1:
            return PaymentPayloadV1.model_validate(data)
    except ValidationError as exc:
        raise PaymentRejected(
            f"malformed x402 payload: {exc.errors()[0]['msg']}", code="invalid_payment_header"
        ) from exc
    raise PaymentRejected(f"unsupported x402Version {version!r}", code="unsupported_x402_version")


def payment_from_headers(headers: Mapping[str, str]) -> PaymentPayload | PaymentPayloadV1 | None:
    """The x402 payment on a request, if any (``PAYMENT-SIGNATURE`` wins over ``X-PAYMENT``).

    ``headers`` should be case-insensitive (aiohttp's CIMultiDict is).
    """
    value = headers.get(PAYMENT_SIGNATURE_HEADER)
    if value is None:
        value = headers.get(X_PAYMENT_HEADER)
    if value is None:
        return None
    return decode_payment_header(value)


def response_header_name(version: int) -> str:
    """``PAYMENT-RESPONSE`` for v2 payments, ``X-PAYMENT-RESPONSE`` for v1."""
    return PAYMENT_RESPONSE_HEADER if version >= 2 else X_PAYMENT_RESPONSE_HEADER


# -- verification -------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedX402Payment:
    """A payment that passed every check; what the ledger reserves and settle needs."""

    version: int
    payer: str
    nonce: str  # 0x + 64 hex, lower case: with (chain, asset, payer) the replay key
    amount: int
    asset: str
    network: str  # as the payment named it: CAIP-2 (v2) or the v1 name
    chain_id: int
    pay_to: str
    valid_before: int
    authorization: Eip3009Authorization
    signature: bytes
    payload: PaymentPayload | PaymentPayloadV1 = field(repr=False)
    requirements: PaymentRequirements | PaymentRequirementsV1 = field(repr=False)
    rail: ExactEvmRail = field(repr=False)

    @property
    def reservation_key(self) -> str:
        """Unique per authorization on chain: EIP-3009 nonces are per (token, authorizer)."""
        return f"x402:eip155:{self.chain_id}:{self.asset.lower()}:{self.payer.lower()}:{self.nonce}"


@dataclass(frozen=True)
class X402Settlement:
    success: bool
    transaction: str
    network: str
    payer: str
    amount: int
    version: int

    @property
    def header_name(self) -> str:
        return response_header_name(self.version)

    @property
    def header_value(self) -> str:
        return payment_response_header(self)


def payment_response_header(settlement: X402Settlement) -> str:
    """Base64 ``SettleResponse`` JSON for ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``."""
    response = SettleResponse(
        success=settlement.success,
        transaction=settlement.transaction,
        network=settlement.network,
        payer=settlement.payer,
        amount=str(settlement.amount),
    )
    return encode_payment_response_header(response)


def _uint(value: Any, what: str) -> int:
    # Decimal strings per spec; JSON integers tolerated. Never floats, signs or hex.
    if isinstance(value, bool):
        raise PaymentRejected(f"authorization {what} is not an integer", code="invalid_payload")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 78:
        return int(value)
    raise PaymentRejected(f"authorization {what} is not a decimal integer", code="invalid_payload")


@dataclass(frozen=True)
class _Matched:
    version: int
    rail: ExactEvmRail
    requirements: PaymentRequirements | PaymentRequirementsV1
    network: str
    authorization: Eip3009Authorization
    signature: bytes


def _match_offer(
    payment: PaymentPayload | PaymentPayloadV1,
    rails: Sequence[ExactEvmRail],
    amount: int,
    *,
    resource_url: str,
) -> _Matched:
    """Checks 1-3: an offered requirement, our recipient, our exact amount."""
    if isinstance(payment, PaymentPayloadV1):
        version, scheme, network = 1, payment.scheme, payment.network
        asset: str | None = None
        candidates = [r for r in rails if r.v1_network == network]
    else:
        version = 2
        scheme, network, asset = (
            payment.accepted.scheme,
            payment.accepted.network,
            payment.accepted.asset,
        )
        candidates = [
            r
            for r in rails
            if r.network == network and is_address(asset) and to_checksum_address(asset) == r.asset
        ]
    if scheme != SCHEME_EXACT:
        raise PaymentRejected(f"scheme {scheme!r} is not offered", code="unsupported_scheme")
    if not candidates:
        raise PaymentRejected(
            f"no offer for network {network!r}" + (f" and asset {asset!r}" if asset else ""),
            code="no_matching_requirement",
        )
    rail = candidates[0]

    inner = payment.payload
    if "permit2Authorization" in inner:
        raise PaymentRejected(
            "only EIP-3009 authorizations are accepted", code="unsupported_asset_transfer_method"
        )
    auth = inner.get("authorization")
    sig_hex = inner.get("signature")
    if not isinstance(auth, dict):
        raise PaymentRejected("payload has no authorization", code="invalid_payload")
    if not isinstance(sig_hex, str) or not _HEX_SIG_RE.match(sig_hex):
        # Only plain 65-byte ECDSA: smart-wallet (ERC-1271/6492) payers are out of scope.
        raise PaymentRejected("signature must be 65 bytes of hex", code="invalid_signature")
    from_addr, to_addr, nonce = auth.get("from"), auth.get("to"), auth.get("nonce")
    if not (isinstance(from_addr, str) and is_address(from_addr)):
        raise PaymentRejected("authorization.from is not an address", code="invalid_payload")
    if not (isinstance(to_addr, str) and is_address(to_addr)):
        raise PaymentRejected("authorization.to is not an address", code="invalid_payload")
    if not (isinstance(nonce, str) and _HEX32_RE.match(nonce)):
        raise PaymentRejected("authorization.nonce is not 32 bytes of hex", code="invalid_payload")
    authorization = Eip3009Authorization(
        from_address=to_checksum_address(from_addr),
        to=to_checksum_address(to_addr),
        value=_uint(auth.get("value"), "value"),
        valid_after=_uint(auth.get("validAfter"), "validAfter"),
        valid_before=_uint(auth.get("validBefore"), "validBefore"),
        nonce=bytes.fromhex(nonce[2:]),
    )

    # 2. recipient: the signed `to`, and (v2) the requirement the client echoes.
    if authorization.to != rail.pay_to:
        raise PaymentRejected("payment is to another recipient", code="wrong_recipient")
    if isinstance(payment, PaymentPayload) and (
        not is_address(payment.accepted.pay_to)
        or to_checksum_address(payment.accepted.pay_to) != rail.pay_to
    ):
        raise PaymentRejected(
            "accepted requirement names another recipient", code="wrong_recipient"
        )
    # 3. exact amount: "exact" means neither less nor more than the price.
    if authorization.value != amount:
        raise PaymentRejected(
            f"authorized {authorization.value}, price is {amount}", code="wrong_amount"
        )

    if version == 2:
        requirements: PaymentRequirements | PaymentRequirementsV1 = rail.requirements_v2(amount)
    else:
        req_v1 = rail.requirements_v1(amount, resource_url=resource_url)
        assert req_v1 is not None
        requirements = req_v1
    return _Matched(
        version=version,
        rail=rail,
        requirements=requirements,
        network=network,
        authorization=authorization,
        signature=bytes.fromhex(sig_hex[2:]),
    )


def _check_window(auth: Eip3009Authorization, now: int, margin: int) -> None:
    """Check 4: usable now, and still usable when we settle after the upstream answers."""
    if auth.valid_after > now:
        raise PaymentRejected("authorization is not valid yet", code="authorization_not_yet_valid")
    if auth.valid_before < now + margin:
        raise PaymentRejected(
            "authorization has expired (or expires before settlement)", code="authorization_expired"
        )


def recover_authorizer(rail: ExactEvmRail, auth: Eip3009Authorization, signature: bytes) -> str:
    """The address whose key signed ``auth`` under ``rail``'s EIP-712 domain."""
    if len(signature) != 65:
        raise PaymentRejected("signature must be 65 bytes", code="invalid_signature")
    if int.from_bytes(signature[32:64], "big") > _HALF_CURVE_ORDER or signature[64] not in (
        0,
        1,
        27,
        28,
    ):
        raise PaymentRejected("non-canonical signature", code="invalid_signature")
    typed = {
        "types": {
            "EIP712Domain": _EIP712_DOMAIN_FIELDS,
            "TransferWithAuthorization": _TRANSFER_WITH_AUTHORIZATION_FIELDS,
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": rail.token_name,
            "version": rail.token_version,
            "chainId": rail.chain_id,
            "verifyingContract": rail.asset,
        },
        "message": {
            "from": auth.from_address,
            "to": auth.to,
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": auth.nonce,
        },
    }
    sig = signature if signature[64] >= 27 else signature[:64] + bytes([signature[64] + 27])
    try:
        return to_checksum_address(
            Account.recover_message(encode_typed_data(full_message=typed), signature=sig)
        )
    except Exception as exc:
        raise PaymentRejected("signature does not recover", code="invalid_signature") from exc


def _verified(
    m: _Matched, payment: PaymentPayload | PaymentPayloadV1, payer: str
) -> VerifiedX402Payment:
    return VerifiedX402Payment(
        version=m.version,
        payer=payer,
        nonce="0x" + m.authorization.nonce.hex(),
        amount=m.authorization.value,
        asset=m.rail.asset,
        network=m.network,
        chain_id=m.rail.chain_id,
        pay_to=m.rail.pay_to,
        valid_before=m.authorization.valid_before,
        authorization=m.authorization,
        signature=m.signature,
        payload=payment,
        requirements=m.requirements,
        rail=m.rail,
    )


class LocalX402Processor:
    """Verify with our own checks and settle on chain with our gas key.

    ``clients`` maps a rail's ``chain_id`` to the ``EvmClient`` that reaches the
    chain hosting its token (normally the same number; on a test chain a token
    may pin another domain chain id).
    """

    def __init__(
        self,
        rails: Sequence[ExactEvmRail],
        clients: Mapping[int, EvmClient],
        *,
        settle_margin_seconds: int = 6,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rails = list(rails)
        self.clients = dict(clients)
        self.settle_margin_seconds = settle_margin_seconds
        self._clock = clock

    def _client(self, rail: ExactEvmRail) -> EvmClient:
        try:
            return self.clients[rail.chain_id]
        except KeyError:
            raise UpstreamRailError(f"no EVM client for chain {rail.chain_id}") from None

    async def verify(
        self,
        payment: PaymentPayload | PaymentPayloadV1,
        *,
        amount: int,
        rails: Sequence[ExactEvmRail] | None = None,
        resource_url: str = "",
    ) -> VerifiedX402Payment:
        """Run the checks in the issue's order; raise PaymentRejected / PaymentConflict.

        ``rails`` overrides the configured ones (e.g. a service with its own payTo).
        The local (payer, nonce) reservation is the caller's, before settling.
        """
        m = _match_offer(
            payment, self.rails if rails is None else rails, amount, resource_url=resource_url
        )
        _check_window(m.authorization, int(self._clock()), self.settle_margin_seconds)
        # 5. the signature decides who pays; `from` is only a claim until it recovers.
        signer = recover_authorizer(m.rail, m.authorization, m.signature)
        if signer != m.authorization.from_address:
            raise PaymentRejected("signature is not from the payer", code="invalid_signature")
        client = self._client(m.rail)
        # 6. unused on chain (the ledger checks its own reservations).
        if await client.authorization_state(m.rail.asset, signer, m.authorization.nonce):
            raise PaymentConflict("this authorization was already used", code="nonce_already_used")
        # 7. the money is there.
        balance = await client.token_balance(m.rail.asset, signer)
        if balance < m.authorization.value:
            raise PaymentRejected("payer balance too low", code="insufficient_balance")
        return _verified(m, payment, signer)

    async def settle(self, verified: VerifiedX402Payment) -> X402Settlement:
        """``transferWithAuthorization`` with the gas key; returns once mined with status 1."""
        client = self._client(verified.rail)
        sent = await client.transfer_with_authorization(
            verified.asset, verified.authorization, verified.signature
        )
        return X402Settlement(
            success=True,
            transaction=sent.tx_hash,
            network=verified.network,
            payer=verified.payer,
            amount=verified.amount,
            version=verified.version,
        )


_STATUS_RE = re.compile(r"failed \((\d{3})\)")


class FacilitatorX402Processor:
    """Verify and settle through an external x402 facilitator (``/verify``, ``/settle``).

    The offer matching, recipient, amount and time-window checks still run
    here first: the facilitator is asked about *our* requirements for this
    call, never about the copy the client echoes.
    """

    def __init__(
        self,
        url: str,
        rails: Sequence[ExactEvmRail],
        *,
        timeout: float = 30.0,
        settle_margin_seconds: int = 6,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.rails = list(rails)
        self.settle_margin_seconds = settle_margin_seconds
        self._clock = clock
        self._http = HTTPFacilitatorClient(FacilitatorConfig(url=url, timeout=timeout))

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        op: str,
        payment: PaymentPayload | PaymentPayloadV1,
        requirements: PaymentRequirements | PaymentRequirementsV1,
    ) -> Any:
        try:
            if op == "verify":
                return await self._http.verify(payment, requirements)
            return await self._http.settle(payment, requirements)
        except FacilitatorResponseError as exc:
            raise UpstreamRailError(f"facilitator {op}: {exc}") from exc
        except ValueError as exc:
            status = _STATUS_RE.search(str(exc))
            if status and status.group(1).startswith("4"):
                # Some facilitators answer an invalid payment with a 4xx instead
                # of a 200 + isValid=false.
                raise PaymentRejected(
                    f"facilitator refused the payment: {exc}", code="facilitator_rejected"
                ) from exc
            raise UpstreamRailError(f"facilitator {op} failed: {exc}") from exc
        except Exception as exc:
            raise UpstreamRailError(f"facilitator {op} unreachable: {exc}") from exc

    async def verify(
        self,
        payment: PaymentPayload | PaymentPayloadV1,
        *,
        amount: int,
        rails: Sequence[ExactEvmRail] | None = None,
        resource_url: str = "",
    ) -> VerifiedX402Payment:
        m = _match_offer(
            payment, self.rails if rails is None else rails, amount, resource_url=resource_url
        )
        _check_window(m.authorization, int(self._clock()), self.settle_margin_seconds)
        result = await self._call("verify", payment, m.requirements)
        if not result.is_valid:
            reason = result.invalid_reason or "invalid_payment"
            if reason == ERR_NONCE_ALREADY_USED:
                raise PaymentConflict(
                    "this authorization was already used", code="nonce_already_used"
                )
            raise PaymentRejected(result.invalid_message or reason, code=reason)
        payer = m.authorization.from_address
        if result.payer and (
            not is_address(result.payer) or to_checksum_address(result.payer) != payer
        ):
            raise PaymentRejected("facilitator names another payer", code="invalid_signature")
        return _verified(m, payment, payer)

    async def settle(self, verified: VerifiedX402Payment) -> X402Settlement:
        result = await self._call("settle", verified.payload, verified.requirements)
        if not result.success:
            reason = result.error_reason or "settlement_failed"
            if reason == ERR_NONCE_ALREADY_USED:
                raise PaymentConflict(
                    "this authorization was already used", code="nonce_already_used"
                )
            raise PaymentRejected(result.error_message or reason, code=reason)
        if not result.transaction:
            raise UpstreamRailError("facilitator settled without a transaction hash")
        return X402Settlement(
            success=True,
            transaction=result.transaction,
            network=verified.network,
            payer=verified.payer,
            amount=verified.amount,
            version=verified.version,
        )
