"""An in-process EVM chain for tests: eth-tester on py-evm, with our EIP-3009 token.

Production code never talks to this object directly: it reaches the chain over
HTTP JSON-RPC through ``tests.support.jsonrpc_server``, exactly as it would
reach a real node. The helpers here are for the test's own side of the world
(deploying tokens, minting, paying, mining), and they take the same lock as
the JSON-RPC server because py-evm's chain object is not thread-safe.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.providers.eth_tester import EthereumTesterProvider

ARTIFACT_PATH = Path(__file__).parent / "contracts" / "EIP3009Token.json"

# eth-tester's MainnetTesterPosChain hard-codes this id.
ETH_TESTER_CHAIN_ID = 131277322940537

# Enough ether that no test ever worries about gas.
_FUND_WEI = 10**21


def load_token_artifact() -> dict[str, Any]:
    return json.loads(ARTIFACT_PATH.read_text())


def _revert_data(reason: str) -> str:
    # What a real node puts in error.data for require(..., reason): Error(string).
    return "0x08c379a0" + abi_encode(["string"], [reason]).hex()


def _to_wire(value: Any) -> Any:
    """Turn eth-tester output into JSON-RPC wire values (quantities as 0x hex)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


class EvmChain:
    """eth-tester chain with funded accounts and helpers for ERC-20 / EIP-3009 tokens."""

    chain_id: int = ETH_TESTER_CHAIN_ID

    def __init__(self, num_accounts: int = 10) -> None:
        genesis_state = PyEVMBackend.generate_genesis_state(num_accounts=num_accounts)
        self.backend = PyEVMBackend(genesis_state=genesis_state)
        self.tester = EthereumTester(self.backend)
        # RLock: helpers call each other while holding it.
        self.lock = threading.RLock()
        self.w3 = Web3(EthereumTesterProvider(self.tester))
        # A second, middleware-free web3 whose provider request function applies
        # only eth-tester's own JSON-RPC formatting: the JSON-RPC server forwards
        # wire requests through it unchanged.
        self._rpc_w3 = Web3(EthereumTesterProvider(self.tester), middleware=[])
        self._rpc_fn = self._rpc_w3.provider.request_func(
            self._rpc_w3, self._rpc_w3.middleware_onion
        )
        self.accounts: list[LocalAccount] = [
            Account.from_key(key.to_bytes()) for key in self.backend.account_keys
        ]
        self.deployer: LocalAccount = self.accounts[0]
        self._artifact = load_token_artifact()
        self._extra_accounts = 0

    # -- JSON-RPC ----------------------------------------------------------------

    def rpc(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one JSON-RPC request object the way a node would."""
        req_id = request.get("id")
        method = request.get("method")
        params = request.get("params") or []
        if not isinstance(method, str):
            return {
                "jsonrpc": "2.0",
                "id": req_id,
                "error": {"code": -32600, "message": "invalid request"},
            }
        try:
            with self.lock:
                response = self._rpc_fn(method, params)
        except TransactionFailed as exc:
            reason = str(exc.args[0]) if exc.args else "execution reverted"
            plain = reason.removeprefix("execution reverted: ")
            return {
                "jsonrpc": "2.0",
                "id": req_id,
                "error": {"code": 3, "message": reason, "data": _revert_data(plain)},
            }
        except Exception as exc:
            return {
                "jsonrpc": "2.0",
                "id": req_id,
                "error": {"code": -32000, "message": f"{type(exc).__name__}: {exc}"},
            }
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id}
        if "error" in response:
            out["error"] = response["error"]
        else:
            out["result"] = _to_wire(response.get("result"))
        return out

    # -- accounts ----------------------------------------------------------------

    def new_account(self, fund_wei: int = _FUND_WEI) -> LocalAccount:
        """A fresh key funded with ether (so tests never share a nonce space by accident)."""
        with self.lock:
            self._extra_accounts += 1
            acct = Account.create(f"tollway-test-{self._extra_accounts}")
            if fund_wei:
                self.send_native(self.deployer, acct.address, fund_wei)
            return acct

    # -- transactions ------------------------------------------------------------

    def _send(self, sender: LocalAccount, tx: dict[str, Any]) -> str:
        with self.lock:
            tx.setdefault("from", sender.address)
            tx.setdefault("nonce", self.w3.eth.get_transaction_count(sender.address))
            tx.setdefault("chainId", self.chain_id)
            if "gas" not in tx:
                tx["gas"] = self.w3.eth.estimate_gas(tx)
            base_fee = self.w3.eth.get_block("latest")["baseFeePerGas"]
            tx.setdefault("maxPriorityFeePerGas", 10**9)
            tx.setdefault("maxFeePerGas", 2 * base_fee + 10**9)
            signed = sender.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            # eth-tester mines one block per transaction (auto-mine).
            return "0x" + bytes(tx_hash).hex()

    def send_native(self, sender: LocalAccount, to: str, amount_wei: int) -> str:
        return self._send(
            sender, {"to": to_checksum_address(to), "value": amount_wei, "gas": 21000}
        )

    def token(self, address: str) -> Any:
        return self.w3.eth.contract(address=to_checksum_address(address), abi=self._artifact["abi"])

    def deploy_token(
        self,
        name: str = "USD Coin",
        version: str = "2",
        domain_chain_id: int | None = None,
        symbol: str = "USDC",
    ) -> str:
        """Deploy an EIP3009Token owned by ``deployer``; returns its checksum address.

        ``domain_chain_id`` pins the EIP-712 domain chain id (default: this chain's).
        """
        with self.lock:
            factory = self.w3.eth.contract(
                abi=self._artifact["abi"], bytecode=self._artifact["bytecode"]
            )
            tx = factory.constructor(
                name,
                symbol,
                version,
                self.chain_id if domain_chain_id is None else domain_chain_id,
            ).build_transaction(
                {
                    "from": self.deployer.address,
                    "nonce": self.w3.eth.get_transaction_count(self.deployer.address),
                }
            )
            tx_hash = self._send(self.deployer, dict(tx))
            receipt = self.w3.eth.get_transaction_receipt(tx_hash)
            assert receipt["status"] == 1, "token deployment failed"
            return to_checksum_address(receipt["contractAddress"])

    def _call_tx(
        self, sender: LocalAccount, token: str, fn: str, *args: Any, gas: int | None = None
    ) -> str:
        with self.lock:
            params: dict[str, Any] = {
                "from": sender.address,
                "nonce": self.w3.eth.get_transaction_count(sender.address),
            }
            if gas is not None:
                # A fixed gas limit skips estimation, which would refuse a
                # reverting call: this is how tests put a failed tx on chain.
                params["gas"] = gas
            tx = getattr(self.token(token).functions, fn)(*args).build_transaction(params)
            return self._send(sender, dict(tx))

    def mint(self, token: str, to: str, amount: int) -> str:
        return self._call_tx(self.deployer, token, "mint", to_checksum_address(to), amount)

    def transfer_token(
        self, token: str, sender: LocalAccount, to: str, amount: int, *, gas: int | None = None
    ) -> str:
        """ERC-20 ``transfer``; with ``gas`` set, a reverting transfer is still mined."""
        return self._call_tx(sender, token, "transfer", to_checksum_address(to), amount, gas=gas)

    def token_balance(self, token: str, owner: str) -> int:
        with self.lock:
            return int(self.token(token).functions.balanceOf(to_checksum_address(owner)).call())

    def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        with self.lock:
            return bool(
                self.token(token)
                .functions.authorizationState(to_checksum_address(authorizer), nonce)
                .call()
            )

    def receipt(self, tx_hash: str) -> Any:
        with self.lock:
            return self.w3.eth.get_transaction_receipt(tx_hash)

    # -- blocks and time ---------------------------------------------------------

    def mine_blocks(self, n: int = 1) -> int:
        """Mine ``n`` empty blocks; returns the new head number."""
        with self.lock:
            self.tester.mine_blocks(n)
            return self.block_number()

    def start_interval_mining(self, seconds: float = 1.0) -> None:
        """Mine like a real node: transactions wait in the pool for the next block,
        one every ``seconds``, so a transaction is pending for a while, then mined."""
        with self.lock:
            self.tester.disable_auto_mine_transactions()
        self._mining_stop = threading.Event()

        def run() -> None:
            while not self._mining_stop.wait(seconds):
                with self.lock:
                    self.tester.mine_blocks(1)

        self._miner = threading.Thread(target=run, name="evm-interval-miner", daemon=True)
        self._miner.start()

    def stop_interval_mining(self) -> None:
        self._mining_stop.set()
        self._miner.join()
        with self.lock:
            self.tester.enable_auto_mine_transactions()  # mines what is still pending

    def block_number(self) -> int:
        with self.lock:
            return int(self.w3.eth.block_number)

    def block_timestamp(self, block: int | str = "latest") -> int:
        with self.lock:
            return int(self.w3.eth.get_block(block)["timestamp"])

    def time_travel(self, timestamp: int) -> None:
        """Mine a block at ``timestamp`` (must be later than the head's)."""
        with self.lock:
            self.tester.time_travel(timestamp)


def eip3009_digest(
    token: str,
    *,
    name: str,
    version: str,
    domain_chain_id: int,
    from_: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
    primary: str = "TransferWithAuthorization",
) -> bytes:
    """The EIP-712 digest the token checks; for tests that hand-sign authorizations."""
    domain_typehash = keccak(
        text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    domain = keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                domain_typehash,
                keccak(text=name),
                keccak(text=version),
                domain_chain_id,
                to_checksum_address(token),
            ],
        )
    )
    typehash = keccak(
        text=f"{primary}(address from,address to,uint256 value,"
        "uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    )
    struct = keccak(
        abi_encode(
            ["bytes32", "address", "address", "uint256", "uint256", "uint256", "bytes32"],
            [
                typehash,
                to_checksum_address(from_),
                to_checksum_address(to),
                value,
                valid_after,
                valid_before,
                nonce,
            ],
        )
    )
    return keccak(b"\x19\x01" + domain + struct)
