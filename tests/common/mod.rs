//! Shared harness for the integration tests: start the real `konsil` binary
//! on free ports with a temporary data directory, and drive real peers
//! (DCMTK, pynetdicom) against it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// AE titles of partner `st-mary` in every test configuration.
pub const ST_MARY_AE: &str = "TESTSCU";
pub const PY_AE: &str = "PYNETDICOM";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to start a gateway: its files, configuration and mode.
struct Launch<'a> {
    work: &'a Path,
    data_dir: PathBuf,
    /// Extra `[server]` keys (and any tables after them).
    extra_server: &'a str,
    /// Extra keys in st-mary's and city-clinic's `[[partners]]` tables.
    partner_keys: [&'a str; 2],
    env: &'a [(&'a str, &'a str)],
    /// `serve --dev` (no authentication).
    dev: bool,
    /// The certificates of `certs.py make` (HTTPS, DICOM TLS, mutual TLS).
    tls: Option<&'a Path>,
}

impl<'a> Launch<'a> {
    fn dev(work: &'a Path) -> Launch<'a> {
        Launch {
            work,
            data_dir: work.join("data"),
            extra_server: "",
            partner_keys: ["", ""],
            env: &[],
            dev: true,
            tls: None,
        }
    }
}

/// A running gateway.
pub struct Gateway {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub http: u16,
    /// Plain DICOM; 0 when switched off (TLS gateways).
    pub dicom: u16,
    /// HTTPS and DICOM TLS; 0 without TLS.
    pub https: u16,
    pub dicom_tls: u16,
    log_path: PathBuf,
    config_path: PathBuf,
}

impl Gateway {
    /// Start on a fresh data directory under `work`, with extra `[server]` keys.
    pub fn start(work: &Path, extra_server: &str) -> Gateway {
        let data_dir = work.join("data");
        Self::start_with(work, &data_dir, extra_server)
    }

    /// Start (again) on `data_dir`.
    pub fn start_with(work: &Path, data_dir: &Path, extra_server: &str) -> Gateway {
        Self::start_full(work, data_dir, extra_server, &[])
    }

    /// Start on `data_dir` with extra environment variables (development
    /// identity: `serve --dev`).
    pub fn start_full(
        work: &Path,
        data_dir: &Path,
        extra_server: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        Self::launch(&Launch {
            data_dir: data_dir.to_owned(),
            extra_server,
            env,
            ..Launch::dev(work)
        })
    }

    /// Start in development mode with extra keys in the partners' tables
    /// (st-mary's, city-clinic's), e.g. their limits.
    pub fn start_dev(work: &Path, extra_server: &str, partner_keys: [&str; 2]) -> Gateway {
        Self::launch(&Launch {
            extra_server,
            partner_keys,
            ..Launch::dev(work)
        })
    }

    /// Start with authentication on, the partners' `[[partners.clients]]`
    /// tables (st-mary's, city-clinic's) and extra `[server]` keys.
    pub fn start_secure(work: &Path, extra_server: &str, clients: [&str; 2]) -> Gateway {
        Self::launch(&Launch {
            extra_server,
            partner_keys: clients,
            dev: false,
            ..Launch::dev(work)
        })
    }

    /// Start with authentication on, HTTPS and DICOM TLS with mutual TLS
    /// (the files of `certs.py make certs`: st-mary's client certificate is
    /// `CN=st-mary-pacs`, city-clinic's `CN=city-pacs`), and plain DICOM off.
    pub fn start_tls(work: &Path, certs: &Path, clients: [&str; 2]) -> Gateway {
        Self::start_tls_with(work, certs, clients, "")
    }

    /// [`Gateway::start_tls`] with extra `[server]` keys.
    pub fn start_tls_with(
        work: &Path,
        certs: &Path,
        clients: [&str; 2],
        extra_server: &str,
    ) -> Gateway {
        Self::launch(&Launch {
            extra_server,
            partner_keys: clients,
            dev: false,
            tls: Some(certs),
            ..Launch::dev(work)
        })
    }

    fn launch(how: &Launch) -> Gateway {
        // A free port can be taken by another test between our probe and
        // the gateway's bind: then start again on other ports.
        for _ in 0..3 {
            let mut gw = Self::spawn(how);
            match gw.wait_ready() {
                Ok(()) => return gw,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("gateway did not come up; log:\n{log}"),
            }
        }
        panic!("gateway did not come up: its ports were taken three times");
    }

