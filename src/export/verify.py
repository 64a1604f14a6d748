#!/usr/bin/env python3
"""Checks an hsmca log export on its own, sharing no code with hsmca.

Run it from the export directory (or give the directory):

    python3 verify.py [DIR] [--vkey KEY] [--checkpoint FILE]...

Needs Python 3.8+ with the standard library and pyca/cryptography (40 or later). It checks:

  * every line of entries.jsonl: valid JSON, `seq` equal to its line number, `prev` equal to
    the RFC 6962 Merkle root over all lines before it;
  * every checkpoint (checkpoints/* and checkpoint): the signature with the log's verifier key,
    the origin, the size, and the root against the root recomputed from the entries;
  * every inclusion proof (proofs/*.tlog-proof, C2SP tlog-proof@v1): its checkpoint and the
    path from the entry's line to that checkpoint's root; every certificate and CRL covered by
    a checkpoint has one;
  * the CA rules: entry 0 is the self-signed root; serials are unique; each certificate matches
    its intent (serial, CSR, profile, SHA-256 of the TBSCertificate) and verifies under its
    issuer (the root or an intermediate earlier in the log); revocations name issued
    certificates; CRL numbers increase per issuer; each CRL matches its intent and verifies
    under its issuer;
  * the files beside the log: root.pem, certs/SERIAL.pem and crls/ISSUER-NUMBER.pem are the
    logged bytes, and there is no certificate or CRL file the log does not hold;
  * with --checkpoint FILE (a checkpoint kept in the ceremony minutes or by a witness): the
    log extends it.

What it trusts: the verifier key. By default that is log.vkey, which must equal the key
recorded in entry 0; give --vkey with the key from the ceremony minutes to trust that instead,
and compare the root certificate SHA-256 printed below with the minutes.

Prints one line per finding and a last line "OK ..." (exit 0) or "FAILED ..." (exit 1).
Other entry types (policy, module, plan, recovery, ...) are covered by the Merkle tree and the
checkpoints; their contents are not interpreted here.
"""
import argparse
import base64
import hashlib
import json
import os
import re
import sys

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
except ImportError:
    print("FAILED: this verifier needs pyca/cryptography (pip install cryptography)")
    sys.exit(2)

EM_DASH = "\u2014 "


class Problems:
    """Collects findings; every check goes on after a failure so all are reported at once."""

    def __init__(self):
        self.items = []

    def add(self, entry, message):
        where = "entry %d: " % entry if entry is not None else ""
        self.items.append(where + message)
        print("problem: " + where + message)


def count(n, one, many=None):
    """ "1 entry", "2 entries": a count with its noun in the right number."""
    return "%d %s" % (n, one if n == 1 else (many or one + "s"))


def leaf_hash(line):
    return hashlib.sha256(b"\x00" + line).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def prefix_roots(leaves):
    """RFC 6962 roots of every prefix: roots[n] is the root over leaves[:n]."""
    roots = [hashlib.sha256(b"").digest()]
    stack = []  # (number of leaves, hash) of perfect subtrees, left to right
    for line in leaves:
        stack.append((1, leaf_hash(line)))
        while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
            (n, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * n, node_hash(left, right)))
        root = stack[-1][1]
        for _, h in reversed(stack[:-1]):
            root = node_hash(h, root)
        roots.append(root)
    return roots


def open_note(note, vkey):
    """Verifies a C2SP signed note (a checkpoint) with a Go note verifier key.

    Returns (origin, size, root bytes) or raises ValueError saying what is wrong."""
    name, key_id_hex, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64)
    key_id = bytes.fromhex(key_id_hex)
    text, sep, sigs = note.rpartition(b"\n\n")
    if not sep:
        raise ValueError("no signature block")
    text += b"\n"
    verified = False
    for line in sigs.decode("utf-8").splitlines():
        if not line.startswith(EM_DASH):
            raise ValueError("malformed signature line %r" % line)
        sig_name, sig_b64 = line[len(EM_DASH):].rsplit(" ", 1)
        blob = base64.b64decode(sig_b64)
        if sig_name != name or blob[:4] != key_id:
            continue
        sig = blob[4:]
        try:
            if key[0] == 0x01:
                if hashlib.sha256(name.encode() + b"\n" + key).digest()[:4] != key_id:
                    raise ValueError("the Ed25519 key id does not match the key")
                ed25519.Ed25519PublicKey.from_public_bytes(key[1:]).verify(sig, text)
            elif key[0] == 0x02:
                if hashlib.sha256(key[1:]).digest()[:4] != key_id:
                    raise ValueError("the ECDSA key id does not match the key")
                pub = serialization.load_der_public_key(key[1:])
                pub.verify(sig, text, ec.ECDSA(hashes.SHA256()))
            else:
                raise ValueError("unknown verifier key type %d" % key[0])
        except InvalidSignature:
            raise ValueError("signature does not verify with the log key")
        verified = True
    if not verified:
        raise ValueError("not signed by the log key %s" % name)
    lines = text.decode("utf-8").split("\n")
    if len(lines) < 4 or not lines[1].isdigit():
        raise ValueError("not a checkpoint")
    if lines[0] != name:
        raise ValueError("origin %r is not the key's name %r" % (lines[0], name))
    return lines[0], int(lines[1]), base64.b64decode(lines[2])


