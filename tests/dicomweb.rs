//! DICOMweb edge against real clients: the Python dicomweb-client, curl with
//! hand-built multipart bodies, and Orthanc's DICOMweb plugin as a STOW
//! client.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const PARTNER: &str = "st-mary";

/// The tests of this file run one at a time: the browser test's page loads
/// are timed by headless Chromium's virtual time, which a 1 GiB transfer
/// beside it on two cores can outrun.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
const OTHER: &str = "city-clinic";
const CT_CLASS: &str = "1.2.840.10008.5.1.4.1.1.2";

fn base(gw: &Gateway) -> String {
    format!("http://127.0.0.1:{}/dicomweb", gw.http)
}

/// Frames `list` of the stored instance of file `path` as
/// application/octet-stream in transfer syntax `ts`, each compared with the
/// file's own frame.
fn frames_as(gw: &Gateway, path: &str, list: &str, ts: &str) -> Value {
    dicomweb(
        gw,
        PARTNER,
        "frames",
        &[path, list, "application/octet-stream", ts],
    )
}

/// Run tests/peers/dicomweb.py and parse its JSON output.
fn dicomweb(gw: &Gateway, partner: &str, cmd: &str, args: &[&str]) -> Value {
    let b = base(gw);
    let mut all = vec![cmd, b.as_str(), partner];
    all.extend_from_slice(args);
    let out = python("dicomweb.py", &all);
    assert!(
        out.status.success(),
        "dicomweb.py {all:?}: {}\n{}\nlog:\n{}",
        stdout(&out),
        stderr(&out),
        gw.log()
    );
    serde_json::from_str(&stdout(&out)).expect("JSON from dicomweb.py")
}

/// What curl saw: status, response headers (lowercase names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn curl(args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args([
            "-sS",
            "-D",
            head.to_str().unwrap(),
            "-o",
            body.to_str().unwrap(),
        ])
        .args(args)
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {args:?}: {}", stderr(&out));
    let head = std::fs::read_to_string(head).unwrap();
    // The last response's headers (after any 100 Continue).
    let last = head
        .rsplit("\r\n\r\n")
        .find(|b| b.starts_with("HTTP/"))
        .unwrap_or("");
    let mut lines = last.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read(body).unwrap_or_default(),
    }
}

