//! TLS: DICOM TLS with DCMTK `storescu +tls` and partner client
//! certificates bound to AE titles, HTTPS with curl and a Python SMART
//! client (mutual TLS optional, but a partner's certificate binds its
//! requests to that partner), and certificate reload on SIGHUP. Test
//! certificates come from tests/peers/certs.py (Python cryptography).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    dicom_files, hold_association_on, python, python_json, signal, stderr, stdout, test_clients,
    Gateway, ST_MARY_AE,
};

fn make_certs(work: &Path) -> PathBuf {
    let dir = work.join("certs");
    let out = python("certs.py", &["make", dir.to_str().unwrap()]);
    assert!(out.status.success(), "certs.py make: {}", stderr(&out));
    dir
}

fn start(work: &Path) -> (Gateway, PathBuf) {
    let certs = make_certs(work);
    let [st_mary, city] = test_clients(&work.join("keys"));
    (Gateway::start_tls(work, &certs, [&st_mary, &city]), certs)
}

/// DCMTK storescu over TLS with client certificate `cert` (None: no
/// certificate), calling as `aet`. Whether it stored, and its output.
fn storescu_tls(
    gw: &Gateway,
    certs: &Path,
    cert: Option<&str>,
    aet: &str,
    file: &Path,
) -> (bool, String) {
    let mut cmd = Command::new("/usr/bin/storescu");
    match cert {
        Some(name) => cmd.args([
            "+tls",
            certs.join(format!("{name}.key")).to_str().unwrap(),
            certs.join(format!("{name}.pem")).to_str().unwrap(),
        ]),
        None => cmd.arg("+tla"),
    };
    let out = cmd
        .args(["+cf", certs.join("ca.pem").to_str().unwrap()])
        .args([
            "-aet",
            aet,
            "-aec",
            "KONSIL",
            "127.0.0.1",
            &gw.dicom_tls.to_string(),
        ])
        .arg(file)
        .output()
        .expect("/usr/bin/storescu");
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// curl over HTTPS to `path` with the test CA, a client certificate
/// (`cert`) and a bearer token, plus `extra` arguments: (exit code, status,
/// headers, body).
fn curl_https(
    gw: &Gateway,
    certs: &Path,
    cert: Option<&str>,
    token: Option<&str>,
    path: &str,
    extra: &[&str],
) -> (i32, u16, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert", certs.join("ca.pem").to_str().unwrap()])
        .args(["-D", head.to_str().unwrap(), "-o", body.to_str().unwrap()]);
    if let Some(name) = cert {
        cmd.args([
            "--cert",
            certs.join(format!("{name}.pem")).to_str().unwrap(),
            "--key",
            certs.join(format!("{name}.key")).to_str().unwrap(),
        ]);
    }
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = cmd
        .args(extra)
        .arg(format!("https://127.0.0.1:{}{path}", gw.https))
        .output()
        .expect("curl");
    let head = std::fs::read_to_string(head).unwrap_or_default();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = std::fs::read_to_string(body).unwrap_or_default();
    (out.status.code().unwrap_or(-1), status, head, body)
}

/// A partner token from the token endpoint over HTTPS, the request made
/// with client certificate `cert` ("-": none): (HTTP status, JSON body).
fn token_over_tls(
    gw: &Gateway,
    work: &Path,
    certs: &Path,
    client: &str,
    cert: &str,
) -> (u64, Value) {
    let v = python_json(
        gw,
        "certs.py",
        &[
            "token",
            &format!("https://127.0.0.1:{}", gw.https),
            work.join("keys").to_str().unwrap(),
            client,
            "system/*.rs system/ImagingStudy.c",
            certs.to_str().unwrap(),
            cert,
        ],
    );
    (v["status"].as_u64().unwrap(), v["body"].clone())
}

#[test]
fn dicom_tls_binds_the_client_certificate_to_its_partners_ae_titles() {
    let work = tempfile::tempdir().unwrap();
    let (gw, certs) = start(work.path());
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "3"]);
    assert!(
        gw.log().contains("dicom=off"),
        "plain DICOM was switched off with dicom = \"\": {}",
        gw.log()
    );

    // St. Mary's certificate with St. Mary's AE title: stored.
    let (ok, out) = storescu_tls(&gw, &certs, Some("st-mary"), ST_MARY_AE, &tiny[0].path);
    assert!(ok, "storescu +tls with st-mary's certificate: {out}");
    assert_eq!(gw.instance_count(), 1);
    assert!(
        gw.log().contains("certificate_subject=\"CN=st-mary-pacs\""),
        "{}",
        gw.log()
    );

    // The same certificate calling with City Clinic's AE title: rejected.
    let (ok, out) = storescu_tls(&gw, &certs, Some("st-mary"), "CITYPACS", &tiny[1].path);
    assert!(
        !ok,
        "st-mary's certificate with city-clinic's AE title was accepted: {out}"
    );
    assert!(
        out.contains("Association Rejected") || out.contains("Calling AE Title Not Recognized"),
        "expected an A-ASSOCIATE-RJ: {out}"
    );
    assert!(gw
        .log()
        .contains("belongs to another partner than the TLS client certificate"));

    // City Clinic's certificate with its own AE title: stored, as its own.
    let (ok, out) = storescu_tls(&gw, &certs, Some("city"), "CITYPACS", &tiny[1].path);
    assert!(ok, "storescu +tls with city's certificate: {out}");
    let partners = common::sql(
        &gw.data_dir,
        "SELECT partner FROM instances ORDER BY partner",
    );
    assert_eq!(
        partners.lines().collect::<Vec<_>>(),
        ["city-clinic", "st-mary"]
    );

    // A certificate of the CA bound to no partner, a self-signed one with
    // St. Mary's name, and none at all: refused in the handshake.
    for (cert, what) in [
        (Some("stranger"), "a certificate bound to no partner"),
        (Some("rogue"), "a self-signed certificate"),
        (None, "no client certificate"),
    ] {
        let (ok, out) = storescu_tls(&gw, &certs, cert, ST_MARY_AE, &tiny[2].path);
        assert!(!ok, "{what} was accepted: {out}");
    }
    assert!(
        gw.log().contains("its subject is no partner's"),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.instance_count(),
        2,
        "nothing stored by refused connections"
    );

    // Plain DICOM does not reach the TLS port.
    let out = Command::new("/usr/bin/echoscu")
        .args([
            "-to",
            "5",
            "-aet",
            ST_MARY_AE,
            "-aec",
            "KONSIL",
            "127.0.0.1",
            &gw.dicom_tls.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plain C-ECHO on the TLS port succeeded"
    );
    assert_eq!(gw.instance_count(), 2);
}

