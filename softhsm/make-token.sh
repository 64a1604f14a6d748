#!/usr/bin/env bash
# Makes an isolated SoftHSM2 token for development, demos or tests.
#   softhsm/make-token.sh DIR LABEL
# Writes DIR/softhsm2.conf and DIR/tokens/, initialises a token LABEL, and prints the
# environment to use it (eval "$(softhsm/make-token.sh DIR LABEL)").
#
# PINs never come from this script's command line:
#   HSMCA_SO_PIN  the token's security-officer PIN; if unset, softhsm2-util asks for it on the
#                 terminal (and without a terminal the script stops: it never picks one itself)
#   HSMCA_PIN     the user PIN hsmca logs in with (the same variable hsmca reads); if unset,
#                 softhsm2-util asks for it on the terminal
# A PIN given through the environment is passed to softhsm2-util as an argument, which other
# users of this machine can see while it runs: use that only for throwaway tokens.
set -euo pipefail
dir=${1:?usage: make-token.sh DIR LABEL (PINs from HSMCA_SO_PIN and HSMCA_PIN, or prompts)}
label=${2:?usage: make-token.sh DIR LABEL (PINs from HSMCA_SO_PIN and HSMCA_PIN, or prompts)}
if [ $# -gt 2 ]; then
  echo "make-token.sh: a PIN is never taken from the command line; set HSMCA_PIN or answer the prompt" >&2
  exit 2
fi
pins=()
if [ -n "${HSMCA_SO_PIN:-}" ]; then
  pins+=(--so-pin "$HSMCA_SO_PIN")
fi
if [ -n "${HSMCA_PIN:-}" ]; then
  pins+=(--pin "$HSMCA_PIN")
fi
if [ ${#pins[@]} -lt 4 ] && ! [ -t 0 ]; then
  echo "make-token.sh: set HSMCA_SO_PIN and HSMCA_PIN, or run on a terminal to be asked for them" >&2
  exit 2
fi
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
cat >"$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
# Prompts (if any) go to the terminal; only the environment line goes to stdout.
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
  "${pins[@]}" >&2
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