/// A multipart/related body of `parts` (content type, bytes), optionally
/// with a Content-Length on each part.
fn multipart(boundary: &str, parts: &[(&str, Vec<u8>)], part_lengths: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (content_type, bytes) in parts {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: {content_type}\r\n").as_bytes(),
        );
        if part_lengths {
            out.extend_from_slice(format!("Content-Length: {}\r\n", bytes.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// POST a multipart body file of DICOM parts with `boundary` to `url`.
fn stow_parts(url: &str, boundary: &str, body: &Path, extra: &[&str]) -> Reply {
    let content_type =
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    post(url, &content_type, body, extra)
}

/// POST a body file to `url` with curl.
fn post(url: &str, content_type: &str, body: &Path, extra: &[&str]) -> Reply {
    let mut args = vec!["-X", "POST", "-H", "X-Konsil-Partner: st-mary", "-H"];
    let ct = format!("Content-Type: {content_type}");
    args.push(&ct);
    let data = format!("@{}", body.display());
    args.extend_from_slice(&["--data-binary", &data]);
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

fn seq_len(response: &Value, tag: &str) -> usize {
    response[tag]["Value"].as_array().map(Vec::len).unwrap_or(0)
}

fn failure_reasons(response: &Value) -> Vec<u64> {
    response["00081198"]["Value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["00081197"]["Value"][0].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dicomweb_client_stores_searches_and_retrieves_unchanged() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "");
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "4",
        "PID-WEB-1",
        "ACC-WEB-1",
    ]);
    let samples = dicom_files(&["samples", work.path().join("samples").to_str().unwrap()]);
    // Samples whose file meta names another instance than their data set,
    // or without StudyInstanceUID: refused with 0xA900, the rest stored.
    let refused = ["JPEGLSNearLossless_08.dcm", "rtdose.dcm", "rtplan.dcm"];
    let (bad, good): (Vec<&DicomFile>, Vec<&DicomFile>) = samples
        .iter()
        .partition(|f| refused.iter().any(|r| f.path.ends_with(r)));
    assert_eq!(bad.len(), 3);
    let mut files: Vec<&DicomFile> = ct.iter().collect();
    files.extend(&good);
    let mut paths: Vec<&str> = files.iter().map(|f| f.path.to_str().unwrap()).collect();
    paths.extend(bad.iter().map(|f| f.path.to_str().unwrap()));

    // Store everything in one request.
    let stored = dicomweb(&gw, PARTNER, "store", &paths);
    assert_eq!(seq_len(&stored, "00081199"), files.len(), "{stored}");
    assert_eq!(failure_reasons(&stored), vec![0xA900; 3], "{stored}");
    let retrieve_url = stored["00081199"]["Value"][0]["00081190"]["Value"][0]
        .as_str()
        .unwrap();
    // (dicomweb-client sends a Host header without the port, so the URL is
    // checked by its path.)
    assert!(
        retrieve_url.starts_with("http://127.0.0.1") && retrieve_url.contains("/dicomweb/studies/"),
        "{retrieve_url}"
    );
    assert_eq!(gw.instance_count() as usize, files.len());

    // The CT study read back.
    let ct0 = &ct[0];
    let head = study_and_series(ct0.path.to_str().unwrap());
    let study = head[0].as_str().unwrap().to_owned();
    let series = head[1].as_str().unwrap().to_owned();

    // QIDO at every level.
    let studies = dicomweb(&gw, PARTNER, "search", &["studies", "PatientID=PID-WEB-1"]);
    assert_eq!(studies.as_array().unwrap().len(), 1, "{studies}");
    let s = &studies[0];
    assert_eq!(s["0020000D"]["Value"][0], study.as_str());
    assert_eq!(
        s["00201208"]["Value"][0], 4,
        "NumberOfStudyRelatedInstances"
    );
    assert_eq!(s["00080061"]["Value"], serde_json::json!(["CT"]));
    assert_eq!(s["00080050"]["Value"][0], "ACC-WEB-1");
    assert!(
        s["00100010"]["Value"][0]["Alphabetic"].is_string(),
        "PN as object: {s}"
    );

    // PatientName wildcard, case-insensitive; fuzzy matching accepted.
    let name = s["00100010"]["Value"][0]["Alphabetic"]
        .as_str()
        .unwrap()
        .to_owned();
    let prefix = |n: usize| name.chars().take(n).collect::<String>();
    let pattern = format!("PatientName={}*", prefix(3).to_lowercase());
    let by_name = dicomweb(&gw, PARTNER, "search", &["studies", &pattern]);
    assert!(by_name
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["0020000D"]["Value"][0] == study.as_str()));
    let fuzzy = format!("PatientName={}", prefix(2));
    let by_fuzzy = dicomweb(
        &gw,
        PARTNER,
        "search",
        &["studies", &fuzzy, "fuzzymatching=true"],
    );
    assert!(by_fuzzy
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["0020000D"]["Value"][0] == study.as_str()));
    let none = dicomweb(
        &gw,
        PARTNER,
        "search",
        &["studies", "PatientName=nobody-like-this*"],
    );
    assert_eq!(none.as_array().unwrap().len(), 0);

    // Modalities, dates, study UID lists, limit.
    let all = dicomweb(&gw, PARTNER, "search", &["studies"]);
    let total = all.as_array().unwrap().len();
    assert!(total >= 2, "{all}");
    let ct_only = dicomweb(&gw, PARTNER, "search", &["studies", "ModalitiesInStudy=CT"]);
    assert!(ct_only
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["00080061"]["Value"]
            .as_array()
            .unwrap()
            .contains(&Value::from("CT"))));
    let limited = dicomweb(&gw, PARTNER, "search", &["studies", "limit=1"]);
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let offset = dicomweb(
        &gw,
        PARTNER,
        "search",
        &["studies", "limit=1000", "offset=1"],
    );
    assert_eq!(offset.as_array().unwrap().len(), total - 1);

    let series_found = dicomweb(&gw, PARTNER, "search", &["series", &study]);
    assert_eq!(series_found.as_array().unwrap().len(), 1);
    assert_eq!(series_found[0]["00201209"]["Value"][0], 4);
    let instances = dicomweb(&gw, PARTNER, "search", &["instances", &study, &series]);
    assert_eq!(instances.as_array().unwrap().len(), 4);
    assert!(instances
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["00080016"]["Value"][0] == CT_CLASS));
    let one = format!("SOPInstanceUID={}", ct0.sop_instance);
    let by_sop = dicomweb(&gw, PARTNER, "search", &["instances", &one]);
    assert_eq!(by_sop.as_array().unwrap().len(), 1);
    // includefield (dicomweb-client repeats the parameter per field): a
    // non-default attribute comes back.
    let with_desc = dicomweb(
        &gw,
        PARTNER,
        "search",
        &[
            "studies",
            "PatientID=PID-WEB-1",
            "includefield=StudyDescription,00100021",
        ],
    );
    assert!(with_desc[0].get("00081030").is_some(), "{with_desc}");

    // The same searches as a viewer writes them by hand (curl sends the
    // query exactly as written): each matching rule through the index.
    let qido = |query: &str| -> Reply {
        curl(&[
            "-H",
            "X-Konsil-Partner: st-mary",
            &format!("{}/{query}", base(&gw)),
        ])
    };
    let uids = |reply: &Reply, tag: &str| -> Vec<String> {
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[tag]["Value"][0].as_str().unwrap().to_owned())
            .collect()
    };
    const STUDY_UID: &str = "0020000D";
    // The generated CT is dated 2026-01-01.
    for (query, found) in [
        ("studies?StudyDate=20251201-20260131", true),
        ("studies?StudyDate=20260101", true),
        ("studies?StudyDate=-20251231", false),
        ("studies?StudyDate=20260102-", false),
        ("studies?AccessionNumber=ACC-WEB-1", true),
        ("studies?AccessionNumber=ACC-WEB-2", false),
    ] {
        let got = uids(&qido(query), STUDY_UID);
        assert_eq!(got.contains(&study), found, "{query}: {got:?}");
    }
    let listed = uids(
        &qido(&format!(
            "studies?StudyInstanceUID={study},1.2.826.0.1.3680043.8.498.999"
        )),
        STUDY_UID,
    );
    assert_eq!(
        listed,
        [study.as_str()],
        "a UID list matches any of its UIDs"
    );
    let series_everywhere = uids(&qido("series?Modality=CT"), "0020000E");
    assert!(series_everywhere.contains(&series), "{series_everywhere:?}");
    let in_study = qido(&format!("studies/{study}/instances"));
    assert_eq!(uids(&in_study, "00080018").len(), 4);
    let everything = qido("studies?PatientID=PID-WEB-1&includefield=all").json();
    let comma = qido("studies?PatientID=PID-WEB-1&includefield=StudyDescription,00100021").json();
    for (answer, name) in [(&everything, "all"), (&comma, "comma-separated")] {
        assert!(
            answer[0].get("00081030").is_some(),
            "includefield {name}: {answer}"
        );
    }
    let ignored =
        qido("studies?PatientID=PID-WEB-1&RequestAttributesSequence.RequestedProcedureID=7");
    assert_eq!(uids(&ignored, STUDY_UID), [study.as_str()]);
    assert!(
        ignored
            .all("warning")
            .iter()
            .any(|w| w.contains("RequestAttributesSequence.RequestedProcedureID")),
        "{:?}",
        ignored.headers
    );

    // Another partner sees nothing of it.
    let theirs = dicomweb(&gw, OTHER, "search", &["studies"]);
    assert_eq!(
        theirs.as_array().unwrap().len(),
        0,
        "partner isolation: {theirs}"
    );
    let (status, _) = gw.get(&format!("/dicomweb/studies/{study}/metadata"));
    assert_eq!(status, 200, "staff read every partner's studies");
    let reply = curl(&[
        "-H",
        "X-Konsil-Partner: city-clinic",
        &format!("{}/studies/{study}", base(&gw)),
    ]);
    assert_eq!(
        reply.status, 404,
        "another partner's study does not exist for them"
    );

    // WADO-RS: study, series, instance, every data set equal to what was sent.
    let ct_paths: Vec<&str> = ct.iter().map(|f| f.path.to_str().unwrap()).collect();
    let mut args = vec![study.as_str(), "--"];
    args.extend(&ct_paths);
    let got = dicomweb(&gw, PARTNER, "retrieve", &args);
    assert_eq!(got["retrieved"], 4);
    assert_eq!(got["identical"], 4, "{got}");
    let mut args = vec![study.as_str(), series.as_str(), "--"];
    args.extend(&ct_paths);
    assert_eq!(dicomweb(&gw, PARTNER, "retrieve", &args)["identical"], 4);
    // Six MR_small samples share one SOP Instance UID (a conflict): every
    // version is kept, the last one sent is served.
    let latest = |f: &&&DicomFile| {
        files
            .iter()
            .rev()
            .find(|g| g.sop_instance == f.sop_instance)
            .is_some_and(|g| g.path == f.path)
    };
    for f in files.iter().filter(latest) {
        let head = study_and_series(f.path.to_str().unwrap());
        let args = [
            head[0].as_str().unwrap(),
            head[1].as_str().unwrap(),
            f.sop_instance.as_str(),
            "--",
            f.path.to_str().unwrap(),
        ];
        let got = dicomweb(&gw, PARTNER, "retrieve", &args);
        assert_eq!(
            got["identical"],
            1,
            "{} ({}): {got}",
            f.path.display(),
            f.transfer_syntax
        );
    }

    // Metadata: PS3.18 F.2 rules, pixel data as a BulkDataURI; the second
    // request is answered from the cache, without re-reading the objects.
    let meta = dicomweb(&gw, PARTNER, "metadata", &[&study]);
    assert_eq!(meta["count"], 4);
    assert_eq!(meta["violations"], serde_json::json!([]), "{meta}");
    assert_eq!(meta["patient_ids"], serde_json::json!(["PID-WEB-1"]));
    let bulk = meta["bulk"].as_array().unwrap();
    assert_eq!(bulk.len(), 4, "{meta}");
    assert!(bulk[0].as_str().unwrap().ends_with("/bulkdata/7FE00010"));
    assert_eq!(
        sql(&gw.data_dir, "SELECT count(*) FROM instance_metadata").trim(),
        "4"
    );
    let meta_again = dicomweb(&gw, PARTNER, "metadata", &[&study, &series]);
    assert_eq!(meta_again["count"], 4);
    // The bulk data URI serves the pixel data.
    let path = bulk[0].as_str().unwrap().split_once("/dicomweb").unwrap().1;
    let pixels = curl(&[
        "-H",
        "Accept: multipart/related; type=application/octet-stream",
        &format!("{}{path}", base(&gw)),
    ]);
    assert_eq!(pixels.status, 200);
    assert!(pixels.body.len() > 512 * 512 * 2, "{}", pixels.body.len());

    // Frames: native (default transfer syntax) and compressed as stored.
    let frames = frames_as(&gw, ct0.path.to_str().unwrap(), "1", "1.2.840.10008.1.2.1");
    assert_eq!(frames[0]["equal"], true, "{frames}");
    let multiframe = samples
        .iter()
        .find(|f| f.path.ends_with("emri_small.dcm"))
        .unwrap();
    let frames = frames_as(
        &gw,
        multiframe.path.to_str().unwrap(),
        "1,3,10",
        "1.2.840.10008.1.2.1",
    );
    assert!(
        frames
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["equal"] == true),
        "{frames}"
    );
    for name in [
        "SC_rgb_jpeg_dcmtk.dcm",
        "JPEG2000.dcm",
        "JPEG-LL.dcm",
        "MR_small_RLE.dcm",
    ] {
        let f = samples.iter().find(|f| f.path.ends_with(name)).unwrap();
        let frames = frames_as(&gw, f.path.to_str().unwrap(), "1", "*");
        assert_eq!(frames[0]["equal"], true, "{name}: {frames}");
    }
    // Multi-frame encapsulated (RLE, one fragment per frame; J2K): frames
    // cut by fragments. Each is a new version of emri_small's instance.
    for name in ["emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"] {
        let path = python_json(&[
            "-c",
            "import sys,json; from pydicom.data import get_testdata_file; print(json.dumps(get_testdata_file(sys.argv[1])))",
            name,
        ]);
        let path = path.as_str().unwrap();
        let stored = dicomweb(&gw, PARTNER, "store", &[path]);
        assert_eq!(seq_len(&stored, "00081199"), 1, "{stored}");
        let frames = frames_as(&gw, path, "1,2,10", "*");
        assert!(
            frames
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["equal"] == true),
            "{name}: {frames}"
        );
    }
    // A compressed instance cannot be served uncompressed: 406 naming what can.
    let jpeg = samples
        .iter()
        .find(|f| f.path.ends_with("SC_rgb_jpeg_dcmtk.dcm"))
        .unwrap();
    let url = format!("{}/frames/1", instance_url(&gw, jpeg));
    let refused = curl(&["-H", "Accept: multipart/related; type=\"application/octet-stream\"; transfer-syntax=1.2.840.10008.1.2.1", &url]);
    assert_eq!(refused.status, 406);
    assert!(String::from_utf8_lossy(&refused.body).contains("1.2.840.10008.1.2.4.50"));
    // OHIF's Accept (type unquoted, transfer-syntax=*).
    let ohif = curl(&[
        "-H",
        "Accept: multipart/related; type=application/octet-stream; transfer-syntax=*",
        &url,
    ]);
    assert_eq!(ohif.status, 200);
    assert!(ohif
        .header("content-type")
        .unwrap()
        .starts_with("multipart/related"));
    // A deflated instance's values cannot be cut out of it: 406, not a 500.
    let deflated = samples
        .iter()
        .find(|f| f.path.ends_with("image_dfl.dcm"))
        .unwrap();
    let url = format!("{}/frames/1", instance_url(&gw, deflated));
    let r = curl(&[
        "-H",
        "X-Konsil-Partner: st-mary",
        "-H",
        "Accept: multipart/related; type=application/octet-stream; transfer-syntax=*",
        &url,
    ]);
    assert_eq!(r.status, 406, "{}", String::from_utf8_lossy(&r.body));
    gw.terminate();
}

