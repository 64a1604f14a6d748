#!/usr/bin/env bash
# hsmca quickstart: from nothing to verified, logged Kubernetes certificates on a local
# SoftHSM2 token. Installs SoftHSM2/OpenSSL if missing, builds hsmca, makes an isolated token,
# creates a root CA, signs sample CSRs for etcd, kube-apiserver, kube-proxy, kubelet and
# flanneld, verifies the log and every certificate, and prints what it issued.
#   bash softhsm/quickstart.sh [WORKDIR]     (default: ./quickstart-out, must not exist)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$PWD/quickstart-out}
[ -e "$work" ] && { echo "error: $work exists; pass another directory" >&2; exit 2; }

bash "$repo/softhsm/install.sh"
echo "== building hsmca" >&2
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
hsmca="$repo/target/release/hsmca"

mkdir -p "$work"
work=$(cd "$work" && pwd)
# Demo PINs for a throwaway token, set here in the open; real ceremonies use the prompts (or
# --pin-file for hsmca).
export HSMCA_SO_PIN=87654321 HSMCA_PIN=123456
eval "$("$repo/softhsm/make-token.sh" "$work/softhsm" quickstart)"
export SOFTHSM2_CONF

echo "== root key ceremony" >&2
# Site parameters: the seed cluster's service IP, node addresses and names.
cat >"$work/site.json" <<'SITE'
{
  "cluster_domain": "cluster.local",
  "service_ip": "10.254.0.1",
  "node_ip_ranges": ["192.168.115.0/24"],
  "node_domains": ["*.cluster.internal"],
  "node_names": ["vm1", "vm2", "vm3"],
  "apiserver_names": [],
  "countries": ["CN"],
  "states": ["FuZhou"],
  "localities": ["FuZhou"],
  "org_units": ["System"]
}
SITE
"$hsmca" init --home "$work/ca" --token quickstart --key-type ecdsa-p384 \
  --subject "CN=Quickstart Kubernetes Root CA,O=hsmca quickstart" --validity 20y --site "$work/site.json"
echo "== offline intermediates, keys in the same token" >&2
for ca in kubernetes-ca etcd-ca front-proxy-ca; do
  "$hsmca" ca create "$ca" --home "$work/ca" --profile "$ca" --subject "CN=$ca"
done

echo "== CSRs from the cluster (made here with openssl req; keys stay with the CSRs)" >&2
csr=$work/csr; mkdir -p "$csr"
req() { # name subject [san] [keytype]
  local key=${4:-ec}
  local args=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
  [ "$key" = rsa ] && args=(-newkey rsa:2048)
  openssl req -new -nodes "${args[@]}" -keyout "$csr/$1-key.pem" -subj "$2" -out "$csr/$1.csr" \
    ${3:+-addext "subjectAltName=$3"} 2>/dev/null
}
seed="/C=CN/ST=FuZhou/L=FuZhou/O=k8s/OU=System"
for i in 1 2 3; do
  req "etcd-vm$i" "/CN=vm$i" "DNS:vm$i.cluster.internal,IP:127.0.0.1,IP:192.168.115.$((i + 4))"
done
req etcd-client "/CN=client" "" rsa
req kubernetes "$seed/CN=kubernetes" \
  "IP:127.0.0.1,IP:192.168.115.4,IP:192.168.115.5,IP:10.254.0.1,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster,DNS:kubernetes.default.svc.cluster.local" rsa
req kube-proxy "$seed/CN=system:kube-proxy" "" rsa
req kubelet-vm1 "/O=system:nodes/CN=system:node:vm1"
req flanneld "$seed/CN=flanneld" "" rsa
# A hostile CSR: a node asking to be cluster-admin. It must be refused.
req evil-node "/O=system:masters/CN=system:node:vm1"

echo "== what would be issued (no token needed)" >&2
"$hsmca" check --home "$work/ca" --profile kubelet-client "$csr/kubelet-vm1.csr" "$csr/evil-node.csr" || true

echo "== signing" >&2
out=$work/certs; mkdir -p "$out"
sign() { "$hsmca" sign --home "$work/ca" --profile "$1" --chain --out "$out" "${@:2}"; }
sign etcd-server "$csr"/etcd-vm*.csr
sign etcd-client "$csr/etcd-client.csr"
sign apiserver "$csr/kubernetes.csr"
sign kube-proxy "$csr/kube-proxy.csr"
sign kubelet-client "$csr/kubelet-vm1.csr" "$csr/evil-node.csr" || echo "(evil-node.csr refused, as it must be; the rest was signed)"
sign flanneld "$csr/flanneld.csr"

echo "== verifying" >&2
"$hsmca" log verify --home "$work/ca"
for c in "$out"/*.crt; do openssl verify -CAfile "$work/ca/root.pem" -untrusted "$c" "$c"; done
python3 "$repo/tests/tools/verify_log.py" "$work/ca" | sed 's/^/independent checkpoint check: /'

echo "== the ceremony's minutes, the checkpoint to keep, and an export an auditor checks alone" >&2
"$hsmca" minutes --home "$work/ca" >"$work/minutes.md"
cp "$work/ca/log/checkpoint" "$work/minutes.checkpoint"
"$hsmca" log export --home "$work/ca" --out "$work/export"
(cd "$work/export" && python3 verify.py --checkpoint "$work/minutes.checkpoint") | tail -n 2
"$hsmca" expiring --home "$work/ca" --format prometheus >"$work/hsmca.prom"

echo
printf '%-22s %-52s %s\n' CERTIFICATE SUBJECT "NOT AFTER"
for c in "$out"/*.crt; do
  printf '%-22s %-52s %s\n' "$(basename "$c")" \
    "$(openssl x509 -in "$c" -noout -subject -nameopt RFC2253 | sed "s/^subject=//")" \
    "$(openssl x509 -in "$c" -noout -enddate | sed 's/^notAfter=//')"
done
echo
echo "CA home: $work/ca   certificates: $out   log: $work/ca/log/entries.jsonl"
echo "minutes: $work/minutes.md   export: $work/export   monitoring: $work/hsmca.prom"