#[test]
fn https_serves_fhir_and_dicomweb_with_tokens_bound_to_the_partner_certificate() {
    let work = tempfile::tempdir().unwrap();
    let (gw, certs) = start(work.path());
    let staff = gw.staff_token("coordinator");

    // Health over HTTPS (and plain HTTP stays on where configured).
    let (code, status, _, _) = curl_https(&gw, &certs, None, None, "/healthz", &[]);
    assert_eq!((code, status), (0, 200));
    assert_eq!(gw.get("/healthz").0, 200);

    // No token: 401 with a challenge; a staff token without a client
    // certificate: 200 (mutual TLS is optional on HTTPS).
    let (_, status, head, _) = curl_https(&gw, &certs, None, None, "/dicomweb/studies", &[]);
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    let (_, status, _, _) = curl_https(&gw, &certs, None, Some(&staff), "/dicomweb/studies", &[]);
    assert_eq!(status, 200);

    // Over St. Mary's certificate, a staff token is refused.
    let (_, status, head, _) = curl_https(
        &gw,
        &certs,
        Some("st-mary"),
        Some(&staff),
        "/fhir/Patient",
        &[],
    );
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("speaks for partner st-mary"), "{head}");

    // St. Mary's client gets a token over its own certificate, and the
    // token endpoint advertises the HTTPS URL.
    let (status, body) = token_over_tls(&gw, work.path(), &certs, "st-mary-ehr", "st-mary");
    assert_eq!(status, 200, "{body}");
    let st_mary = body["access_token"].as_str().unwrap().to_owned();
    // ... but not over City Clinic's certificate.
    let (status, body) = token_over_tls(&gw, work.path(), &certs, "st-mary-ehr", "city");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_client");
    // Without a client certificate the token is the credential.
    let (status, body) = token_over_tls(&gw, work.path(), &certs, "city-clinic-ehr", "-");
    assert_eq!(status, 200, "{body}");
    let city = body["access_token"].as_str().unwrap().to_owned();

    // STOW-RS over HTTPS: the RetrieveURL carries the scheme the client used.
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "1"]);
    let mut multipart = b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    multipart.extend_from_slice(&std::fs::read(&tiny[0].path).unwrap());
    multipart.extend_from_slice(b"\r\n--XYZ--\r\n");
    let body_file = work.path().join("stow.body");
    std::fs::write(&body_file, multipart).unwrap();
    let data = format!("@{}", body_file.display());
    let (_, status, _, body) = curl_https(
        &gw,
        &certs,
        Some("st-mary"),
        Some(&st_mary),
        "/dicomweb/studies",
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary=XYZ",
            "-H",
            "Accept: application/dicom+json",
            "--data-binary",
            &data,
        ],
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let url = answer["00081190"]["Value"][0].as_str().unwrap();
    assert!(
        url.starts_with(&format!("https://127.0.0.1:{}/dicomweb/studies/", gw.https)),
        "{url}"
    );

    // St. Mary's token over its certificate sees its study; City Clinic's
    // token over no certificate does not; City's token over St. Mary's
    // certificate is refused.
    let (_, status, _, body) = curl_https(
        &gw,
        &certs,
        Some("st-mary"),
        Some(&st_mary),
        "/dicomweb/studies",
        &[],
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (_, status, _, body) = curl_https(&gw, &certs, None, Some(&city), "/dicomweb/studies", &[]);
    assert!(status == 204 || body.trim() == "[]", "{status} {body}");
    let (_, status, _, _) = curl_https(
        &gw,
        &certs,
        Some("st-mary"),
        Some(&city),
        "/dicomweb/studies",
        &[],
    );
    assert_eq!(status, 401);

    // A certificate bound to no partner, or not from the partners' CA:
    // the handshake fails.
    for cert in ["stranger", "rogue"] {
        let (code, status, _, _) =
            curl_https(&gw, &certs, Some(cert), Some(&staff), "/healthz", &[]);
        assert!(
            code != 0 && status == 0,
            "{cert}: curl exit {code}, status {status}"
        );
    }
    // TLS 1.2 and 1.3 are offered; a TLS 1.2 CBC suite (outside BCP 195's
    // recommended AEAD suites) is not.
    for version in ["1.2", "1.3"] {
        let (code, status, _, _) = curl_https(
            &gw,
            &certs,
            None,
            None,
            "/healthz",
            &[&format!("--tlsv{version}"), "--tls-max", version],
        );
        assert_eq!((code, status), (0, 200), "TLS {version}");
    }
    let (code, status, _, _) = curl_https(
        &gw,
        &certs,
        None,
        None,
        "/healthz",
        &[
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            "--ciphers",
            "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
        ],
    );
    assert!(code != 0 && status == 0, "a CBC suite was negotiated");
}

