#!/usr/bin/env bash
# Batch-signing benchmark on a local SoftHSM2 token; prints a table.
#   bash softhsm/bench.sh [N] [BIG] [ROUNDS]   (defaults: N=10000 CSRs per run, BIG=100000 for
#                                               memory, ROUNDS=3)
# For each issuer key type (RSA-2048, ECDSA P-256) it measures, on the same machine and run:
#   - the raw token rate: C_Sign of a 1 KiB message in a loop, on 1 and on 2 sessions
#   - `hsmca sign-dir INPUT` over N CSRs on 1 and on 2 sessions: whole-process wall time (login,
#     reading, verifying, deciding, logging, signing, writing), and its peak RSS. Twice: with
#     ECDSA P-256 CSRs (what kubelets send) and with RSA-2048 CSRs (kubeadm's default); checking
#     each CSR's signature is a large part of the host's work, and P-256 costs ~3x RSA here.
#   - `hsmca plan` then `hsmca sign-dir --plan` (the reviewed ceremony): wall time of the signing
#   - a shell loop of `openssl x509 -req` with the pkcs11 engine over 200 of the P-256 CSRs
# then the peak RSS of `sign-dir INPUT` over BIG CSRs (memory must stay flat as the batch grows).
# Every hsmca run signs into a fresh copy of the CA home and of its token (the token keeps the
# log head, so a copied home alone would be refused as rolled back), so nothing is "already
# issued".
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
# Throwaway benchmark tokens: their PINs are set here, in the open.
export HSMCA_PIN=123456 HSMCA_SO_PIN=87654321
echo "making $n P-256, $n RSA-2048 and $big P-256 CSRs..." >&2
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/csr-key.pem" 2>/dev/null
"$bin/examples/make_csrs" "$n" "$work/csrs-p256"
"$bin/examples/make_csrs" "$n" "$work/csrs-rsa" "$work/csr-key.pem"
"$bin/examples/make_csrs" "$big" "$work/big"
mkdir -p "$work/loop"; find "$work/csrs-p256" -name '*.csr' | sed -n '1,200p' >"$work/loop.list"