/// The WADO-RS URL of a stored file's instance.
fn instance_url(gw: &Gateway, file: &DicomFile) -> String {
    let uids = study_and_series(file.path.to_str().unwrap());
    format!(
        "{}/studies/{}/series/{}/instances/{}",
        base(gw),
        uids[0].as_str().unwrap(),
        uids[1].as_str().unwrap(),
        file.sop_instance
    )
}

/// One new tiny instance in `dir/name`.
fn fresh_tiny(dir: &Path, name: &str) -> std::path::PathBuf {
    dicom_files(&["tiny", dir.join(name).to_str().unwrap(), "1"])
        .remove(0)
        .path
}

/// The Study and Series Instance UIDs of a file, as JSON [study, series].
fn study_and_series(path: &str) -> Value {
    python_json(&[
        "-c",
        "import pydicom,sys,json; d=pydicom.dcmread(sys.argv[1]); print(json.dumps([d.StudyInstanceUID, d.SeriesInstanceUID]))",
        path,
    ])
}

/// Run python3 with `args` and parse its stdout as JSON.
fn python_json(args: &[&str]) -> Value {
    let out = Command::new("python3").args(args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// A STOW-RS request whose client goes away midway still leaves its
/// AuditEvent, naming the instance it stored before the cut; no note of an
/// unaudited transfer is left in the index.
#[test]
fn a_stow_request_cut_by_its_client_is_audited_with_what_it_stored() {
    use std::io::Write;
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "");
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "2"]);
    let first = std::fs::read(&tiny[0].path).unwrap();
    let second = std::fs::read(&tiny[1].path).unwrap();
    let mut body = multipart("cut", &[("application/dicom", first)], false);
    // Drop the closing delimiter; the second part stops halfway.
    body.truncate(body.len() - "--cut--\r\n".len());
    body.extend_from_slice(b"--cut\r\nContent-Type: application/dicom\r\n\r\n");
    body.extend_from_slice(&second[..second.len() / 2]);
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", gw.http)).unwrap();
    let head = format!(
        "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Konsil-Partner: st-mary\r\n\
         Content-Type: multipart/related; type=\"application/dicom\"; boundary=cut\r\n\
         Content-Length: {}\r\n\r\n",
        body.len() + second.len()
    );
    socket.write_all(head.as_bytes()).unwrap();
    socket.write_all(&body).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while gw.instance_count() < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(gw.instance_count(), 1, "the first part is stored");
    drop(socket);

    let study = sql(&gw.data_dir, "SELECT study_uid FROM instances");
    let wanted = format!("urn:oid:{}", study.trim());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let event = loop {
        let events = store_events(&gw.data_dir);
        let found = events
            .iter()
            .find(|e| e["entity"][0]["what"]["identifier"]["value"] == wanted.as_str());
        match found {
            Some(event) => break event.clone(),
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            None => panic!("no AuditEvent names the stored study: {events:?}"),
        }
    };
    assert_eq!(event["action"], "C", "{event}");
    assert_eq!(
        event["entity"][0]["description"], "1 instance(s)",
        "{event}"
    );
    assert_ne!(
        event["outcome"], "0",
        "the request did not succeed: {event}"
    );
    assert_eq!(
        sql(&gw.data_dir, "SELECT count(*) FROM transfers_unaudited").trim(),
        "0"
    );
}