#[test]
fn sighup_reloads_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let work = tempfile::tempdir().unwrap();
    let (gw, certs) = start(work.path());
    let subject = |port: u16| {
        let out = python("certs.py", &["subject", "127.0.0.1", &port.to_string()]);
        assert!(out.status.success(), "certs.py subject: {}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    assert_eq!(subject(gw.https), "CN=konsil-test-server");
    assert_eq!(subject(gw.dicom_tls), "CN=konsil-test-server");

    std::fs::copy(certs.join("server2.pem"), certs.join("server.pem")).unwrap();
    std::fs::copy(certs.join("server2.key"), certs.join("server.key")).unwrap();
    signal(gw.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while subject(gw.https) != "CN=konsil-test-server-renewed" {
        assert!(Instant::now() < deadline, "not reloaded: {}", gw.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(subject(gw.dicom_tls), "CN=konsil-test-server-renewed");
    assert!(gw.log().contains("TLS certificate and key reloaded"));

    // A broken file: the reload fails loudly, the renewed certificate stays.
    std::fs::write(certs.join("server.pem"), "not a certificate\n").unwrap();
    signal(gw.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("TLS reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload error logged: {}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(subject(gw.https), "CN=konsil-test-server-renewed");
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "1"]);
    let (ok, out) = storescu_tls(&gw, &certs, Some("st-mary"), ST_MARY_AE, &tiny[0].path);
    assert!(ok, "DICOM TLS after a failed reload: {out}");
}

/// Over the server's association cap, a DICOM TLS caller gets what a
/// plain one gets: the TLS handshake completes and the association is
/// rejected as transient ("local limit exceeded"), so its PACS retries
/// later; once the slot is free, the same caller gets in.
#[test]
fn over_the_association_cap_dicom_tls_gets_a_transient_rejection() {
    let work = tempfile::tempdir().unwrap();
    let certs = make_certs(work.path());
    let [st_mary, city] = test_clients(&work.path().join("keys"));
    let gw = Gateway::start_tls_with(
        work.path(),
        &certs,
        [&st_mary, &city],
        "max_associations = 1",
    );
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "1"]);
    let mut holder = hold_association_on(
        gw.dicom_tls,
        Some([
            &certs.join("st-mary.pem"),
            &certs.join("st-mary.key"),
            &certs.join("ca.pem"),
        ]),
        6,
    );
    let (stored, out) = storescu_tls(&gw, &certs, Some("st-mary"), ST_MARY_AE, &tiny[0].path);
    assert!(!stored, "stored over the cap: {out}");
    assert!(out.contains("Rejected Transient"), "{out}");
    assert!(holder.wait().unwrap().success());
    let (stored, out) = storescu_tls(&gw, &certs, Some("st-mary"), ST_MARY_AE, &tiny[0].path);
    assert!(stored, "{out}");
    assert_eq!(gw.instance_count(), 1);
}
