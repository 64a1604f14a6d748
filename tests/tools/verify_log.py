#!/usr/bin/env python3
"""Independent check of an hsmca issuance log, sharing no code with hsmca.

Recomputes the RFC 6962 Merkle root of log/entries.jsonl (leaf = line bytes without the
newline) with hashlib, parses the C2SP signed note in log/checkpoint, checks its signature
against the verifier key in log/log.vkey with pyca/cryptography (Ed25519 type 0x01, or
ECDSA P-256 type 0x02 over SHA-256), and checks that the checkpoint's root equals the
recomputed root at its size. Prints "OK <size> <root>" and exits 0, or exits 1.

usage: verify_log.py CA_HOME
"""
import base64
import hashlib
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519


def mth(leaves):
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def fail(msg):
    print("FAIL " + msg)
    sys.exit(1)


def check_note(note, vkey):
    """Verifies a signed checkpoint note with the vkey; returns (origin, size, root_b64)."""
    name, key_id_hex, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64)
    text, sep, sigs = note.rpartition(b"\n\n")
    if not sep:
        fail("no signature block")
    text += b"\n"
    verified = False
    for line in sigs.decode().splitlines():
        if not line.startswith("\u2014 "):
            fail("bad signature line")
        sig_name, sig_b64 = line[2:].rsplit(" ", 1)
        blob = base64.b64decode(sig_b64)
        if sig_name != name or blob[:4] != bytes.fromhex(key_id_hex):
            continue
        sig = blob[4:]
        try:
            if key[0] == 0x01:
                expect = hashlib.sha256(name.encode() + b"\n" + key).digest()[:4]
                if expect != bytes.fromhex(key_id_hex):
                    fail("Ed25519 key id does not match the key")
                ed25519.Ed25519PublicKey.from_public_bytes(key[1:]).verify(sig, text)
            elif key[0] == 0x02:
                if hashlib.sha256(key[1:]).digest()[:4] != bytes.fromhex(key_id_hex):
                    fail("ECDSA key id does not match the key")
                pub = serialization.load_der_public_key(key[1:])
                pub.verify(sig, text, ec.ECDSA(hashes.SHA256()))
            else:
                fail("unknown key type %d" % key[0])
        except InvalidSignature:
            fail("checkpoint signature does not verify")
        verified = True
    if not verified:
        fail("no signature by the log key")
    lines = text.decode().split("\n")
    origin, size, root_b64 = lines[0], int(lines[1]), lines[2]
    if origin != name:
        fail("origin %r is not the key name %r" % (origin, name))
    return origin, size, root_b64


def main(home):
    with open(home + "/log/entries.jsonl", "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        fail("torn last line")
    leaves = data.split(b"\n")[:-1]
    vkey = open(home + "/log/log.vkey").read().strip()
    note = open(home + "/log/checkpoint", "rb").read()
    _, size, root_b64 = check_note(note, vkey)
    if size > len(leaves):
        fail("checkpoint covers %d entries, log has %d" % (size, len(leaves)))
    root = base64.b64encode(mth(leaves[:size])).decode()
    if root != root_b64:
        fail("root mismatch at size %d" % size)
    print("OK %d %s" % (size, root))


if __name__ == "__main__":
    main(sys.argv[1])
