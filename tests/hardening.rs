//! Hardening: per-partner request rates (429 with Retry-After) and
//! association caps, and request bodies that stall.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{echoscu, Gateway, ST_MARY_AE};

#[test]
fn a_partner_over_its_request_rate_gets_429_and_others_are_unaffected() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start_dev(work.path(), "", ["requests_per_minute = 3\n", ""]);
    let st_mary = [("X-Konsil-Partner", "st-mary")];
    for _ in 0..3 {
        assert_eq!(gw.get_with("/fhir/Patient", &st_mary).0, 200);
    }
    // The fourth within the minute: throttled, on FHIR and DICOMweb alike.
    let response = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{}/fhir/Patient", gw.http))
        .header("X-Konsil-Partner", "st-mary")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let outcome: serde_json::Value = serde_json::from_str(&response.text().unwrap()).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "throttled");
    assert_eq!(gw.get_with("/dicomweb/studies", &st_mary).0, 429);
    // Another partner and staff have their own allowance (none here).
    for _ in 0..5 {
        assert_eq!(
            gw.get_with("/fhir/Patient", &[("X-Konsil-Partner", "city-clinic")])
                .0,
            200
        );
        assert_eq!(gw.get_with("/fhir/Patient", &[]).0, 200);
    }
}

#[test]
fn a_partner_at_its_max_associations_is_rejected_until_one_closes() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start_dev(work.path(), "", ["max_associations = 1\n", ""]);
    // St. Mary's pynetdicom holds one association open for a while.
    let mut holder = common::hold_association(&gw, 8);
    // St. Mary's second system: rejected; City Clinic: accepted.
    let second = echoscu(&gw, ST_MARY_AE, "KONSIL");
    assert!(
        !second.status.success(),
        "a second st-mary association was accepted"
    );
    // Transient, as for a full server: the PACS may retry later.
    let err = common::stderr(&second);
    assert!(err.contains("Rejected Transient"), "{err}");
    assert!(gw
        .log()
        .contains("the partner has its max_associations open"));
    assert!(echoscu(&gw, "CITYPACS", "KONSIL").status.success());
    // Once the first is released, St. Mary's may associate again.
    assert!(holder.wait().unwrap().success());
    let mut after = echoscu(&gw, ST_MARY_AE, "KONSIL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !after.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = echoscu(&gw, ST_MARY_AE, "KONSIL");
    }
    assert!(after.status.success(), "the slot was not given back");
}

#[test]
fn a_stalled_request_body_is_cut_after_the_idle_timeout() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start_dev(work.path(), "idle_timeout_secs = 2\n", ["", ""]);
    let mut s = TcpStream::connect(("127.0.0.1", gw.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A STOW-RS request announcing 100 kB that sends a few bytes, then nothing.
    write!(
        s,
        "POST /dicomweb/studies HTTP/1.1\r\nHost: localhost\r\nX-Konsil-Partner: st-mary\r\n\
         Content-Type: multipart/related; type=\"application/dicom\"; boundary=B\r\n\
         Content-Length: 100000\r\n\r\n--B\r\nContent-Type: application/dicom\r\n\r\nDICM"
    )
    .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read the answer (the server closes or keeps the connection; stop at
    // the end of the body or when nothing more comes).
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if String::from_utf8_lossy(&answer).contains("idle_timeout_secs") {
            break;
        }
    }
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("no request body data for 2 s"), "{text}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "cut after {waited:?}"
    );
    assert_eq!(gw.instance_count(), 0);
    // Headers that never finish: the connection is closed after twice the
    // idle time without a byte (no request ever reaches a handler).
    let mut s = TcpStream::connect(("127.0.0.1", gw.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = s.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(closed.is_ok(), "not closed: {closed:?}");
    assert!(
        waited >= Duration::from_millis(3500) && waited < Duration::from_secs(15),
        "closed after {waited:?}"
    );
    // A slow body that keeps moving is not cut: one byte a second for 4 s
    // goes past 2 s of total time without an idle gap.
    let mut s = TcpStream::connect(("127.0.0.1", gw.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = b"{\"resourceType\":\"Patient\",\"active\":true}";
    write!(
        s,
        "POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    for piece in body.chunks(7) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}
