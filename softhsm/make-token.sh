#!/usr/bin/env bash
# Makes an isolated SoftHSM2 token for development or tests.
#   softhsm/make-token.sh DIR LABEL [USER_PIN]
# Writes DIR/softhsm2.conf and DIR/tokens/, initialises a token LABEL, and prints the
# environment to use it. The PINs here are for throwaway dev/test tokens only.
set -euo pipefail
dir=${1:?usage: make-token.sh DIR LABEL [USER_PIN]}
label=${2:?usage: make-token.sh DIR LABEL [USER_PIN]}
pin=${3:-123456}
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
cat >"$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
  --so-pin 87654321 --pin "$pin" >/dev/null
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