    fn spawn(how: &Launch) -> Gateway {
        let Launch {
            work,
            ref data_dir,
            extra_server,
            partner_keys: clients,
            env,
            dev,
            tls,
        } = *how;
        let data_dir = data_dir.as_path();
        let http = free_port();
        let mut dicom = free_port();
        let (mut https, mut dicom_tls) = (0, 0);
        let mut tls_server = String::new();
        let mut tls_section = String::new();
        let mut subjects = ["", ""];
        let config_id = dicom;
        if let Some(certs) = tls {
            (https, dicom_tls) = (free_port(), free_port());
            dicom = 0;
            tls_server =
                format!("https = \"127.0.0.1:{https}\"\ndicom_tls = \"127.0.0.1:{dicom_tls}\"\n");
            let file = |name: &str| format!("{:?}", certs.join(name).display().to_string());
            tls_section = format!(
                "[tls]\ncertificate = {}\nprivate_key = {}\nclient_ca = {}\n",
                file("server.pem"),
                file("server.key"),
                file("ca.pem")
            );
            subjects = [
                "certificate_subjects = [\"CN=st-mary-pacs\"]\n",
                "certificate_subjects = [\"cn=city-pacs\"]\n",
            ];
        }
        let dicom_address = if dicom == 0 {
            String::new()
        } else {
            format!("127.0.0.1:{dicom}")
        };
        let config_path = work.join(format!("konsil-{config_id}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "[server]\ndata_dir = {data:?}\nhttp = \"127.0.0.1:{http}\"\ndicom = \"{dicom_address}\"\nshutdown_grace_secs = 60\n{tls_server}{extra_server}\n{tls_section}\
                 [[partners]]\nid = \"st-mary\"\nname = \"St. Mary's Hospital\"\nae_titles = [\"{ST_MARY_AE}\", \"{PY_AE}\"]\n{st_mary_subjects}{st_mary}\n\
                 [[partners]]\nid = \"city-clinic\"\nname = \"City Clinic\"\nae_titles = [\"CITYPACS\", \"ORTHANC\"]\n{city_subjects}{city}\n",
                data = data_dir.display().to_string(),
                st_mary = clients[0],
                city = clients[1],
                st_mary_subjects = subjects[0],
                city_subjects = subjects[1],
            ),
        )
        .unwrap();
        let log_path = work.join(format!("konsil-{config_id}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut args = vec!["--config", config_path.to_str().unwrap(), "serve"];
        if dev {
            args.push("--dev");
        }
        let child = Command::new(env!("CARGO_BIN_EXE_konsil"))
            .args(&args)
            .env("KONSIL_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start konsil");
        Gateway {
            child: Some(child),
            data_dir: data_dir.to_owned(),
            http,
            dicom,
            https,
            dicom_tls,
            log_path,
            config_path,
        }
    }

    /// A staff token from `konsil token` for this gateway's configuration.
    pub fn staff_token(&self, roles: &str) -> String {
        self.staff_token_as(roles, &format!("test-{roles}"))
    }

    /// A staff token for `subject` with `roles`.
    pub fn staff_token_as(&self, roles: &str, subject: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_konsil"))
            .args([
                "--config",
                self.config_path.to_str().unwrap(),
                "token",
                "--role",
                roles,
                "--subject",
                subject,
            ])
            .output()
            .expect("konsil token");
        assert!(
            out.status.success(),
            "konsil token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Wait until both listeners answer; `Err(log)` if the process ended
    /// or 30 s passed.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return Err(self.log());
            }
            let dimse_port = if self.dicom == 0 {
                self.dicom_tls
            } else {
                self.dicom
            };
            if TcpStream::connect(("127.0.0.1", dimse_port)).is_ok()
                && self
                    .try_get("/healthz")
                    .map(|(s, _)| s == 200)
                    .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(self.log())
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A minimal HTTP/1.1 GET (status, body).
    pub fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).expect("HTTP GET")
    }

    /// GET with request headers (status, body).
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request =
            reqwest::blocking::Client::new().get(format!("http://127.0.0.1:{}{path}", self.http));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().expect("HTTP GET");
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM")
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        wait_timeout(&mut child, Duration::from_secs(90)).expect("konsil exits after SIGTERM")
    }