#[test]
fn hand_built_multipart_bodies_get_ps3_18_answers() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    // (The extra text lands after [server]; a new table starts here.)
    let gw = Gateway::start(
        work.path(),
        "[dicomweb]\nmax_part_bytes = 4000000\ncors_origins = [\"http://viewer.test\"]",
    );
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "4"]);
    let bytes: Vec<Vec<u8>> = tiny
        .iter()
        .map(|f| std::fs::read(&f.path).unwrap())
        .collect();
    let studies = format!("{}/studies", base(&gw));
    let body_path = work.path().join("body");
    let write = |b: &[u8]| std::fs::write(&body_path, b).unwrap();

    // Quoted type, per-part Content-Length, Content-Length on the request.
    write(&multipart(
        "b1",
        &[("application/dicom", bytes[0].clone())],
        true,
    ));
    let r = stow_parts(&studies, "b1", &body_path, &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/dicom+json"));
    assert_eq!(seq_len(&r.json(), "00081199"), 1);

    // Unquoted type, no part lengths, chunked request.
    write(&multipart(
        "Boundary_With-Odd.chars",
        &[("application/dicom", bytes[1].clone())],
        false,
    ));
    let r = post(
        &studies,
        "multipart/related; type=application/dicom; boundary=\"Boundary_With-Odd.chars\"",
        &body_path,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // A re-sent identical instance is success.
    let r = post(
        &studies,
        "multipart/related; type=application/dicom; boundary=Boundary_With-Odd.chars",
        &body_path,
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(gw.instance_count(), 2);

    // A part that is not DICOM among good ones: 202, one failure, a Warning.
    write(&multipart(
        "mixed",
        &[
            ("application/dicom", bytes[2].clone()),
            (
                "application/dicom",
                b"this is not a DICOM file at all".repeat(10),
            ),
            ("application/dicom", bytes[3].clone()),
        ],
        false,
    ));
    let r = stow_parts(&studies, "mixed", &body_path, &[]);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let json = r.json();
    assert_eq!(seq_len(&json, "00081199"), 2);
    assert_eq!(failure_reasons(&json), vec![0xC000]);
    assert!(!r.all("warning").is_empty(), "Warning header on 202");
    assert_eq!(gw.instance_count(), 4);

    // All bad: 409, a failure for every part. Garbage after a valid header,
    // no StudyInstanceUID, an invalid UID, and a truncated instance.
    let out = python(
        "dicom_files.py",
        &["bad", work.path().join("bad").to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut parts: Vec<(&str, Vec<u8>)> = stdout(&out)
        .lines()
        .filter(|l| !l.contains("conflict"))
        .map(|l| ("application/dicom", std::fs::read(l.trim()).unwrap()))
        .collect();
    let whole = std::fs::read(fresh_tiny(work.path(), "cut")).unwrap();
    parts.push(("application/dicom", whole[..whole.len() - 20].to_vec()));
    assert!(!parts.is_empty());
    write(&multipart("bad", &parts, true));
    let r = stow_parts(&studies, "bad", &body_path, &[]);
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let reasons = failure_reasons(&r.json());
    assert_eq!(
        reasons.len(),
        parts.len(),
        "a failure for every part: {reasons:?}"
    );
    assert!(reasons.iter().all(|r| *r != 0), "{reasons:?}");
    assert_eq!(gw.instance_count(), 4, "nothing of the bad parts stored");

    // Study UID in the path that the instance does not belong to: 0x0110.
    let fresh = fresh_tiny(work.path(), "tiny2");
    write(&multipart(
        "s",
        &[("application/dicom", std::fs::read(&fresh).unwrap())],
        false,
    ));
    let r = stow_parts(&format!("{studies}/1.2.3.4"), "s", &body_path, &[]);
    assert_eq!(r.status, 409);
    assert_eq!(failure_reasons(&r.json()), vec![0x0110]);

    // XML when asked.
    let r = stow_parts(
        &studies,
        "s",
        &body_path,
        &["-H", "Accept: application/dicom+xml"],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/dicom+xml"));
    let xml = String::from_utf8_lossy(&r.body);
    assert!(
        xml.contains("<NativeDicomModel") && xml.contains("tag=\"00081199\""),
        "{xml}"
    );

    // Media types and malformed requests.
    let r = post(&studies, "application/json", &body_path, &[]);
    assert_eq!(r.status, 415);
    let r = post(
        &studies,
        "multipart/related; type=\"application/dicom+json\"; boundary=s",
        &body_path,
        &[],
    );
    assert_eq!(r.status, 415);
    let r = post(
        &studies,
        "multipart/related; type=\"application/dicom\"",
        &body_path,
        &[],
    );
    assert_eq!(r.status, 400, "no boundary");
    write(b"--x\r\nContent-Type: application/dicom\r\n\r\nnot closed");
    let r = stow_parts(&studies, "x", &body_path, &[]);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));

    // Staff have no partner to store under.
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: multipart/related; type=\"application/dicom\"; boundary=s",
        "--data-binary",
        &format!("@{}", body_path.display()),
        &studies,
    ]);
    assert_eq!(r.status, 403);

    // Bad UIDs in paths are 400, unknown ones 404, never 500.
    assert_eq!(gw.get("/dicomweb/studies/1.02.3/metadata").0, 400);
    assert_eq!(gw.get("/dicomweb/studies/abc").0, 400);
    assert_eq!(gw.get("/dicomweb/studies/1.2.3.999").0, 404);
    assert_eq!(gw.get("/dicomweb/studies?StudyDate=yesterday").0, 400);
    // A key we do not support is ignored (PS3.18 8.3.4), with a Warning.
    assert_eq!(gw.get("/dicomweb/studies?NoSuchKey=1").0, 200);

    // A part over max_part_bytes: 413.
    let mut huge = bytes[0].clone();
    huge.resize(5_000_000, 0);
    write(&multipart("h", &[("application/dicom", huge)], false));
    let r = stow_parts(&studies, "h", &body_path, &[]);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));

    // CORS for the configured viewer origin, preflight included.
    let r = curl(&[
        "-X",
        "OPTIONS",
        "-H",
        "Origin: http://viewer.test",
        "-H",
        "Access-Control-Request-Method: GET",
        "-H",
        "Access-Control-Request-Headers: accept",
        &studies,
    ]);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://viewer.test"),
        "{:?}",
        r.headers
    );
    let r = curl(&["-H", "Origin: http://elsewhere.test", &studies]);
    assert_eq!(r.header("access-control-allow-origin"), None);

    // ETag / Last-Modified on retrieve, frames and bulk data; 304 when the
    // client's copy is current (a viewer re-fetching a frame it holds). The
    // bodies are multipart, whose boundary differs per response: weak tags.
    let instance = instance_url(&gw, &tiny[0]);
    for part in ["", "/frames/1", "/bulkdata/7FE00010"] {
        let url = format!("{instance}{part}");
        let get = |if_none_match: &str| {
            curl(&[
                "-H",
                "X-Konsil-Partner: st-mary",
                "-H",
                &format!("If-None-Match: {if_none_match}"),
                &url,
            ])
        };
        let r = get("W/\"another\"");
        assert_eq!(r.status, 200, "{part}");
        assert!(r.header("last-modified").is_some(), "{part}");
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
        let etag = r.header("etag").expect("ETag").to_owned();
        assert!(etag.starts_with("W/\""), "{part}: {etag}");
        assert_eq!(get(&etag).status, 304, "{part}");
        if part == "/frames/1" {
            // A malformed frame list is a 400, whatever the client holds.
            let bad = curl(&[
                "-H",
                "X-Konsil-Partner: st-mary",
                "-H",
                &format!("If-None-Match: {etag}"),
                &format!("{instance}/frames/0"),
            ]);
            assert_eq!(bad.status, 400);
        }
    }

    // QIDO limit truncation is announced.
    let r = curl(&[&format!("{studies}?limit=1")]);
    assert_eq!(r.status, 200);
    assert!(
        r.all("warning")
            .iter()
            .any(|w| w.contains("additional results")),
        "{:?}",
        r.headers
    );
    gw.terminate();
}

