#!/usr/bin/env python3
"""WADO-RS frame latency, cold and cached (issue 3's frames cache): stores a
16-frame 1024x1024 native instance by STOW-RS, then asks for its frames 201
times on one keep-alive connection. The first request parses and walks the
instance; the others use the cached layout.

    cargo build --release && python3 benches/wado_frames.py target/release/konsil

Prints the first request's time and the median of the rest.
"""

import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import pydicom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    binary = sys.argv[1]
    work = tempfile.mkdtemp(prefix="konsil-frames-")
    path = os.path.join(work, "mf.dcm")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests/peers/dicom_files.py"), "big", path, "16"],
                   check=True, stdout=subprocess.DEVNULL)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    http_port, dicom_port = free_port(), free_port()
    config = os.path.join(work, "konsil.toml")
    with open(config, "w") as f:
        f.write(f'[server]\ndata_dir = "{work}/data"\nhttp = "127.0.0.1:{http_port}"\n'
                f'dicom = "127.0.0.1:{dicom_port}"\n[[partners]]\nid = "bench"\nname = "Bench"\nae_titles = ["BENCH"]\n')
    server = subprocess.Popen([binary, "--config", config, "serve", "--dev"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "KONSIL_LOG": "warn"})
    try:
        for _ in range(100):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", http_port)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.05)
        who = {"X-Konsil-Partner": "bench"}
        boundary = "b" + uuid.uuid4().hex
        with open(path, "rb") as f:
            body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read()
                    + f"\r\n--{boundary}--\r\n".encode())
        conn.request("POST", "/dicomweb/studies", body,
                     {**who, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        url = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}/frames/")
        accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        times = []
        for i in range(201):
            start = time.perf_counter()
            conn.request("GET", url + str(1 + i % 16), headers={**who, "Accept": accept})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            times.append((time.perf_counter() - start) * 1000)
        print(f"frame requests (1 MiB frames of a 16-frame instance): first {times[0]:.2f} ms "
              f"(parses and walks the instance), then median {statistics.median(times[1:]):.2f} ms "
              f"over 200 (layout cached)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
