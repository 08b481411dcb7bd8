#!/usr/bin/env python3
"""Side-by-side DICOMweb benchmark (issue 3): Konsil vs Orthanc 1.10 with its
DICOMweb plugin 1.7, same client (Python requests, one keep-alive session),
same data, one run. Run through benches/dicomweb.sh, which builds Konsil.

  dicomweb.py KONSIL_BINARY WORKDIR

Measures, for each server on a fresh data directory:
  stow-one   the 300-slice 512x512 CT study as one chunked STOW-RS request
  stow-each  another 300-slice CT study as 300 STOW-RS requests
  wado       WADO-RS retrieve of the whole first study (multipart, as stored)
  qido       QIDO-RS study searches over an index of INDEX_INSTANCES
             (default 100,000; 0 skips the QIDO part) instances: median time to first byte of 10
             runs each of a PatientID match, a PatientName wildcard with
             limit=100, and a StudyDate range with limit=100
  rss-1g     peak RSS (VmHWM) of the server process after one 1 GiB
             single-instance STOW (fresh server)
and prints a table with Konsil/Orthanc ratios. Konsil fsyncs every instance
before answering; so does Orthanc (SyncStorageArea, its default).
"""
import io, json, os, shutil, socket, statistics, subprocess, sys, time
import requests
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"
INDEX_INSTANCES = int(os.environ.get("INDEX_INSTANCES", "100000"))
PER_STUDY = 100
BOUNDARY = "konsil-bench-boundary"
DICOM_MP = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def wait_up(url):
    for _ in range(600):
        try:
            requests.get(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not come up")

class Server:
    def __init__(self, kind, binary, work):
        self.kind, self.binary, self.work = kind, binary, work
        self.proc = None

    def start(self):
        data = os.path.join(self.work, f"{self.kind}-data")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        http = free_port()
        log = open(os.path.join(self.work, f"{self.kind}.log"), "w")
        if self.kind == "konsil":
            cfg = os.path.join(self.work, "konsil.toml")
            with open(cfg, "w") as f:
                f.write(f'[server]\ndata_dir = "{data}"\nhttp = "127.0.0.1:{http}"\n'
                        f'dicom = "127.0.0.1:{free_port()}"\n'
                        '[[partners]]\nid = "bench"\nname = "Bench"\nae_titles = ["BENCH"]\n')
            env = dict(os.environ, KONSIL_LOG="warn")
            self.proc = subprocess.Popen([self.binary, "--config", cfg, "serve", "--dev"],
                                         stdout=log, stderr=log, env=env)
            self.base = f"http://127.0.0.1:{http}/dicomweb"
            wait_up(f"http://127.0.0.1:{http}/healthz")
        else:
            cfg = os.path.join(self.work, "orthanc.json")
            with open(cfg, "w") as f:
                json.dump({
                    "Name": "bench", "HttpPort": http, "DicomPort": free_port(),
                    "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                    "StorageDirectory": data, "IndexDirectory": data,
                    "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                }, f)
            self.proc = subprocess.Popen(["/usr/sbin/Orthanc", cfg], stdout=log, stderr=log)
            self.base = f"http://127.0.0.1:{http}/dicom-web"
            wait_up(f"http://127.0.0.1:{http}/system")
        self.session = requests.Session()
        if self.kind == "konsil":
            self.session.headers["X-Konsil-Partner"] = "bench"
        return self

    def peak_rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)

def multipart_stream(paths, chunk=1 << 20):
    for p in paths:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                yield b
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()

def stow(server, paths):
    r = server.session.post(server.base + "/studies", data=multipart_stream(paths),
                            headers={"Content-Type": DICOM_MP, "Accept": "application/dicom+json"})
    if r.status_code != 200:
        sys.exit(f"{server.kind} STOW answered {r.status_code}: {r.text[:500]}")

def study_uid(path):
    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID

def ct_files(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory))

def write_body(path, files):
    with open(path, "wb") as out:
        for chunk in multipart_stream(files):
            out.write(chunk)

def identity(server):
    return ["-H", "X-Konsil-Partner: bench"] if server.kind == "konsil" else []

def curl(server, args):
    """Run curl (a C client, so the client is not what is measured); returns
    its -w output split in fields."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null"] + identity(server) + args,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()

def measure_transfer(server, ct1, ct2, work):
    size1 = sum(os.path.getsize(p) for p in ct1)
    size2 = sum(os.path.getsize(p) for p in ct2)
    one = os.path.join(work, "stow-one.body")
    if not os.path.exists(one):
        write_body(one, ct1)
    each = []
    for n, p in enumerate(ct2):
        b = os.path.join(work, "stow-each", f"{n:04d}.body")
        if not os.path.exists(b):
            os.makedirs(os.path.dirname(b), exist_ok=True)
            write_body(b, [p])
        each.append(b)
    # Times are curl's own (%{time_total}), so starting curl is not counted.
    ct = ["-H", f"Content-Type: {DICOM_MP}"]
    code, stow_one = curl(server, ct + ["-X", "POST", "--data-binary", f"@{one}",
                                        "-w", "%{http_code} %{time_total}", server.base + "/studies"])
    stow_one = float(stow_one)
    if code != "200":
        sys.exit(f"{server.kind} STOW answered {code}")
    # One curl, one keep-alive connection, 300 requests.
    args = []
    for b in each:
        args += identity(server) + ct + ["-X", "POST", "--data-binary", f"@{b}", "-o", "/dev/null",
                                         "-w", "%{http_code} %{time_total}\\n",
                                         server.base + "/studies", "--next"]
    fields = curl(server, args[:-1])
    codes, times = fields[0::2], [float(t) for t in fields[1::2]]
    stow_each = sum(times)
    if codes != ["200"] * len(each):
        sys.exit(f"{server.kind} STOW-each answered {sorted(set(codes))}")
    # Reads repeat: best of three.
    uid = study_uid(ct1[0])
    wado = float("inf")
    for _ in range(3):
        code, got, took = curl(server, ["-H", 'Accept: multipart/related; type="application/dicom"',
                                        "-w", "%{http_code} %{size_download} %{time_total}",
                                        f"{server.base}/studies/{uid}"])
        if code != "200" or int(got) < size1:
            sys.exit(f"{server.kind} WADO answered {code} with {got} bytes")
        wado = min(wado, float(took))
    mb = lambda n, s: n / s / 1e6
    return {"stow-one MB/s": mb(size1, stow_one), "stow-each inst/s": len(ct2) / stow_each,
            "stow-each MB/s": mb(size2, stow_each), "wado MB/s": mb(int(got), wado)}

def tiny_instance(study, series, patient_no, n):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName = f"Bench^Patient{patient_no:05d}"
    ds.PatientID = f"PID-{patient_no:05d}"
    ds.StudyDate = f"20{10 + patient_no % 15:02d}{1 + patient_no % 12:02d}{1 + patient_no % 28:02d}"
    ds.AccessionNumber = f"ACC{patient_no:06d}"
    ds.Modality = "OT"
    ds.InstanceNumber = n
    ds.ConversionType = "WSD"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()

def index_batches():
    """INDEX_INSTANCES tiny instances, PER_STUDY per study, one STOW body per study."""
    for s in range(INDEX_INSTANCES // PER_STUDY):
        study, series = generate_uid(), generate_uid()
        body = io.BytesIO()
        for n in range(PER_STUDY):
            body.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(tiny_instance(study, series, s, n + 1))
            body.write(b"\r\n")
        body.write(f"--{BOUNDARY}--\r\n".encode())
        yield body.getvalue()

def measure_qido(servers):
    populate = {s.kind: 0.0 for s in servers}
    for body in index_batches():
        for s in servers:
            t = time.perf_counter()
            r = s.session.post(s.base + "/studies", data=body, headers={"Content-Type": DICOM_MP})
            populate[s.kind] += time.perf_counter() - t
            if r.status_code != 200:
                sys.exit(f"{s.kind} index STOW answered {r.status_code}: {r.text[:300]}")
    queries = [f"PatientID=PID-{INDEX_INSTANCES // PER_STUDY // 2:05d}",
               "PatientName=bench%5Epatient004*&limit=100",
               "StudyDate=20150101-20161231&limit=100"]
    results = {}
    for s in servers:
        for q in queries:
            ttfb, total = [], []
            for _ in range(10):
                first, whole = curl(s, ["-H", "Accept: application/dicom+json",
                                        "-w", "%{time_starttransfer} %{time_total}",
                                        f"{s.base}/studies?{q}"])
                ttfb.append(float(first))
                total.append(float(whole))
            r = s.session.get(f"{s.base}/studies?{q}", headers={"Accept": "application/dicom+json"})
            count = len(r.json()) if r.content else 0
            results[(s.kind, q)] = (statistics.median(ttfb) * 1000, statistics.median(total) * 1000, count)
    rate = {k: INDEX_INSTANCES / v for k, v in populate.items()}
    return results, queries, rate

def measure_big(server, big):
    stow(server, [big])
    return server.peak_rss_mib()

def main():
    binary, work = sys.argv[1], sys.argv[2]
    ct1, ct2 = ct_files(os.path.join(work, "ct1")), ct_files(os.path.join(work, "ct2"))
    big = os.path.join(work, "big.dcm")
    kinds = ["konsil", "orthanc"]
    transfer, rss = {}, {}
    for kind in kinds:
        s = Server(kind, binary, work).start()
        try:
            transfer[kind] = measure_transfer(s, ct1, ct2, work)
        finally:
            s.stop()
        s = Server(kind, binary, work).start()
        try:
            rss[kind] = measure_big(s, big)
        finally:
            s.stop()
    qido, queries, populate = {}, [], {}
    if INDEX_INSTANCES > 0:
        servers = [Server(k, binary, work).start() for k in kinds]
        try:
            qido, queries, populate = measure_qido(servers)
        finally:
            for s in servers:
                s.stop()

    print(f"{'measure':42} {'konsil':>10} {'orthanc':>10} {'ratio':>7}")
    for key in transfer["konsil"]:
        k, o = transfer["konsil"][key], transfer["orthanc"][key]
        print(f"{key:42} {k:10.1f} {o:10.1f} {k / o:6.2f}x")
    if populate:
        k, o = populate["konsil"], populate["orthanc"]
        print(f"{'index STOW (100/request) inst/s':42} {k:10.1f} {o:10.1f} {k / o:6.2f}x")
    for q in queries:
        kt, kt_all, kn = qido[("konsil", q)]
        ot, ot_all, on = qido[("orthanc", q)]
        label = f"qido ttfb ms {q[:26]}"
        print(f"{label:42} {kt:10.1f} {ot:10.1f} {ot / kt:6.2f}x  (results {kn}/{on}; total ms {kt_all:.1f}/{ot_all:.1f})")
    print(f"{'peak RSS MiB, 1 GiB single-instance STOW':42} {rss['konsil']:10.1f} {rss['orthanc']:10.1f}")
    print(f"(index: {INDEX_INSTANCES} instances in {INDEX_INSTANCES // PER_STUDY} studies; "
          "QIDO ratio is orthanc/konsil: above 1 means Konsil answers sooner)")

if __name__ == "__main__":
    main()
