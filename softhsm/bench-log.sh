#!/usr/bin/env bash
# Lifetime-scale log benchmark (issue 15) on a local SoftHSM2 token; prints a table.
#   bash softhsm/bench-log.sh [CERTS]   (default CERTS=500000: 10^6 log entries, as every
#                                        certificate is an issue-intent and a cert entry)
#   BENCH_OUT=FILE bash softhsm/bench-log.sh ...   also writes the table to FILE
# A 20-year root signs for whole fleets (10,000 nodes x 2 certificates x yearly renewal is
# 400,000 certificates); the question is whether the everyday commands stay fast and small
# when the log is that long. The script:
#   1. makes a CA home on a fresh token (ECDSA P-256 root and log key, a P-256 intermediate
#      `bench-ca`, the profile `bench` under it, 90 days), CERTS distinct P-256 CSRs, and signs
#      them with ONE `hsmca sign-dir --sessions 2` (wall time, certs/s, peak RSS). A second fresh
#      home and token signs CERTS/5 CSRs the same way: its peak RSS beside the big one shows
#      whether memory stays flat as the batch grows.
#   2. on the big home, keeps HOME/log/checkpoint as before.checkpoint, then times each command
#      as its own process (/usr/bin/time: wall seconds, peak RSS): `sign` of one more CSR (7 days,
#      so `expiring --within 30d` has exactly one certificate to find among all the others),
#      `expiring`, `log list` filtered by profile and subject, `log show` of a certificate from
#      the middle of the log, `revoke` of another one, `crl` of its issuer, `log verify` (also
#      CPU %), `log verify --from-checkpoint before.checkpoint` and `log reindex` (both print
#      n/a while this hsmca has no such flag or subcommand), and the log's size on disk.
#   3. prints: operation | wall s | peak RSS MiB | target | met?  (targets from issue 15)
# Everything runs in a throwaway work directory, removed on exit (the table is kept in
# $BENCH_OUT if set). The machine is shared: figures drift by 10-20 % from run to run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
certs=${1:-500000}
case $certs in '' | *[!0-9]*) echo "bench-log.sh: CERTS must be a number, not '$certs'" >&2; exit 2 ;; esac
[ "$certs" -ge 20 ] || { echo "bench-log.sh: CERTS must be at least 20, not $certs" >&2; exit 2; }
small=$((certs / 5))
bash "$repo/softhsm/install.sh"
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --examples --bins
bin=$repo/target/release
work=$(mktemp -d)
# BENCH_KEEP=1 keeps the work directory (the big home) for more measurements.
trap 'if [ -n "${BENCH_KEEP:-}" ]; then echo "bench-log.sh: kept $work" >&2; else rm -rf "$work"; fi' EXIT
# Throwaway benchmark tokens: their PINs are set here, in the open.
export HSMCA_PIN=123456 HSMCA_SO_PIN=87654321
cores=$(nproc)

py() { python3 -c "$1"; }
mib() { echo $(($1 / 1024)); }
# timed LABEL [--ok-exit N] CMD...: runs CMD under /usr/bin/time, its stdout in $work/out-LABEL;
# sets $wall (s), $rss (KiB) and $cpu (%, of one core). Any other exit status than 0 (or N)
# stops the benchmark with the command's stderr.
timed() {
  local label=$1 ok=0 rc=0; shift
  if [ "$1" = --ok-exit ]; then ok=$2; shift 2; fi
  /usr/bin/time -f '%e %M %P' -o "$work/time-$label" "$@" >"$work/out-$label" 2>"$work/err-$label" || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne "$ok" ]; then
    cat "$work/err-$label" >&2
    echo "bench-log.sh: $label failed (exit $rc): $*" >&2
    exit 1
  fi
  # /usr/bin/time writes "Command exited with non-zero status N" before the figures then.
  read -r wall rss cpu < <(tail -n 1 "$work/time-$label")
  cpu=${cpu%\%}
  case $cpu in '' | *[!0-9]*) cpu=0 ;; esac # "?" when the run took no measurable time
}
# quiet CMD...: runs CMD, shows its output only if it fails (then the benchmark stops).
quiet() { "$@" >"$work/quiet.out" 2>&1 || { cat "$work/quiet.out" >&2; echo "bench-log.sh: failed: $*" >&2; return 1; }; }
# make_home NAME: a fresh token and CA home $work/ca-NAME with the `bench` profile under an
# intermediate; sets SOFTHSM2_CONF for it.
make_home() {
  local env_line
  env_line=$("$repo/softhsm/make-token.sh" "$work/hsm-$1" "bench-$1" 2>"$work/make-token.err") \
    || { cat "$work/make-token.err" >&2; exit 1; }
  eval "$env_line"
  export SOFTHSM2_CONF
  quiet "$bin/hsmca" init --home "$work/ca-$1" --token "bench-$1" --key-type ecdsa-p256 --subject "CN=Bench Root" \
    --log-key-type ecdsa-p256
  quiet "$bin/hsmca" ca create bench-ca --home "$work/ca-$1" --profile kubernetes-ca --subject "CN=kubernetes-ca" \
    --key-type ecdsa-p256
  # 90 days for the batch, so `expiring --within 30d` must pick the one 7-day certificate out.
  sed 's/"issuer": "root"/"issuer": "bench-ca"/; s/"name": "test-any-key"/"name": "bench"/; s/"default": "30d"/"default": "90d"/' \
    "$repo/tests/data/profiles/test-any-key.json" >"$work/ca-$1/profiles/bench.json"
  quiet "$bin/hsmca" profiles apply --home "$work/ca-$1" # a new profile is signed once logged
}
# sign_dir NAME SRC: one `sign-dir SRC --sessions 2` into the home NAME; sets $rate, $wall, $rss.
sign_dir() {
  local count
  timed "sign-dir-$1" "$bin/hsmca" sign-dir --home "$work/ca-$1" "$2" --profile bench --out "$work/signed-$1" \
    --sessions 2 --json
  count=$(py "import json; print(json.loads(open('$work/out-sign-dir-$1').read().splitlines()[-1])['issued'])")
  [ "$count" = "$(find "$2" -name '*.csr' | wc -l)" ] || { echo "bench-log.sh: only $count issued from $2" >&2; exit 1; }
  rate=$(py "print('%.0f' % ($count / max($wall, 0.01)))")
}
# serial_of NAME I: the serial sign-dir gave bench-I.csr in the home NAME.
serial_of() {
  py "
import json, sys
for line in open('$work/out-sign-dir-$1'):
    o = json.loads(line)
    if o.get('file', '').endswith('/bench-$2.csr'):
        print(o['serial']); sys.exit(0)
sys.exit('bench-log.sh: no serial for bench-$2.csr in the sign-dir output')"
}

