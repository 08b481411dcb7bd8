#!/usr/bin/env python3
"""FHIR edge benchmark (issue 4): load 100,000 resources through 500-entry
transactions, then measure reads, creates and searches with wrk, and print a
table against the issue's targets.

    benches/fhir.py KONSIL_BINARY WORKDIR

Run through benches/fhir.sh (release build). wrk runs on the same 2-core
machine as the gateway, so each wrk run takes one core and Konsil the other.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

DURATION = os.environ.get("WRK_DURATION", "15s")
CONNECTIONS = os.environ.get("WRK_CONNECTIONS", "16")
TOTAL = int(os.environ.get("FHIR_RESOURCES", "100000"))
BATCH = 500


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, work):
    data = os.path.join(work, "data")
    shutil.rmtree(data, ignore_errors=True)
    http, dicom = free_port(), free_port()
    log = open(os.path.join(work, "konsil.log"), "w")
    proc = subprocess.Popen(
        [binary, "serve", "--dev", "--data-dir", data, "--http", f"127.0.0.1:{http}", "--dicom", f"127.0.0.1:{dicom}"],
        stdout=log, stderr=log, env={**os.environ, "KONSIL_LOG": "warn"})
    base = f"http://127.0.0.1:{http}/fhir"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz")
            return proc, base
        except OSError:
            time.sleep(0.05)
    raise SystemExit("konsil did not start")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def transaction(batch_no):
    """500 entries: a Patient and a ServiceRequest referring to it, x250."""
    entries = []
    for i in range(BATCH // 2):
        n = batch_no * BATCH + i
        pid = f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
        entries.append({"fullUrl": pid, "request": {"method": "POST", "url": "Patient"}, "resource": {
            "resourceType": "Patient", "identifier": [{"system": "urn:bench:mrn", "value": f"MRN-{n}"}],
            "name": [{"family": f"Family{n % 997}", "given": ["Bench"]}], "birthDate": f"19{50 + n % 50}-0{1 + n % 9}-1{n % 10}"}})
        entries.append({"request": {"method": "POST", "url": "ServiceRequest"}, "resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "identifier": [{"system": "urn:bench:acc", "value": f"ACC-{n}"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": f"{10000 + n % 50}-1"}]},
            "subject": {"reference": pid}, "authoredOn": f"2024-0{1 + n % 9}-1{n % 10}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def wrk(url, script=None, duration=DURATION):
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": pct(50), "p99": pct(99), "errors": int(non2xx.group(1)) if non2xx else 0}


def lua(work, name, body):
    path = os.path.join(work, name)
    with open(path, "w") as f:
        f.write(body)
    return path


def main():
    binary, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    proc, base = start(binary, work)
    try:
        print(f"== loading {TOTAL} resources in {BATCH}-entry transactions", file=sys.stderr)
        times = []
        for b in range(TOTAL // BATCH):
            t0 = time.perf_counter()
            answer = post(base, transaction(b))
            times.append(time.perf_counter() - t0)
            assert len(answer["entry"]) == BATCH
        # Some ids to read.
        with urllib.request.urlopen(f"{base}/Patient?_count=1000") as r:
            ids = [e["resource"]["id"] for e in json.loads(r.read())["entry"]]
        total = TOTAL // 2

        ids_lua = "ids = {" + ",".join(f'"{i}"' for i in ids) + "}\n"
        read = wrk(base, lua(work, "read.lua", ids_lua + """
request = function()
  return wrk.format("GET", "/fhir/Patient/" .. ids[math.random(#ids)])
end
"""))
        search_id = wrk(base, lua(work, "search.lua", f"""
request = function()
  return wrk.format("GET", "/fhir/ServiceRequest?identifier=urn:bench:acc|ACC-" .. math.random(0, {total - 1}) .. "&_total=none")
end
"""))
        search_name = wrk(base, lua(work, "name.lua", """
request = function()
  return wrk.format("GET", "/fhir/Patient?family=family" .. math.random(0, 996) .. "&birthdate=ge1970&_count=20")
end
"""))
        create = wrk(base, lua(work, "create.lua", """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.headers["Prefer"] = "return=minimal"
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/fhir/Task", nil,
    '{"resourceType":"Task","status":"requested","intent":"order","identifier":[{"system":"urn:bench:task","value":"T-' .. counter .. '"}],"for":{"reference":"Patient/x"}}')
end
"""), duration="10s")
        rss = 0
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) // 1024
        rows = [
            ("read by id (100k store)", f"{read['rps']:.0f}", f"{read['p50']:.2f}", f"{read['p99']:.2f}", "p99 < 5 ms at >= 5,000 req/s", read["errors"]),
            ("create Task", f"{create['rps']:.0f}", f"{create['p50']:.2f}", f"{create['p99']:.2f}", "-", create["errors"]),
            ("search identifier (50k SR)", f"{search_id['rps']:.0f}", f"{search_id['p50']:.2f}", f"{search_id['p99']:.2f}", "-", search_id["errors"]),
            ("search family+birthdate", f"{search_name['rps']:.0f}", f"{search_name['p50']:.2f}", f"{search_name['p99']:.2f}", "-", search_name["errors"]),
        ]
        print(f"\nKonsil FHIR edge, {TOTAL} resources, wrk -c{CONNECTIONS} {DURATION} on this machine (2 cores shared with wrk)\n")
        print(f"{'measure':32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  {'target':30} {'non-2xx':>7}")
        for r in rows:
            print(f"{r[0]:32} {r[1]:>8} {r[2]:>8} {r[3]:>8}  {r[4]:30} {r[5]:>7}")
        print(f"\n500-entry transaction (Patient + ServiceRequest pairs, urn:uuid refs): "
              f"p50 {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {len(times)} "
              f"(target < 1000 ms; {BATCH / statistics.median(times):.0f} entries/s)")
        print(f"peak RSS {rss} MiB")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