    /// SIGKILL: the crash case.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "KILL");
        let _ = child.wait();
    }

    /// Total bytes in the blob store's segment files.
    pub fn segment_bytes(&self) -> u64 {
        segment_bytes(&self.data_dir)
    }

    /// Indexed instance rows (all partners).
    pub fn instance_count(&self) -> i64 {
        instance_count(&self.data_dir)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A failed test shows what the gateway said (the tail of its log).
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- gateway log (last {} lines) ---\n{}",
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever a test checks, a record the gateway built and its own
        // validator refused (an AuditEvent of the trail, a workflow
        // resource) is a defect: it is lost, or the change it belonged to is.
        if !std::thread::panicking() {
            let log = self.log();
            let refused: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("built an invalid"))
                .collect();
            assert!(
                refused.is_empty(),
                "the gateway built resources its validator refused:\n{}",
                refused.join("\n")
            );
        }
    }
}

/// Total bytes in the blob store's segment files.
/// Bytes the segment files hold, up to each file's last non-zero byte: the
/// store keeps zeroed space ahead of a segment's last record (and zeroes a
/// withdrawn record inside it), which holds no data.
pub fn segment_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("segments"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| used_length(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn used_length(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let mut end = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut block = vec![0u8; 1 << 16];
    while end > 0 {
        let n = end.min(block.len() as u64) as usize;
        file.read_exact_at(&mut block[..n], end - n as u64)
            .expect("read segment");
        if let Some(i) = block[..n].iter().rposition(|b| *b != 0) {
            return end - n as u64 + i as u64 + 1;
        }
        end -= n as u64;
    }
    0
}

/// Bytes the index accounts for: every indexed object plus record framing
/// (at most `slack` bytes per record).
pub fn indexed_bytes(data_dir: &Path) -> (u64, u64) {
    let out = sql(
        data_dir,
        "SELECT COALESCE(SUM(blob_length), 0), COUNT(*) FROM instances",
    );
    let mut f = out.trim().split('\t');
    let bytes = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let rows = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (bytes, rows)
}

/// Count instances straight from the SQLite file, as an operator would.
pub fn instance_count(data_dir: &Path) -> i64 {
    let out = sql(data_dir, "SELECT COUNT(*) FROM instances");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("count: {out}"))
}

/// Run a query with Python's sqlite3 (read-only) and return its rows as TSV.
pub fn sql(data_dir: &Path, query: &str) -> String {
    let db = data_dir.join("index.sqlite");
    let script = "import sqlite3,sys\ncon=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro',uri=True)\nfor r in con.execute(sys.argv[2]): print('\\t'.join('' if v is None else str(v) for v in r))";
    let out = Command::new("python3")
        .args(["-c", script, db.to_str().unwrap(), query])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "sql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// A child process (a peer, a second server) killed when dropped, also
/// when the test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `ready` every 20 ms for up to `timeout`; panic naming `what` if
/// it never holds.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Run a Python peer helper from tests/peers and return its output.
pub fn python(script: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg(peers_dir().join(script))
        .args(args)
        .output()
        .expect("python3")
}

/// Run a peer script against a running gateway; it must succeed and print
/// one JSON document (on failure: its stderr and the gateway's log).
pub fn python_json(gw: &Gateway, script: &str, args: &[&str]) -> serde_json::Value {
    let out = python(script, args);
    assert!(
        out.status.success(),
        "{script} failed:\n{}\nlog:\n{}",
        stderr(&out),
        gw.log()
    );
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("JSON from {script}: {e}"))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One generated or sample file: path and its UIDs.
#[derive(Debug, Clone)]
pub struct DicomFile {
    pub path: PathBuf,
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
}

/// Make test data with tests/peers/dicom_files.py.
pub fn dicom_files(args: &[&str]) -> Vec<DicomFile> {
    let out = python("dicom_files.py", args);
    assert!(
        out.status.success(),
        "dicom_files.py {args:?}: {}",
        stderr(&out)
    );
    stdout(&out)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(DicomFile {
                path: PathBuf::from(f.next()?),
                sop_class: f.next()?.to_owned(),
                sop_instance: f.next()?.to_owned(),
                transfer_syntax: f.next()?.to_owned(),
            })
        })
        .collect()
}

