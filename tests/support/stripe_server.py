"""A local stand-in for the Stripe REST API, for tests.

The real Stripe API cannot be reached from the test environment, so this aiohttp
server speaks the part of its protocol Tollway uses, on 127.0.0.1 and a free port:
form-encoded requests exactly as the ``stripe`` SDK sends them, Bearer auth,
Idempotency-Key replay, Stripe-shaped objects and error bodies. Point the SDK's
API base at ``server.url`` and assert on ``server.requests`` to see what the SDK
really sent.

It also plays Stripe's side of the flows that happen outside the API: a
customer paying a Checkout page (``complete_checkout``), saving a card
(``complete_setup``), finishing Connect onboarding (``complete_onboarding``),
a refund made in the Dashboard (``refund``) and its failure at the card network
(``fail_refund``), a cardholder's chargeback (``open_dispute``) and its outcome
(``close_dispute``), and the webhook events those produce, signed like Stripe
signs them (``sign_webhook``).

Endpoints: POST /v1/checkout/sessions, GET /v1/checkout/sessions/{id},
POST /v1/customers, GET /v1/customers/{id}, GET /v1/payment_methods,
POST /v1/payment_intents, GET /v1/payment_intents/{id}, POST /v1/accounts,
GET /v1/accounts/{id}, POST /v1/account_links, POST /v1/transfers,
GET /v1/transfers (by transfer_group), GET /v1/transfers/{id}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from billing.rails.stripe_rail import StripeRail, StripeRailConfig

DEFAULT_API_KEY = "sk_test_tollway_local"
DEFAULT_WEBHOOK_SECRET = "whsec_tollway_local_test_secret"
# The API version the events claim; the SDK does not check it when parsing.
EVENT_API_VERSION = "2025-01-27.acacia"


def sign_webhook(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe sends with ``payload``.

    Stripe signs ``"{t}.{raw body}"`` with HMAC-SHA256 keyed by the endpoint secret
    (the whole ``whsec_...`` string, as bytes) and sends ``t=<unix>,v1=<hex>``.
    Written here independently of the SDK so the test checks the SDK against the
    documented scheme rather than against itself.
    """
    t = int(time.time()) if timestamp is None else int(timestamp)
    signed = str(t).encode("ascii") + b"." + payload
    mac = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event_payload(event: dict[str, Any]) -> bytes:
    """Serialize an event the way Stripe delivers it (pretty JSON, UTF-8)."""
    return json.dumps(event, indent=2).encode("utf-8")


# --------------------------------------------------------------------- form decoding

_KEY_PART = re.compile(r"\[([^\]]*)\]")


def parse_stripe_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe's bracket form encoding into nested dicts and lists.

    ``metadata[owner_id]=a`` -> ``{"metadata": {"owner_id": "a"}}``;
    ``line_items[0][quantity]=1`` -> ``{"line_items": [{"quantity": "1"}]}``.
    Values stay strings, as on the wire; handlers coerce what they need.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        head = key.split("[", 1)[0]
        parts = [head, *_KEY_PART.findall(key[len(head) :])]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TypeError(f"conflicting form key {key!r}")
        last = parts[-1]
        if last == "":
            # ``a[]=x`` style arrays: append under a fresh index.
            last = str(len(node))
        node[last] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


# --------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    form: dict[str, Any]
    query: dict[str, Any]
    headers: dict[str, str]
    status: int = 0

    @property
    def params(self) -> dict[str, Any]:
        """The request's parameters wherever they were (body for POST, query for GET)."""
        return self.form if self.method == "POST" else self.query

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("Idempotency-Key")


@dataclass
class _Failure:
    status: int
    error: dict[str, Any]


class StripeAPIError(Exception):
    """Raised inside a handler to answer with Stripe's error shape."""

    def __init__(self, status: int, error: dict[str, Any], *, save: bool = False):
        super().__init__(error.get("message", ""))
        self.status = status
        self.error = error
        # Stripe saves the result of a request that started executing (a decline)
        # under its idempotency key, but not of one that failed validation.
        self.save = save


def _invalid(
    message: str, param: str | None = None, code: str = "parameter_invalid"
) -> StripeAPIError:
    err: dict[str, Any] = {"type": "invalid_request_error", "message": message, "code": code}
    if param:
        err["param"] = param
    return StripeAPIError(400, err)


