#!/usr/bin/env bash
# Batch-signing benchmark on a local SoftHSM2 token; prints a table.
#   bash softhsm/bench.sh [N] [BIG] [ROUNDS]   (defaults: N=10000 CSRs per issuer key, BIG=100000
#                                               for memory, ROUNDS=3)
# For each issuer key type (RSA-2048, ECDSA P-256) it measures, on the same machine and run:
#   - the raw token rate: C_Sign of a 1 KiB message in a loop, on 1 and on 2 sessions
#   - `hsmca sign-dir INPUT` over N P-256 CSRs on 1 and on 2 sessions: whole-process wall time
#     (login, reading, verifying, deciding, logging, signing, writing), and its peak RSS
#   - `hsmca plan` then `hsmca sign-dir --plan` (the reviewed ceremony): wall time of the signing
#   - a shell loop of `openssl x509 -req` with the pkcs11 engine over 200 of the same CSRs
# then the peak RSS of `sign-dir INPUT` over BIG CSRs (memory must stay flat as the batch grows).
# Every hsmca run signs into a fresh copy of the CA home, so nothing is "already issued".
# The machine is shared and its speed drifts by 10-20 % from minute to minute, so the raw and
# hsmca runs are interleaved, ROUNDS times, and the table shows medians (ranges below it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-10000}
big=${2:-100000}
rounds=${3:-3}
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

py() { python3 -c "$1"; }
run_no=0
# timed LABEL CMD...: runs CMD under /usr/bin/time; sets $wall (s) and $rss (KiB).
timed() {
  local label=$1; shift
  /usr/bin/time -f '%e %M' -o "$work/time-$label" "$@" >"$work/out-$label.json" 2>"$work/err-$label" \
    || { cat "$work/err-$label" >&2; exit 1; }
  read -r wall rss <"$work/time-$label"
}
# sign_input KT SESSIONS SRC: `sign-dir INPUT` on a fresh copy of the CA home; sets $rate, $rss.
sign_input() {
  local kt=$1 sessions=$2 src=$3 count
  run_no=$((run_no + 1))
  cp -a "$work/ca-$kt" "$work/run-$run_no"
  timed "run-$run_no" "$bin/hsmca" sign-dir --home "$work/run-$run_no" "$src" --profile bench \
    --out "$work/signed-$run_no" --sessions "$sessions" --json
  count=$(py "import json; print(json.loads(open('$work/out-run-$run_no.json').read().splitlines()[-1])['issued'])")
  [ "$count" = "$(find "$src" -name '*.csr' | wc -l)" ] || { echo "error: only $count issued" >&2; exit 1; }
  rate=$(py "print('%.0f' % ($count / $wall))")
}

rows=(); ranges=()
for kt in rsa-2048 ecdsa-p256; do
  eval "$("$repo/softhsm/make-token.sh" "$work/hsm-$kt" "bench-$kt")"
  export SOFTHSM2_CONF
  init_type=$kt; [ "$kt" = rsa-2048 ] && init_type=rsa-3072
  "$bin/hsmca" init --home "$work/ca-$kt" --token "bench-$kt" --key-type "$init_type" --subject "CN=Bench Root" \
    --log-key-type ecdsa-p256 >/dev/null  # libp11 (the openssl engine) fails on tokens holding Ed25519 keys
  # The issuer under test: an intermediate with the key type being measured.
  "$bin/hsmca" ca create bench-ca --home "$work/ca-$kt" --profile kubernetes-ca --subject "CN=kubernetes-ca" --key-type "$kt" >/dev/null
  sed 's/"issuer": "root"/"issuer": "bench-ca"/; s/"name": "test-any-key"/"name": "bench"/' \
    "$work/ca-$kt/profiles/test-any-key.json" >"$work/ca-$kt/profiles/bench.json"
  label=hsmca-root-bench-ca
  r1=(); r2=(); h1=(); h2=(); hp=(); rsss=()
  for _ in $(seq "$rounds"); do
    r1+=("$("$bin/examples/token_rate" "$module" "bench-$kt" "$label" 3 1)")
    r2+=("$("$bin/examples/token_rate" "$module" "bench-$kt" "$label" 3 2)")
    sign_input "$kt" 1 "$work/csrs"; h1+=("$rate")
    sign_input "$kt" 2 "$work/csrs"; h2+=("$rate"); rsss+=("$rss")
    # The reviewed ceremony: plan (no token), then sign exactly that plan.
    run_no=$((run_no + 1))
    cp -a "$work/ca-$kt" "$work/run-$run_no"
    "$bin/hsmca" plan --home "$work/run-$run_no" "$work/csrs" --profile bench --out "$work/plan-$run_no.json" >/dev/null
    timed "run-$run_no" "$bin/hsmca" sign-dir --home "$work/run-$run_no" --plan "$work/plan-$run_no.json" \
      --out "$work/signed-$run_no" --sessions 2 --json
    hp+=("$(py "print('%.0f' % ($n / $wall))")")
  done
  med() { py "import statistics; print('%.0f' % statistics.median([$(IFS=,; echo "$*")]))"; }
  span() { py "v=[$(IFS=,; echo "$*")]; print('%.0f-%.0f' % (min(v), max(v)))"; }
  raw1=$(med "${r1[@]}"); raw2=$(med "${r2[@]}"); rate1=$(med "${h1[@]}"); rate2=$(med "${h2[@]}")
  planned=$(med "${hp[@]}"); rss2=$(med "${rsss[@]}")
  ranges+=("$kt: raw 1 sess $(span "${r1[@]}"), raw 2 sess $(span "${r2[@]}"), hsmca 1 sess $(span "${h1[@]}"), hsmca 2 sess $(span "${h2[@]}"), --plan $(span "${hp[@]}") /s")
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
  ossl=$(py "print('%.1f' % ($i / ($end - $start)))")
  rows+=("$kt|$raw1|$raw2|$rate1|$rate2|$planned|$rss2|$ossl")
done

# Memory as the batch grows: BIG CSRs on the P-256 issuer.
sign_input ecdsa-p256 2 "$work/big"
bigrate=$rate; bigrss=$rss

printf '\nwhole-process rates, %s P-256 CSRs per issuer key, median of %s rounds; %% of the better raw rate\n' "$n" "$rounds"
printf '%-11s %10s %10s %12s %12s %8s %14s %9s %9s %9s\n' "issuer key" "raw 1 sess" "raw 2 sess" \
  "hsmca 1 sess" "hsmca 2 sess" "% of raw" "--plan 2 sess" "peak RSS" "openssl" "x openssl"
for row in "${rows[@]}"; do
  IFS='|' read -r kt raw1 raw2 rate1 rate2 planned rss ossl <<<"$row"
  best=$(py "print(max($rate1, $rate2))")
  pct=$(py "print('%.0f%%' % (100.0 * $best / max($raw1, $raw2)))")
  times=$(py "print('%.0fx' % ($best / $ossl))")
  printf '%-11s %8s/s %8s/s %10s/s %10s/s %8s %12s/s %5s MiB %7s/s %9s\n' "$kt" "$raw1" "$raw2" "$rate1" \
    "$rate2" "$pct" "$planned" "$((rss / 1024))" "$ossl" "$times"
done
printf 'ranges: %s\n' "${ranges[@]}"
printf '\n%s CSRs (ecdsa-p256 issuer, 2 sessions): %s/s, peak RSS %s MiB\n' "$big" "$bigrate" "$((bigrss / 1024))"
