"""Power-on self-test of the enclave runtime's cryptography.

Every primitive a migration needs (X25519, HKDF, AES-GCM into caller
buffers, ECDSA P-256, X.509 parsing, SHA-2, CMAC) runs once with a known
answer when the enclave starts.  A broken or substituted crypto library stops
the enclave before it holds any secret; and the library's code and tables
are loaded at start, not in the middle of a migration, so a migration's
memory footprint is what it moves, not first-use initialisation.
"""

from __future__ import annotations

import datetime as _dt
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from ..errors import EnclaveError

# RFC 7748, section 6.1
_ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
_BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def run() -> None:
    try:
        alice = x25519.X25519PrivateKey.from_private_bytes(_ALICE)
        shared = alice.exchange(x25519.X25519PublicKey.from_public_bytes(_BOB_PUB))
        if shared != _SHARED:
            raise EnclaveError("X25519 self-test failed")
        key = HKDF(hashes.SHA256(), 32, salt=b"s", info=b"i").derive(shared)
        aead = AESGCM(key)
        out = bytearray(64 + 16)
        aead.encrypt_into(bytes(12), bytes(64), b"aad", out)
        back = bytearray(64)
        aead.decrypt_into(bytes(12), bytes(out), b"aad", back)
        if back != bytes(64):
            raise EnclaveError("AES-GCM self-test failed")
        mac = CMAC(algorithms.AES(key[:16]))
        mac.update(b"x")
        mac.finalize()
        hashlib.sha512(b"x").digest()
        signer = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-test")])
        now = _dt.datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(signer.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + _dt.timedelta(minutes=1))
            .sign(signer, hashes.SHA256())
        )
        cert.verify_directly_issued_by(cert)
        sig = signer.sign(b"x", ec.ECDSA(hashes.SHA256()))
        signer.public_key().verify(sig, b"x", ec.ECDSA(hashes.SHA256()))
    except EnclaveError:
        raise
    except Exception as exc:
        raise EnclaveError(f"cryptography self-test failed: {type(exc).__name__}") from exc
