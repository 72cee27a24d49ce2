"""The Stripe payment rail: Checkout top-ups, saved cards, off-session charges, Connect payouts.

This module is a thin, typed wrapper over the official ``stripe`` SDK. It owns no
state and never touches the ledger: it turns Tollway intents into Stripe API
calls and Stripe webhooks into normalized events; the caller (billing/proxy)
decides what to credit or debit, keyed by the PaymentIntent id.

Why the choices below:

- Every call uses the SDK's ``*_async`` methods through its ``AIOHTTPClient``, so
  the event loop is never blocked on Stripe (the proxy hot path shares the loop).
  ``aiohttp`` is imported only for its client timeout type; billing never imports
  the web layer.
- The API base is configurable so tests (and a staging mock) can point the SDK
  at a local server speaking the Stripe REST protocol.
- Amounts are integers in the currency's minor unit (cents for USD). Converting
  cents to a ledger asset unit is the caller's job.
- Stripe errors are mapped to ``billing.errors`` types so the edge renders them
  as the standard JSON error shape. A refused payout (Stripe answered 4xx) is
  ``PayoutFailed``: the money did not move and the debit can be reversed. A
  network error or 5xx means the outcome is unknown, so it is
  ``UpstreamRailError``: retry with the same idempotency key rather than reverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self

import aiohttp
import stripe

from billing.errors import (
    BillingError,
    PaymentRejected,
    PayoutFailed,
    UpstreamRailError,
)
from billing.rails.stripe_events import (
    OWNER_KEY,
    CreditEvent,
    IgnoredEvent,
    ReversalEvent,
    ReversalPart,
    SetupCompletedEvent,
    StripeEvent,
    WebhookRejected,
    normalize_event,
)

DEFAULT_API_BASE = "https://api.stripe.com"

# Stripe's own three-letter lowercase ISO codes; we refuse anything else before a
# round trip so a typo never becomes a 400 from Stripe at the edge.
_CURRENCY_RE = re.compile(r"^[a-z]{3}$")

PURPOSE_KEY = "tollway_purpose"


class ChargeDeclined(PaymentRejected):
    """Stripe refused an off-session charge (card declined, authentication required...).

    ``payment_intent_id`` is set when Stripe created the PaymentIntent before declining
    it (the usual case), so the caller can log it and start its cooldown.
    """

    code = "charge_declined"

    def __init__(
        self,
        message: str,
        *,
        payment_intent_id: str | None = None,
        decline_code: str | None = None,
        stripe_code: str | None = None,
    ):
        super().__init__(message)
        self.payment_intent_id = payment_intent_id
        self.decline_code = decline_code
        self.stripe_code = stripe_code


@dataclass(frozen=True, slots=True)
class StripeRailConfig:
    """Everything the rail needs, read once at start-up from the config layer."""

    api_key: str
    webhook_secret: str
    success_url: str
    cancel_url: str
    api_base: str = DEFAULT_API_BASE
    # Connect (provider payouts through Express accounts).
    connect_country: str = "US"
    # Express accounts in the platform's country need card_payments with transfers;
    # cross-border "recipient" accounts need transfers only. Configurable for that reason.
    connect_capabilities: tuple[str, ...] = ("card_payments", "transfers")
    # Product name shown on the Checkout page of a top-up.
    topup_product_name: str = "Tollway balance top-up"
    # Retries are safe: every POST carries an Idempotency-Key (ours, or one the SDK makes).
    max_network_retries: int = 2
    timeout_seconds: float = 30.0
    # Webhook timestamp tolerance; the SDK default (300 s) unless an operator must change it.
    webhook_tolerance_seconds: int = stripe.Webhook.DEFAULT_TOLERANCE
    extra_metadata: dict[str, str] = field(default_factory=dict)


class CheckoutSession(NamedTuple):
    """A Checkout Session created for a top-up; unpacks as ``(session_id, url)``."""

    session_id: str
    url: str


class SetupSession(NamedTuple):
    """A setup-mode Checkout Session that saves a card for the customer."""

    session_id: str
    url: str
    customer_id: str


class OffSessionCharge(NamedTuple):
    """The PaymentIntent of an off-session charge and its status (``succeeded``, ``processing``...)."""

    payment_intent_id: str
    status: str


class ConnectStatus(NamedTuple):
    account_id: str
    charges_enabled: bool
    payouts_enabled: bool
    details_submitted: bool


def _check_amount(amount_cents: int) -> None:
    # bool is an int subclass; floats and strings are refused: money is integers only.
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents <= 0:
        raise BillingError(
            f"amount must be a positive integer in minor units, got {amount_cents!r}",
            code="invalid_amount",
            status=422,
        )


def _check_currency(currency: str) -> str:
    cur = currency.lower() if isinstance(currency, str) else ""
    if not _CURRENCY_RE.match(cur):
        raise BillingError(
            f"currency must be a three-letter ISO code, got {currency!r}",
            code="invalid_currency",
            status=422,
        )
    return cur


def _stripe_message(exc: stripe.StripeError) -> str:
    return exc.user_message or str(exc) or type(exc).__name__


def _map_stripe_error(exc: stripe.StripeError, what: str) -> BillingError:
    """Map an SDK error to a billing error when no call-specific mapping applies."""
    if isinstance(exc, (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)):
        return UpstreamRailError(f"Stripe unavailable during {what}: {_stripe_message(exc)}")
    if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
        # Our key is wrong: an operator problem, not the caller's.
        return UpstreamRailError(f"Stripe refused our credentials during {what}")
    status = exc.http_status or 502
    if status >= 500:
        return UpstreamRailError(f"Stripe error during {what}: {_stripe_message(exc)}")
    if status == 404:
        return BillingError(_stripe_message(exc), code="stripe_not_found", status=404)
    return BillingError(_stripe_message(exc), code=exc.code or "stripe_rejected", status=400)


def _outcome_unknown(exc: stripe.StripeError) -> bool:
    """True when Stripe may or may not have acted (network error, 5xx, 429)."""
    if isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError)):
        return True
    return (exc.http_status or 500) >= 500


class StripeRail:
    """The Stripe API as Tollway uses it. Build once per process and share; call ``aclose``."""

    def __init__(
        self, config: StripeRailConfig, *, http_client: stripe.HTTPClient | None = None
    ) -> None:
        if not config.api_key:
            raise ValueError("Stripe api_key is required")
        if not config.webhook_secret:
            raise ValueError("Stripe webhook_secret is required")
        self._config = config
        api_base = config.api_base.rstrip("/")
        # The SDK's aiohttp client creates its ClientSession lazily, inside the
        # running loop, so building the rail before the loop starts is fine.
        self._http = http_client or stripe.AIOHTTPClient(
            timeout=aiohttp.ClientTimeout(total=config.timeout_seconds)
        )
        self._client = stripe.StripeClient(
            config.api_key,
            # Both bases point at the same host: Connect OAuth is not used, but a
            # stray call must never leave for the real Stripe from a test setup.
            base_addresses={"api": api_base, "connect": api_base, "files": api_base},
            http_client=self._http,
            max_network_retries=config.max_network_retries,
        )

    @property
    def config(self) -> StripeRailConfig:
        return self._config

    async def aclose(self) -> None:
        """Close the pooled HTTP session the SDK opened (if any)."""
        # Only close a session that exists: touching ``_session`` would create one.
        if getattr(self._http, "_cached_session", None) is not None:
            await self._http.close_async()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _metadata(self, owner_id: str, purpose: str) -> dict[str, str]:
        return {**self._config.extra_metadata, OWNER_KEY: owner_id, PURPOSE_KEY: purpose}

    # ----------------------------------------------------------------- top-ups

    async def create_topup_session(
        self,
        owner_id: str,
        amount_cents: int,
        currency: str = "usd",
        *,
        customer_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> CheckoutSession:
        """Create a payment-mode Checkout Session paying ``amount_cents`` into ``owner_id``'s wallet.

        The amount comes from Tollway (never from the browser afterwards): the
        credit later uses what Stripe reports as paid, not what the client claims.
        """
        _check_amount(amount_cents)
        cur = _check_currency(currency)
        metadata = self._metadata(owner_id, "topup")
        params: dict[str, Any] = {
            "mode": "payment",
            "success_url": self._config.success_url,
            "cancel_url": self._config.cancel_url,
            "client_reference_id": owner_id,
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": cur,
                        "unit_amount": amount_cents,
                        "product_data": {"name": self._config.topup_product_name},
                    },
                }
            ],
            "metadata": metadata,
            # The PaymentIntent gets the owner too, so payment_intent.succeeded can be
            # attributed on its own (it may arrive before checkout.session.completed).
            "payment_intent_data": {"metadata": metadata},
        }
        if customer_id:
            params["customer"] = customer_id
        options: dict[str, Any] = {}
        if idempotency_key:
            options["idempotency_key"] = idempotency_key
        try:
            session = await self._client.v1.checkout.sessions.create_async(params, options)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "checkout session creation") from exc
        if not session.url:
            raise UpstreamRailError("Stripe returned a Checkout Session without a URL")
        return CheckoutSession(session.id, session.url)

    async def create_customer(self, owner_id: str, *, idempotency_key: str | None = None) -> str:
        """Create a Stripe Customer for ``owner_id``; returns its id (``cus_...``)."""
        options: dict[str, Any] = {}
        if idempotency_key:
            options["idempotency_key"] = idempotency_key
        try:
            customer = await self._client.v1.customers.create_async(
                {"metadata": self._metadata(owner_id, "wallet")},
                options,  # type: ignore[arg-type]
            )
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "customer creation") from exc
        return customer.id

    async def create_setup_session(
        self, owner_id: str, customer_id: str | None = None
    ) -> SetupSession:
        """Create a setup-mode Checkout that saves a card for off-session use.

        Creates the Customer first when ``customer_id`` is None; store the returned
        ``customer_id`` on the wallet.
        """
        if customer_id is None:
            customer_id = await self.create_customer(owner_id)
        metadata = self._metadata(owner_id, "setup")
        params: dict[str, Any] = {
            "mode": "setup",
            "customer": customer_id,
            # Setup mode needs either a currency or explicit method types; we save cards.
            "payment_method_types": ["card"],
            "success_url": self._config.success_url,
            "cancel_url": self._config.cancel_url,
            "client_reference_id": owner_id,
            "metadata": metadata,
            "setup_intent_data": {"metadata": metadata},
        }
        try:
            session = await self._client.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "setup session creation") from exc
        if not session.url:
            raise UpstreamRailError("Stripe returned a Checkout Session without a URL")
        return SetupSession(session.id, session.url, customer_id)

    # ----------------------------------------------------------------- webhooks

    def parse_webhook(self, payload: bytes, sig_header: str | None) -> StripeEvent:
        """Verify and normalize a webhook delivery.

        ``payload`` must be the raw request body (the signature covers its exact
        bytes). Raises ``WebhookRejected`` (400) for a missing/forged signature, a
        timestamp older than the tolerance, or a body that is not an event.
        Synchronous on purpose: it is pure CPU (one HMAC), no I/O.
        """
        try:
            event = stripe.Webhook.construct_event(
                payload,
                sig_header,
                self._config.webhook_secret,
                tolerance=self._config.webhook_tolerance_seconds,
                api_key=self._config.api_key,
            )
        except stripe.SignatureVerificationError as exc:
            raise WebhookRejected(f"webhook signature refused: {_stripe_message(exc)}") from exc
        except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as exc:
            # Body is not JSON / not an event; the signature may even be valid.
            raise WebhookRejected(f"webhook body is not a Stripe event: {exc}") from exc
        data = event.to_dict()
        return normalize_event(data)

    # ----------------------------------------------------------------- off-session

    async def default_payment_method(self, customer_id: str) -> str | None:
        """The customer's most recently saved card, or None."""
        try:
            methods = await self._client.v1.payment_methods.list_async(
                {"customer": customer_id, "type": "card", "limit": 1}
            )
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "payment method lookup") from exc
        # Stripe lists newest first.
        for pm in methods.data:
            return pm.id
        return None

    async def charge_off_session(
        self,
        customer_id: str,
        payment_method_id: str | None,
        amount_cents: int,
        currency: str,
        idempotency_key: str,
        *,
        owner_id: str,
    ) -> OffSessionCharge:
        """Charge a saved card without the customer present (auto top-up).

        ``idempotency_key`` is sent as Stripe's ``Idempotency-Key`` header: use one per
        auto top-up episode so a retry (ours or the SDK's) never charges twice.
        ``owner_id`` goes into the PaymentIntent metadata so its
        ``payment_intent.succeeded`` webhook is attributed like a Checkout top-up.
        When ``payment_method_id`` is None the customer's newest saved card is used
        (PaymentIntents do not fall back to a default card by themselves).

        Raises ``ChargeDeclined`` (402) when Stripe refuses the card and
        ``UpstreamRailError`` when the outcome is unknown (retry with the same key).
        """
        _check_amount(amount_cents)
        cur = _check_currency(currency)
        if not idempotency_key:
            raise ValueError("an off-session charge needs an idempotency key")
        if payment_method_id is None:
            payment_method_id = await self.default_payment_method(customer_id)
            if payment_method_id is None:
                raise ChargeDeclined(
                    "no saved card for this customer", stripe_code="no_payment_method"
                )
        params: dict[str, Any] = {
            "amount": amount_cents,
            "currency": cur,
            "customer": customer_id,
            "payment_method": payment_method_id,
            "confirm": True,
            "off_session": True,
            "metadata": self._metadata(owner_id, "auto_topup"),
        }
        try:
            pi = await self._client.v1.payment_intents.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.CardError as exc:
            err = exc.error
            pi_obj = getattr(err, "payment_intent", None) if err is not None else None
            raise ChargeDeclined(
                _stripe_message(exc),
                payment_intent_id=getattr(pi_obj, "id", None),
                decline_code=getattr(err, "decline_code", None) if err is not None else None,
                stripe_code=exc.code,
            ) from exc
        except stripe.StripeError as exc:
            if _outcome_unknown(exc):
                raise UpstreamRailError(
                    f"off-session charge outcome unknown: {_stripe_message(exc)}"
                ) from exc
            if exc.http_status == 402:
                raise ChargeDeclined(_stripe_message(exc), stripe_code=exc.code) from exc
            raise _map_stripe_error(exc, "off-session charge") from exc
        return OffSessionCharge(pi.id, pi.status)

    # ----------------------------------------------------------------- Connect

    async def create_connect_account(
        self, owner_id: str, *, email: str | None = None, idempotency_key: str | None = None
    ) -> str:
        """Create an Express connected account for a provider; returns ``acct_...``."""
        params: dict[str, Any] = {
            "type": "express",
            "country": self._config.connect_country,
            "capabilities": {c: {"requested": True} for c in self._config.connect_capabilities},
            "metadata": self._metadata(owner_id, "connect"),
        }
        if email:
            params["email"] = email
        options: dict[str, Any] = {}
        if idempotency_key:
            options["idempotency_key"] = idempotency_key
        try:
            account = await self._client.v1.accounts.create_async(params, options)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "Connect account creation") from exc
        return account.id

    async def onboarding_link(self, account_id: str, refresh_url: str, return_url: str) -> str:
        """A single-use Express onboarding URL (it expires in minutes; make one per click)."""
        try:
            link = await self._client.v1.account_links.create_async(
                {
                    "account": account_id,
                    "type": "account_onboarding",
                    "refresh_url": refresh_url,
                    "return_url": return_url,
                }
            )
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "Connect onboarding link") from exc
        return link.url

    async def connect_status(self, account_id: str) -> ConnectStatus:
        """Where the provider is in onboarding; pay out only when ``payouts_enabled``."""
        try:
            account = await self._client.v1.accounts.retrieve_async(account_id)
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "Connect status") from exc
        return ConnectStatus(
            account.id,
            bool(account.charges_enabled),
            bool(account.payouts_enabled),
            bool(account.details_submitted),
        )

    async def transfer_to_connect(
        self,
        account_id: str,
        amount_cents: int,
        currency: str,
        idempotency_key: str,
        *,
        transfer_group: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Move platform funds to a connected account; returns the transfer id (``tr_...``).

        Raises ``PayoutFailed`` when Stripe refuses (4xx: nothing moved, reverse the
        debit) and ``UpstreamRailError`` when the outcome is unknown (network error or
        5xx). After an unknown outcome do not reverse blindly: Stripe replays a saved
        result for the same ``idempotency_key`` (a 5xx included), so pass a
        ``transfer_group`` (e.g. the withdrawal id) and ask ``find_transfers`` whether
        the transfer exists before deciding.
        """
        _check_amount(amount_cents)
        cur = _check_currency(currency)
        if not idempotency_key:
            raise ValueError("a transfer needs an idempotency key")
        params: dict[str, Any] = {
            "amount": amount_cents,
            "currency": cur,
            "destination": account_id,
        }
        if transfer_group:
            params["transfer_group"] = transfer_group
        if metadata:
            params["metadata"] = dict(metadata)
        try:
            transfer = await self._client.v1.transfers.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            if _outcome_unknown(exc):
                raise UpstreamRailError(
                    f"Connect transfer outcome unknown: {_stripe_message(exc)}"
                ) from exc
            if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
                raise _map_stripe_error(exc, "Connect transfer") from exc
            failed = PayoutFailed(f"Stripe refused the transfer: {_stripe_message(exc)}")
            failed.stripe_code = exc.code  # type: ignore[attr-defined]
            raise failed from exc
        return transfer.id

    async def find_transfers(self, transfer_group: str, *, limit: int = 10) -> list[str]:
        """Ids of the transfers made under ``transfer_group`` (newest first), to reconcile
        a transfer whose outcome was unknown."""
        try:
            found = await self._client.v1.transfers.list_async(
                {"transfer_group": transfer_group, "limit": limit}
            )
        except stripe.StripeError as exc:
            raise _map_stripe_error(exc, "transfer lookup") from exc
        return [t.id for t in found.data]


# --------------------------------------------------------------------- normalization


__all__ = [
    "DEFAULT_API_BASE",
    "ChargeDeclined",
    "CheckoutSession",
    "ConnectStatus",
    "CreditEvent",
    "IgnoredEvent",
    "OffSessionCharge",
    "ReversalEvent",
    "ReversalPart",
    "SetupCompletedEvent",
    "SetupSession",
    "StripeEvent",
    "StripeRail",
    "StripeRailConfig",
    "WebhookRejected",
    "normalize_event",
]
