"""Tollway settings: defaults < TOML file < TOLLWAY_* environment variables.

Every setting is declared once in ``FIELDS`` with its type and check, so the
TOML file, the environment and the README table all speak the same names. An
invalid value raises ``SettingsError`` naming the setting; the CLI turns that
into exit code 2 with one line on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "TOLLWAY_"


class SettingsError(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(f"invalid setting {name}: {message}")
        self.setting = name


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


def _list(v: Any) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v]
    return [p.strip() for p in str(v).split(",") if p.strip()]


def _int_list(v: Any) -> list[int]:
    return [int(x) for x in _list(v)]


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v)
    return s or None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    database_url: str = "sqlite:///./data/tollway.db"
    redis_url: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 30.0
    upstream_pool_size: int = 512
    allow_private_upstreams: bool = False
    cors_origins: list[str] = field(default_factory=list)
    admin_key: str | None = None
    # Per client IP, requests per minute; 0 turns the per-IP limit off.
    ip_rate_limit: int = 1200
    # Whether X-Forwarded-For from the peer is trusted for the client IP (behind a load balancer).
    trust_forwarded_for: bool = False
    # With Redis down: "local" keeps limiting in this process (never unlimited); "closed" refuses.
    redis_down_policy: str = "local"
    # Every Redis key Tollway writes starts with this, so deployments (or test runs)
    # sharing one Redis never read each other's counters.
    redis_key_prefix: str = "tollway:"
    # The origin buyers reach this server at (https://api.example.com). Wallet
    # sign-in messages name it, never the request's Host header, which a
    # phishing site would set to its own. Default: http://host:port.
    public_url: str | None = None
    default_asset: str = "USDC"
    asset_decimals: int = 6
    platform_fee_bps: int = 1000
    # Fee schedule by provider month since registration (the growth program), in basis points;
    # month 1 uses the first entry, later months the last. Empty means platform_fee_bps always.
    fee_schedule_bps: list[int] = field(default_factory=list)
    hold_ttl_seconds: int = 120
    hold_sweep_interval_seconds: float = 10.0
    key_cache_ttl_seconds: float = 30.0
    service_cache_ttl_seconds: float = 5.0
    idempotency_window_seconds: int = 24 * 3600
    ledger_batch_max: int = 512
    # Ledger operations that may wait for a commit; past it, calls get 503 (0: 20 batches).
    ledger_queue_max: int = 0
    # Group-commit flushers per process; 0 picks 2 on PostgreSQL, 1 on SQLite.
    ledger_writers: int = 0
    receipts_dir: str = "./data/receipts"
    # "on_request": a charged call carries X-ACF-Receipt when the request asks for
    # it with "Prefer: receipt" (one Ed25519 signature, ~57 us, only then);
    # "always": every charged call; "off".
    receipts: str = "on_request"
    # Balance leases (billing.leases): a hot buyer's calls are admitted in memory
    # from a slice of its balance and posted in batches. lease_calls is the slice
    # in calls' worth (0: every call takes its own hold); a slice is at most
    # 1/lease_share of the balance, and under lease_min_calls calls' worth the
    # calls take exact holds. A buyer is hot after lease_after_calls calls within
    # a second in one worker.
    lease_calls: int = 64
    lease_share: int = 4
    lease_min_calls: int = 8
    lease_after_calls: int = 4
    lease_idle_seconds: float = 2.0
    # How long a dead worker's lease keeps its slice before it expires back.
    lease_ttl_seconds: float = 30.0
    # How long finished leased calls wait to share a batch.
    lease_flush_ms: float = 25.0
    # A call refused for want of balance is refused again from memory for this
    # long (unless money reached a wallet through this process meanwhile).
    refusal_memo_seconds: float = 1.0
    log_level: str = "info"
    # Payment rails (402 issue); empty means the rail is off.
    evm_rpc_url: str | None = None
    evm_chain_id: int = 0
    evm_token_address: str | None = None
    evm_pay_to: str | None = None
    evm_gas_private_key: str | None = None
    evm_confirmations: int = 1
    x402_facilitator_url: str | None = None
    # Tokens offered through x402, "domain_chain_id:token_address"; empty means
    # evm_chain_id:evm_token_address. A domain chain id such as 84532 lets v1
    # clients pay as "base-sepolia".
    x402_tokens: list[str] = field(default_factory=list)
    invoice_ttl_seconds: int = 900
    invoice_mint_rate_limit: int = 120
    cardano_backend_url: str | None = None
    cardano_project_id: str | None = None
    cardano_pay_to: str | None = None
    cardano_network: str = "testnet"
    cardano_confirmations: int = 1
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
    stripe_success_url: str = "http://127.0.0.1:8000/wallet/topup/success"
    stripe_cancel_url: str = "http://127.0.0.1:8000/wallet/topup/cancel"
    stripe_connect_refresh_url: str = "http://127.0.0.1:8000/provider/connect/refresh"
    stripe_connect_return_url: str = "http://127.0.0.1:8000/provider/connect/done"
    stripe_currency: str = "usd"
    # Ledger units credited per Stripe cent (USDC has 6 decimals: 1 cent = 10,000 units).
    stripe_units_per_cent: int = 10_000
    auto_topup_cooldown_seconds: int = 3600
    # Card money pays for calls at once but leaves a wallet (on chain or through
    # Connect) only this long after its credit: a stolen card can charge back.
    card_settle_seconds: int = 7 * 86_400
    evm_hot_wallet_private_key: str | None = None
    invoice_partner: str = "tollway"
    # Calls one invoice pays for; above 1 the rest is credited as a prepaid batch.
    invoice_batch_target: int = 1
    # How long after payment the rest of a prepaid batch may be drawn by invoice id.
    invoice_batch_ttl_seconds: int = 30 * 86400
    cardano_asset: str = "lovelace"
    # Cardano units per ledger unit, as a decimal string (1 for a 6-decimal USD stablecoin).
    cardano_rate: str = "1"
    # Revenue-share outputs every Cardano invoice must carry: "address=basis_points".
    cardano_split_outputs: list[str] = field(default_factory=list)
    webhook_allow_http: bool = False
    webhook_max_per_owner: int = 20
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 1.0
    webhook_timeout_seconds: float = 5.0
    webhook_poll_interval_seconds: float = 0.5

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))

    @property
    def public_origin(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    @property
    def storage_kind(self) -> str:
        return (
            "postgres"
            if self.database_url.startswith(("postgres://", "postgresql://"))
            else "sqlite"
        )


_PARSERS: dict[str, Callable[[Any], Any]] = {}
for _f in dataclasses.fields(Settings):
    t = str(_f.type)
    if t == "int":
        _PARSERS[_f.name] = lambda v: int(str(v).strip())
    elif t == "float":
        _PARSERS[_f.name] = lambda v: float(str(v).strip())
    elif t == "bool":
        _PARSERS[_f.name] = _bool
    elif t == "list[str]":
        _PARSERS[_f.name] = _list
    elif t == "list[int]":
        _PARSERS[_f.name] = _int_list
    elif t == "str | None":
        _PARSERS[_f.name] = _opt_str
    else:
        _PARSERS[_f.name] = lambda v: str(v)

FIELDS = tuple(_PARSERS)


def _check(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(name, message)


def validate(s: Settings) -> Settings:
    _check("port", 0 <= s.port <= 65535, f"{s.port} is not a TCP port")
    _check("workers", 1 <= s.workers <= 256, "must be between 1 and 256")
    _check(
        "database_url",
        s.database_url.startswith(("sqlite:///", "postgres://", "postgresql://")),
        "must start with sqlite:///, postgres:// or postgresql://",
    )
    _check(
        "redis_url",
        s.redis_url is None or s.redis_url.startswith(("redis://", "rediss://", "unix://")),
        "must start with redis://, rediss:// or unix://",
    )
    _check("max_body_bytes", s.max_body_bytes > 0, "must be positive")
    _check("upstream_connect_timeout", s.upstream_connect_timeout > 0, "must be positive")
    _check("upstream_read_timeout", s.upstream_read_timeout > 0, "must be positive")
    _check("upstream_pool_size", s.upstream_pool_size > 0, "must be positive")
    _check("ip_rate_limit", s.ip_rate_limit >= 0, "must be >= 0 (0 turns it off)")
    _check(
        "redis_down_policy", s.redis_down_policy in ("local", "closed"), "must be local or closed"
    )
    _check(
        "public_url",
        s.public_url is None
        or (
            s.public_url.startswith(("https://", "http://"))
            and "/" not in s.public_url.split("://", 1)[1].rstrip("/")
        ),
        "must be an origin such as https://api.example.com",
    )
    _check(
        "redis_key_prefix",
        0 < len(s.redis_key_prefix) <= 64 and not any(c.isspace() for c in s.redis_key_prefix),
        "must be 1 to 64 characters without spaces",
    )
    _check("asset_decimals", 0 <= s.asset_decimals <= 18, "must be between 0 and 18")
    _check("platform_fee_bps", 0 <= s.platform_fee_bps <= 10000, "must be 0..10000 basis points")
    _check(
        "fee_schedule_bps",
        all(0 <= b <= 10000 for b in s.fee_schedule_bps),
        "every rate must be 0..10000 basis points",
    )
    # A hold must outlive the longest upstream call, or a slow but successful call
    # would find its hold already expired and go uncharged.
    _check(
        "hold_ttl_seconds",
        s.hold_ttl_seconds > s.upstream_connect_timeout + s.upstream_read_timeout,
        "must exceed upstream_connect_timeout + upstream_read_timeout",
    )
    _check("hold_sweep_interval_seconds", s.hold_sweep_interval_seconds > 0, "must be positive")
    _check("ledger_batch_max", 1 <= s.ledger_batch_max <= 10000, "must be 1..10000")
    _check("receipts", s.receipts in ("on_request", "always", "off"), "on_request|always|off")
    _check("lease_calls", 0 <= s.lease_calls <= 1_000_000, "must be 0 (off) to 1000000")
    _check("lease_share", s.lease_share >= 2, "must be 2 or more")
    _check(
        "lease_min_calls",
        s.lease_min_calls >= 1 and (s.lease_calls == 0 or s.lease_min_calls <= s.lease_calls),
        "must be 1..lease_calls",
    )
    _check("lease_after_calls", s.lease_after_calls >= 1, "must be 1 or more")
    _check("lease_idle_seconds", s.lease_idle_seconds > 0, "must be positive")
    _check(
        "lease_ttl_seconds",
        s.lease_ttl_seconds >= 5 and s.lease_ttl_seconds > 2 * s.lease_idle_seconds,
        "must be at least 5 and more than twice lease_idle_seconds",
    )
    _check("lease_flush_ms", 0 <= s.lease_flush_ms <= 1000, "must be 0..1000")
    _check("refusal_memo_seconds", 0 <= s.refusal_memo_seconds <= 60, "must be 0..60")
    _check("ledger_queue_max", s.ledger_queue_max >= 0, "must be 0 (auto) or more")
    _check("ledger_writers", 0 <= s.ledger_writers <= 64, "must be 0 (auto) to 64")
    _check(
        "admin_key",
        s.admin_key is None or (":" in s.admin_key and all(s.admin_key.split(":", 1))),
        "must be key_id:secret",
    )
    _check(
        "log_level",
        s.log_level in ("debug", "info", "warning", "error"),
        "debug|info|warning|error",
    )
    _check("evm_confirmations", s.evm_confirmations >= 0, "must be >= 0")
    _check("invoice_ttl_seconds", s.invoice_ttl_seconds > 0, "must be positive")
    for entry in s.x402_tokens:
        cid, sep, addr = entry.partition(":")
        _check(
            "x402_tokens",
            bool(sep and cid.isdigit() and addr.startswith("0x") and len(addr) == 42),
            "entries must be domain_chain_id:0xTokenAddress",
        )
    _check("invoice_batch_target", s.invoice_batch_target >= 1, "must be >= 1")
    _check("invoice_batch_ttl_seconds", s.invoice_batch_ttl_seconds > 0, "must be positive")
    _check("stripe_units_per_cent", s.stripe_units_per_cent > 0, "must be positive")
    _check("card_settle_seconds", s.card_settle_seconds >= 0, "must be >= 0")
    _check("webhook_max_per_owner", s.webhook_max_per_owner >= 1, "must be >= 1")
    _check("webhook_max_attempts", s.webhook_max_attempts >= 1, "must be >= 1")
    _check("webhook_backoff_base_seconds", s.webhook_backoff_base_seconds > 0, "must be positive")
    try:
        from fractions import Fraction

        ok = Fraction(s.cardano_rate) > 0
    except (ValueError, ZeroDivisionError):
        ok = False
    _check("cardano_rate", ok, "must be a positive decimal")
    for entry in s.cardano_split_outputs:
        addr, sep, bps = entry.rpartition("=")
        _check(
            "cardano_split_outputs",
            bool(sep and addr and bps.isdigit() and 0 < int(bps) < 10000),
            "entries must be address=basis_points",
        )
    return s


def _apply(values: dict[str, Any], source: Mapping[str, Any], origin: str) -> None:
    for name, raw in source.items():
        if name not in _PARSERS:
            raise SettingsError(name, f"unknown setting (from {origin})")
        try:
            values[name] = _PARSERS[name](raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(name, f"{raw!r} ({origin}): {exc}") from None


def load(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings; ``overrides`` (CLI flags) win over everything."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError("config", f"cannot read {config_file}: {exc}") from None
        # Allow a [tollway] table or top-level keys.
        _apply(values, data.get("tollway", data), config_file)
    env = os.environ if env is None else env
    from_env = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in env.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() in _PARSERS
    }
    _apply(values, from_env, "environment")
    if overrides:
        _apply(values, {k: v for k, v in overrides.items() if v is not None}, "command line")
    try:
        s = Settings(**values)
    except TypeError as exc:  # pragma: no cover - guarded by _apply
        raise SettingsError("config", str(exc)) from None
    return validate(s)