/// pynetdicom store/raw/echo: lines of (status, file, comment).
pub fn pyscu(gw: &Gateway, mode: &str, args: &[&str]) -> Vec<(String, String, String)> {
    let port = gw.dicom.to_string();
    let mut all = vec![mode, "127.0.0.1", port.as_str(), PY_AE, "KONSIL"];
    all.extend_from_slice(args);
    let out = python("pyscu.py", &all);
    assert!(
        out.status.success(),
        "pyscu {all:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, '\t');
            (
                f.next().unwrap_or("").to_owned(),
                f.next().unwrap_or("").to_owned(),
                f.next().unwrap_or("").trim().to_owned(),
            )
        })
        .collect()
}

/// DCMTK echoscu calling `aec` as `aet`.
pub fn echoscu(gw: &Gateway, aet: &str, aec: &str) -> Output {
    Command::new("/usr/bin/echoscu")
        .args(["-aet", aet, "-aec", aec, "127.0.0.1", &gw.dicom.to_string()])
        .output()
        .expect("/usr/bin/echoscu")
}

/// DCMTK storescu with TCP_NODELAY, calling as `aet`.
pub fn storescu(gw: &Gateway, aet: &str, files: &[&Path]) -> Output {
    storescu_cmd(gw, aet, files)
        .output()
        .expect("/usr/bin/storescu")
}

