#!/usr/bin/env bash
# Rebuild EIP3009Token.json (abi + bytecode) from EIP3009Token.vy.
#
# The compiler is installed into a throwaway venv rather than the project's
# environment: vyper pins its own dependency versions and is only needed when
# the contract source changes, never to run the tests.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
VYPER_VERSION="${VYPER_VERSION:-0.4.3}"
venv="${VYPER_VENV:-$(mktemp -d)/vyper-venv}"

if [ ! -x "$venv/bin/vyper" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "vyper==${VYPER_VERSION}"
fi

"$venv/bin/python" - "$here" "$venv/bin/vyper" <<'PY'
import json
import subprocess
import sys
from pathlib import Path

here, vyper = Path(sys.argv[1]), sys.argv[2]
src = here / "EIP3009Token.vy"
out = subprocess.run(
    [vyper, "-f", "combined_json", str(src.name)],
    cwd=here, check=True, capture_output=True, text=True,
).stdout
combined = json.loads(out)
entry = combined[src.name]
version = subprocess.run([vyper, "--version"], check=True, capture_output=True, text=True).stdout.strip()
# __default__ serves the (bytes signature) overloads; list them in the ABI so
# web3 and other clients can encode calls to them by name.
def _bytes_form(name):
    words = [("from", "address"), ("to", "address"), ("value", "uint256"),
             ("validAfter", "uint256"), ("validBefore", "uint256"), ("nonce", "bytes32"),
             ("signature", "bytes")]
    return {"type": "function", "name": name, "stateMutability": "nonpayable",
            "inputs": [{"name": n, "type": t} for n, t in words], "outputs": []}

abi = entry["abi"] + [_bytes_form("transferWithAuthorization"),
                      _bytes_form("receiveWithAuthorization")]
artifact = {
    "contractName": "EIP3009Token",
    "compiler": f"vyper {version}",
    "source": src.name,
    "abi": abi,
    "bytecode": entry["bytecode"],
}
(here / "EIP3009Token.json").write_text(json.dumps(artifact, indent=1) + "\n")
print(f"wrote {here / 'EIP3009Token.json'} with {version}")
PY
