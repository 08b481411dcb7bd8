#!/usr/bin/env python3
"""OHIF Viewer (the built @ohif/app dist) in headless Chromium against the
gateway's DICOMweb, from another origin (so CORS is exercised).

  ohif.py DIST KONSIL_DICOMWEB_BASE PORT STUDY_UID

Serves DIST on 127.0.0.1:PORT (single-page-app fallback to index.html, and an
app-config.js pointing OHIF's qidoRoot/wadoRoot at the gateway), then runs
Chromium twice: the study list (its DOM is dumped) and the viewer on
STUDY_UID, which fetches metadata and frames (the gateway's metrics show
what it served). Prints JSON: the study list's text.

Whether the frames were drawn is not checked here: drawing happens in web
workers that headless Chromium's virtual time does not wait for, so a
screenshot can come before it on a busy machine.
"""
import functools, http.server, json, os, re, subprocess, sys, tempfile, threading

CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'dicomweb',
    configuration: {
      friendlyName: 'Konsil', name: 'konsil',
      wadoUriRoot: '%(base)s', qidoRoot: '%(base)s', wadoRoot: '%(base)s',
      qidoSupportsIncludeField: true, supportsFuzzyMatching: true, supportsWildcard: true,
      imageRendering: 'wadors', thumbnailRendering: 'wadors', enableStudyLazyLoad: true,
      omitQuotationForMultipartRequest: true,
    },
  }],
  defaultDataSourceName: 'dicomweb',
};
"""

def serve(dist, port, base):
    config = (CONFIG % {"base": base}).encode()
    class SPA(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            if self.path.split("?")[0] == "/app-config.js":
                self.send_response(200)
                self.send_header("Content-Type", "application/javascript")
                self.send_header("Content-Length", str(len(config)))
                self.end_headers()
                return __import__("io").BytesIO(config)
            if not os.path.exists(self.translate_path(self.path)):
                self.path = "/index.html"
            return super().send_head()
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(SPA, directory=dist))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

def chromium(url, *extra, budget=60000):
    profile = tempfile.mkdtemp()
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget}", "--window-size=1280,900", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)

def main():
    dist, base, port, study = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    server = serve(dist, port, base)
    origin = f"http://127.0.0.1:{port}"
    listing = chromium(origin + "/", "--dump-dom").stdout
    text = re.sub(r"<[^>]+>", " ", listing)
    # The viewer page: it fetches the study's metadata and frames.
    chromium(f"{origin}/viewer?StudyInstanceUIDs={study}", "--dump-dom")
    server.shutdown()
    print(json.dumps({"study_list": " ".join(text.split())}))

main()