def check_proof(proof, leaf, vkey):
    """A tlog-proof@v1: returns (index, size, root) once the path leads to the signed root."""
    head, sep, note = proof.partition(b"\n\n")
    if not sep:
        raise ValueError("no blank line before the checkpoint")
    lines = head.decode("utf-8").split("\n")
    if lines[0] != "c2sp.org/tlog-proof@v1":
        raise ValueError("not a c2sp.org/tlog-proof@v1")
    rest = [x for x in lines[1:] if not x.startswith("extra ")]
    if not rest or not rest[0].startswith("index "):
        raise ValueError("no index line")
    index = int(rest[0][len("index "):])
    path = [base64.b64decode(h) for h in rest[1:]]
    _, size, root = open_note(note, vkey)
    if index >= size:
        raise ValueError("index %d outside a tree of %d" % (index, size))
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in path:
        if sn == 0:
            raise ValueError("proof too long")
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise ValueError("the inclusion path does not lead to the checkpoint's root")
    return index, size, root


def pem_der(path, label):
    text = open(path, "rb").read().decode("ascii", "replace")
    m = re.search(r"-----BEGIN %s-----(.*?)-----END %s-----" % (label, label), text, re.S)
    if not m:
        raise ValueError("no %s PEM block" % label)
    return base64.b64decode("".join(m.group(1).split()))


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def is_ca(cert):
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


class Ca:
    """The CA certificates seen so far: the root, then each intermediate in log order."""

    def __init__(self):
        self.certs = []

    def issuer_of(self, name_der):
        for c in self.certs:
            if c.subject.public_bytes() == name_der:
                return c
        return None


