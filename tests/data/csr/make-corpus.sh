#!/usr/bin/env bash
# Regenerates the hostile-CSR corpus: bad/*.csr plus corpus.json (file -> profile -> the rule
# that must refuse it). Every CSR is made by real OpenSSL (or is deliberately not a CSR).
# Keys are thrown away. Run from anywhere; rewrites bad/ and corpus.json.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf bad && mkdir bad
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
manifest=()
add() { manifest+=("{\"file\": \"bad/$1.csr\", \"profile\": \"$2\", \"rule\": \"$3\"}"); }
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
# req NAME PROFILE RULE SUBJECT [openssl args...]
req() {
  local name=$1 profile=$2 rule=$3 subj=$4; shift 4
  openssl req -new -nodes -keyout "$tmp/$name.key" -subj "$subj" -out "bad/$name.csr" "$@" 2>/dev/null
  add "$name" "$profile" "$rule"
}
node="/O=system:nodes/CN=system:node:node1"

# --- privilege escalation and subject shape (kubelet-client, kubeadm profiles) ---
req o-system-masters kubelet-client subject.O.forbidden "/O=system:masters/CN=system:node:node1" "${ec[@]}"
req o-repeated-masters kubelet-client subject.O.repeated "/O=system:nodes/O=system:masters/CN=system:node:node1" "${ec[@]}"
req cn-empty-node kubelet-client subject.CN "/O=system:nodes/CN=system:node:" "${ec[@]}"
req cn-upper-node kubelet-client subject.CN "/O=system:nodes/CN=system:node:Node1" "${ec[@]}"
req cn-dotted-node kubelet-client subject.CN "/O=system:nodes/CN=system:node:a.b" "${ec[@]}"
req cn-wrong-prefix kubelet-client subject.CN "/O=system:nodes/CN=system:nodes:node1" "${ec[@]}"
req cn-admin kubelet-client subject.CN "/O=system:nodes/CN=admin" "${ec[@]}"
req o-missing kubelet-client subject.O.required "/CN=system:node:node1" "${ec[@]}"
req cn-missing kubelet-client subject.CN.required "/O=system:nodes" "${ec[@]}"
req ou-extra kubelet-client subject.attribute "$node/OU=ops" "${ec[@]}"
req email-attr kubelet-client subject.attribute "$node/emailAddress=root@example.com" "${ec[@]}"
req cn-control-char kubelet-client subject.CN.value $'/O=system:nodes/CN=system:node:n\x07' "${ec[@]}"
req admin-masters admin subject.O.forbidden "/O=system:masters/CN=kubernetes-admin" "${ec[@]}"
req kubelet-client-api-masters apiserver-kubelet-client subject.O.forbidden "/O=system:masters/CN=kube-apiserver-kubelet-client" "${ec[@]}"
req super-admin-wrong-group super-admin subject.O "/O=kubeadm:cluster-admins/CN=kubernetes-super-admin" "${ec[@]}"
req front-proxy-wrong-cn front-proxy-client subject.CN "/CN=front-proxy" "${ec[@]}"
req controller-manager-as-scheduler controller-manager subject.CN "/CN=system:kube-scheduler" "${ec[@]}"
req etcd-client-as-apiserver apiserver-etcd-client subject.CN "/CN=kube-apiserver" "${ec[@]}"

# --- subjectAltNames ---
req kc-dns kubelet-client san.dns "$node" "${ec[@]}" -addext "subjectAltName=DNS:node1.internal"
req kc-email kubelet-client san.email "$node" "${ec[@]}" -addext "subjectAltName=email:root@example.com"
req kc-uri kubelet-client san.uri "$node" "${ec[@]}" -addext "subjectAltName=URI:spiffe://cluster/ns/x"
req kc-ip kubelet-client san.ip "$node" "${ec[@]}" -addext "subjectAltName=IP:10.0.0.5"
req ks-no-san kubelet-serving san.min "$node" "${ec[@]}"
req ks-single-label kubelet-serving san.dns.single_label "$node" "${ec[@]}" -addext "subjectAltName=DNS:node1"
req ks-foreign-dns kubelet-serving san.dns "$node" "${ec[@]}" -addext "subjectAltName=DNS:evil.example.com"
req ks-wildcard kubelet-serving san.dns.wildcard "$node" "${ec[@]}" -addext "subjectAltName=DNS:*.node1.internal"
req ks-empty-label kubelet-serving san.dns.syntax "$node" "${ec[@]}" -addext "subjectAltName=DNS:node1..internal"
req ks-upper-dns kubelet-serving san.dns.syntax "$node" "${ec[@]}" -addext "subjectAltName=DNS:Node1.internal"
req ks-underscore-dns kubelet-serving san.dns.syntax "$node" "${ec[@]}" -addext "subjectAltName=DNS:node_1.internal"
req ks-trailing-dot kubelet-serving san.dns.syntax "$node" "${ec[@]}" -addext "subjectAltName=DNS:node1.internal."
req ks-ip-public kubelet-serving san.ip "$node" "${ec[@]}" -addext "subjectAltName=IP:8.8.8.8"
req ks-ipv6-outside kubelet-serving san.ip "$node" "${ec[@]}" -addext "subjectAltName=IP:2001:db8::1"
req ks-duplicate kubelet-serving san.duplicate "$node" "${ec[@]}" -addext "subjectAltName=DNS:node1,DNS:node1"
req api-missing-required apiserver san.required_dns "/CN=kube-apiserver" "${ec[@]}" -addext "subjectAltName=DNS:kubernetes,IP:127.0.0.1"
req api-foreign-dns apiserver san.dns "/CN=kube-apiserver" "${ec[@]}" -addext "subjectAltName=DNS:kubernetes.default.svc,DNS:google.com"
many=$(for i in $(seq 1 70); do printf 'IP:10.1.0.%d,' "$i"; done)
req api-too-many apiserver san.max "/CN=kube-apiserver" "${ec[@]}" -addext "subjectAltName=${many}DNS:kubernetes.default.svc"
req etcd-no-loopback etcd-server san.required_ip "/CN=node1" "${ec[@]}" -addext "subjectAltName=DNS:node1,IP:10.0.0.11"

