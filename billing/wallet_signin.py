"""Sign-in with a wallet: a fresh challenge, signed by the wallet, claims its owner id.

The balance of a wallet that paid invoices or x402 calls without a key sits
under the wallet's owner id (``billing.payer_proof.wallet_owner``). Nobody can
mint a key for that id by naming it (``billing.owners``); the wallet proves
itself instead:

- EVM: an EIP-4361 (Sign-In with Ethereum) message, built and verified with
  the ``siwe`` library (``signinwithethereum``, the one the x402
  sign-in-with-x extension uses), signed with ``personal_sign``;
- Cardano: a CIP-8 / CIP-30 ``signData`` signature over the same kind of
  challenge text.

A challenge is ours (the message is stored and must come back unchanged),
lives five minutes and is used once: the conditional UPDATE that spends it
is the guard against a replayed signature, also across processes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from billing.errors import BillingError
from billing.payer_proof import normalize_payer, wallet_owner
from ledger.db import Store, Tx
from ledger.journal import now_ms
from ledger.writer import GroupCommitWriter

CHALLENGE_TTL_SECONDS = 300
STATEMENT = "Sign in to Tollway: this proves you hold this wallet and claims its balance."


class SignInRejected(BillingError):
    status = 401
    code = "invalid_wallet_signature"


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: str
    chain: str
    address: str
    message: str
    expires_at: int  # ms
    owner_id: str


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class WalletSignIn:
    def __init__(
        self,
        store: Store,
        writer: GroupCommitWriter,
        *,
        partner: str,
        evm_chain_id: int | None,
        cardano_network: str | None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.partner = partner
        self.evm_chain_id = evm_chain_id
        self.cardano_network = cardano_network

    def _chain(self, chain: str | None) -> str:
        c = (chain or "evm").lower()
        if c.startswith("cardano"):
            if self.cardano_network is None:
                raise BillingError("Cardano is not configured", code="unsupported_chain")
            return f"cardano-{self.cardano_network}"
        if c in ("evm", "eip155", f"eip155:{self.evm_chain_id}", str(self.evm_chain_id)):
            return f"eip155:{self.evm_chain_id or 1}"
        raise BillingError(f"unsupported chain {chain!r}", code="unsupported_chain")

    async def challenge(
        self, address: str, chain: str | None, *, domain: str, uri: str
    ) -> Challenge:
        chain_id = self._chain(chain)
        payer = normalize_payer(chain_id, address)
        nonce = secrets.token_hex(16)
        now = now_ms()
        expires = now + CHALLENGE_TTL_SECONDS * 1000
        if chain_id.startswith("eip155:"):
            from siwe import SiweMessage
            from web3 import Web3

            message = SiweMessage(
                domain=domain,
                address=Web3.to_checksum_address(payer),
                statement=STATEMENT,
                uri=uri,
                version="1",
                chain_id=int(chain_id.split(":", 1)[1]),
                nonce=nonce,
                issued_at=_iso(now),
                expiration_time=_iso(expires),
            ).prepare_message()
        else:
            message = (
                f"{domain} wants you to sign in with your Cardano account:\n{payer}\n\n"
                f"{STATEMENT}\n\nURI: {uri}\nNonce: {nonce}\n"
                f"Issued At: {_iso(now)}\nExpiration Time: {_iso(expires)}"
            )

        async def op(tx):  # type: ignore[no-untyped-def]
            await tx.execute(
                "INSERT INTO wallet_challenges (nonce, chain, address, message, expires_at,"
                " created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                nonce,
                chain_id,
                payer,
                message,
                expires,
                now,
            )

        await self.writer.submit(op)
        return Challenge(
            nonce, chain_id, payer, message, expires, wallet_owner(self.partner, payer)
        )

    async def verify(
        self, message: str, signature: str, key: str | None = None, *, domain: str, uri: str
    ) -> Challenge:
        """Check the signature of one of our challenges and spend it; returns it.

        ``domain`` and ``uri`` are this server's own public origin: a message
        naming another (a phishing page's) claims nothing, even if we issued it."""
        nonce = _nonce_of(message)
        row = await self.store.fetchrow("SELECT * FROM wallet_challenges WHERE nonce = $1", nonce)
        if row is None or row["message"] != message:
            raise SignInRejected("not a challenge of this server; ask for a new one")
        now = now_ms()
        if int(row["expires_at"]) < now:
            raise SignInRejected("the challenge has expired; ask for a new one")
        chain, payer = str(row["chain"]), str(row["address"])
        if not _names_origin(message, domain, uri):
            raise SignInRejected(f"the message is not for {uri}; ask this server for a challenge")
        if chain.startswith("eip155:"):
            ok = _siwe_valid(message, signature, nonce, domain)
        else:
            from billing.rails.cardano_identity import verify_cip8

            ok = verify_cip8(payer, message, signature, key)
        if not ok:
            raise SignInRejected("the signature is not this wallet's signature of the challenge")

        async def spend(tx):  # type: ignore[no-untyped-def]
            return await tx.execute(
                "UPDATE wallet_challenges SET used_at = $2 WHERE nonce = $1 AND used_at IS NULL",
                nonce,
                now,
            )

        if await self.writer.submit(spend) != 1:
            raise SignInRejected("this challenge was already used; ask for a new one")
        return Challenge(
            nonce, chain, payer, message, int(row["expires_at"]), wallet_owner(self.partner, payer)
        )


def _nonce_of(message: str) -> str:
    for line in message.splitlines():
        if line.startswith("Nonce: "):
            return line[len("Nonce: ") :].strip()
    raise SignInRejected("the message has no nonce")


def _names_origin(message: str, domain: str, uri: str) -> bool:
    lines = message.splitlines()
    return (
        bool(lines)
        and lines[0].startswith(f"{domain} wants you to sign in")
        and (f"URI: {uri}" in lines)
    )


def _siwe_valid(message: str, signature: str, nonce: str, domain: str) -> bool:
    from siwe import SiweMessage

    try:
        parsed = SiweMessage.from_message(message)
        parsed.verify(signature, nonce=nonce, domain=domain)
        return True
    except Exception:  # any parse or signature failure is a refusal
        return False


async def expire_challenges(tx: Tx, now: int, limit: int = 1000) -> int:
    """Forget challenges past their life: used or not, they can claim nothing more,
    and a flood of unanswered ones must not grow the table for ever."""
    return await tx.execute(
        "DELETE FROM wallet_challenges WHERE nonce IN"
        " (SELECT nonce FROM wallet_challenges WHERE expires_at < $1 LIMIT $2)",
        now,
        limit,
    )
