"""EVM rail: check ERC-20 payments on chain, pay out, and settle EIP-3009 authorizations.

One ``EvmClient`` per configured chain, created at start-up and reused: it owns
one ``AsyncWeb3`` over ``AsyncHTTPProvider`` (one pooled HTTP session), and
serializes the transactions it sends per key so nonces do not collide inside a
process.

Everything that decides whether money arrived reads the chain itself (receipt,
logs, block); nothing a client says about a payment is taken on trust.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import (
    ContractLogicError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)

from billing.errors import PaymentConflict, PaymentRejected, PayoutFailed, UpstreamRailError
from billing.rails.evm_nonces import NONCE_ATTEMPTS, HostNonceLock, nonce_taken

# keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
# EIP-3009's AuthorizationUsed(address,bytes32): the token emits it when an x402
# authorization is settled, so such a transfer pays through x402 and no other door.
AUTHORIZATION_USED_TOPIC = "0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5"

# Only the functions we call; a full token ABI is not needed and would tie us
# to one implementation.
ERC20_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "type": "function",
        "name": "transfer",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "function",
        "name": "authorizationState",
        "stateMutability": "view",
        "inputs": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "function",
        "name": "name",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string"}],
    },
    {
        "type": "function",
        "name": "version",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string"}],
    },
    {
        "type": "function",
        "name": "decimals",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint8"}],
    },
    # The (v, r, s) form: present on every EIP-3009 token (USDC v1 and v2).
    {
        "type": "function",
        "name": "transferWithAuthorization",
        "stateMutability": "nonpayable",
        "inputs": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"},
            {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"},
            {"name": "nonce", "type": "bytes32"},
            {"name": "v", "type": "uint8"},
            {"name": "r", "type": "bytes32"},
            {"name": "s", "type": "bytes32"},
        ],
        "outputs": [],
    },
]

_TX_HASH_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class TokenTransfer:
    """A verified ERC-20 payment: ``amount`` of the pinned token reached ``pay_to``."""

    tx_hash: str
    payer: str
    pay_to: str
    amount: int
    block_number: int
    block_time: int


@dataclass(frozen=True)
class Eip3009Authorization:
    """The signed fields of ``TransferWithAuthorization`` (integers, nonce as 32 bytes)."""

    from_address: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes


@dataclass(frozen=True)
class TokenMetadata:
    address: str
    name: str
    version: str
    decimals: int


@dataclass(frozen=True)
class SentTransaction:
    tx_hash: str
    block_number: int


def _addr(value: str, what: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise ValueError(f"invalid {what} address: {value!r}")
    return to_checksum_address(value)


def _hex(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    text = str(value)
    return text if text.startswith("0x") else "0x" + text


def _topic_address(topic: Any) -> str:
    return to_checksum_address("0x" + _hex(topic)[-40:])


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """65-byte r||s||v to (v, r, s); v normalized to 27/28 as tokens expect."""
    if len(signature) != 65:
        raise ValueError(f"signature must be 65 bytes, got {len(signature)}")
    v = signature[64]
    if v < 27:
        v += 27
    return v, signature[:32], signature[32:64]


class EvmClient:
    """Async access to one EVM chain over JSON-RPC HTTP.

    ``hot_wallet_key`` pays withdrawals (``send_token``); ``gas_key`` pays the gas
    of x402 settlements (``transfer_with_authorization``). Either may be absent
    when the deployment does not use that feature.
    """

    def __init__(
        self,
        rpc_url: str,
        *,
        expected_chain_id: int | None = None,
        hot_wallet_key: str | None = None,
        gas_key: str | None = None,
        payout_token: str | None = None,
        request_timeout: float = 15.0,
        receipt_timeout: float = 120.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.rpc_url = rpc_url
        self.w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": request_timeout}))
        self._expected_chain_id = expected_chain_id
        self._chain_id: int | None = None
        self.hot_wallet: LocalAccount | None = (
            Account.from_key(hot_wallet_key) if hot_wallet_key else None
        )
        self.gas_wallet: LocalAccount | None = Account.from_key(gas_key) if gas_key else None
        self.payout_token = _addr(payout_token, "payout token") if payout_token else None
        self._receipt_timeout = receipt_timeout
        self._poll_interval = poll_interval
        # One lock per sending address: nonce lookup, signing and broadcast must
        # not interleave or two sends would take the same nonce.
        self._send_locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        disconnect = getattr(self.w3.provider, "disconnect", None)
        if disconnect is not None:
            await disconnect()

    def _token(self, token: str) -> Any:
        return self.w3.eth.contract(address=_addr(token, "token"), abi=ERC20_ABI)

    async def chain_id(self) -> int:
        """The node's chain id, checked once against the configured one."""
        if self._chain_id is None:
            try:
                cid = int(await self.w3.eth.chain_id)
            except (TimeoutError, OSError, Web3Exception) as exc:
                raise UpstreamRailError(f"EVM node unreachable: {exc}") from exc
            if self._expected_chain_id is not None and cid != self._expected_chain_id:
                raise UpstreamRailError(
                    f"EVM node at {self.rpc_url} is chain {cid}, "
                    f"configured {self._expected_chain_id}"
                )
            self._chain_id = cid
        return self._chain_id

    # -- reads -------------------------------------------------------------------

    async def token_balance(self, token: str, owner: str) -> int:
        try:
            return int(await self._token(token).functions.balanceOf(_addr(owner, "owner")).call())
        except ContractLogicError as exc:
            raise UpstreamRailError(f"balanceOf failed on {token}: {exc}") from exc
        except (TimeoutError, OSError, Web3Exception) as exc:
            raise UpstreamRailError(f"EVM node error: {exc}") from exc

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        """True if ``nonce`` of ``authorizer`` was already used (or cancelled) on ``token``."""
        if len(nonce) != 32:
            raise ValueError("EIP-3009 nonce must be 32 bytes")
        try:
            return bool(
                await self._token(token)
                .functions.authorizationState(_addr(authorizer, "authorizer"), nonce)
                .call()
            )
        except ContractLogicError as exc:
            # Not an EIP-3009 token at all: the asset was misconfigured.
            raise UpstreamRailError(f"authorizationState failed on {token}: {exc}") from exc
        except (TimeoutError, OSError, Web3Exception) as exc:
            raise UpstreamRailError(f"EVM node error: {exc}") from exc

    async def token_metadata(self, token: str) -> TokenMetadata:
        """Name, EIP-712 version and decimals of ``token``, for building x402 offers.

        Read once at start-up: the offer's ``extra.name``/``extra.version`` must
        equal the token's EIP-712 domain or every client signature fails.
        """
        contract = self._token(token)
        try:
            name = str(await contract.functions.name().call())
            decimals = int(await contract.functions.decimals().call())
            try:
                version = str(await contract.functions.version().call())
            except ContractLogicError:
                # Tokens without version() (EIP-712 default): USDC-style "1".
                version = "1"
        except ContractLogicError as exc:
            raise UpstreamRailError(f"{token} does not look like an ERC-20: {exc}") from exc
        except (TimeoutError, OSError, Web3Exception) as exc:
            raise UpstreamRailError(f"EVM node error: {exc}") from exc
        return TokenMetadata(
            address=_addr(token, "token"), name=name, version=version, decimals=decimals
        )

    # -- invoice payments ----------------------------------------------------------

    async def verify_token_transfer(
        self,
        tx_hash: str,
        *,
        token: str,
        pay_to: str,
        min_amount: int,
        not_before_unix: int,
        min_confirmations: int,
        sender: str | None = None,
    ) -> TokenTransfer:
        """Check that ``tx_hash`` paid at least ``min_amount`` of ``token`` to ``pay_to``.

        Only Transfer logs emitted by the pinned token contract count: another
        token with the same event, or native coin sent along, pays nothing.
        With ``sender``, the transaction must be that address's own (its
        ``from``) and only the token it sends counts: whoever proves that
        address is the payer, nobody else. A transfer that settled an EIP-3009
        authorization (an x402 payment) is refused: it was sent by a relayer,
        and x402 already credits it.
        Raises PaymentRejected with a specific code otherwise.
        """
        if not isinstance(tx_hash, str) or not _TX_HASH_RE.match(tx_hash):
            raise PaymentRejected("not a transaction hash", code="invalid_tx_hash")
        token = _addr(token, "token")
        pay_to = _addr(pay_to, "recipient")
        try:
            try:
                receipt = await self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                receipt = None
            if receipt is None:
                # Known but unmined counts as unconfirmed, unknown as not found.
                try:
                    await self.w3.eth.get_transaction(tx_hash)
                except TransactionNotFound:
                    raise PaymentRejected(
                        "transaction not found on chain", code="tx_not_found"
                    ) from None
                raise PaymentRejected(
                    "transaction is not mined yet", code="insufficient_confirmations"
                )
            if int(receipt["status"]) != 1:
                raise PaymentRejected("transaction reverted", code="tx_failed")
            head = int(await self.w3.eth.block_number)
            block_number = int(receipt["blockNumber"])
            confirmations = head - block_number + 1
            if confirmations < min_confirmations:
                raise PaymentRejected(
                    f"{confirmations} confirmations, {min_confirmations} required",
                    code="insufficient_confirmations",
                )

            if sender is not None:
                sent = await self.w3.eth.get_transaction(tx_hash)
                if to_checksum_address(sent["from"]) != _addr(sender, "sender"):
                    raise PaymentRejected(
                        "the transaction was not sent by the paying address", code="payer_mismatch"
                    )
            paid = 0
            payer: str | None = None
            token_logs_elsewhere = False
            foreign_transfer_to_payee = False
            for log in receipt["logs"]:
                if log.get("removed"):
                    continue
                topics = log["topics"]
                if (
                    topics
                    and _hex(topics[0]).lower() == AUTHORIZATION_USED_TOPIC
                    and to_checksum_address(log["address"]) == token
                ):
                    raise PaymentRejected(
                        "this transfer settled an x402 authorization; it pays through x402 only",
                        code="authorization_transfer",
                    )
                # ERC-721 Transfer has the same topic with 4 topics; skip it.
                if len(topics) != 3 or _hex(topics[0]).lower() != TRANSFER_TOPIC:
                    continue
                data = _hex(log["data"])
                if len(data) != 66:
                    continue
                to = _topic_address(topics[2])
                emitter = to_checksum_address(log["address"])
                if emitter != token:
                    if to == pay_to:
                        foreign_transfer_to_payee = True
                    continue
                if to != pay_to:
                    token_logs_elsewhere = True
                    continue
                if sender is not None and _topic_address(topics[1]) != _addr(sender, "sender"):
                    continue  # someone else's tokens in the same transaction
                paid += int(data, 16)
                if payer is None:
                    payer = _topic_address(topics[1])

            if paid == 0:
                if foreign_transfer_to_payee:
                    raise PaymentRejected("transfer is of another token", code="wrong_token")
                if token_logs_elsewhere:
                    raise PaymentRejected(
                        "token was sent to another address", code="wrong_recipient"
                    )
                tx = await self.w3.eth.get_transaction(tx_hash)
                if int(tx.get("value", 0)) > 0:
                    raise PaymentRejected(
                        "native coin is not the invoiced token", code="wrong_token"
                    )
                raise PaymentRejected(
                    "transaction carries no transfer of the token", code="wrong_token"
                )
            if paid < min_amount:
                raise PaymentRejected(
                    f"paid {paid}, {min_amount} required", code="amount_too_small"
                )
            block = await self.w3.eth.get_block(block_number)
            block_time = int(block["timestamp"])
            if block_time <= not_before_unix:
                raise PaymentRejected(
                    "transaction is older than the invoice", code="tx_before_invoice"
                )
        except (TimeoutError, OSError, Web3Exception) as exc:
            raise UpstreamRailError(f"EVM node error: {exc}") from exc
        assert payer is not None
        return TokenTransfer(
            tx_hash=tx_hash.lower(),
            payer=payer,
            pay_to=pay_to,
            amount=paid,
            block_number=block_number,
            block_time=block_time,
        )

    # -- writes --------------------------------------------------------------------

    async def _send_call(self, account: LocalAccount, call: Any) -> SentTransaction:
        """Sign and broadcast a contract call from ``account``; wait for a status-1 receipt.

        Raises ContractLogicError if the call would revert (gas estimation runs
        it first), PayoutFailed if it reverted or never got mined.
        """
        await self.chain_id()
        lock = self._send_locks.setdefault(account.address, asyncio.Lock())
        async with lock, HostNonceLock(account.address):
            for attempt in range(NONCE_ATTEMPTS):
                nonce = await self.w3.eth.get_transaction_count(account.address, "pending")
                tx = await call.build_transaction(
                    {"from": account.address, "nonce": nonce, "chainId": await self.chain_id()}
                )
                signed = account.sign_transaction(tx)
                try:
                    raw_hash = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
                except Web3RPCError as exc:
                    # Another host sent from this address with the same nonce first: the
                    # node refused ours, nothing of it was broadcast, so sign again.
                    if nonce_taken(exc) and attempt + 1 < NONCE_ATTEMPTS:
                        continue
                    raise
                tx_hash = _hex(raw_hash)
                break
        try:
            receipt = await self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self._receipt_timeout, poll_latency=self._poll_interval
            )
        except TimeExhausted as exc:
            raise PayoutFailed(
                f"transaction {tx_hash} not mined in time", code="tx_not_mined"
            ) from exc
        if int(receipt["status"]) != 1:
            raise PayoutFailed(f"transaction {tx_hash} reverted", code="tx_reverted")
        return SentTransaction(tx_hash=tx_hash, block_number=int(receipt["blockNumber"]))

    async def send_token(self, to: str, amount: int, *, token: str | None = None) -> str:
        """Pay ``amount`` of ``token`` (default: the payout token) from the hot wallet.

        Returns the transaction hash once mined with status 1; raises PayoutFailed.
        """
        if self.hot_wallet is None:
            raise PayoutFailed("no hot wallet key configured", code="payout_not_configured")
        token = token or self.payout_token
        if token is None:
            raise PayoutFailed("no payout token configured", code="payout_not_configured")
        if not isinstance(amount, int) or amount <= 0:
            raise PayoutFailed("payout amount must be a positive integer", code="invalid_amount")
        try:
            call = self._token(token).functions.transfer(_addr(to, "recipient"), amount)
            sent = await self._send_call(self.hot_wallet, call)
        except ContractLogicError as exc:
            raise PayoutFailed(
                f"token transfer would revert: {exc}", code="payout_reverted"
            ) from exc
        except (TimeoutError, OSError, Web3Exception, ValueError) as exc:
            # Bad address or signing trouble means nothing was sent; a transport
            # error during broadcast may mean it was. Callers must treat a
            # PayoutFailed other than payout_reverted as "outcome unknown" and
            # reconcile by the sender's nonce before retrying.
            raise PayoutFailed(f"payout failed: {exc}") from exc
        return sent.tx_hash

    async def transfer_with_authorization(
        self, token: str, auth: Eip3009Authorization, signature: bytes
    ) -> SentTransaction:
        """Submit an EIP-3009 authorization, paying gas with the gas key.

        Reverts are mapped from the token's reason: a used nonce is a conflict
        (someone settled it first), an expired window or short balance is a
        rejected payment; transport trouble is UpstreamRailError.
        """
        if self.gas_wallet is None:
            raise UpstreamRailError(
                "no gas key configured for settlement", code="settlement_not_configured"
            )
        v, r, s = split_signature(signature)
        call = self._token(token).functions.transferWithAuthorization(
            _addr(auth.from_address, "payer"),
            _addr(auth.to, "recipient"),
            auth.value,
            auth.valid_after,
            auth.valid_before,
            auth.nonce,
            v,
            r,
            s,
        )
        try:
            return await self._send_call(self.gas_wallet, call)
        except ContractLogicError as exc:
            raise _authorization_revert(str(exc)) from exc
        except PayoutFailed as exc:
            raise PaymentRejected(exc.message, code="settlement_failed") from exc
        except (TimeoutError, OSError, Web3Exception) as exc:
            raise UpstreamRailError(f"EVM node error during settlement: {exc}") from exc


def _authorization_revert(reason: str) -> PaymentRejected | PaymentConflict:
    msg = reason.lower()
    if "authorization is used" in msg or "authorizationalreadyused" in msg:
        return PaymentConflict(
            "authorization nonce already used on chain", code="nonce_already_used"
        )
    if "expired" in msg:
        return PaymentRejected("authorization expired", code="authorization_expired")
    if "not yet valid" in msg:
        return PaymentRejected("authorization not yet valid", code="authorization_not_yet_valid")
    if "exceeds balance" in msg or "insufficientbalance" in msg:
        return PaymentRejected("payer balance too low", code="insufficient_balance")
    if "invalid signature" in msg or "signermismatch" in msg:
        return PaymentRejected("signature rejected by the token", code="invalid_signature")
    return PaymentRejected(f"settlement reverted: {reason}", code="settlement_failed")