# --- keys and signatures ---
req rsa-1024 kubelet-client key.rsa_size "$node" -newkey rsa:1024
req rsa-1536 kubelet-client key.rsa_size "$node" -newkey rsa:1536
req sha1-signature kubelet-client csr.signature.hash "$node" -newkey rsa:2048 -sha1
req pss-max-salt kubelet-client csr.signature.algorithm "$node" -newkey rsa:2048 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:max
req p256-sha512 kubelet-client csr.signature.algorithm "$node" "${ec[@]}" -sha512
req secp256k1 kubelet-client key.curve "$node" -newkey ec -pkeyopt ec_paramgen_curve:secp256k1
req p521 kubelet-client key.curve "$node" -newkey ec -pkeyopt ec_paramgen_curve:P-521
req brainpool kubelet-client key.curve "$node" -newkey ec -pkeyopt ec_paramgen_curve:brainpoolP256r1
req ed25519-not-allowed kubelet-client key_types "$node" -newkey ed25519
openssl dsaparam -out "$tmp/dsa.pem" 2048 2>/dev/null
req dsa-key kubelet-client key.algorithm "$node" -newkey "dsa:$tmp/dsa.pem"

# Signature made by another key: the CRI of one RSA CSR with the signature of another.
openssl req -new -nodes -newkey rsa:2048 -keyout "$tmp/a.key" -subj "$node" -outform DER -out "$tmp/a.der" 2>/dev/null
openssl req -new -nodes -newkey rsa:2048 -keyout "$tmp/b.key" -subj "$node" -outform DER -out "$tmp/b.der" 2>/dev/null
python3 - "$tmp/a.der" "$tmp/b.der" bad/other-signer.csr <<'PY'
import sys
a, b = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
open(sys.argv[3], "wb").write(a[:-256] + b[-256:])
PY
add other-signer kubelet-client csr.signature
# A subject changed after signing.
python3 - "$tmp/a.der" bad/tampered-subject.csr <<'PY'
import sys
d = open(sys.argv[1], "rb").read()
open(sys.argv[2], "wb").write(d.replace(b"node1", b"node2", 1))
PY
add tampered-subject kubelet-client csr.signature

# --- requested extensions and attributes ---
req ca-true kubelet-client extensions.basic_constraints "$node" "${ec[@]}" -addext "basicConstraints=critical,CA:TRUE"
req unknown-critical kubelet-client extensions.unknown "$node" "${ec[@]}" -addext "1.2.3.4=critical,ASN1:NULL"
req unknown-extension kubelet-client extensions.unknown "$node" "${ec[@]}" -addext "1.3.6.1.4.1.99999.1=ASN1:UTF8String:hello"
req ku-cert-sign kubelet-client extensions.key_usage "$node" "${ec[@]}" -addext "keyUsage=critical,keyCertSign"
req eku-code-signing kubelet-client extensions.extended_key_usage "$node" "${ec[@]}" -addext "extendedKeyUsage=codeSigning"
req eku-server-on-client kubelet-client extensions.extended_key_usage "$node" "${ec[@]}" -addext "extendedKeyUsage=serverAuth"
req critical-san kubelet-serving extensions.critical "$node" "${ec[@]}" -addext "subjectAltName=critical,DNS:node1"
cat >"$tmp/attr.cnf" <<'CNF'
[req]
prompt = no
distinguished_name = dn
attributes = attrs
[dn]
O = system:nodes
CN = system:node:node1
[attrs]
challengePassword = hunter22
CNF
openssl req -new -nodes "${ec[@]}" -keyout "$tmp/c.key" -config "$tmp/attr.cnf" -out bad/challenge-password.csr 2>/dev/null
add challenge-password kubelet-client csr.attributes

# --- not CSRs at all ---
openssl req -new -nodes "${ec[@]}" -keyout "$tmp/d.key" -subj "$node" -outform DER -out "$tmp/d.der" 2>/dev/null
head -c 100 "$tmp/d.der" >bad/truncated.csr; add truncated kubelet-client csr.malformed
head -c 4000 /dev/urandom >bad/garbage.csr; add garbage kubelet-client csr.malformed
: >bad/empty.csr; add empty kubelet-client csr.malformed
openssl req -x509 -new -nodes "${ec[@]}" -keyout "$tmp/e.key" -subj "$node" -days 1 -out bad/certificate-pem.csr 2>/dev/null
add certificate-pem kubelet-client csr.pem_label
openssl x509 -in bad/certificate-pem.csr -outform DER -out bad/certificate-der.csr
add certificate-der kubelet-client csr.malformed
head -c 100000 /dev/zero | tr '\0' 'A' >bad/huge.csr; add huge kubelet-client csr.size
printf -- '-----BEGIN CERTIFICATE REQUEST-----\n!!!not base64!!!\n-----END CERTIFICATE REQUEST-----\n' >bad/bad-base64.csr
add bad-base64 kubelet-client csr.malformed

{ echo "["; ( IFS=$'\n'; echo "${manifest[*]}" ) | sed '$!s/$/,/' | sed 's/^/  /'; echo "]"; } >corpus.json
echo "$(ls bad | wc -l) CSRs written" >&2
