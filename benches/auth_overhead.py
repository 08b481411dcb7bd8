#!/usr/bin/env python3
"""What authentication costs on the DICOMweb hot path (issue 6): the same
Konsil binary twice on fresh data directories, once with `serve --dev` (no
authentication) and once with authentication on (a SMART Backend Services
token from /auth/token, checked on every request: signature, claims, scopes,
policy), same data, same client (curl), one run. Both write the audit
trail (one AuditEvent per request), so its cost is in both columns.
Run through benches/auth_overhead.sh, which builds Konsil.

  auth_overhead.py KONSIL_BINARY WORKDIR

Prints, for both, the measures of benches/dicomweb.py's transfer part
(stow-one, stow-each, wado) and the ratio auth/dev (1.00: no cost;
below 1: slower with authentication).
"""
import importlib.util, os, shutil, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# benches/dicomweb.py (the measuring code) and tests/peers/auth.py (the
# SMART client), by path: tests/peers has a dicomweb.py of its own.
bench = load("dicomweb_bench", os.path.join(HERE, "dicomweb.py"))
auth = load("auth_peer", os.path.join(os.path.dirname(HERE), "tests", "peers", "auth.py"))

CLIENT = "st-mary-ehr"


class Konsil:
    """Konsil with (`secure`) or without authentication; `kind` stays
    "konsil" for the shared measuring code, `header` is the identity."""

    def __init__(self, binary, work, secure):
        self.binary, self.work, self.secure = binary, work, secure
        self.kind = "konsil"
        self.label = "auth" if secure else "dev"

    def start(self):
        data = os.path.join(self.work, f"konsil-{self.label}-data")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        http = bench.free_port()
        cfg = os.path.join(self.work, f"konsil-{self.label}.toml")
        keys = os.path.join(self.work, "keys")
        with open(cfg, "w") as f:
            f.write(f'[server]\ndata_dir = "{data}"\nhttp = "127.0.0.1:{http}"\n'
                    f'dicom = "127.0.0.1:{bench.free_port()}"\n'
                    '[[partners]]\nid = "bench"\nname = "Bench"\nae_titles = ["BENCH"]\n')
            if self.secure:
                f.write(f'[[partners.clients]]\nclient_id = "{CLIENT}"\n'
                        f'jwks_file = "{keys}/{CLIENT}.jwks.json"\nscopes = ["system/*.cruds"]\n')
        args = [self.binary, "--config", cfg, "serve"] + ([] if self.secure else ["--dev"])
        log = open(os.path.join(self.work, f"konsil-{self.label}.log"), "w")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=dict(os.environ, KONSIL_LOG="warn"))
        root = f"http://127.0.0.1:{http}"
        self.base = f"{root}/dicomweb"
        bench.wait_up(f"{root}/healthz")
        if self.secure:
            token = auth.token(root, keys, CLIENT, "system/ImagingStudy.crs")["access_token"]
            self.header = f"Authorization: Bearer {token}"
        else:
            self.header = "X-Konsil-Partner: bench"
        return self

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def main():
    binary, work = sys.argv[1], sys.argv[2]
    auth.keys(os.path.join(work, "keys"))
    ct1, ct2 = bench.ct_files(os.path.join(work, "ct1")), bench.ct_files(os.path.join(work, "ct2"))
    results = {}
    current = {}
    # The shared code asks for the identity of "konsil": the one running.
    bench.identity = lambda server: ["-H", current["server"].header]
    for secure in (False, True):
        server = Konsil(binary, work, secure).start()
        current["server"] = server
        try:
            results[server.label] = bench.measure_transfer(server, ct1, ct2, work)
        finally:
            server.stop()
    print(f"{'measure':24} {'dev':>10} {'auth':>10} {'auth/dev':>9}")
    for key in results["dev"]:
        d, a = results["dev"][key], results["auth"][key]
        print(f"{key:24} {d:10.1f} {a:10.1f} {a / d:8.2f}x")


if __name__ == "__main__":
    main()
