#!/usr/bin/env python3
"""Verifies a fedrelay evidence bundle (`fedrelay evidence EVENT_ID --bundle FILE`)
without fedrelay: with jwcrypto (Debian: python3-jwcrypto), an independent JOSE
implementation. Checks the token's EdDSA signature under the bundle's JWK, that
the token names that key and the bundle's sender and event id, the JWK's RFC 7638
thumbprint, and the SHA-256 of the body. Prints one line; exit 0 if all hold.

    python3 scripts/verify-evidence.py BUNDLE.json
"""
import base64
import hashlib
import json
import sys

from jwcrypto import jwk, jws


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        bundle = json.load(f)
    if bundle.get("format") != "fedrelay-evidence/1":
        print(f"not a fedrelay evidence bundle: format {bundle.get('format')!r}")
        return 1
    key = jwk.JWK(kty="OKP", crv="Ed25519", x=bundle["jwk"]["x"])
    if key.thumbprint() != bundle["thumbprint"]:
        print("the key's RFC 7638 thumbprint is not the bundle's")
        return 1
    token = jws.JWS()
    token.deserialize(bundle["token"])
    try:
        token.verify(key, alg="EdDSA")
    except jws.InvalidJWSSignature:
        print("the signature does not verify with the bundle's key")
        return 1
    header = token.jose_header
    claims = json.loads(token.payload)
    if header.get("kid") != bundle["jwk"]["kid"]:
        print(f"the token names key {header.get('kid')!r}, not {bundle['jwk']['kid']!r}")
        return 1
    if claims.get("iss") != bundle["iss"] or claims.get("jti") != bundle["jti"]:
        print("the token's iss or jti is not the bundle's")
        return 1
    if b64url(hashlib.sha256(b64url_decode(claims["body"])).digest()) != bundle["bodySha256"]:
        print("the body's SHA-256 is not the bundle's")
        return 1
    print(f"ok: event {bundle['jti']} was signed by {bundle['jwk']['kid']} (key {bundle['thumbprint']}), "
          f"received by {bundle['receivedBy']} at {bundle['receivedAt']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip())
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
