#!/usr/bin/env bash
# What authentication costs on the DICOMweb hot path (issue 6): Konsil with
# `serve --dev` vs Konsil with tokens, side by side. See
# benches/auth_overhead.py.
#
# Usage: benches/auth_overhead.sh [WORKDIR]   (python3 with
# tests/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$(mktemp -d /var/tmp/konsil-auth-bench.XXXXXX)}
mkdir -p "$WORK"

cargo build --release --quiet
gen() { python3 "$ROOT/tests/peers/dicom_files.py" "$@" > /dev/null; }
[ -d "$WORK/ct1" ] || { echo "== generating two 300-slice CT studies" >&2; gen ct "$WORK/ct1" 300 BENCH-PID-1 BENCH-ACC-1; gen ct "$WORK/ct2" 300 BENCH-PID-2 BENCH-ACC-2; }
python3 "$ROOT/benches/auth_overhead.py" "$ROOT/target/release/konsil" "$WORK"
