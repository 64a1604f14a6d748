#!/usr/bin/env bash
# Installs what hsmca's quickstart and tests need on Debian/Ubuntu: SoftHSM2 (the token),
# OpenSC (pkcs11-tool), OpenSSL (CSRs and independent verification), etcd and etcdctl and
# GnuTLS certtool (interop tests), kubectl (Debian's kubernetes-client; the kubeadm round trip
# test; a kubectl already on PATH is used as it is), and from PyPI `cryptography` and
# `jsonschema` (independent checkpoint/proof and schema checks) and pkilint. Idempotent; needs
# root for apt-get.
set -euo pipefail

need=()
command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3 python3-pip)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v certtool >/dev/null || need+=(gnutls-bin)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v sqlite3 >/dev/null || need+=(sqlite3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c "import cryptography, jsonschema" 2>/dev/null; then
  echo "installing Python cryptography and jsonschema" >&2
  python3 -m pip install -q cryptography jsonschema || python3 -m pip install -q --break-system-packages cryptography jsonschema
fi
if ! command -v lint_pkix_cert >/dev/null; then
  echo "installing pkilint" >&2
  python3 -m pip install -q pkilint || python3 -m pip install -q --break-system-packages pkilint
fi
softhsm2-util --version >/dev/null
