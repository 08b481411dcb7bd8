#!/usr/bin/env python3
"""OHIF Viewer (the built @ohif/app dist) in headless Chromium against the
gateway's DICOMweb, from another origin (so CORS is exercised).

  ohif.py DIST KONSIL_DICOMWEB_BASE PORT STUDY_UID

Serves DIST on 127.0.0.1:PORT (single-page-app fallback to index.html, and an
app-config.js pointing OHIF's qidoRoot/wadoRoot at the gateway), then runs
Chromium twice: the study list (its DOM is dumped) and the viewer on
STUDY_UID (a screenshot). Prints JSON: the study list's text, and the spread
(standard deviation) of grey values in the middle of the viewport, which is
0 for an empty viewport and large once an image is drawn.
"""
import functools, http.server, json, os, re, subprocess, sys, tempfile, threading
from PIL import Image, ImageStat

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
    # Drawing runs in web workers, which headless virtual time does not wait
    # for; on a loaded machine the first screenshot can come too early, so
    # up to three tries, each with a longer budget.
    spread = 0.0
    for budget in (60000, 120000, 240000):
        shot = os.path.join(tempfile.mkdtemp(), "viewer.png")
        chromium(f"{origin}/viewer?StudyInstanceUIDs={study}", f"--screenshot={shot}",
                 budget=budget)
        grey = Image.open(shot).convert("L")
        w, h = grey.size
        middle = grey.crop((w // 2 - 150, h // 2 - 150, w // 2 + 150, h // 2 + 150))
        spread = ImageStat.Stat(middle).stddev[0]
        if spread > 5:
            break
    server.shutdown()
    print(json.dumps({"study_list": " ".join(text.split()), "viewport_stddev": spread}))

main()
