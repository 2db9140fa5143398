"""Talks to weft's Workload API with the Python `spiffe` package (PyPI).

Driven by proxy/tests/workload_api.rs, which starts a real control plane and
sidecar and points SPIFFE_ENDPOINT_SOCKET at the sidecar's socket.

Usage: python3 workload_api_client.py TRUST_DOMAIN AUDIENCE
Prints one JSON object with what the library saw; exits 3 when the `spiffe`
package is missing, 1 on any other failure (with the traceback on stderr).
"""

import json
import sys
import time

try:
    from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
    from spiffe.workloadapi.errors import ValidateJwtSvidError
except ImportError as e:  # pragma: no cover - reported by the Rust test
    print(f"spiffe package not importable: {e}", file=sys.stderr)
    sys.exit(3)

from cryptography.hazmat.primitives import serialization


def public_der(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def expect_validation_failure(client, token, audience):
    try:
        client.validate_jwt_svid(token, audience)
    except ValidateJwtSvidError as e:
        return str(e)
    raise AssertionError(f"validate_jwt_svid accepted audience {audience!r}")


def main():
    td_name, audience = sys.argv[1], sys.argv[2]
    td = TrustDomain(td_name)
    out = {}
    # The endpoint comes from SPIFFE_ENDPOINT_SOCKET; every call has a deadline.
    with WorkloadApiClient(default_timeout=15) as client:
        svid = client.fetch_x509_svid()
        out["x509_spiffe_id"] = str(svid.spiffe_id)
        out["x509_chain_len"] = len(svid.cert_chain)
        out["x509_key_matches_leaf"] = public_der(svid.private_key.public_key()) == public_der(svid.leaf.public_key())

        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(td)
        out["x509_bundle_authorities"] = len(bundle.x509_authorities) if bundle else 0
        # The chain leads to a bundle authority: leaf <- intermediate <- root.
        chain = svid.cert_chain
        for child, parent in zip(chain, chain[1:]):
            child.verify_directly_issued_by(parent)
        roots = list(bundle.x509_authorities)
        verified = False
        for root in roots:
            try:
                chain[-1].verify_directly_issued_by(root)
                verified = True
            except Exception:
                pass
        out["x509_chain_verifies_to_bundle"] = verified

        ctx = client.fetch_x509_context()
        out["x509_context_svids"] = len(ctx.x509_svids)

        jwt = client.fetch_jwt_svid(audience={audience})
        out["jwt_spiffe_id"] = str(jwt.spiffe_id)
        out["jwt_audience"] = sorted(jwt.audience)
        out["jwt_ttl"] = jwt.expiry - int(time.time())
        again = client.fetch_jwt_svid(audience={audience})
        out["jwt_cached"] = again.token == jwt.token

        jwt_bundles = client.fetch_jwt_bundles()
        jb = jwt_bundles.get_bundle_for_trust_domain(td)
        out["jwt_bundle_kids"] = sorted(jb.jwt_authorities.keys()) if jb else []
        # Independent check of weft's signature with PyJWT, through the library.
        local = JwtSvid.parse_and_validate(jwt.token, jb, {audience})
        out["jwt_local_spiffe_id"] = str(local.spiffe_id)

        validated = client.validate_jwt_svid(jwt.token, audience)
        out["validated_spiffe_id"] = str(validated.spiffe_id)
        out["wrong_audience_error"] = expect_validation_failure(client, jwt.token, audience + "-other")
        head, payload, sig = jwt.token.split(".")
        flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
        out["bad_signature_error"] = expect_validation_failure(client, f"{head}.{payload}.{flipped}", audience)

    print(json.dumps(out))


if __name__ == "__main__":
    main()
