#!/usr/bin/env bash
# Side-by-side DICOMweb benchmark (issue 3): Konsil vs Orthanc + DICOMweb
# plugin. See benches/dicomweb.py for what is measured.
#
# Usage: benches/dicomweb.sh [WORKDIR]   (needs orthanc, orthanc-dicomweb,
# python3 with tests/requirements.txt and requests; INDEX_INSTANCES=N to size
# the QIDO index, default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$(mktemp -d /var/tmp/konsil-dicomweb-bench.XXXXXX)}
mkdir -p "$WORK"

cargo build --release --quiet
gen() { python3 "$ROOT/tests/peers/dicom_files.py" "$@" > /dev/null; }
[ -d "$WORK/ct1" ] || { echo "== generating two 300-slice CT studies" >&2; gen ct "$WORK/ct1" 300 BENCH-PID-1 BENCH-ACC-1; gen ct "$WORK/ct2" 300 BENCH-PID-2 BENCH-ACC-2; }
[ -f "$WORK/big.dcm" ] || { echo "== generating 1 GiB multiframe instance" >&2; gen big "$WORK/big.dcm" 1024; }
python3 "$ROOT/benches/dicomweb.py" "$ROOT/target/release/konsil" "$WORK"