py() { python3 -c "$1"; }
med() { py "import statistics; print('%.0f' % statistics.median([$(IFS=,; echo "$*")]))"; }
span() { py "v=[$(IFS=,; echo "$*")]; print('%.0f-%.0f' % (min(v), max(v)))"; }
run_no=0
# timed LABEL CMD...: runs CMD under /usr/bin/time; sets $wall (s) and $rss (KiB).
timed() {
  local label=$1; shift
  /usr/bin/time -f '%e %M' -o "$work/time-$label" "$@" >"$work/out-$label.json" 2>"$work/err-$label" \
    || { cat "$work/err-$label" >&2; exit 1; }
  read -r wall rss <"$work/time-$label"
}
# fresh KT: a copy of the CA home and its token for one run; sets $home and $conf.
fresh() {
  run_no=$((run_no + 1))
  home=$work/run-$run_no
  cp -a "$work/ca-$1" "$home"
  cp -a "$work/hsm-$1" "$work/hsm-run-$run_no"
  conf=$work/hsm-run-$run_no/softhsm2.conf
  sed "s|$work/hsm-$1/|$work/hsm-run-$run_no/|" "$work/hsm-$1/softhsm2.conf" >"$conf"
}
# sign_input KT SESSIONS SRC: `sign-dir INPUT` on a fresh CA home; sets $rate, $rss.
sign_input() {
  local count
  fresh "$1"
  SOFTHSM2_CONF=$conf timed "run-$run_no" "$bin/hsmca" sign-dir --home "$home" "$3" --profile bench \
    --out "$work/signed-$run_no" --sessions "$2" --json
  count=$(py "import json; print(json.loads(open('$work/out-run-$run_no.json').read().splitlines()[-1])['issued'])")
  [ "$count" = "$(find "$3" -name '*.csr' | wc -l)" ] || { echo "error: only $count issued" >&2; exit 1; }
  rate=$(py "print('%.0f' % ($count / $wall))")
  rm -rf "$home" "$work/hsm-run-$run_no"
}
# sign_plan KT SRC: `plan`, then `sign-dir --plan` on 2 sessions (timed); sets $rate.
sign_plan() {
  fresh "$1"
  "$bin/hsmca" plan --home "$home" "$2" --profile bench --out "$work/plan-$run_no.json" >/dev/null
  approve=$(py "import json; print(json.load(open('$work/plan-$run_no.json'))['hash'])")
  SOFTHSM2_CONF=$conf timed "run-$run_no" "$bin/hsmca" sign-dir --home "$home" --plan "$work/plan-$run_no.json" \
    --approve "$approve" --out "$work/signed-$run_no" --sessions 2 --json
  rate=$(py "print('%.0f' % ($n / $wall))")
  rm -rf "$home" "$work/hsm-run-$run_no"
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
    "$repo/tests/data/profiles/test-any-key.json" >"$work/ca-$kt/profiles/bench.json"
  "$bin/hsmca" profiles apply --home "$work/ca-$kt" >/dev/null  # a new profile is signed once logged
  label=hsmca-root-bench-ca
  r1=(); r2=()
  declare -A h1=() h2=() hp=() rs=()
  for _ in $(seq "$rounds"); do
    r1+=("$("$bin/examples/token_rate" "$module" "bench-$kt" "$label" 3 1)")
    r2+=("$("$bin/examples/token_rate" "$module" "bench-$kt" "$label" 3 2)")
    for csrs in p256 rsa; do
      sign_input "$kt" 1 "$work/csrs-$csrs"; h1[$csrs]+="$rate "
      sign_input "$kt" 2 "$work/csrs-$csrs"; h2[$csrs]+="$rate "; rs[$csrs]+="$rss "
      sign_plan "$kt" "$work/csrs-$csrs"; hp[$csrs]+="$rate "
    done
  done
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
  raw1=$(med "${r1[@]}"); raw2=$(med "${r2[@]}")
  ranges+=("$kt: raw 1 session $(span "${r1[@]}")/s, raw 2 sessions $(span "${r2[@]}")/s")
  for csrs in p256 rsa; do
    # shellcheck disable=SC2086 # word splitting of the collected figures is intended
    rows+=("$kt|$csrs|$raw1|$raw2|$(med ${h1[$csrs]})|$(med ${h2[$csrs]})|$(med ${hp[$csrs]})|$(med ${rs[$csrs]})|$ossl")
    # shellcheck disable=SC2086
    ranges+=("$kt, $csrs CSRs: hsmca 1 session $(span ${h1[$csrs]})/s, 2 sessions $(span ${h2[$csrs]})/s, --plan $(span ${hp[$csrs]})/s")
  done
  unset h1 h2 hp rs
done

# Memory as the batch grows: BIG CSRs on the P-256 issuer.
sign_input ecdsa-p256 2 "$work/big"
bigrate=$rate; bigrss=$rss

printf '\nwhole-process rates, %s CSRs per run, median of %s rounds; %% = better hsmca / better raw rate;\n' "$n" "$rounds"
printf '1:1 = hsmca on 1 session / raw 1 session (the token busy on one core, the host on the other)\n'
printf '%-11s %-5s %10s %10s %12s %12s %6s %5s %14s %9s %9s %9s\n' "issuer key" "CSRs" "raw 1 sess" "raw 2 sess" \
  "hsmca 1 sess" "hsmca 2 sess" "%" "1:1" "--plan 2 sess" "peak RSS" "openssl" "x openssl"
for row in "${rows[@]}"; do
  IFS='|' read -r kt csrs raw1 raw2 rate1 rate2 planned rss ossl <<<"$row"
  best=$(py "print(max($rate1, $rate2))")
  pct=$(py "print('%.0f%%' % (100.0 * $best / max($raw1, $raw2)))")
  one=$(py "print('%.0f%%' % (100.0 * $rate1 / $raw1))")
  times=$(py "print('%.0fx' % ($best / $ossl))")
  printf '%-11s %-5s %8s/s %8s/s %10s/s %10s/s %6s %5s %12s/s %5s MiB %7s/s %9s\n' "$kt" "$csrs" "$raw1" "$raw2" \
    "$rate1" "$rate2" "$pct" "$one" "$planned" "$((rss / 1024))" "$ossl" "$times"
done
printf 'ranges: %s\n' "${ranges[@]}"
printf '\n%s P-256 CSRs (ecdsa-p256 issuer, 2 sessions): %s/s, peak RSS %s MiB\n' "$big" "$bigrate" "$((bigrss / 1024))"
