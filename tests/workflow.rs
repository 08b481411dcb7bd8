//! The second-opinion case end to end (`tests/peers/workflow.py` plays every
//! role with real clients: fhirpy, DCMTK storescu, requests, a rest-hook
//! receiver), then the public validators check every resource the server
//! emitted and pdftotext reads the opinion back.

mod common;

use std::process::Command;

use serde_json::Value;

use common::{peers_dir, stderr, stdout, Gateway};

#[test]
fn a_referral_goes_from_intake_to_delivered_opinion_and_follow_up() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(
        work.path(),
        "[workflow]\nimaging_quiet_secs = 2\ncheck_interval_secs = 1\nnotify_first_retry_secs = 1\nnotify_max_backoff_secs = 2",
    );
    let base = format!("http://127.0.0.1:{}/fhir", gw.http);
    let out = Command::new("python3")
        .arg(peers_dir().join("workflow.py"))
        .args([&base, &gw.dicom.to_string(), work.path().to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "workflow.py failed:\n{}\nlog:\n{}",
        stderr(&out),
        gw.log()
    );
    let result: Value = serde_json::from_str(&stdout(&out)).expect("JSON from workflow.py");
    let facts = &result["facts"];
    assert_eq!(
        facts["awaiting_records_missing"],
        serde_json::json!(["consent", "imaging"])
    );
    assert!(facts["status_reason"]
        .as_str()
        .unwrap()
        .starts_with("missing: "));
    assert!(facts["stray_warning"]
        .as_str()
        .unwrap()
        .contains("no case started"));
    assert_eq!(facts["imaging_study_instances"], 4);
    assert_eq!(facts["assigned"], true);
    assert!(facts["subscription_error"]
        .as_str()
        .unwrap()
        .contains("delivery to the endpoint failed"));
    assert!(facts["notifications"].as_u64().unwrap() >= 2);
    assert_eq!(
        facts["notification_auth"],
        serde_json::json!(["Bearer hook-secret"])
    );
    assert_eq!(facts["notification_leaks_name"], false);
    assert!(facts["audit_events"].as_u64().unwrap() >= 2);

    // The opinion PDF reads back as text.
    let pdf = work.path().join("opinion.pdf");
    let text = Command::new("pdftotext")
        .args([pdf.to_str().unwrap(), "-"])
        .output()
        .expect("pdftotext (poppler-utils)");
    assert!(text.status.success(), "pdftotext: {}", stderr(&text));
    let text = stdout(&text);
    for expected in [
        "Second opinion",
        "T2a N0 M0",
        "Agreement with the diagnosis",
        "Obtain a PET-CT before surgery.",
        "What would change this opinion",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not in the PDF:\n{text}"
        );
    }

    // Every resource the server emitted passes both public validators.
    let resources = result["resources"].as_array().unwrap();
    assert!(resources.len() >= 12, "{} resources", resources.len());
    let report = common::public_validators(resources);
    let failures: Vec<&Value> = report
        .iter()
        .filter(|r| {
            !r["medplum"].as_array().unwrap().is_empty()
                || !r["fhirjs"].as_array().unwrap().is_empty()
        })
        .collect();
    assert!(failures.is_empty(), "validator findings: {failures:#?}");
}
