#!/usr/bin/env bash
# FHIR edge benchmark (issue 4): release build, 100,000 resources loaded by
# 500-entry transactions, then wrk on reads, creates and searches; prints a
# table against the issue's targets. See benches/fhir.py.
#
# Usage: benches/fhir.sh [WORKDIR]   (needs wrk: apt-get install wrk;
# FHIR_RESOURCES=N, WRK_DURATION=15s, WRK_CONNECTIONS=16 to vary)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /var/tmp/konsil-fhir-bench.XXXXXX)}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet
python3 benches/fhir.py "$PWD/target/release/konsil" "$WORK"