rows=()
# row OPERATION WALL RSS_KIB TARGET_S TARGET_MIB: one table row; '-' for no target, 'n/a' for
# a command this hsmca lacks.
row() {
  local op=$1 w=$2 r=$3 ts=$4 tm=$5 target met=yes
  if [ "$w" = n/a ]; then rows+=("$op|n/a|n/a|$(target_text "$ts" "$tm")|n/a"); return; fi
  target=$(target_text "$ts" "$tm")
  if [ "$ts" != - ] && ! py "import sys; sys.exit(0 if $w <= $ts else 1)"; then met=no; fi
  if [ "$tm" != - ] && [ "$(mib "$r")" -gt "$tm" ]; then met=no; fi
  if [ "$ts" = - ] && [ "$tm" = - ]; then met=-; fi
  rows+=("$op|$w|$(mib "$r")|$target|$met")
}
target_text() {
  local t=""
  [ "$1" = - ] || t="<= $1 s"
  [ "$2" = - ] || t="${t:+$t, }<= $2 MiB"
  echo "${t:--}"
}

# 1. The batches: CERTS/5 first (memory at the smaller size), then CERTS (the big home).
echo "making $certs and $small P-256 CSRs..." >&2
start=$(date +%s.%N)
"$bin/examples/make_csrs" "$certs" "$work/csrs-big"
csr_secs=$(py "print('%.1f' % ($(date +%s.%N) - $start))")
"$bin/examples/make_csrs" "$small" "$work/csrs-small"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench-extra \
  -keyout "$work/extra.key" -out "$work/extra.csr" 2>/dev/null

echo "signing $small CSRs in a fresh home..." >&2
make_home small
sign_dir small "$work/csrs-small"
small_rate=$rate small_wall=$wall small_rss=$rss
rm -rf "$work/csrs-small" "$work/signed-small" # disk: only the big home is measured further

echo "signing $certs CSRs in a fresh home..." >&2
make_home big
sign_dir big "$work/csrs-big"
big_rate=$rate big_wall=$wall big_rss=$rss
home=$work/ca-big
mid=$((certs / 2)) quarter=$((certs / 4))
mid_serial=$(serial_of big "$mid")
revoke_serial=$(serial_of big "$quarter")
rm -rf "$work/csrs-big" "$work/signed-big"

# 2. Everyday commands on the big log, each its own process.
cp "$home/log/checkpoint" "$work/before.checkpoint"
echo "timing the everyday commands on $(wc -l <"$home/log/entries.jsonl") log entries..." >&2
timed sign "$bin/hsmca" sign --home "$home" --profile bench --validity 7d "$work/extra.csr" --out "$work/extra.crt"
row "sign (one CSR)" "$wall" "$rss" 0.5 100
timed expiring --ok-exit 1 "$bin/hsmca" expiring --home "$home" --within 30d
grep -q 'CN=bench-extra' "$work/out-expiring" \
  || { echo "bench-log.sh: expiring did not list the 7-day certificate" >&2; exit 1; }
row "expiring --within 30d" "$wall" "$rss" 1 150
timed list "$bin/hsmca" log list --home "$home" --profile bench --subject "CN=bench-$mid"
grep -q "$mid_serial" "$work/out-list" \
  || { echo "bench-log.sh: log list did not find CN=bench-$mid ($mid_serial)" >&2; exit 1; }