#[test]
fn orthanc_dicomweb_plugin_pushes_a_study_by_stow() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "");
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "5",
        "PID-ORTHANC-STOW",
        "ACC-OS",
    ]);
    let mut args = vec![
        "stow".to_owned(),
        work.path().join("orthanc").to_str().unwrap().to_owned(),
        gw.http.to_string(),
        PARTNER.to_owned(),
    ];
    args.extend(ct.iter().map(|f| f.path.to_str().unwrap().to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python("orthanc.py", &args);
    assert!(
        out.status.success(),
        "orthanc stow: {}\n{}\nlog:\n{}",
        stdout(&out),
        stderr(&out),
        gw.log()
    );
    assert_eq!(gw.instance_count(), 5);
    let sources = sql(
        &gw.data_dir,
        "SELECT DISTINCT source || '/' || partner FROM instances",
    );
    assert_eq!(sources.trim(), "stow/st-mary");
    for f in &ct {
        let stored = stored_blob(&gw.data_dir, PARTNER, &f.sop_instance, &f.transfer_syntax);
        assert_same_data_set(&f.path, &stored);
    }
    gw.terminate();
}

#[test]
fn a_1_gib_stow_and_its_retrieve_keep_memory_flat() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "");
    // The fixed start-up cost (compiled FHIR definitions, pools) is not
    // what this bounds: the growth over it is.
    let baseline = gw.peak_rss_kib() / 1024;
    let big = dicom_files(&["big", work.path().join("big.dcm").to_str().unwrap(), "1024"]);
    let big = &big[0];
    // The body is the file between a part header and the closing boundary,
    // sent chunked from disk by curl.
    let body = work.path().join("body");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&body).unwrap();
        f.write_all(b"--big\r\nContent-Type: application/dicom\r\n\r\n")
            .unwrap();
        let mut src = std::fs::File::open(&big.path).unwrap();
        std::io::copy(&mut src, &mut f).unwrap();
        f.write_all(b"\r\n--big--\r\n").unwrap();
    }
    std::fs::remove_file(&big.path).ok();
    let r = curl(&[
        "-X",
        "POST",
        "-H",
        "X-Konsil-Partner: st-mary",
        "-H",
        "Content-Type: multipart/related; type=\"application/dicom\"; boundary=big",
        "-H",
        "Transfer-Encoding: chunked",
        "-T",
        body.to_str().unwrap(),
        &format!("{}/studies", base(&gw)),
    ]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    std::fs::remove_file(&body).ok();
    let after_store = gw.peak_rss_kib() / 1024 - baseline;
    assert!(
        after_store <= 64,
        "peak RSS grew {after_store} MiB (from {baseline} MiB) during a 1 GiB STOW"
    );

    let url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &url,
        ])
        .output()
        .unwrap();
    let text = stdout(&out);
    let mut fields = text.split_whitespace();
    assert_eq!(fields.next(), Some("200"));
    let size: u64 = fields.next().unwrap().parse().unwrap();
    assert!(size > 1024 * 1024 * 1024, "whole instance streamed: {size}");
    let after_retrieve = gw.peak_rss_kib() / 1024 - baseline;
    assert!(
        after_retrieve <= 64,
        "peak RSS grew {after_retrieve} MiB (from {baseline} MiB) after a 1 GiB WADO-RS retrieve"
    );
    gw.terminate();
}

