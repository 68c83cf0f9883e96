#!/usr/bin/env bash
# Leader failover, N times in a row: a 3-node cluster of release raftblkd processes on
# this machine, one replicas=2 volume, fio (4k randwrite, iodepth 8, crc32c verify of
# every block as it goes) through one node for the whole run. Each cycle kill -9s the
# volume's leader (moving leadership off fio's node first if it landed there), waits
# for a new leader, restarts the killed node and waits until it has caught up. At the
# end fio must report no error and no verify failure; the longest single write
# (fio's max write completion latency) is printed against the 1.0 s bound.
#
# Usage: tests/failover-cycles.sh [--cycles N] [--size SIZE] [--keep DIR] [--bin-dir DIR]
# (--bin-dir: use the raftblkd and raftblk already built there instead of building)
# Prints one line per cycle and a summary; exits non-zero if fio saw an error, a
# verify failure, or a write slower than the bound.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

cycles=100
size=256M
keep=""
bin_dir=""
bound_ms=1000
while [[ $# -gt 0 ]]; do
    case $1 in
        --cycles) cycles=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --keep) keep=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; }

if [[ -z $bin_dir ]]; then
    cargo build --release -p raftblk-daemon --bins
    bin_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
fi
raftblkd=$bin_dir/raftblkd
raftblk=$bin_dir/raftblk
[[ -x $raftblkd && -x $raftblk ]] || { echo "no raftblkd and raftblk in $bin_dir" >&2; exit 2; }

work=${keep:-$(mktemp -d)}
mkdir -p "$work"
base=$((30000 + RANDOM % 20000))
declare -A pid
peer() { echo "127.0.0.1:$((base + 10 * $1 + 2))"; }
api() { echo "127.0.0.1:$((base + 10 * $1 + 1))"; }
nbd() { echo "127.0.0.1:$((base + 10 * $1))"; }

start_node() {
    local id=$1 peers=() j
    for j in 1 2 3; do [[ $j != "$id" ]] && peers+=("$j@$(peer "$j")"); done
    mkdir -p "$work/node$id"
    "$raftblkd" --node-id "$id" --data-dir "$work/node$id" --peer-listen "$(peer "$id")" \
        --peers="$(IFS=,; echo "${peers[*]}")" --nbd-listen "$(nbd "$id")" --api-listen "$(api "$id")" \
        --nbd-socket "$work/node$id.sock" --bootstrap-volumes none --leader-follows-client false \
        >>"$work/node$id.log" 2>&1 &
    pid[$id]=$!
}
cleanup() {
    for id in 1 2 3; do [[ -n ${pid[$id]:-} ]] && kill -9 "${pid[$id]}" 2>/dev/null || true; done
    [[ -n ${fio_pid:-} ]] && kill -9 "$fio_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    [[ -z $keep ]] && rm -rf "$work"
}
trap cleanup EXIT

cli() { local on=$1; shift; "$raftblk" --api "$(api "$on")" "$@"; }
# Field of the volume's replication status as node $1 sees it.
repl() {
    cli "$1" --json volume inspect v 2>/dev/null |
        python3 -c "import json,sys; print(json.load(sys.stdin)['replication']['$2'])" 2>/dev/null || echo 0
}
# The leader both nodes in "$@" agree on (0 if they do not yet).
agreed_leader() {
    local l first=""
    for n in "$@"; do
        l=$(repl "$n" leader)
        [[ $l == 0 ]] && { echo 0; return; }
        [[ -z $first ]] && first=$l
        [[ $l != "$first" ]] && { echo 0; return; }
    done
    echo "$first"
}
wait_leader() {   # nodes...
    local l
    for _ in $(seq 400); do
        l=$(agreed_leader "$@")
        [[ $l != 0 ]] && { echo "$l"; return 0; }
        sleep 0.05
    done
    echo "no leader among $* within 20 s" >&2; return 1
}

for id in 1 2 3; do start_node "$id"; done
for _ in $(seq 200); do cli 1 status >/dev/null 2>&1 && break; sleep 0.1; done
cli 1 volume create v --size "$size" --replicas 2 >/dev/null
leader=$(wait_leader 1 2 3)
via=$(( leader % 3 + 1 ))
echo "volume v: leader $leader, fio through node $via"
fio --name=failover --ioengine=nbd --uri="nbd://$(nbd "$via")/v" --rw=randwrite --bs=4k --iodepth=8 \
    --size="$size" --time_based --runtime=100000 --verify=crc32c --verify_backlog=64 --verify_fatal=1 \
    --verify_state_save=0 --output-format=json --output="$work/fio.json" >"$work/fio.out" 2>&1 &
fio_pid=$!
sleep 3

longest_election=0
for cycle in $(seq "$cycles"); do
    kill -0 "$fio_pid" 2>/dev/null || { echo "fio stopped early (cycle $cycle):"; cat "$work/fio.out"; exit 1; }
    leader=$(wait_leader 1 2 3)
    if [[ $leader == "$via" ]]; then
        other=$(( via % 3 + 1 ))
        cli "$via" volume transfer-leader v "$other" >/dev/null
        for _ in $(seq 200); do leader=$(agreed_leader 1 2 3); [[ $leader != 0 && $leader != "$via" ]] && break; sleep 0.05; done
        [[ $leader == "$via" || $leader == 0 ]] && { echo "cycle $cycle: leadership did not move off node $via"; exit 1; }
    fi
    survivors=()
    for n in 1 2 3; do [[ $n != "$leader" ]] && survivors+=("$n"); done
    t0=$(date +%s%N)
    kill -9 "${pid[$leader]}"; wait "${pid[$leader]}" 2>/dev/null || true
    new=$(wait_leader "${survivors[@]}")
    election_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    (( election_ms > longest_election )) && longest_election=$election_ms
    start_node "$leader"
    # Caught up: the restarted node has applied what the leader had committed when it came back.
    for _ in $(seq 200); do cli "$leader" status >/dev/null 2>&1 && break; sleep 0.1; done
    target=$(repl "$new" commit_index)
    for _ in $(seq 600); do
        applied=$(repl "$leader" applied_index)
        (( applied >= target )) && break
        sleep 0.1
    done
    (( applied >= target )) || { echo "cycle $cycle: node $leader did not catch up ($applied < $target)"; exit 1; }
    echo "cycle $cycle: killed leader $leader, node $new leads after ${election_ms} ms, node $leader caught up to $target"
done

kill -INT "$fio_pid"; wait "$fio_pid" || true
fio_pid=""
python3 - "$work/fio.json" "$work/fio.out" "$bound_ms" "$cycles" "$longest_election" <<'PY'
import json, sys
path, out, bound_ms, cycles, election = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
text = open(path).read()
job = json.loads(text[text.index('{'):])["jobs"][0]
said = open(out).read().lower()
w, r = job["write"], job["read"]
max_write_ms = w["clat_ns"]["max"] / 1e6
complaints = [n for n in ("verify failed", "bad magic", "io_u error", "verify: ") if n in said]
print(f"RESULT {cycles} leader kills: fio error {job['error']}, {w['total_ios']} writes, {r['total_ios']} verified reads, "
      f"verify complaints {complaints or 'none'}, longest write {max_write_ms:.0f} ms (bound {bound_ms} ms), "
      f"longest election seen by the survivors {election} ms")
ok = job["error"] == 0 and not complaints and w["total_ios"] > 0 and r["total_ios"] > 0 and max_write_ms <= bound_ms
sys.exit(0 if ok else 1)
PY
