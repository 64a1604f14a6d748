#!/usr/bin/env bash
# Batch-signing benchmark on a local SoftHSM2 token; prints a table.
#   bash softhsm/bench.sh [N] [BIG]     (default N=10000 CSRs per issuer key, BIG=100000 for memory)
# For each issuer key type (RSA-2048, ECDSA P-256) it measures, on the same machine and run:
#   - the raw token rate: C_Sign of a 1 KiB message in a loop, 1 and 2 sessions
#   - hsmca sign-dir over N P-256 CSRs (2 sessions), and its peak RSS
#   - a shell loop of `openssl x509 -req` with the pkcs11 engine over 200 of the same CSRs
# then the peak RSS of sign-dir over BIG CSRs (memory must stay flat as the batch grows).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-10000}
big=${2:-100000}
bash "$repo/softhsm/install.sh"
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
dpkg -s libengine-pkcs11-openssl >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libengine-pkcs11-openssl >/dev/null
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --examples --bins
bin=$repo/target/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
module=$(for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; do [ -e "$m" ] && echo "$m" && break; done)
export HSMCA_PIN=123456
echo "making $n and $big CSRs..." >&2
"$bin/examples/make_csrs" "$n" "$work/csrs"
"$bin/examples/make_csrs" "$big" "$work/big"
mkdir -p "$work/loop"; find "$work/csrs" -name '*.csr' | sed -n '1,200p' >"$work/loop.list"

rows=()
for kt in rsa-2048 ecdsa-p256; do
  eval "$("$repo/softhsm/make-token.sh" "$work/hsm-$kt" "bench-$kt")"
  export SOFTHSM2_CONF
  init_type=$kt; [ "$kt" = rsa-2048 ] && init_type=rsa-3072
  "$bin/hsmca" init --home "$work/ca-$kt" --token "bench-$kt" --key-type "$init_type" --subject "CN=Bench Root" \
    --log-key-type ecdsa-p256 >/dev/null  # libp11 (the openssl engine) fails on tokens holding Ed25519 keys
  # The issuer under test: an intermediate with the key type being measured.
  ca_type=$kt
  "$bin/hsmca" ca create bench-ca --home "$work/ca-$kt" --profile kubernetes-ca --subject "CN=kubernetes-ca" --key-type "$ca_type" >/dev/null
  sed 's/"issuer": "root"/"issuer": "bench-ca"/; s/"name": "test-any-key"/"name": "bench"/' \
    "$work/ca-$kt/profiles/test-any-key.json" >"$work/ca-$kt/profiles/bench.json"
  label=hsmca-root-bench-ca
  raw1=$("$bin/examples/token_rate" "$module" "bench-$kt" "$label" 3 1)
  raw2=$("$bin/examples/token_rate" "$module" "bench-$kt" "$label" 3 2)
  /usr/bin/time -f '%M' -o "$work/rss-$kt" "$bin/hsmca" sign-dir --home "$work/ca-$kt" "$work/csrs" --profile bench \
    --out "$work/out-$kt" --sessions 2 --json >"$work/report-$kt.json" 2>/dev/null
  rate=$(python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print('%.0f' % (r['issued']/r['seconds']))" "$work/report-$kt.json")
  issued=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['issued'])" "$work/report-$kt.json")
  [ "$issued" = "$n" ] || { echo "error: only $issued of $n issued" >&2; exit 1; }
  # openssl + pkcs11 engine, one process per certificate, as a shell script would do it.
  cp "$work/ca-$kt/cas/bench-ca.pem" "$work/ca-$kt.pem"
  start=$(date +%s.%N); i=0
  while read -r csr; do
    PKCS11_MODULE_PATH=$module openssl x509 -req -engine pkcs11 -CAkeyform engine \
      -CAkey "pkcs11:token=bench-$kt;object=$label;type=private;pin-value=$HSMCA_PIN" \
      -CA "$work/ca-$kt.pem" -in "$csr" -days 30 -set_serial $((1000 + i)) -out "$work/loop/$kt-$i.crt" 2>/dev/null
    i=$((i + 1))
  done <"$work/loop.list"
  openssl verify -CAfile "$work/ca-$kt/root.pem" -untrusted "$work/ca-$kt.pem" "$work/loop/$kt-0.crt" >/dev/null
  end=$(date +%s.%N)
  ossl=$(python3 -c "print('%.1f' % ($i / ($end - $start)))")
  rows+=("$kt|$raw1|$raw2|$rate|$(cat "$work/rss-$kt")|$ossl")
done

# Memory as the batch grows: BIG CSRs on the P-256 issuer.
/usr/bin/time -f '%M' -o "$work/rss-big" "$bin/hsmca" sign-dir --home "$work/ca-ecdsa-p256" "$work/big" --profile bench \
  --out "$work/out-big" --sessions 2 --json >"$work/report-big.json" 2>/dev/null
bigrate=$(python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print('%d issued, %.0f/s' % (r['issued'], r['issued']/r['seconds']))" "$work/report-big.json")

printf '\n%-11s %12s %12s %14s %9s %10s %10s %9s\n' "issuer key" "raw 1 sess" "raw 2 sess" "hsmca batch" "% of raw" "peak RSS" "openssl" "x openssl"
for row in "${rows[@]}"; do
  IFS='|' read -r kt raw1 raw2 rate rss ossl <<<"$row"
  pct=$(python3 -c "print('%.0f%%' % (100.0 * $rate / $raw2))")
  times=$(python3 -c "print('%.0fx' % ($rate / $ossl))")
  printf '%-11s %10s/s %10s/s %12s/s %9s %7s MiB %8s/s %9s\n' "$kt" "$raw1" "$raw2" "$rate" "$pct" "$((rss / 1024))" "$ossl" "$times"
done
printf '\n%s CSRs (ecdsa-p256 issuer): %s, peak RSS %s MiB (batch of %s: see above)\n' "$big" "$bigrate" "$(( $(cat "$work/rss-big") / 1024 ))" "$n"