def _missing(param: str) -> StripeAPIError:
    return _invalid(f"Missing required param: {param}.", param, "parameter_missing")


def _as_int(params: dict[str, Any], name: str) -> int:
    raw = params.get(name)
    if raw is None:
        raise _missing(name)
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
        raise _invalid(f"Invalid integer: {raw}", name, "parameter_invalid_integer")
    return int(raw)


def _as_bool(raw: Any) -> bool:
    return raw == "true"


def _no_such(kind: str, ident: str, param: str = "id") -> StripeAPIError:
    return StripeAPIError(
        404,
        {
            "type": "invalid_request_error",
            "code": "resource_missing",
            "message": f"No such {kind}: '{ident}'",
            "param": param,
        },
    )


# --------------------------------------------------------------------- server


@dataclass
class StripeServer:
    """The local Stripe API. Use ``async with StripeServer() as stripe_srv:``."""

    api_key: str = DEFAULT_API_KEY
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET
    host: str = "127.0.0.1"
    requests: list[RecordedRequest] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The charge of each succeeded PaymentIntent (its ``latest_charge``), and disputes.
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Platform balance available for transfers, per currency, in minor units.
    platform_balance: dict[str, int] = field(default_factory=lambda: {"usd": 10_000_000})

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._idem: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = {}
        self._fail_transfer: list[_Failure] = []
        self._fail_payment_intent: list[_Failure] = []

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The API base to give the SDK, e.g. ``http://127.0.0.1:54321``."""
        if self._port is None:
            raise RuntimeError("StripeServer is not started")
        return f"http://{self.host}:{self._port}"

    async def start(self) -> StripeServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)  # port 0: the OS picks a free one
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- test controls

    def fail_next_transfer(
        self,
        code: str = "balance_insufficient",
        message: str = "You have insufficient available funds in your Stripe account.",
        status: int = 400,
        error_type: str = "invalid_request_error",
    ) -> None:
        """The next POST /v1/transfers answers with this Stripe error (and creates nothing).

        ``status=500, error_type="api_error"`` simulates a Stripe outage (outcome unknown)."""
        self._fail_transfer.append(
            _Failure(status, {"type": error_type, "code": code, "message": message})
        )

    def fail_next_payment_intent(
        self,
        code: str = "card_declined",
        decline_code: str = "insufficient_funds",
        message: str = "Your card has insufficient funds.",
        status: int = 402,
    ) -> None:
        """The next POST /v1/payment_intents is declined like Stripe declines a card:
        the PaymentIntent is created (status ``requires_payment_method``) and returned
        inside the error body."""
        self._fail_payment_intent.append(
            _Failure(
                status,
                {
                    "type": "card_error",
                    "code": code,
                    "decline_code": decline_code,
                    "message": message,
                },
            )
        )

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Recorded requests with this method and exact path (or path prefix ending in '/')."""
        method = method.upper()
        return [
            r
            for r in self.requests
            if r.method == method
            and (r.path == path or (path.endswith("/") and r.path.startswith(path)))
        ]

    def attach_card(self, customer_id: str, brand: str = "visa", last4: str = "4242") -> str:
        """Save a card on the customer (what a completed setup Checkout does); returns ``pm_...``."""
        if customer_id not in self.customers:
            raise KeyError(customer_id)
        pm_id = _new_id("pm")
        self.payment_methods[pm_id] = {
            "id": pm_id,
            "object": "payment_method",
            "type": "card",
            "customer": customer_id,
            "created": _now(),
            "livemode": False,
            "metadata": {},
            "billing_details": {"email": None, "name": None},
            "card": {"brand": brand, "last4": last4, "exp_month": 12, "exp_year": 2034},
        }
        return pm_id

    def complete_checkout(self, session_id: str) -> dict[str, Any]:
        """The customer pays a payment-mode Checkout Session: creates its succeeded
        PaymentIntent (with ``payment_intent_data.metadata``) and marks the session paid.
        Returns the PaymentIntent."""
        session = self.sessions[session_id]
        if session["mode"] != "payment":
            raise ValueError("not a payment-mode session")
        pi = self._new_payment_intent(
            amount=session["amount_total"],
            currency=session["currency"],
            customer=session["customer"],
            metadata=dict(session["_payment_intent_metadata"]),
            payment_method=None,
            status="succeeded",
        )
        session.update(payment_intent=pi["id"], payment_status="paid", status="complete")
        return pi

    def complete_setup(self, session_id: str) -> str:
        """The customer saves a card on a setup-mode session; returns the ``pm_...`` id."""
        session = self.sessions[session_id]
        if session["mode"] != "setup":
            raise ValueError("not a setup-mode session")
        pm_id = self.attach_card(session["customer"])
        session.update(setup_intent=_new_id("seti"), status="complete")
        return pm_id

    def complete_onboarding(self, account_id: str) -> None:
        """The provider finishes Express onboarding: charges, payouts and transfers enabled."""
        acct = self.accounts[account_id]
        acct.update(charges_enabled=True, payouts_enabled=True, details_submitted=True)
        acct["capabilities"] = {name: "active" for name in acct["capabilities"]}

    def refund(
        self, payment_intent_id: str, amount: int | None = None, status: str = "succeeded"
    ) -> dict[str, Any]:
        """Refund ``amount`` (default: all that is left) of the PaymentIntent's charge, as
        the Dashboard or the Refunds API does. Returns the charge: ``amount_refunded`` is
        the running total of its refunds, ``refunds.data`` lists them newest first.
        ``status="pending"`` makes a refund the card network has not confirmed yet
        (Stripe has taken the funds from the balance all the same)."""
        charge = self.charges[self.payment_intents[payment_intent_id]["latest_charge"]]
        left = charge["amount"] - charge["amount_refunded"]
        amount = left if amount is None else amount
        if not 0 < amount <= left:
            raise ValueError(f"cannot refund {amount} of a charge with {left} left")
        refund = {
            "id": _new_id("re"),
            "object": "refund",
            "amount": amount,
            "charge": charge["id"],
            "created": _now(),
            "currency": charge["currency"],
            "payment_intent": payment_intent_id,
            "balance_transaction": _new_id("txn"),
            "failure_balance_transaction": None,
            "failure_reason": None,
            "metadata": {},
            "reason": None,
            "status": status,
        }
        self.refunds[refund["id"]] = refund
        charge["refunds"]["data"].insert(0, refund)
        charge["refunds"]["total_count"] += 1
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        return charge

    def fail_refund(
        self, refund_id: str, status: str = "failed", reason: str = "expired_or_canceled_card"
    ) -> dict[str, Any]:
        """The refund does not reach the cardholder (``failed``: card closed or expired;
        ``canceled``: a refund that required action was canceled). Stripe returns the
        funds to the platform's balance (``failure_balance_transaction``), and the
        charge may be refunded again: its ``amount_refunded`` drops by the refund.
        Returns the refund; ``refund_event`` is its ``charge.refund.updated``."""
        refund = self.refunds[refund_id]
        if refund["status"] in ("failed", "canceled"):
            raise ValueError(f"refund {refund_id} is already {refund['status']}")
        charge = self.charges[refund["charge"]]
        previous = {"status": refund["status"], "failure_reason": None}
        refund.update(status=status, _previous=previous)
        if status == "failed":
            refund.update(failure_reason=reason, failure_balance_transaction=_new_id("txn"))
        charge["amount_refunded"] -= refund["amount"]
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        return refund

    def refund_event(
        self, refund_id: str, event_type: str = "charge.refund.updated"
    ) -> dict[str, Any]:
        """An event carrying the Refund object: ``charge.refund.updated`` (with the
        ``previous_attributes`` of its last change), or ``refund.created``,
        ``refund.updated``, ``refund.failed``."""
        refund = self.refunds[refund_id]
        return self.make_event(event_type, refund, previous=refund.get("_previous"))

    def charge_refunded_event(self, payment_intent_id: str) -> dict[str, Any]:
        charge = self.charges[self.payment_intents[payment_intent_id]["latest_charge"]]
        return self.make_event("charge.refunded", charge)

    def open_dispute(
        self, payment_intent_id: str, amount: int | None = None, status: str = "needs_response"
    ) -> dict[str, Any]:
        """The cardholder disputes the PaymentIntent's charge (default: all of it).
        ``status="warning_needs_response"`` makes an inquiry, which withdraws no funds."""
        charge = self.charges[self.payment_intents[payment_intent_id]["latest_charge"]]
        disputed = charge["amount"] if amount is None else amount
        dispute_id = _new_id("dp")
        withdrawn = []
        if not status.startswith("warning_"):
            withdrawn.append(_dispute_balance_transaction(dispute_id, charge, -disputed, fee=1500))
        dispute = {
            "id": dispute_id,
            "object": "dispute",
            "amount": disputed,
            # Funds withdrawn (and, when won, reinstated): an inquiry withdraws none.
            "balance_transactions": withdrawn,
            "charge": charge["id"],
            "created": _now(),
            "currency": charge["currency"],
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": {},
            "payment_intent": payment_intent_id,
            "reason": "fraudulent",
            "status": status,
        }
        self.disputes[dispute["id"]] = dispute
        charge["disputed"] = True
        return dispute

    def close_dispute(
        self, dispute_id: str, won: bool = True, reinstated: int | None = None
    ) -> dict[str, Any]:
        """The card network decides. Won: the funds withdrawn come back to the platform
        (a second balance transaction, ``charge.dispute.funds_reinstated``). Lost: they
        stay gone, except ``reinstated`` (a dispute of the whole amount of a partly
        refunded charge gives back the refunded part: status ``lost``, "partially
        won" in the Dashboard). Returns the dispute."""
        dispute = self.disputes[dispute_id]
        charge = self.charges[dispute["charge"]]
        back = dispute["amount"] if won else (reinstated or 0)
        if back:
            dispute["balance_transactions"].append(
                _dispute_balance_transaction(dispute_id, charge, back, fee=-1500 if won else 0)
            )
        dispute.update(status="won" if won else "lost", is_charge_refundable=False)
        return dispute

    def dispute_created_event(self, dispute_id: str) -> dict[str, Any]:
        return self.make_event("charge.dispute.created", self.disputes[dispute_id])

    def dispute_event(self, dispute_id: str, event_type: str) -> dict[str, Any]:
        """Another event of the dispute: ``charge.dispute.updated``, ``.funds_withdrawn``,
        ``.closed`` or ``.funds_reinstated`` (a snapshot of the dispute as it is now)."""
        return self.make_event(event_type, self.disputes[dispute_id])

    def make_event(
        self, event_type: str, obj: dict[str, Any], previous: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A Stripe event wrapping a snapshot of ``obj`` (a stored object); ``previous``
        is the ``previous_attributes`` of an ``*.updated`` event."""
        data: dict[str, Any] = {"object": json.loads(json.dumps(_public(obj)))}
        if previous is not None:
            data["previous_attributes"] = dict(previous)
        return {
            "id": _new_id("evt"),
            "object": "event",
            "api_version": EVENT_API_VERSION,
            "created": _now(),
            # A deep copy: later changes to the object (another refund) are not in this event.
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    def checkout_completed_event(self, session_id: str) -> dict[str, Any]:
        return self.make_event("checkout.session.completed", self.sessions[session_id])

    def payment_intent_succeeded_event(self, payment_intent_id: str) -> dict[str, Any]:
        return self.make_event("payment_intent.succeeded", self.payment_intents[payment_intent_id])

    def signed(self, event: dict[str, Any], timestamp: int | None = None) -> tuple[bytes, str]:
        """``(body, Stripe-Signature header)`` for delivering ``event`` to a webhook endpoint."""
        body = event_payload(event)
        return body, sign_webhook(body, self.webhook_secret, timestamp)

    # ----------------------------------------------------------------- dispatch

    async def _dispatch(self, request: web.Request) -> web.Response:
        body = await request.read()
        form_pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True) if body else []
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            form=parse_stripe_form(form_pairs),
            query=parse_stripe_form(list(request.query.items())),
            headers=dict(request.headers),
        )
        self.requests.append(rec)
        response = await self._answer(request, rec)
        rec.status = response.status
        return response

    async def _answer(self, request: web.Request, rec: RecordedRequest) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}":
            shown = auth.removeprefix("Bearer ")[:12]
            return _error_response(
                401,
                {
                    "type": "invalid_request_error",
                    "message": f"Invalid API Key provided: {shown}***",
                },
            )
        handler, args = self._route(rec.method, rec.path)
        if handler is None:
            return _error_response(
                404,
                {
                    "type": "invalid_request_error",
                    "message": f"Unrecognized request URL ({rec.method}: {rec.path}).",
                },
            )
        idem_key = rec.idempotency_key if rec.method == "POST" else None
        fingerprint = json.dumps([rec.method, rec.path, rec.form], sort_keys=True)
        if idem_key:
            saved = self._idem.get((self.api_key, idem_key))
            if saved is not None:
                saved_fp, status, payload = saved
                if saved_fp != fingerprint:
                    return _error_response(
                        400,
                        {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with "
                            "the same parameters they were first used with.",
                        },
                    )
                return _json(status, payload, replayed=True)
        try:
            status, payload = 200, await handler(rec, *args)
        except StripeAPIError as exc:
            status, payload = exc.status, {"error": exc.error}
            if idem_key and exc.save:
                self._idem[(self.api_key, idem_key)] = (fingerprint, status, payload)
            return _json(status, payload)
        if idem_key:
            self._idem[(self.api_key, idem_key)] = (fingerprint, status, payload)
        return _json(status, payload)

    def _route(self, method: str, path: str) -> tuple[Any, tuple[str, ...]]:
        routes: list[tuple[str, str, Any]] = [
            ("POST", r"/v1/checkout/sessions", self._create_session),
            ("GET", r"/v1/checkout/sessions/([^/]+)", self._get_session),
            ("POST", r"/v1/customers", self._create_customer),
            ("GET", r"/v1/customers/([^/]+)", self._get_customer),
            ("GET", r"/v1/payment_methods", self._list_payment_methods),
            ("POST", r"/v1/payment_intents", self._create_payment_intent),
            ("GET", r"/v1/payment_intents/([^/]+)", self._get_payment_intent),
            ("POST", r"/v1/accounts", self._create_account),
            ("GET", r"/v1/accounts/([^/]+)", self._get_account),
            ("POST", r"/v1/account_links", self._create_account_link),
            ("POST", r"/v1/transfers", self._create_transfer),
            ("GET", r"/v1/transfers", self._list_transfers),
            ("GET", r"/v1/transfers/([^/]+)", self._get_transfer),
        ]
        for m, pattern, fn in routes:
            if m == method:
                match = re.fullmatch(pattern, path)
                if match:
                    return fn, match.groups()
        return None, ()

    # ----------------------------------------------------------------- handlers

    async def _create_session(self, rec: RecordedRequest) -> dict[str, Any]:
        p = rec.form
        mode = p.get("mode")
        if mode not in ("payment", "setup", "subscription"):
            raise _missing("mode") if mode is None else _invalid(f"Invalid mode: {mode}", "mode")
        if "success_url" not in p:
            raise _missing("success_url")
        customer = p.get("customer")
        if customer is not None and customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        amount_total: int | None = None
        currency: str | None = p.get("currency")
        if mode == "payment":
            items = p.get("line_items")
            if not isinstance(items, list) or not items:
                raise _missing("line_items")
            amount_total = 0
            for i, item in enumerate(items):
                price_data = item.get("price_data")
                if not isinstance(price_data, dict):
                    raise _missing(f"line_items[{i}][price_data]")
                unit = _as_int(price_data, "unit_amount")
                qty = _as_int(item, "quantity")
                if unit < 0 or qty < 1:
                    raise _invalid("Invalid amount", f"line_items[{i}][price_data][unit_amount]")
                item_currency = price_data.get("currency")
                if not item_currency:
                    raise _missing(f"line_items[{i}][price_data][currency]")
                if currency is not None and currency != item_currency:
                    raise _invalid("All line items must share one currency", "line_items")
                currency = item_currency
                if not (price_data.get("product_data") or {}).get("name") and not price_data.get(
                    "product"
                ):
                    raise _missing(f"line_items[{i}][price_data][product_data][name]")
                amount_total += unit * qty
        elif mode == "setup" and currency is None and not p.get("payment_method_types"):
            raise _missing("currency")
        sid = _new_id("cs")
        session: dict[str, Any] = {
            "id": sid,
            "object": "checkout.session",
            "amount_subtotal": amount_total,
            "amount_total": amount_total,
            "cancel_url": p.get("cancel_url"),
            "client_reference_id": p.get("client_reference_id"),
            "created": _now(),
            "currency": currency,
            "customer": customer,
            "expires_at": _now() + 24 * 3600,
            "livemode": False,
            "metadata": p.get("metadata") or {},
            "mode": mode,
            # Since API 2022-08-01 the PaymentIntent is created when the customer pays.
            "payment_intent": None,
            "payment_method_types": p.get("payment_method_types") or ["card"],
            "payment_status": "no_payment_required" if mode == "setup" else "unpaid",
            "setup_intent": None,
            "status": "open",
            "success_url": p["success_url"],
            "url": f"{self.url}/c/pay/{sid}",
            "_payment_intent_metadata": (p.get("payment_intent_data") or {}).get("metadata") or {},
        }
        self.sessions[sid] = session
        return _public(session)

    async def _get_session(self, rec: RecordedRequest, sid: str) -> dict[str, Any]:
        if sid not in self.sessions:
            raise _no_such("checkout.session", sid)
        return _public(self.sessions[sid])

    async def _create_customer(self, rec: RecordedRequest) -> dict[str, Any]:
        cid = _new_id("cus")
        customer = {
            "id": cid,
            "object": "customer",
            "created": _now(),
            "email": rec.form.get("email"),
            "livemode": False,
            "metadata": rec.form.get("metadata") or {},
            "invoice_settings": {"default_payment_method": None},
        }
        self.customers[cid] = customer
        return customer

    async def _get_customer(self, rec: RecordedRequest, cid: str) -> dict[str, Any]:
        if cid not in self.customers:
            raise _no_such("customer", cid)
        return self.customers[cid]

    async def _list_payment_methods(self, rec: RecordedRequest) -> dict[str, Any]:
        q = rec.query
        customer = q.get("customer")
        if customer is not None and customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        limit = int(q.get("limit", "10"))
        # Newest first, like Stripe; insertion order breaks same-second ties.
        found = [
            pm
            for pm in reversed(self.payment_methods.values())
            if (customer is None or pm["customer"] == customer)
            and (q.get("type") is None or pm["type"] == q.get("type"))
        ]
        return {
            "object": "list",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "url": "/v1/payment_methods",
        }

    def _new_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        customer: str | None,
        metadata: dict[str, Any],
        payment_method: str | None,
        status: str,
    ) -> dict[str, Any]:
        pid = _new_id("pi")
        succeeded = status == "succeeded"
        pi = {
            "id": pid,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_received": amount if succeeded else 0,
            "capture_method": "automatic_async",
            "client_secret": f"{pid}_secret_{secrets.token_hex(8)}",
            "confirmation_method": "automatic",
            "created": _now(),
            "currency": currency,
            "customer": customer,
            "last_payment_error": None,
            "latest_charge": _new_id("ch") if succeeded else None,
            "livemode": False,
            "metadata": metadata,
            "payment_method": payment_method,
            "payment_method_types": ["card"],
            "status": status,
        }
        self.payment_intents[pid] = pi
        if succeeded:
            self.charges[pi["latest_charge"]] = {
                "id": pi["latest_charge"],
                "object": "charge",
                "amount": amount,
                "amount_captured": amount,
                "amount_refunded": 0,
                "captured": True,
                "created": _now(),
                "currency": currency,
                "customer": customer,
                "disputed": False,
                "livemode": False,
                "metadata": {},
                "paid": True,
                "payment_intent": pid,
                "payment_method": payment_method,
                "refunded": False,
                "refunds": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "total_count": 0,
                    "url": f"/v1/charges/{pi['latest_charge']}/refunds",
                },
                "status": "succeeded",
            }
        return pi

    async def _create_payment_intent(self, rec: RecordedRequest) -> dict[str, Any]:
        p = rec.form
        amount = _as_int(p, "amount")
        if amount < 1:
            raise _invalid("Amount must be at least 1 cent", "amount", "amount_too_small")
        currency = p.get("currency")
        if not currency:
            raise _missing("currency")
        customer = p.get("customer")
        if customer is not None and customer not in self.customers:
            raise _no_such("customer", customer, "customer")
        pm = p.get("payment_method")
        confirm = _as_bool(p.get("confirm"))
        if pm is not None:
            if pm not in self.payment_methods:
                raise _no_such("PaymentMethod", pm, "payment_method")
            if self.payment_methods[pm]["customer"] != customer:
                raise _invalid(
                    "The provided PaymentMethod does not belong to this Customer.",
                    "payment_method",
                )
        if _as_bool(p.get("off_session")) and not confirm:
            raise _invalid("off_session can only be used with confirm=true", "off_session")
        if confirm and pm is None:
            raise _invalid(
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                "payment_method",
                "payment_intent_unexpected_state",
            )
        metadata = p.get("metadata") or {}
        if self._fail_payment_intent:
            failure = self._fail_payment_intent.pop(0)
            pi = self._new_payment_intent(
                amount=amount,
                currency=currency,
                customer=customer,
                metadata=metadata,
                payment_method=None,
                status="requires_payment_method",
            )
            error = {
                **failure.error,
                "payment_intent": dict(pi),
                "payment_method": self.payment_methods.get(pm or ""),
            }
            pi["last_payment_error"] = failure.error
            raise StripeAPIError(failure.status, error, save=True)
        status = "succeeded" if confirm else "requires_confirmation"
        return self._new_payment_intent(
            amount=amount,
            currency=currency,
            customer=customer,
            metadata=metadata,
            payment_method=pm,
            status=status,
        )

    async def _get_payment_intent(self, rec: RecordedRequest, pid: str) -> dict[str, Any]:
        if pid not in self.payment_intents:
            raise _no_such("payment_intent", pid)
        return self.payment_intents[pid]

    async def _create_account(self, rec: RecordedRequest) -> dict[str, Any]:
        p = rec.form
        if p.get("type") not in ("express", "standard", "custom") and "controller" not in p:
            raise _missing("type")
        caps = p.get("capabilities") or {}
        aid = _new_id("acct")
        account = {
            "id": aid,
            "object": "account",
            "business_type": p.get("business_type"),
            "capabilities": {
                name: "inactive" for name, spec in caps.items() if _as_bool(spec.get("requested"))
            },
            "charges_enabled": False,
            "country": p.get("country", "US"),
            "created": _now(),
            "default_currency": "usd",
            "details_submitted": False,
            "email": p.get("email"),
            "livemode": False,
            "metadata": p.get("metadata") or {},
            "payouts_enabled": False,
            "requirements": {"currently_due": ["external_account", "tos_acceptance.date"]},
            "type": p.get("type", "express"),
        }
        self.accounts[aid] = account
        return account

    async def _get_account(self, rec: RecordedRequest, aid: str) -> dict[str, Any]:
        if aid not in self.accounts:
            # Stripe answers 403 for accounts that are not yours; 404-ish otherwise.
            raise _no_such("account", aid)
        return self.accounts[aid]

    async def _create_account_link(self, rec: RecordedRequest) -> dict[str, Any]:
        p = rec.form
        for name in ("account", "type"):
            if name not in p:
                raise _missing(name)
        if p["account"] not in self.accounts:
            raise _no_such("account", p["account"], "account")
        if p["type"] not in ("account_onboarding", "account_update"):
            raise _invalid(f"Invalid type: {p['type']}", "type")
        if p["type"] == "account_onboarding" and "return_url" not in p:
            raise _missing("return_url")
        token = secrets.token_urlsafe(16)
        return {
            "object": "account_link",
            "created": _now(),
            "expires_at": _now() + 300,
            "url": f"{self.url}/setup/e/{p['account']}/{token}",
        }

    async def _create_transfer(self, rec: RecordedRequest) -> dict[str, Any]:
        p = rec.form
        amount = _as_int(p, "amount")
        currency = p.get("currency")
        if not currency:
            raise _missing("currency")
        destination = p.get("destination")
        if not destination:
            raise _missing("destination")
        if self._fail_transfer:
            failure = self._fail_transfer.pop(0)
            raise StripeAPIError(failure.status, failure.error, save=True)
        if destination not in self.accounts:
            raise _no_such("destination", destination, "destination")
        acct = self.accounts[destination]
        if acct["capabilities"].get("transfers") != "active":
            raise StripeAPIError(
                400,
                {
                    "type": "invalid_request_error",
                    "code": "insufficient_capabilities_for_transfer",
                    "message": "Your destination account needs to have at least one of the "
                    "following capabilities enabled: transfers, crypto_transfers, legacy_payments",
                    "param": "destination",
                },
                save=True,
            )
        if amount < 1:
            raise _invalid("Amount must be at least 1 cent", "amount", "amount_too_small")
        if self.platform_balance.get(currency, 0) < amount:
            raise StripeAPIError(
                400,
                {
                    "type": "invalid_request_error",
                    "code": "balance_insufficient",
                    "message": "You have insufficient available funds in your Stripe account.",
                },
                save=True,
            )
        self.platform_balance[currency] -= amount
        tid = _new_id("tr")
        transfer = {
            "id": tid,
            "object": "transfer",
            "amount": amount,
            "amount_reversed": 0,
            "balance_transaction": _new_id("txn"),
            "created": _now(),
            "currency": currency,
            "destination": destination,
            "destination_payment": _new_id("py"),
            "livemode": False,
            "metadata": p.get("metadata") or {},
            "reversals": {
                "object": "list",
                "data": [],
                "has_more": False,
                "url": f"/v1/transfers/{tid}/reversals",
            },
            "reversed": False,
            "transfer_group": p.get("transfer_group"),
        }
        self.transfers[tid] = transfer
        return transfer

    async def _list_transfers(self, rec: RecordedRequest) -> dict[str, Any]:
        q = rec.query
        limit = int(q.get("limit", "10"))
        found = [
            t
            for t in reversed(self.transfers.values())
            if all(q.get(k) is None or t[k] == q[k] for k in ("destination", "transfer_group"))
        ]
        return {
            "object": "list",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "url": "/v1/transfers",
        }

    async def _get_transfer(self, rec: RecordedRequest, tid: str) -> dict[str, Any]:
        if tid not in self.transfers:
            raise _no_such("transfer", tid)
        return self.transfers[tid]


# --------------------------------------------------------------------- helpers


def _new_id(prefix: str) -> str:
    return f"{prefix}_{'test_' if prefix in ('cs',) else ''}{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


def _dispute_balance_transaction(
    dispute_id: str, charge: dict[str, Any], amount: int, *, fee: int
) -> dict[str, Any]:
    """Funds a dispute moves in the platform balance: negative when withdrawn, positive
    when reinstated; ``fee`` is the dispute fee (refunded on a win where the network does)."""
    return {
        "id": _new_id("txn"),
        "object": "balance_transaction",
        "amount": amount,
        "created": _now(),
        "currency": charge["currency"],
        "description": f"Chargeback {'withdrawal' if amount < 0 else 'reversal'}"
        f" for {charge['id']}",
        "fee": fee,
        "net": amount - fee,
        "reporting_category": "dispute" if amount < 0 else "dispute_reversal",
        "source": dispute_id,
        "status": "available",
        "type": "adjustment",
    }


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without the server's private bookkeeping fields (``_...``)."""
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _json(status: int, payload: dict[str, Any], *, replayed: bool = False) -> web.Response:
    headers = {"Request-Id": f"req_{secrets.token_hex(7)}", "Stripe-Version": EVENT_API_VERSION}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(payload, status=status, headers=headers)


def _error_response(status: int, error: dict[str, Any]) -> web.Response:
    return _json(status, {"error": error})


@asynccontextmanager
async def running_stripe_server(**kwargs: Any) -> AsyncIterator[StripeServer]:
    """``async with running_stripe_server() as srv:`` for tests that do not use the fixture."""
    server = StripeServer(**kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


# --------------------------------------------------------------------- pytest fixtures
# Import them into a test module or conftest; pytest registers them under the names
# ``stripe_server`` and ``stripe_rail``. The function names differ so that test
# parameters named like the fixtures do not shadow an import (ruff F811):
#     from tests.support.stripe_server import stripe_rail_fixture, stripe_server_fixture


@pytest.fixture(name="stripe_server")
async def stripe_server_fixture() -> AsyncIterator[StripeServer]:
    """A started local Stripe API, closed after the test."""
    async with running_stripe_server() as server:
        yield server


def rail_config_for(server: StripeServer, **overrides: Any) -> StripeRailConfig:
    """A rail config pointed at ``server`` (its key and webhook secret), no retry delays."""
    values: dict[str, Any] = {
        "api_key": server.api_key,
        "webhook_secret": server.webhook_secret,
        "api_base": server.url,
        "success_url": "http://127.0.0.1/wallet/topup/success",
        "cancel_url": "http://127.0.0.1/wallet/topup/cancel",
        # Tests want one request per call so recorded requests are exact.
        "max_network_retries": 0,
        "timeout_seconds": 10.0,
    }
    values.update(overrides)
    return StripeRailConfig(**values)


@pytest.fixture(name="stripe_rail")
async def stripe_rail_fixture(stripe_server: StripeServer) -> AsyncIterator[StripeRail]:
    """A ``StripeRail`` talking to the ``stripe_server`` fixture."""
    rail = StripeRail(rail_config_for(stripe_server))
    try:
        yield rail
    finally:
        await rail.aclose()
