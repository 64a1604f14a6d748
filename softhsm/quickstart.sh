#!/usr/bin/env bash
# hsmca quickstart: from nothing to verified, logged Kubernetes certificates on a local
# SoftHSM2 token. Installs SoftHSM2/OpenSSL if missing, builds hsmca, makes an isolated token,
# creates a root CA, signs sample CSRs for etcd, kube-apiserver (the seed's own k8s-csr.json,
# through cfssl), kube-proxy, kubelet and flanneld, verifies the log and every certificate, and
# prints what it issued.
#   bash softhsm/quickstart.sh [WORKDIR]     (default: ./quickstart-out, must not exist)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$PWD/quickstart-out}
[ -e "$work" ] && { echo "error: $work exists; pass another directory" >&2; exit 2; }

bash "$repo/softhsm/install.sh"
# cfssl makes the seed's own CSR below from its cfssl JSON (Debian's golang-cfssl).
if ! command -v cfssl >/dev/null || ! command -v cfssljson >/dev/null; then
  echo "installing: golang-cfssl" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-cfssl >/dev/null
fi
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
# Site parameters: the seed cluster's service IP, node addresses and names. The seed's
# apiserver request lists the single-label name `kubernetes` (pods reach the API by it), which
# RFC 5280 name checkers reject: kubeadm_single_label_names lets the apiserver profile take it.
# cluster_name "seed" names this cluster's intermediates (seed-kubernetes-ca, CN "seed
# kubernetes-ca"), so another cluster can later get its own under the same root.
cluster=seed
cat >"$work/site.json" <<SITE
{
  "cluster_name": "$cluster",
  "cluster_domain": "cluster.local",
  "service_ip": "10.254.0.1",
  "node_ip_ranges": ["192.168.115.0/24"],
  "node_domains": ["*.cluster.internal"],
  "node_names": ["vm1", "vm2", "vm3"],
  "apiserver_names": [],
  "countries": ["CN"],
  "states": ["FuZhou"],
  "localities": ["FuZhou"],
  "org_units": ["System"],
  "kubeadm_single_label_names": true
}
SITE
"$hsmca" init --home "$work/ca" --token quickstart --key-type ecdsa-p384 \
  --subject "CN=Quickstart Kubernetes Root CA,O=hsmca quickstart" --validity 20y --site "$work/site.json"
echo "== the site settings in force" >&2
"$hsmca" site show --home "$work/ca"
echo "== offline intermediates of cluster \"$cluster\", keys in the same token" >&2
for ca in kubernetes-ca etcd-ca front-proxy-ca; do
  "$hsmca" ca create "$cluster-$ca" --home "$work/ca" --profile "$ca" --subject "CN=$cluster $ca"
done

echo "== CSRs from the cluster (openssl req, and cfssl for the seed's own k8s-csr.json; keys stay with the CSRs)" >&2
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
# The seed's kube-apiserver request exactly as the seed tutorial wrote it (k8s-csr.json), made
# by cfssl as the seed made it (`cfssl genkey`: the key and the CSR, without signing).
cat >"$csr/k8s-csr.json" <<'SEED'
{
  "CN": "kubernetes",
  "hosts": [
    "127.0.0.1",
    "192.168.115.4",
    "192.168.115.5",
    "192.168.115.6",
    "192.168.115.7",
    "10.254.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster",
    "kubernetes.default.svc.cluster.local"
  ],
  "key": {
    "algo": "rsa",
    "size": 2048
  },
  "names": [
    {
      "C": "CN",
      "ST": "FuZhou",
      "L": "FuZhou",
      "O": "k8s",
      "OU": "System"
    }
  ]
}
SEED
(cd "$csr" && cfssl genkey k8s-csr.json 2>cfssl.log | cfssljson -bare kubernetes) ||
  { cat "$csr/cfssl.log" >&2; exit 1; }
req kube-proxy "$seed/CN=system:kube-proxy" "" rsa
req kubelet-vm1 "/O=system:nodes/CN=system:node:vm1"
req flanneld "$seed/CN=flanneld" "" rsa
# A hostile CSR: a node asking to be cluster-admin. It must be refused.
req evil-node "/O=system:masters/CN=system:node:vm1"

echo "== which profile fits each CSR, and what would be issued (no token needed)" >&2
"$hsmca" check --home "$work/ca" --profile auto "$csr/kubelet-vm1.csr" "$csr/evil-node.csr" || true
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

echo "== the seed's apiserver certificate, with its host list as the seed asked for it" >&2
openssl x509 -in "$out/kubernetes.crt" -noout -ext subjectAltName

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
echo "cluster: $cluster (intermediates $cluster-kubernetes-ca, $cluster-etcd-ca, $cluster-front-proxy-ca)."
echo "Another cluster under the same root: set cluster_name in $work/ca/site.json, run"
echo "hsmca profiles apply, then hsmca ca create NAME-kubernetes-ca ... --subject 'CN=NAME kubernetes-ca'."
echo "minutes: $work/minutes.md   export: $work/export   monitoring: $work/hsmca.prom"