/// The OHIF Viewer build that tests/run downloads (npm registry tarball).
fn ohif_dist() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/ohif/package/dist")
}

#[test]
fn ohif_viewer_lists_and_draws_a_study_across_origins() {
    let _serial = serial();
    let dist = ohif_dist();
    assert!(
        dist.join("index.html").exists(),
        "OHIF Viewer missing at {} (./tests/run downloads it)",
        dist.display()
    );
    let work = tempfile::tempdir().unwrap();
    let viewer_port = free_port();
    let gw = Gateway::start(
        work.path(),
        &format!("[dicomweb]\ncors_origins = [\"http://127.0.0.1:{viewer_port}\"]"),
    );
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "3",
        "PID-OHIF-1",
        "ACC-OHIF-1",
    ]);
    let paths: Vec<&str> = ct.iter().map(|f| f.path.to_str().unwrap()).collect();
    let stored = dicomweb(&gw, PARTNER, "store", &paths);
    assert_eq!(seq_len(&stored, "00081199"), 3);
    let study = study_and_series(paths[0])[0].as_str().unwrap().to_owned();

    // OHIF runs as staff (no partner header): it sees every partner's studies.
    let b = base(&gw);
    let port = viewer_port.to_string();
    let out = python("ohif.py", &[dist.to_str().unwrap(), &b, &port, &study]);
    assert!(
        out.status.success(),
        "ohif.py: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let seen: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let list = seen["study_list"].as_str().unwrap();
    assert!(
        list.contains("PID-OHIF-1") && list.contains("ACC-OHIF-1"),
        "study list: {list}"
    );
    // The viewer fetched the metadata (computed and cached now) and the
    // frames, successfully, across origins. (Whether it drew them is
    // OHIF's part; see tests/peers/ohif.py.)
    assert_eq!(
        sql(&gw.data_dir, "SELECT count(*) FROM instance_metadata").trim(),
        "3"
    );
    let (_, metrics) = gw.get("/metrics");
    let frames_ok = metrics
        .lines()
        .find(|l| {
            l.starts_with("konsil_dicomweb_requests_total")
                && l.contains("resource=\"frames\"")
                && l.contains("status=\"200\"")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(frames_ok >= 1, "OHIF fetched no frames:\n{metrics}");
    gw.terminate();
}
