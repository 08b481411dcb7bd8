#!/usr/bin/env python3
"""Orthanc as a referring PACS: push files to the gateway.

  orthanc.py push WORKDIR GATEWAY_DICOM_PORT FILE...
  orthanc.py stow WORKDIR GATEWAY_HTTP_PORT PARTNER FILE...

Starts /usr/sbin/Orthanc with a private configuration in WORKDIR (loopback
only, high ports, AE title ORTHANC) and uploads the files over its REST API.
`push` registers the gateway as modality "konsil" (AE KONSIL at
127.0.0.1:PORT) and pushes every uploaded study by C-STORE; `stow` loads the
DICOMweb plugin, registers the gateway as DICOMweb server "konsil" (sending
X-Konsil-Partner: PARTNER) and pushes every study by STOW-RS (Orthanc sends
chunked bodies and parses the gateway's response). Prints Orthanc's JSON
answer and stops Orthanc; exit 0 when Orthanc reports the push done.
"""
import json, os, socket, subprocess, sys, time, urllib.request

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def call(base, method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
    return json.loads(text) if text else None

DICOMWEB_PLUGIN = "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"

def main():
    if len(sys.argv) < 5 or sys.argv[1] not in ("push", "stow"):
        sys.exit(__doc__)
    mode, work, gateway_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    partner = sys.argv[4] if mode == "stow" else None
    files = sys.argv[5:] if mode == "stow" else sys.argv[4:]
    os.makedirs(work, exist_ok=True)
    http, dicom = free_port(), free_port()
    config = {
        "Name": "konsil-test", "DicomAet": "ORTHANC", "DicomPort": dicom, "HttpPort": http,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": os.path.join(work, "storage"), "IndexDirectory": os.path.join(work, "index"),
        "Plugins": [], "DicomScpTimeout": 30,
    }
    if mode == "stow":
        config["Plugins"] = [DICOMWEB_PLUGIN]
        config["DicomWeb"] = {
            "Enable": True,
            "Servers": {"konsil": {
                "Url": f"http://127.0.0.1:{gateway_port}/dicomweb/",
                "HttpHeaders": {"X-Konsil-Partner": partner},
            }},
        }
    cfg = os.path.join(work, "orthanc.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    log = open(os.path.join(work, "orthanc.log"), "w")
    proc = subprocess.Popen(["/usr/sbin/Orthanc", cfg], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            try:
                call(base, "GET", "/system")
                break
            except Exception:
                time.sleep(0.1)
        else:
            sys.exit("Orthanc did not start")
        studies = set()
        for path in files:
            with open(path, "rb") as f:
                answer = call(base, "POST", "/instances", raw=f.read())
            studies.add(answer["ParentStudy"])
        if mode == "stow":
            result = call(base, "POST", "/dicom-web/servers/konsil/stow",
                          {"Resources": sorted(studies), "Synchronous": True})
        else:
            call(base, "PUT", "/modalities/konsil",
                 {"AET": "KONSIL", "Host": "127.0.0.1", "Port": gateway_port})
            result = call(base, "POST", "/modalities/konsil/store",
                          {"Resources": sorted(studies), "Synchronous": True})
        print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

main()
