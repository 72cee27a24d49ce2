"""A local Ethereum JSON-RPC HTTP endpoint in front of an in-process ``EvmChain``.

Our production code only knows web3's real HTTP provider, so the tests give it
a real HTTP node to talk to. The server runs in its own thread (stdlib
``ThreadingHTTPServer``), so it keeps answering while the test's event loop is
blocked in a sync helper and while a proxy in another process calls it at the
same time; every request goes through ``EvmChain.rpc``, which holds the chain
lock.

From a test::

    with JsonRpcServer(EvmChain()) as node:
        rpc_url = node.url          # http://127.0.0.1:<port>/

From a shell or another process (prints one JSON line with url, token, keys)::

    python -m tests.support.jsonrpc_server
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.support.evm_chain import EvmChain

# JSON-RPC bodies from web3 are small; refuse anything absurd early.
_MAX_BODY = 8 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as web3's aiohttp session expects

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > _MAX_BODY:
            self._reply(
                400,
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "bad body"}},
            )
            return
        raw = self.rfile.read(length)
        try:
            request = json.loads(raw)
        except ValueError:
            self._reply(
                200,
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}},
            )
            return
        chain = self.server.chain
        if isinstance(request, list):
            body: Any = [
                chain.rpc(r)
                if isinstance(r, dict)
                else {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {"code": -32600, "message": "invalid request"},
                }
                for r in request
            ]
        elif isinstance(request, dict):
            body = chain.rpc(request)
        else:
            body = {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": -32600, "message": "invalid request"},
            }
        self.server.requests_served += 1
        self._reply(200, body)

    def do_GET(self) -> None:
        # Health check for a parent process waiting for the node to come up.
        self._reply(200, {"ok": True})

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: pytest output is for failures.
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, chain: EvmChain, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)
        self.chain = chain
        self.requests_served = 0


class JsonRpcServer:
    """Serve ``chain`` over HTTP JSON-RPC on 127.0.0.1 (a free port by default)."""

    def __init__(self, chain: EvmChain, host: str = "127.0.0.1", port: int = 0) -> None:
        self.chain = chain
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def requests_served(self) -> int:
        return self._server.requests_served if self._server else 0

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = _Server(self.chain, self._host, self._port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="evm-jsonrpc",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Run a chain + node in the foreground; print what a client needs as one JSON line."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--token-domain-chain-id",
        type=int,
        action="append",
        default=[],
        help="also deploy a token whose EIP-712 domain pins this chain id",
    )
    args = parser.parse_args()

    chain = EvmChain()
    tokens = {str(chain.chain_id): chain.deploy_token()}
    for cid in args.token_domain_chain_id:
        tokens[str(cid)] = chain.deploy_token(domain_chain_id=cid)
    server = JsonRpcServer(chain, port=args.port).start()
    print(
        json.dumps(
            {
                "url": server.url,
                "chain_id": chain.chain_id,
                "tokens": tokens,
                "deployer": chain.deployer.address,
                "accounts": [{"address": a.address, "key": a.key.hex()} for a in chain.accounts],
            }
        ),
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()


if __name__ == "__main__":
    main()