pub fn storescu_cmd(gw: &Gateway, aet: &str, files: &[&Path]) -> Command {
    let mut cmd = Command::new("/usr/bin/storescu");
    cmd.env("TCP_NODELAY", "1")
        .args([
            "-aet",
            aet,
            "-aec",
            "KONSIL",
            "127.0.0.1",
            &gw.dicom.to_string(),
        ])
        .args(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The stored Part 10 object of an indexed instance (by partner, SOP
/// Instance UID and transfer syntax), copied out of its segment into a file
/// next to the data directory.
pub fn stored_blob(data_dir: &Path, partner: &str, sop: &str, ts: &str) -> PathBuf {
    let row = sql(
        data_dir,
        &format!(
            "SELECT blob_object, blob_offset, blob_length FROM instances WHERE partner = '{partner}' AND sop_instance_uid = '{sop}' AND transfer_syntax = '{ts}'"
        ),
    );
    let row = row
        .lines()
        .next()
        .unwrap_or_else(|| panic!("{sop} ({ts}) not indexed"));
    let mut f = row.split('\t');
    let (object, offset, length) = (
        f.next().unwrap(),
        f.next().unwrap().parse::<u64>().unwrap(),
        f.next().unwrap().parse::<usize>().unwrap(),
    );
    let segment = std::fs::read(data_dir.join("segments").join(object)).unwrap();
    let start = offset as usize;
    let bytes = &segment[start..start + length];
    let out = data_dir
        .parent()
        .unwrap()
        .join(format!("stored-{partner}-{sop}-{ts}.dcm"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// Compare the data set of a stored blob with the sent file (pydicom).
pub fn assert_same_data_set(sent: &Path, stored: &Path) {
    let out = python(
        "compare.py",
        &[sent.to_str().unwrap(), stored.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{} differs from what was sent:\n{}{}",
        sent.display(),
        stdout(&out),
        stderr(&out)
    );
}

/// Where tests/run installs the Node peers.
pub fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/node/node_modules")
}

/// Run @medplum/core and FHIR.js over `resources`.
pub fn public_validators(resources: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("resources.json");
    std::fs::write(&input, serde_json::to_vec(resources).unwrap()).unwrap();
    let out = Command::new("node")
        // @medplum/core 5 expects Node 22's global WebSocket.
        .arg("--experimental-websocket")
        .arg(peers_dir().join("fhir_validate.mjs"))
        .arg(&input)
        .env("KONSIL_NODE_MODULES", node_modules())
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "fhir_validate.mjs: {}",
        stderr(&out).chars().take(2000).collect::<String>()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("validator report");
    report.as_array().unwrap().clone()
}

/// An access token for `client` (its keys in `<work>/keys`, see
/// [`test_clients`]) with `scope`, by SMART Backend Services (`auth.py`).
pub fn partner_token(gw: &Gateway, work: &Path, client: &str, scope: &str) -> String {
    let keys = work.join("keys");
    let root = format!("http://127.0.0.1:{}", gw.http);
    let v = python_json(
        gw,
        "auth.py",
        &["token", &root, keys.to_str().unwrap(), client, scope],
    );
    v["access_token"].as_str().expect("access_token").to_owned()
}

/// Make the test clients' keys; the `[[partners.clients]]` tables of
/// st-mary and city-clinic that register them.
pub fn test_clients(keys: &Path) -> [String; 2] {
    let out = python("auth.py", &["keys", keys.to_str().unwrap()]);
    assert!(out.status.success(), "auth.py keys: {}", stderr(&out));
    let jwks = |client: &str| {
        keys.join(format!("{client}.jwks.json"))
            .display()
            .to_string()
    };
    [
        format!(
            "[[partners.clients]]\nclient_id = \"st-mary-ehr\"\njwks_file = {:?}\nscopes = [\"system/*.cruds\"]\n\
             [[partners.clients]]\nclient_id = \"st-mary-viewer\"\njwks_file = {:?}\nscopes = [\"system/DiagnosticReport.rs\", \"system/ImagingStudy.rs\"]\n",
            jwks("st-mary-ehr"),
            jwks("st-mary-viewer")
        ),
        format!(
            "[[partners.clients]]\nclient_id = \"city-clinic-ehr\"\njwks_file = {:?}\nscopes = [\"system/*.rs\", \"system/Patient.c\"]\n",
            jwks("city-clinic-ehr")
        ),
    ]
}

/// pynetdicom associates as `PY_AE` (St. Mary's) and holds the association
/// for `seconds`; returns once it is established (pyscu.py prints "held").
pub fn hold_association(gw: &Gateway, seconds: u32) -> Child {
    hold_association_on(gw.dicom, None, seconds)
}

/// [`hold_association`] on `port`, over TLS with a client certificate
/// when `tls` is given (certificate, key and CA files).
pub fn hold_association_on(port: u16, tls: Option<[&Path; 3]>, seconds: u32) -> Child {
    let (holder, printed) = pyscu_holding(port, tls, "hold", seconds, &[]);
    assert!(printed.is_empty(), "pyscu.py hold printed {printed:?}");
    holder
}

/// pynetdicom as `PY_AE` on `port` in `mode` (`hold`, or `store-hold`
/// with `files`), holding its association for `seconds`: once it is held,
/// the process and the lines it printed before "held" (one status per
/// stored file).
pub fn pyscu_holding(
    port: u16,
    tls: Option<[&Path; 3]>,
    mode: &str,
    seconds: u32,
    files: &[&Path],
) -> (Child, Vec<String>) {
    let mut command = Command::new("python3");
    if let Some([cert, key, ca]) = tls {
        command.env(
            "PYSCU_TLS",
            format!("{}:{}:{}", cert.display(), key.display(), ca.display()),
        );
    }
    let mut holder = command
        .arg(peers_dir().join("pyscu.py"))
        .args([
            mode,
            "127.0.0.1",
            &port.to_string(),
            PY_AE,
            "KONSIL",
            &seconds.to_string(),
        ])
        .args(files)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::BufRead;
    let mut printed = Vec::new();
    for line in std::io::BufReader::new(holder.stdout.take().expect("piped")).lines() {
        let line = line.expect("pyscu.py output");
        if line == "held" {
            return (holder, printed);
        }
        printed.push(line);
    }
    let _ = holder.kill();
    let _ = holder.wait();
    panic!("pyscu.py {mode} did not hold its association; it printed {printed:?}");
}

/// The AuditEvents of DICOM stores ("Instances Transferred") in the store
/// of `data_dir`, read directly (also while the gateway is down).
pub fn store_events(data_dir: &Path) -> Vec<serde_json::Value> {
    sql(
        data_dir,
        "SELECT body FROM fhir_resource WHERE type = 'AuditEvent' AND body LIKE '%\"110104\"%'",
    )
    .lines()
    .map(|l| serde_json::from_str(l).expect("a stored AuditEvent"))
    .collect()
}
