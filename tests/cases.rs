//! A specialist sees the cases assigned to them and nothing else of
//! patients' records: FHIR reads, searches and writes, and DICOMweb.

mod common;

use serde_json::{json, Value};

use common::{dicom_files, storescu, Gateway, ST_MARY_AE};

const STAFF_SID: &str = "http://konsil.dev/fhir/sid/staff";

struct Api<'a> {
    gw: &'a Gateway,
    token: String,
}

impl Api<'_> {
    fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut request = reqwest::blocking::Client::new()
            .request(method, format!("http://127.0.0.1:{}{path}", self.gw.http))
            .bearer_auth(&self.token)
            .header(
                "Accept",
                if path.starts_with("/dicomweb") {
                    "application/dicom+json"
                } else {
                    "application/fhir+json"
                },
            );
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/fhir+json")
                .body(body.to_string());
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None)
    }

    /// Create and return the new id.
    fn create(&self, resource: Value) -> String {
        let path = format!("/fhir/{}", resource["resourceType"].as_str().unwrap());
        let (status, body) = self.send(reqwest::Method::POST, &path, Some(&resource));
        assert_eq!(status, 201, "{path}: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// The ids of the resources a search answers with.
    fn ids(&self, path: &str) -> Vec<String> {
        self.each_entry(path, |e| e["resource"]["id"].as_str().unwrap().to_owned())
    }

    /// `each` of every entry of the Bundle `path` answers with.
    fn each_entry(&self, path: &str, each: impl Fn(&Value) -> String) -> Vec<String> {
        let (status, bundle) = self.get(path);
        assert_eq!(status, 200, "{path}: {bundle}");
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(each)
            .collect()
    }
}

fn report(patient: &str) -> Value {
    json!({"resourceType": "DiagnosticReport", "status": "preliminary",
           "code": {"text": "Second opinion"}, "subject": {"reference": format!("Patient/{patient}")}})
}

#[test]
fn a_specialist_sees_only_the_cases_assigned_to_them() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start_secure(work.path(), "", ["", ""]);
    let coordinator = Api {
        gw: &gw,
        token: gw.staff_token("coordinator"),
    };
    // The roster: Dr Lee signs in as "dr-lee"; Dr Kim as "dr-kim".
    let lee = coordinator.create(json!({"resourceType": "Practitioner",
        "identifier": [{"system": STAFF_SID, "value": "dr-lee"}], "name": [{"family": "Lee"}]}));
    let lee_role = coordinator.create(json!({"resourceType": "PractitionerRole",
        "practitioner": {"reference": format!("Practitioner/{lee}")}}));
    let kim = coordinator.create(json!({"resourceType": "Practitioner",
        "identifier": [{"system": STAFF_SID, "value": "dr-kim"}], "name": [{"family": "Kim"}]}));
    let kim_role = coordinator.create(json!({"resourceType": "PractitionerRole",
        "practitioner": {"reference": format!("Practitioner/{kim}")}}));
    // Two cases: A assigned to Dr Lee, B to Dr Kim.
    let patient_a =
        coordinator.create(json!({"resourceType": "Patient", "name": [{"family": "Casea"}]}));
    let patient_b =
        coordinator.create(json!({"resourceType": "Patient", "name": [{"family": "Caseb"}]}));
    let task_a = coordinator.create(
        json!({"resourceType": "Task", "status": "in-progress", "intent": "order",
        "for": {"reference": format!("Patient/{patient_a}")},
        "owner": {"reference": format!("PractitionerRole/{lee_role}")}}),
    );
    let task_b = coordinator.create(
        json!({"resourceType": "Task", "status": "in-progress", "intent": "order",
        "for": {"reference": format!("Patient/{patient_b}")},
        "owner": {"reference": format!("PractitionerRole/{kim_role}")}}),
    );
    let report_a = coordinator.create(report(&patient_a));
    let report_b = coordinator.create(report(&patient_b));
    let note = |patient: &str, binary: &str| {
        json!({"resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": format!("Patient/{patient}")},
        "content": [{"attachment": {"contentType": "text/plain", "url": format!("Binary/{binary}")}}]})
    };
    let binary = |text: &str| {
        json!({"resourceType": "Binary", "contentType": "text/plain",
        "data": base64_of(text)})
    };
    let binary_a = coordinator.create(binary("notes of case A"));
    let binary_b = coordinator.create(binary("notes of case B"));
    let note_a = coordinator.create(note(&patient_a, &binary_a));
    coordinator.create(note(&patient_b, &binary_b));
    // Case A's imaging, sent by St. Mary's PACS, and its manifest.
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "2",
        "CASEA",
        "ACC-A",
    ]);
    let sent = storescu(&gw, ST_MARY_AE, &[ct[0].path.as_path()]);
    assert!(sent.status.success());
    let study_a = common::sql(&gw.data_dir, "SELECT study_uid FROM instances LIMIT 1")
        .trim()
        .to_owned();
    coordinator.create(
        json!({"resourceType": "ImagingStudy", "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{study_a}")}],
        "subject": {"reference": format!("Patient/{patient_a}")}}),
    );
    let other = dicom_files(&[
        "ct",
        work.path().join("ct2").to_str().unwrap(),
        "1",
        "CASEB",
        "ACC-B",
    ]);
    assert!(storescu(&gw, ST_MARY_AE, &[other[0].path.as_path()])
        .status
        .success());
    let study_b = common::sql(
        &gw.data_dir,
        &format!("SELECT study_uid FROM instances WHERE study_uid <> '{study_a}' LIMIT 1"),
    )
    .trim()
    .to_owned();
    assert!(!study_b.is_empty());

    let lee = Api {
        gw: &gw,
        token: gw.staff_token_as("specialist", "dr-lee"),
    };
    // Reads: case A and its records; case B is unknown (404).
    assert_eq!(lee.get(&format!("/fhir/Patient/{patient_a}")).0, 200);
    assert_eq!(lee.get(&format!("/fhir/Patient/{patient_b}")).0, 404);
    assert_eq!(lee.get(&format!("/fhir/Task/{task_a}")).0, 200);
    assert_eq!(lee.get(&format!("/fhir/Task/{task_b}")).0, 404);
    assert_eq!(
        lee.get(&format!("/fhir/DiagnosticReport/{report_b}")).0,
        404
    );
    assert_eq!(lee.get(&format!("/fhir/Binary/{binary_a}")).0, 200);
    assert_eq!(lee.get(&format!("/fhir/Binary/{binary_b}")).0, 404);
    assert_eq!(
        lee.get(&format!("/fhir/PractitionerRole/{kim_role}")).0,
        200,
        "the directory is open"
    );
    // Searches: case A only, totals included.
    assert_eq!(lee.ids("/fhir/Patient"), [patient_a.as_str()]);
    assert_eq!(lee.ids("/fhir/Task"), [task_a.as_str()]);
    assert_eq!(lee.ids("/fhir/DiagnosticReport"), [report_a.as_str()]);
    assert_eq!(lee.ids("/fhir/DocumentReference"), [note_a.as_str()]);
    let (_, bundle) = lee.get("/fhir/DiagnosticReport?_summary=count");
    assert_eq!(bundle["total"], 1);
    let included = lee.ids(&format!(
        "/fhir/DiagnosticReport?_id={report_a}&_include=DiagnosticReport:subject"
    ));
    assert_eq!(included, [report_a.as_str(), patient_a.as_str()]);
    // History: case A's versions only, at every level.
    // History entries by `Type/id` (a deletion has no resource).
    let history = |path: &str| -> Vec<String> {
        lee.each_entry(path, |e| {
            let url = e["fullUrl"].as_str().unwrap();
            let mut parts = url.rsplit('/');
            let id = parts.next().unwrap();
            format!("{}/{id}", parts.next().unwrap())
        })
    };
    assert_eq!(
        history("/fhir/Patient/_history"),
        [format!("Patient/{patient_a}")]
    );
    let everything = history("/fhir/_history?_count=500");
    for theirs in [
        format!("Patient/{patient_b}"),
        format!("Task/{task_b}"),
        format!("DiagnosticReport/{report_b}"),
        format!("Binary/{binary_b}"),
    ] {
        assert!(!everything.contains(&theirs), "{theirs} in {everything:?}");
    }
    for ours in [format!("Patient/{patient_a}"), format!("Task/{task_a}")] {
        assert!(everything.contains(&ours), "{ours} not in {everything:?}");
    }
    assert_eq!(
        lee.get(&format!("/fhir/DiagnosticReport/{report_b}/_history"))
            .0,
        404
    );
    // Writes: the opinion on case A, not on case B.
    let (status, _) = lee.send(
        reqwest::Method::POST,
        "/fhir/DiagnosticReport",
        Some(&report(&patient_a)),
    );
    assert_eq!(status, 201);
    let (status, outcome) = lee.send(
        reqwest::Method::POST,
        "/fhir/DiagnosticReport",
        Some(&report(&patient_b)),
    );
    assert_eq!(status, 403, "{outcome}");
    let mut changed = report(&patient_b);
    changed["id"] = json!(report_b);
    let (status, _) = lee.send(
        reqwest::Method::PUT,
        &format!("/fhir/DiagnosticReport/{report_b}"),
        Some(&changed),
    );
    assert_eq!(status, 404, "case B's report cannot be overwritten");
    // DICOMweb: case A's study only.
    let (status, studies) = lee.get("/dicomweb/studies");
    assert_eq!(status, 200);
    let found: Vec<&str> = studies
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["0020000D"]["Value"][0].as_str().unwrap())
        .collect();
    assert_eq!(found, [study_a.as_str()]);
    assert_eq!(
        lee.get(&format!("/dicomweb/studies/{study_a}/metadata")).0,
        200
    );
    assert_eq!(
        lee.get(&format!("/dicomweb/studies/{study_b}/metadata")).0,
        404
    );

    // A specialist with no assignment sees no patient records; a
    // specialist who is also coordinator sees everything.
    let nobody = Api {
        gw: &gw,
        token: gw.staff_token_as("specialist", "dr-nobody"),
    };
    assert!(nobody.ids("/fhir/Patient").is_empty());
    assert!(nobody.ids("/fhir/DiagnosticReport").is_empty());
    let (status, studies) = nobody.get("/dicomweb/studies");
    assert!(
        status == 204 || studies.as_array().is_some_and(|a| a.is_empty()),
        "{status} {studies}"
    );
    let both = Api {
        gw: &gw,
        token: gw.staff_token_as("specialist,coordinator", "dr-lead"),
    };
    assert_eq!(both.ids("/fhir/Patient").len(), 2);
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
