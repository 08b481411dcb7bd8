#!/usr/bin/env bash
# Side-by-side DIMSE ingest benchmark (issue 2): Konsil vs DCMTK storescp vs
# dicom-rs dicom-storescp, same sender (DCMTK storescu, TCP_NODELAY=1 on both
# ends), same data, one run; every figure is the best of RUNS (default 3)
# fresh-receiver runs, RSS the maximum over them. Prints MB/s and instances/s for a 300-slice 512x512 CT study,
# instances/s for 2,000 tiny instances, and each receiver's peak RSS (VmHWM)
# while receiving one 1 GiB multiframe instance.
#
# Konsil makes every instance durable before it answers (fdatasync of its
# blob segment, overlapped with the index commit); storescp and
# dicom-storescp do not fsync.
#
# Usage: benches/dimse_ingest.sh [WORKDIR]   (needs dcmtk, bc, python3 with
# tests/requirements.txt; builds konsil --release and installs dicom-storescp
# from crates.io into target/bench-tools on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$(mktemp -d /var/tmp/konsil-bench.XXXXXX)}
mkdir -p "$WORK"
RUNS=${RUNS:-3}

cargo build --release --quiet
KONSIL=$ROOT/target/release/konsil
TOOLS=$ROOT/target/bench-tools
if [ ! -x "$TOOLS/bin/dicom-storescp" ]; then
    echo "== installing dicom-storescp (dicom-rs) from crates.io" >&2
    cargo install --quiet --root "$TOOLS" dicom-storescp
fi
DICOMRS=$TOOLS/bin/dicom-storescp

gen() { python3 "$ROOT/tests/peers/dicom_files.py" "$@" > /dev/null; }
[ -d "$WORK/ct" ] || { echo "== generating 300-slice CT" >&2; gen ct "$WORK/ct" 300 BENCH-PID BENCH-ACC; }
[ -d "$WORK/tiny" ] || { echo "== generating 2000 tiny instances" >&2; gen tiny "$WORK/tiny" 2000; }
[ -f "$WORK/big.dcm" ] || { echo "== generating 1 GiB multiframe instance" >&2; gen big "$WORK/big.dcm" 1024; }

PORT=11190
RECV_PID=""

start_receiver() { # name outdir
    local name=$1 out=$2
    rm -rf "$out"; mkdir -p "$out"
    case $name in
        konsil)
            cat > "$WORK/konsil.toml" <<TOML
[server]
data_dir = "$out"
http = "127.0.0.1:$((PORT + 1))"
dicom = "127.0.0.1:$PORT"
ae_title = "BENCH"
[[partners]]
id = "bench"
name = "Bench"
ae_titles = ["STORESCU"]
TOML
            KONSIL_LOG=warn "$KONSIL" --config "$WORK/konsil.toml" serve 2> "$WORK/konsil.log" &
            ;;
        dcmtk)
            # DCMTK reads TCP_NODELAY from the environment on both ends.
            TCP_NODELAY=1 /usr/bin/storescp -aet BENCH +xa -od "$out" $PORT 2> "$WORK/storescp.log" &
            ;;
        dicom-rs)
            "$DICOMRS" -p $PORT -o "$out" --calling-ae-title BENCH 2> "$WORK/dicomrs.log" > /dev/null &
            ;;
    esac
    RECV_PID=$!
    for _ in $(seq 100); do
        /usr/bin/echoscu -aet STORESCU -aec BENCH 127.0.0.1 $PORT 2>/dev/null && return 0
        sleep 0.1
    done
    echo "receiver $name did not start" >&2; exit 1
}

stop_receiver() {
    kill -TERM "$RECV_PID" 2>/dev/null || true
    wait "$RECV_PID" 2>/dev/null || true
}

peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$RECV_PID/status"; }

send() { # files... ; prints seconds
    local t0 t1
    t0=$(date +%s.%N)
    TCP_NODELAY=1 /usr/bin/storescu -aet STORESCU -aec BENCH 127.0.0.1 $PORT "$@" \
        || { echo "storescu failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

CT_FILES=("$WORK"/ct/*.dcm)
TINY_FILES=("$WORK"/tiny/*.dcm)
CT_MB=$(du -cb "${CT_FILES[@]}" | tail -1 | awk '{print $1/1e6}')

declare -A CT_MBS CT_IPS TINY_IPS BIG_RSS BIG_MBS
best_of() { # scenario files... ; prints the best (lowest) seconds of $RUNS fresh-receiver runs
    local r=$1; shift
    local best=999999 s
    for _ in $(seq "$RUNS"); do
        start_receiver "$r" "$WORK/out-$r"
        s=$(send "$@")
        stop_receiver
        if [ "$(echo "$s < $best" | bc -l)" = 1 ]; then best=$s; fi
    done
    echo "$best"
}
BIG_BYTES=$(stat -c %s "$WORK/big.dcm")
for r in konsil dcmtk dicom-rs; do
    s=$(best_of $r "${CT_FILES[@]}")
    CT_MBS[$r]=$(echo "$CT_MB / $s" | bc -l)
    CT_IPS[$r]=$(echo "300 / $s" | bc -l)
    s=$(best_of $r "${TINY_FILES[@]}")
    TINY_IPS[$r]=$(echo "2000 / $s" | bc -l)
    # Peak RSS is the maximum over the runs (read after each transfer).
    rss=0
    best=999999
    for _ in $(seq "$RUNS"); do
        start_receiver $r "$WORK/out-$r"
        t=$(send "$WORK/big.dcm")
        m=$(peak_rss_mib)
        stop_receiver
        [ "$m" -gt "$rss" ] && rss=$m
        if [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
    done
    BIG_RSS[$r]=$rss
    BIG_MBS[$r]=$(echo "$BIG_BYTES / 1000000 / $best" | bc -l)
    rm -rf "$WORK/out-$r"
    echo "== $r done" >&2
done

printf '\n%-10s %12s %12s %14s %14s %12s\n' receiver "CT MB/s" "CT inst/s" "tiny inst/s" "1GiB MB/s" "1GiB RSS MiB"
for r in konsil dcmtk dicom-rs; do
    printf '%-10s %12.1f %12.1f %14.1f %14.1f %12s\n' $r "${CT_MBS[$r]}" "${CT_IPS[$r]}" "${TINY_IPS[$r]}" "${BIG_MBS[$r]}" "${BIG_RSS[$r]}"
done
printf '\nkonsil / dcmtk storescp: CT throughput %.2fx, tiny %.2fx   (target: >= 1.0x, Konsil fsyncs, storescp does not)\n' \
    "$(echo "${CT_MBS[konsil]} / ${CT_MBS[dcmtk]}" | bc -l)" "$(echo "${TINY_IPS[konsil]} / ${TINY_IPS[dcmtk]}" | bc -l)"
printf 'konsil peak RSS for the 1 GiB instance: %s MiB   (target: <= 64 MiB)\n' "${BIG_RSS[konsil]}"
