#!/usr/bin/env python3
"""Independent check of a C2SP tlog-proof@v1 exported by `hsmca log export`, sharing no code
with hsmca: the checkpoint signature (via verify_log.check_note, pyca/cryptography), then the
RFC 9162 §2.1.3.2 inclusion path from the leaf (the exact entry line) to the checkpoint root.

usage: verify_proof.py VKEY_FILE ENTRY_LINE_FILE PROOF_FILE     (prints "OK index size")
"""
import base64
import hashlib
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from verify_log import check_note, fail  # noqa: E402


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def main(vkey_file, leaf_file, proof_file):
    vkey = open(vkey_file).read().strip()
    leaf = open(leaf_file, "rb").read().rstrip(b"\n")
    proof = open(proof_file, "rb").read()
    head, sep, note = proof.partition(b"\n\n")
    if not sep:
        fail("no blank line before the checkpoint")
    lines = head.decode().split("\n")
    if lines[0] != "c2sp.org/tlog-proof@v1":
        fail("not a tlog-proof@v1")
    rest = [l for l in lines[1:] if not l.startswith("extra ")]
    if not rest[0].startswith("index "):
        fail("no index line")
    index = int(rest[0][len("index "):])
    path = [base64.b64decode(h) for h in rest[1:]]
    _, size, root_b64 = check_note(note, vkey)
    if index >= size:
        fail("index %d outside a tree of %d" % (index, size))
    fn, sn = index, size - 1
    r = hashlib.sha256(b"\x00" + leaf).digest()
    for p in path:
        if sn == 0:
            fail("proof too long")
        if fn % 2 == 1 or fn == sn:
            r = node(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or base64.b64encode(r).decode() != root_b64:
        fail("inclusion proof does not lead to the checkpoint root")
    print("OK %d %d" % (index, size))


if __name__ == "__main__":
    main(*sys.argv[1:4])