row "log list --profile --subject" "$wall" "$rss" 1 150
timed show "$bin/hsmca" log show --home "$home" "$mid_serial"
grep -q "CN=bench-$mid\$" "$work/out-show" \
  || { echo "bench-log.sh: log show $mid_serial is not CN=bench-$mid" >&2; exit 1; }
row "log show (middle of the log)" "$wall" "$rss" 1 150
timed revoke "$bin/hsmca" revoke --home "$home" "$revoke_serial" --reason superseded
row "revoke" "$wall" "$rss" 1 -
timed crl "$bin/hsmca" crl --home "$home" --issuer bench-ca --out "$work/bench-ca.crl"
openssl crl -in "$work/bench-ca.crl" -noout -text >"$work/crl.txt"
py "
import re, sys
listed = [int(s, 16) for s in re.findall(r'Serial Number: ([0-9A-Fa-f]+)', open('$work/crl.txt').read())]
sys.exit(0 if int('$revoke_serial', 16) in listed else 1)" \
  || { echo "bench-log.sh: the CRL does not list the revoked serial $revoke_serial" >&2; exit 1; }
row "crl --issuer bench-ca" "$wall" "$rss" 1 -
timed verify "$bin/hsmca" log verify --home "$home"
verify_cpu=$cpu
row "log verify (full)" "$wall" "$rss" 30 -
# "Uses every core": at least 3/4 of all cores busy on average over the run.
every_core=$(py "print('yes' if $verify_cpu >= 75 * $cores else 'no')")
rows+=("  CPU of log verify|$verify_cpu %|-|>= $((75 * cores)) % ($cores cores)|$every_core")
if "$bin/hsmca" log verify --help | grep -q -- '--from-checkpoint'; then
  timed verify-from "$bin/hsmca" log verify --home "$home" --from-checkpoint "$work/before.checkpoint"
  row "log verify --from-checkpoint" "$wall" "$rss" 1 -
else
  row "log verify --from-checkpoint" n/a n/a 1 -
fi
if "$bin/hsmca" log --help | grep -qE '^  reindex '; then
  timed reindex "$bin/hsmca" log reindex --home "$home"
  row "log reindex" "$wall" "$rss" - -
else
  row "log reindex" n/a n/a - -
fi
entries=$(wc -l <"$home/log/entries.jsonl")
entries_mib=$(py "print('%.1f' % ($(stat -c %s "$home/log/entries.jsonl") / 1048576))")
log_mib=$(py "print('%.1f' % ($(du -sb "$home/log" | cut -f1) / 1048576))")
home_mib=$(py "print('%.1f' % ($(du -sb "$home" | cut -f1) / 1048576))")

# 3. The table.
flat=$(py "print('%.2f' % ($big_rss / max($small_rss, 1)))")
# What each certificate beyond CERTS/5 added to the peak (issue 15 measured about 500 bytes).
per_cert=$(py "print('%.0f' % (max($big_rss - $small_rss, 0) * 1024 / ($certs - $small)))")
{
  printf 'hsmca log at lifetime scale: %s certificates, %s log entries (%s cores, %s)\n' "$certs" "$entries" \
    "$cores" "$(date -u +%Y-%m-%dT%H:%MZ)"
  printf 'log: entries.jsonl %s MiB, everything under HOME/log (index included) %s MiB, the whole HOME %s MiB\n\n' \
    "$entries_mib" "$log_mib" "$home_mib"
  printf '%-30s %9s %13s %-24s %s\n' "operation" "wall s" "peak RSS MiB" "target" "met?"
  for r in "${rows[@]}"; do
    IFS='|' read -r op w m t ok <<<"$r"
    printf '%-30s %9s %13s %-24s %s\n' "$op" "$w" "$m" "$t" "$ok"
  done
  printf '\n%-30s %9s %13s %-24s %s\n' "sign-dir (one run, 2 sessions)" "wall s" "peak RSS MiB" "rate" "target"
  printf '%-30s %9s %13s %-24s %s\n' "$certs CSRs" "$big_wall" "$(mib "$big_rss")" "$big_rate/s" \
    "<= 150 MiB: $([ "$(mib "$big_rss")" -le 150 ] && echo yes || echo no)"
  printf '%-30s %9s %13s %-24s %s\n' "$small CSRs (fresh home)" "$small_wall" "$(mib "$small_rss")" "$small_rate/s" \
    "RSS x$flat for 5x the CSRs (flat: <= 1.25): $(py "print('yes' if $flat <= 1.25 else 'no')")"
  printf 'peak RSS grew by %s bytes per certificate beyond %s\n' "$per_cert" "$small"
  printf '(issue 15, before: 4,400/s at 500,000; making the %s CSRs took %s s)\n' "$certs" "$csr_secs"
} | tee "$work/table"
if [ -n "${BENCH_OUT:-}" ]; then cp "$work/table" "$BENCH_OUT"; fi