def check_entries(lines, problems):
    """The CA rules over the entries; returns what the file checks and proofs need."""
    cas = Ca()
    intents, crl_intents, resolved = {}, {}, set()
    serials, certs, revoked, crl_numbers = set(), {}, set(), {}
    crls, artefacts, root = {}, {}, None
    for seq, line in enumerate(lines):
        try:
            e = json.loads(line)
        except ValueError as err:
            problems.add(seq, "not JSON (%s)" % err)
            continue
        if not isinstance(e, dict):
            problems.add(seq, "not a JSON object")
            continue
        kind = e.get("type")
        try:
            if kind == "root":
                if seq != 0:
                    problems.add(seq, "a second root entry")
                    continue
                der = base64.b64decode(e["cert"])
                if sha256_hex(der) != e["cert_sha256"]:
                    problems.add(seq, "root certificate does not match its recorded SHA-256")
                root = x509.load_der_x509_certificate(der)
                try:
                    root.verify_directly_issued_by(root)
                except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                    problems.add(seq, "the root certificate is not self-signed by its key")
                cas.certs.append(root)
                root = (der, e["log_vkey"])
            elif seq == 0:
                problems.add(seq, "the first entry is not the root entry")
            elif kind == "issue-intent":
                if e["serial"] in serials:
                    problems.add(seq, "serial %s is used twice" % e["serial"])
                serials.add(e["serial"])
                intents[seq] = e
            elif kind == "cert":
                i = intents.get(e["intent_seq"])
                if i is None or e["intent_seq"] in resolved:
                    problems.add(seq, "certificate for %d, which is not an open intent"
                                 % e["intent_seq"])
                    continue
                resolved.add(e["intent_seq"])
                if (i["serial"], i["csr_sha256"], i["profile"]) != (
                        e["serial"], e["csr_sha256"], e["profile"]):
                    problems.add(seq, "serial, CSR or profile differ from intent %d"
                                 % e["intent_seq"])
                der = base64.b64decode(e["cert"])
                if sha256_hex(der) != e["cert_sha256"]:
                    problems.add(seq, "certificate does not match its recorded SHA-256")
                cert = x509.load_der_x509_certificate(der)
                if sha256_hex(cert.tbs_certificate_bytes) != i["tbs_sha256"]:
                    problems.add(seq, "the TBSCertificate differs from the one intent %d "
                                 "recorded" % e["intent_seq"])
                if cert.serial_number != int(e["serial"], 16):
                    problems.add(seq, "the certificate's serial is not %s" % e["serial"])
                issuer = cas.issuer_of(cert.issuer.public_bytes())
                if issuer is None:
                    problems.add(seq, "issuer %s is neither the root nor an intermediate "
                                 "earlier in the log" % cert.issuer.rfc4514_string())
                else:
                    try:
                        cert.verify_directly_issued_by(issuer)
                    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                        problems.add(seq, "signature does not verify under its issuer %s"
                                     % issuer.subject.rfc4514_string())
                if is_ca(cert):
                    cas.certs.append(cert)
                certs[e["serial"]] = der
                artefacts[seq] = ("certs/%s.pem" % e["serial"], "CERTIFICATE", der)
            elif kind == "abandon":
                s = e["intent_seq"]
                if (s not in intents and s not in crl_intents) or s in resolved:
                    problems.add(seq, "abandons %d, which is not an open intent" % s)
                resolved.add(s)
            elif kind == "revocation":
                if e["serial"] not in certs:
                    problems.add(seq, "revokes %s, which this log never issued" % e["serial"])
                if e["serial"] in revoked:
                    problems.add(seq, "revokes %s a second time" % e["serial"])
                revoked.add(e["serial"])
            elif kind == "crl-intent":
                last = crl_numbers.get(e["issuer"], 0)
                if e["crl_number"] <= last:
                    problems.add(seq, "CRL number %d for %r does not increase (last was %d)"
                                 % (e["crl_number"], e["issuer"], last))
                crl_numbers[e["issuer"]] = max(last, e["crl_number"])
                crl_intents[seq] = e
            elif kind == "crl":
                i = crl_intents.get(e["intent_seq"])
                if i is None or e["intent_seq"] in resolved:
                    problems.add(seq, "CRL for %d, which is not an open CRL intent"
                                 % e["intent_seq"])
                    continue
                resolved.add(e["intent_seq"])
                if (i["issuer"], i["crl_number"]) != (e["issuer"], e["crl_number"]):
                    problems.add(seq, "issuer or number differ from intent %d" % e["intent_seq"])
                der = base64.b64decode(e["crl"])
                if sha256_hex(der) != e["crl_sha256"]:
                    problems.add(seq, "CRL does not match its recorded SHA-256")
                crl = x509.load_der_x509_crl(der)
                if sha256_hex(crl.tbs_certlist_bytes) != i["tbs_sha256"]:
                    problems.add(seq, "the TBSCertList differs from the one intent %d recorded"
                                 % e["intent_seq"])
                issuer = cas.issuer_of(crl.issuer.public_bytes())
                try:
                    valid = issuer is not None and crl.is_signature_valid(issuer.public_key())
                except (TypeError, UnsupportedAlgorithm):
                    valid = False
                if not valid:
                    problems.add(seq, "CRL signature does not verify under its issuer %s"
                                 % crl.issuer.rfc4514_string())
                listed = sorted("%x" % r.serial_number for r in crl)
                wanted = sorted("%x" % int(s, 16) for s in i["revoked"])
                if listed != wanted:
                    problems.add(seq, "the CRL lists other serials than its intent")
                name = "crls/%s-%d.pem" % (e["issuer"], e["crl_number"])
                crls[name] = der
                artefacts[seq] = (name, "X509 CRL", der)
        except (KeyError, TypeError, ValueError) as err:
            problems.add(seq, "malformed %s entry (%s: %s)" % (kind, type(err).__name__, err))
    return root, artefacts, len(certs), len(crls)


def check_files(d, root, artefacts, problems):
    """root.pem, certs/ and crls/ hold exactly the logged bytes."""
    if root is not None:
        try:
            if pem_der(os.path.join(d, "root.pem"), "CERTIFICATE") != root[0]:
                problems.add(None, "root.pem is not the root certificate of entry 0")
        except (OSError, ValueError) as err:
            problems.add(None, "root.pem: %s" % err)
    expected = {name: (label, der) for name, label, der in artefacts.values()}
    for sub in ("certs", "crls"):
        path = os.path.join(d, sub)
        for f in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            if "%s/%s" % (sub, f) not in expected:
                problems.add(None, "%s/%s is not in the log" % (sub, f))
    for name, (label, der) in sorted(expected.items()):
        try:
            if pem_der(os.path.join(d, name), label) != der:
                problems.add(None, "%s differs from the logged bytes" % name)
        except (OSError, ValueError) as err:
            problems.add(None, "%s: %s" % (name, err))


