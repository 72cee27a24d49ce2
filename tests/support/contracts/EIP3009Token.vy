# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title EIP-3009 test token (USDC-like)
@notice A small ERC-20 with 6 decimals and EIP-3009 transfer/receive with
        authorization, used only by Tollway's tests on an in-process chain.
@dev The EIP-712 domain chain id is a constructor argument instead of
     chain.id: a test chain (eth-tester, chain id 131277322940537) can then host
     a token whose signatures are bound to a named x402 v1 network such as
     base-sepolia (84532). Real tokens always use chain.id.
     transferWithAuthorization exists in both forms USDC v2 exposes:
     (v, r, s) as a normal function, and (bytes signature) dispatched in
     __default__, because Vyper has no overloading by argument types.
"""

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

EIP712_DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
RECEIVE_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
# transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)
TWA_BYTES_SELECTOR: constant(bytes4) = method_id(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
    output_type=bytes4,
)
# receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)
RWA_BYTES_SELECTOR: constant(bytes4) = method_id(
    "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
    output_type=bytes4,
)
# ABI body of the bytes form with a 65-byte signature: 7 head words, the
# length word, then 65 bytes padded to 96.
BYTES_FORM_BODY_LEN: constant(uint256) = 7 * 32 + 32 + 96
# secp256k1n / 2: signatures with a larger s are the malleable twin (EIP-2).
HALF_CURVE_ORDER: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

name: public(String[64])
symbol: public(String[32])
version: public(String[16])
decimals: public(constant(uint8)) = 6
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
authorizationState: public(HashMap[address, HashMap[bytes32, bool]])
owner: public(address)
domainChainId: public(uint256)
DOMAIN_SEPARATOR: public(bytes32)


@deploy
def __init__(_name: String[64], _symbol: String[32], _version: String[16], _domain_chain_id: uint256):
    self.name = _name
    self.symbol = _symbol
    self.version = _version
    self.owner = msg.sender
    self.domainChainId = _domain_chain_id
    self.DOMAIN_SEPARATOR = keccak256(
        abi_encode(
            EIP712_DOMAIN_TYPEHASH,
            keccak256(_name),
            keccak256(_version),
            _domain_chain_id,
            self,
        )
    )


@internal
def _transfer(_from: address, _to: address, _value: uint256):
    assert _to != empty(address), "ERC20: transfer to the zero address"
    assert self.balanceOf[_from] >= _value, "ERC20: transfer amount exceeds balance"
    self.balanceOf[_from] -= _value
    self.balanceOf[_to] += _value
    log Transfer(sender=_from, receiver=_to, value=_value)


@external
def transfer(_to: address, _value: uint256) -> bool:
    self._transfer(msg.sender, _to, _value)
    return True


@external
def transferFrom(_from: address, _to: address, _value: uint256) -> bool:
    allowed: uint256 = self.allowance[_from][msg.sender]
    assert allowed >= _value, "ERC20: insufficient allowance"
    if allowed != max_value(uint256):
        self.allowance[_from][msg.sender] = allowed - _value
    self._transfer(_from, _to, _value)
    return True


@external
def approve(_spender: address, _value: uint256) -> bool:
    self.allowance[msg.sender][_spender] = _value
    log Approval(owner=msg.sender, spender=_spender, value=_value)
    return True


@external
def mint(_to: address, _value: uint256):
    assert msg.sender == self.owner, "only owner"
    assert _to != empty(address), "ERC20: mint to the zero address"
    self.totalSupply += _value
    self.balanceOf[_to] += _value
    log Transfer(sender=empty(address), receiver=_to, value=_value)


@internal
def _use_authorization(
    _typehash: bytes32,
    _from: address,
    _to: address,
    _value: uint256,
    _valid_after: uint256,
    _valid_before: uint256,
    _nonce: bytes32,
    _v: uint256,
    _r: bytes32,
    _s: bytes32,
):
    # Messages match the FiatToken (USDC) revert strings so that clients and
    # facilitators that map revert reasons keep working against this token.
    assert block.timestamp > _valid_after, "FiatTokenV2: authorization is not yet valid"
    assert block.timestamp < _valid_before, "FiatTokenV2: authorization is expired"
    assert not self.authorizationState[_from][_nonce], "FiatTokenV2: authorization is used or canceled"
    struct_hash: bytes32 = keccak256(
        abi_encode(_typehash, _from, _to, _value, _valid_after, _valid_before, _nonce)
    )
    digest: bytes32 = keccak256(concat(b"\x19\x01", self.DOMAIN_SEPARATOR, struct_hash))
    v: uint256 = _v
    if v < 27:
        v += 27
    assert v == 27 or v == 28, "FiatTokenV2: invalid signature"
    assert convert(_s, uint256) <= HALF_CURVE_ORDER, "FiatTokenV2: invalid signature"
    signer: address = ecrecover(digest, v, _r, _s)
    assert signer != empty(address) and signer == _from, "FiatTokenV2: invalid signature"
    self.authorizationState[_from][_nonce] = True
    log AuthorizationUsed(authorizer=_from, nonce=_nonce)
    self._transfer(_from, _to, _value)


@external
def transferWithAuthorization(
    _from: address,
    _to: address,
    _value: uint256,
    _valid_after: uint256,
    _valid_before: uint256,
    _nonce: bytes32,
    _v: uint8,
    _r: bytes32,
    _s: bytes32,
):
    self._use_authorization(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH,
        _from, _to, _value, _valid_after, _valid_before, _nonce,
        convert(_v, uint256), _r, _s,
    )


@external
def receiveWithAuthorization(
    _from: address,
    _to: address,
    _value: uint256,
    _valid_after: uint256,
    _valid_before: uint256,
    _nonce: bytes32,
    _v: uint8,
    _r: bytes32,
    _s: bytes32,
):
    # The payee must submit it itself, so a front-runner cannot redirect the
    # authorization into a plain transfer the payee did not expect.
    assert msg.sender == _to, "FiatTokenV2: caller must be the payee"
    self._use_authorization(
        RECEIVE_WITH_AUTHORIZATION_TYPEHASH,
        _from, _to, _value, _valid_after, _valid_before, _nonce,
        convert(_v, uint256), _r, _s,
    )


@external
def __default__():
    # The (bytes signature) forms. Only 65-byte ECDSA signatures are
    # accepted, which fixes the ABI body length; smart-wallet (ERC-1271)
    # signatures are out of scope for a test token.
    assert len(msg.data) == 4 + BYTES_FORM_BODY_LEN, "unknown function or signature length"
    selector: bytes4 = convert(slice(msg.data, 0, 4), bytes4)
    assert selector == TWA_BYTES_SELECTOR or selector == RWA_BYTES_SELECTOR, "unknown function"
    _from: address = empty(address)
    _to: address = empty(address)
    _value: uint256 = 0
    _valid_after: uint256 = 0
    _valid_before: uint256 = 0
    _nonce: bytes32 = empty(bytes32)
    _sig: Bytes[65] = b""
    _from, _to, _value, _valid_after, _valid_before, _nonce, _sig = abi_decode(
        slice(msg.data, 4, BYTES_FORM_BODY_LEN),
        (address, address, uint256, uint256, uint256, bytes32, Bytes[65]),
    )
    assert len(_sig) == 65, "FiatTokenV2: invalid signature length"
    r: bytes32 = extract32(_sig, 0)
    s: bytes32 = extract32(_sig, 32)
    v: uint256 = convert(slice(_sig, 64, 1), uint256)
    typehash: bytes32 = TRANSFER_WITH_AUTHORIZATION_TYPEHASH
    if selector == RWA_BYTES_SELECTOR:
        assert msg.sender == _to, "FiatTokenV2: caller must be the payee"
        typehash = RECEIVE_WITH_AUTHORIZATION_TYPEHASH
    self._use_authorization(
        typehash, _from, _to, _value, _valid_after, _valid_before, _nonce, v, r, s
    )