def check_checkpoint(name, note, vkey, roots, problems):
    """One checkpoint: signature, and the log must extend it. Returns its size or None."""
    try:
        _, size, root = open_note(note, vkey)
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        problems.add(None, "%s: %s" % (name, err))
        return None
    if size >= len(roots):
        problems.add(None, "%s covers %d entries but the log has %d: the log was truncated "
                     "or rolled back" % (name, size, len(roots) - 1))
        return None
    if roots[size] != root:
        problems.add(None, "%s (size %d) does not match the entries: history before it was "
                     "rewritten" % (name, size))
        return None
    return size


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Check an hsmca log export without hsmca.")
    p.add_argument("dir", nargs="?", default=here, help="the export (default: this script's)")
    p.add_argument("--vkey", help="verifier key to trust (from the ceremony minutes)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="a checkpoint kept outside the export; the log must extend it")
    a = p.parse_args()
    d, problems = a.dir, Problems()

    data = open(os.path.join(d, "entries.jsonl"), "rb").read()
    if data and not data.endswith(b"\n"):
        problems.add(None, "entries.jsonl ends in an incomplete line")
    lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
    roots = prefix_roots(lines)
    for seq, line in enumerate(lines):
        try:
            e = json.loads(line)
        except ValueError:
            continue  # reported by check_entries
        if not isinstance(e, dict):
            continue  # reported by check_entries
        if e.get("seq") != seq:
            problems.add(seq, "has seq %r: an entry is missing, inserted or moved here"
                         % e.get("seq"))
        elif e.get("prev") != base64.b64encode(roots[seq]).decode():
            problems.add(seq, "prev is not the root over the entries before it: an earlier "
                         "entry was altered")

    root, artefacts, n_certs, n_crls = check_entries(lines, problems)
    recorded = root[1] if root else None
    file_vkey = open(os.path.join(d, "log.vkey")).read().strip()
    if recorded is not None and file_vkey != recorded:
        problems.add(None, "log.vkey differs from the verifier key recorded in entry 0")
    vkey = a.vkey or recorded or file_vkey

    sizes = []
    cp_dir = os.path.join(d, "checkpoints")
    names = sorted(os.listdir(cp_dir)) if os.path.isdir(cp_dir) else []
    for f in names:
        size = check_checkpoint("checkpoints/" + f, open(os.path.join(cp_dir, f), "rb").read(),
                                vkey, roots, problems)
        if size is not None:
            if not f.isdigit() or int(f) != size:
                problems.add(None, "checkpoints/%s holds the checkpoint of size %d" % (f, size))
            sizes.append(size)
    latest = check_checkpoint("checkpoint", open(os.path.join(d, "checkpoint"), "rb").read(),
                              vkey, roots, problems)
    if latest is not None and sizes and latest != max(sizes):
        problems.add(None, "checkpoint (size %d) is not the newest in checkpoints/ (%d)"
                     % (latest, max(sizes)))
    for f in a.checkpoint:
        size = check_checkpoint(f, open(f, "rb").read(), vkey, roots, problems)
        if size is not None:
            print("checked %s: size %d; the log extends it" % (f, size))

    covered = latest or 0
    proved = set()
    pr_dir = os.path.join(d, "proofs")
    for f in sorted(os.listdir(pr_dir)) if os.path.isdir(pr_dir) else []:
        try:
            want = int(f.split(".")[0])
            if want >= len(lines):
                raise ValueError("entry %d is not in the log" % want)
            index, size, root_at = check_proof(open(os.path.join(pr_dir, f), "rb").read(),
                                               lines[want], vkey)
            if index != want:
                raise ValueError("proves entry %d, not %d" % (index, want))
            if roots[size] != root_at:
                raise ValueError("its checkpoint does not match the entries")
            proved.add(index)
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            problems.add(None, "proofs/%s: %s" % (f, err))
    for seq in sorted(artefacts):
        if seq < covered and seq not in proved:
            problems.add(seq, "%s has no inclusion proof in proofs/" % artefacts[seq][0])

    check_files(d, root, artefacts, problems)

    tail = len(lines) - covered
    if tail > 0:
        print("warning: %s after the last checkpoint %s covered by no signature"
              % (count(tail, "entry", "entries"), "is" if tail == 1 else "are"))
    if root is not None:
        print("root certificate SHA-256 %s (compare with the ceremony minutes)"
              % sha256_hex(root[0]))
    print("verifier key %s" % vkey)
    if problems.items:
        print("FAILED: %s" % count(len(problems.items), "problem"))
        return 1
    print("OK: %s, %s, %s, %s, %s; root %s at size %d"
          % (count(len(lines), "entry", "entries"), count(len(sizes), "checkpoint"),
             count(len(proved), "proof"), count(n_certs, "certificate"), count(n_crls, "CRL"),
             base64.b64encode(roots[covered]).decode(), covered))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as err:
        print("FAILED: %s" % err)
        sys.exit(1)
