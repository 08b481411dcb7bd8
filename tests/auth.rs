//! Authentication and authorisation with authentication on (no `--dev`):
//! SMART Backend Services token requests signed by a Python client (PyJWT),
//! fhirpy and dicomweb-client with the tokens, `konsil token` for staff, and
//! the access matrix: every role × every kind of endpoint × own / other
//! partner.

mod common;

use std::path::Path;

use serde_json::{json, Value};

use common::{
    dicom_files, partner_token, python, python_json, stderr, storescu, test_clients, Gateway,
    KillOnDrop, ST_MARY_AE,
};

fn start(work: &Path) -> Gateway {
    let keys = work.join("keys");
    let [st_mary, city] = test_clients(&keys);
    Gateway::start_secure(work, "", [&st_mary, &city])
}

fn root(gw: &Gateway) -> String {
    format!("http://127.0.0.1:{}", gw.http)
}

#[test]
fn partners_get_tokens_by_client_assertion_and_see_only_their_own() {
    let work = tempfile::tempdir().unwrap();
    let gw = start(work.path());
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "1",
        "AUTH-1",
        "ACC-AUTH-1",
    ]);
    let keys = work.path().join("keys");
    let facts = python_json(
        &gw,
        "auth.py",
        &[
            "scenario",
            &root(&gw),
            keys.to_str().unwrap(),
            ct[0].path.to_str().unwrap(),
        ],
    );
    assert_eq!(
        facts["token_endpoint"],
        format!("http://127.0.0.1:{}/auth/token", gw.http)
    );
    assert_eq!(facts["st_mary_scope"], "system/*.cruds");
    // Granted is what was asked, cut to the registration.
    assert_eq!(facts["city_scope"], "system/*.rs system/Patient.c");
    assert_eq!(
        facts["viewer_scope"],
        "system/DiagnosticReport.rs system/ImagingStudy.rs"
    );
    let refusals = facts["refusals"].as_object().unwrap();
    assert!(refusals["wrong aud"].as_str().unwrap().contains("aud"));
    assert!(refusals["expired"].as_str().unwrap().contains("expired"));
    assert!(refusals["exp too far"].as_str().unwrap().contains("exp"));
    assert!(refusals["exp 360 s ahead"]
        .as_str()
        .unwrap()
        .contains("more than 300 s ahead"));
    assert!(refusals["no jti"].as_str().unwrap().contains("jti"));
    assert!(refusals["unknown client"]
        .as_str()
        .unwrap()
        .contains("client_id"));
    assert!(refusals["signed by another key"]
        .as_str()
        .unwrap()
        .contains("signature"));
    assert!(refusals["RS256"]
        .as_str()
        .unwrap()
        .contains("RS384 or ES384"));
    assert!(facts["viewer_denied"]
        .as_str()
        .unwrap()
        .contains("system/Patient.c"));
    // The partner's PACS over DIMSE: one audit record per association.
    let sent = storescu(&gw, ST_MARY_AE, &[ct[0].path.as_path()]);
    assert!(sent.status.success(), "storescu: {}", stderr(&sent));

    // The audit trail: the auditor alone reads it; every kind of access of
    // the scenario left its event.
    let auditor = gw.staff_token("auditor");
    let events = wait_for_audit(&gw, &auditor, |events| {
        events.iter().any(|e| e["altId"] == ST_MARY_AE)
    });
    let has = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        assert!(
            events.iter().any(pred),
            "no audit event for {what} among {} events:\n{}",
            events.len(),
            serde_json::to_string_pretty(&events).unwrap()
        );
    };
    let subtype = |e: &Value| e["subtype"][0]["code"].as_str().unwrap_or("").to_owned();
    let agent = |e: &Value| e["agent"][0]["altId"].as_str().unwrap_or("").to_owned();
    let patient = facts["patient_id"].as_str().unwrap();
    has("the token issue", &|e| {
        subtype(e) == "110122" && agent(e) == "st-mary-ehr" && e["outcome"] == "0"
    });
    has("a refused token request", &|e| {
        subtype(e) == "110122" && e["outcome"] == "4"
    });
    has("the patient's creation (in its transaction)", &|e| {
        subtype(e) == "create"
            && e["action"] == "C"
            && e["entity"][0]["what"]["reference"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("Patient/{patient}/_history/"))
    });
    has("the patient's read", &|e| {
        subtype(e) == "read" && e["entity"][0]["what"]["reference"] == format!("Patient/{patient}")
    });
    has("a search", &|e| {
        subtype(e) == "search-type" && e["entity"][0]["query"].is_string()
    });
    has("another partner's failed read", &|e| {
        subtype(e) == "read"
            && agent(e) == "city-clinic-ehr"
            && e["outcome"] == "4"
            && e["agent"][0]["who"]["identifier"]["value"] == "city-clinic"
    });
    has("a refused write", &|e| {
        subtype(e) == "update" && e["outcome"] == "4"
    });
    has("the STOW-RS, naming the study it stored", &|e| {
        subtype(e) == "110104"
            && e["action"] == "C"
            && agent(e) == "st-mary-ehr"
            && e["entity"][0]["what"]["identifier"]["value"]
                .as_str()
                .is_some_and(|v| v.starts_with("urn:oid:"))
            && e["entity"][0]["description"] == "1 instance(s)"
    });
    has("a request without a token (a failed login)", &|e| {
        subtype(e) == "110122"
            && e["outcome"] == "4"
            && e["agent"][0]["who"]["display"]
                .as_str()
                .is_some_and(|d| d.contains("unidentified"))
            && e.to_string().contains("request to /dicomweb/studies")
    });
    has("a token request naming no registered client", &|e| {
        subtype(e) == "110122"
            && e["outcome"] == "4"
            && e.to_string().contains("unknown client_id")
            && e.to_string().contains("request to /auth/token")
    });
    has("the WADO-RS", &|e| {
        subtype(e) == "110104" && e["action"] == "R"
    });
    has("the QIDO-RS", &|e| subtype(e) == "110112");
    has("the C-STORE association", &|e| {
        subtype(e) == "110104"
            && agent(e) == ST_MARY_AE
            && e["entity"][0]["what"]["identifier"]["value"]
                == format!("urn:oid:{}", facts["study"].as_str().unwrap())
    });
    // Nobody else reads the trail, nobody deletes it.
    let coordinator = gw.staff_token("coordinator");
    let (status, _) = get_bearer(&gw, "/fhir/AuditEvent", &coordinator);
    assert_eq!(status, 403);
    let id = events[0]["id"].as_str().unwrap();
    let admin = gw.staff_token("admin");
    let gone = reqwest::blocking::Client::new()
        .delete(format!("{}/fhir/AuditEvent/{id}", root(&gw)))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    assert_eq!(gone.status().as_u16(), 405);

    // Token issue is logged without the assertion or the token, and no
    // patient data reaches the log.
    let log = gw.log();
    assert!(log.contains("access token issued"), "{log}");
    assert!(!log.contains("eyJ"), "a JWT reached the log");
    for phi in ["Authtest", "AUTH-1"] {
        assert!(!log.contains(phi), "{phi} reached the log:\n{log}");
    }
}

fn get_bearer(gw: &Gateway, path: &str, token: &str) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{}{path}", root(gw)))
        .bearer_auth(token)
        .send()
        .expect("GET");
    let status = response.status().as_u16();
    let text = response.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The AuditEvents (with `altId` lifted to the top for matching), once
/// `ready` holds for them (the trail of reads is written in the
/// background).
fn wait_for_audit(gw: &Gateway, token: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, bundle) = get_bearer(gw, "/fhir/AuditEvent?_count=1000", token);
        assert_eq!(status, 200, "{bundle}");
        let events: Vec<Value> = bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        let mut r = e["resource"].clone();
                        r["altId"] = r["agent"][0]["altId"].clone();
                        r
                    })
                    .collect()
            })
            .unwrap_or_default();
        if ready(&events) || std::time::Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Expected status of one request for each caller, in [`CALLERS`] order.
const CALLERS: [&str; 8] = [
    "coordinator",
    "specialist",
    "approver",
    "auditor",
    "admin",
    "own-partner",
    "other-partner",
    "anonymous",
];

#[test]
fn access_matrix_of_roles_and_partners() {
    let work = tempfile::tempdir().unwrap();
    let gw = start(work.path());
    let mut tokens: Vec<Option<String>> = CALLERS[..5]
        .iter()
        .map(|role| Some(gw.staff_token(role)))
        .collect();
    tokens.push(Some(partner_token(
        &gw,
        work.path(),
        "st-mary-ehr",
        "system/*.cruds",
    )));
    tokens.push(Some(partner_token(
        &gw,
        work.path(),
        "city-clinic-ehr",
        "system/*.rs system/Patient.c",
    )));
    tokens.push(None);
    let own = &tokens[5];

    let http = reqwest::blocking::Client::new();
    let send = |method: &str, path: &str, token: &Option<String>, body: Option<(&str, Vec<u8>)>| {
        let url = format!("{}{path}", root(&gw));
        let mut request = http.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some((content_type, bytes)) = body {
            request = request.header("Content-Type", content_type).body(bytes);
        }
        let response = request.send().expect("request");
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    };
    let fhir_json = |v: Value| Some(("application/fhir+json", v.to_string().into_bytes()));

    // The partner's own records: a Patient and a study.
    let (status, body) = send(
        "POST",
        "/fhir/Patient",
        own,
        fhir_json(
            json!({"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "M-1"}]}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    let patient: Value = serde_json::from_str(&body).unwrap();
    let patient_id = patient["id"].as_str().unwrap().to_owned();
    let tiny = dicom_files(&["tiny", work.path().join("tiny").to_str().unwrap(), "1"]);
    let instance = std::fs::read(&tiny[0].path).unwrap();
    let boundary = "konsil-matrix";
    let mut stow = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    stow.extend_from_slice(&instance);
    stow.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let stow_type = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let (status, body) = send(
        "POST",
        "/dicomweb/studies",
        own,
        Some((&stow_type, stow.clone())),
    );
    assert_eq!(status, 200, "{body}");
    let study: Value = serde_json::from_str(&body).unwrap();
    let retrieve = study["00081199"]["Value"][0]["00081190"]["Value"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let study_uid = retrieve
        .split("/studies/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap()
        .to_owned();

    let (series_uid, sop_uid) = {
        let parts: Vec<&str> = retrieve.rsplit('/').collect();
        (parts[2].to_owned(), parts[0].to_owned())
    };
    let instance_path =
        format!("/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}");

    // The partner's own case: the worked referral, posted as a transaction.
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conformance/examples/referral-transaction.json");
    let (status, body) = send(
        "POST",
        "/fhir",
        own,
        Some(("application/fhir+json", std::fs::read(example).unwrap())),
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    // The first id of each type, from `response.location` (Type/id/_history/n).
    let id_of = |resource_type: &str| -> String {
        answer["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["response"]["location"].as_str())
            .find_map(|location| {
                let mut parts = location.split('/');
                (parts.next() == Some(resource_type)).then(|| parts.next().unwrap().to_owned())
            })
            .unwrap_or_else(|| panic!("no {resource_type} in {answer}"))
    };
    let [sr, task, consent, binary, document, imaging] = [
        "ServiceRequest",
        "Task",
        "Consent",
        "Binary",
        "DocumentReference",
        "ImagingStudy",
    ]
    .map(id_of);

    let assign = json!({"resourceType": "Parameters", "parameter": [
        {"name": "owner", "valueReference": {"reference": "PractitionerRole/nobody"}}]});
    let link = json!({"resourceType": "Parameters", "parameter": [
        {"name": "task", "valueReference": {"reference": format!("Task/{task}")}}]});
    let empty = json!({"resourceType": "Parameters"});
    let new_patient = fhir_json(json!({"resourceType": "Patient", "active": true}));
    let same_patient = fhir_json(json!({"resourceType": "Patient", "id": patient_id,
        "identifier": [{"system": "urn:oid:1.2.3", "value": "M-1"}]}));
    let one_patient_transaction =
        fhir_json(json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [{"fullUrl": "urn:uuid:0b7f6c1e-7a55-4c4e-9d1a-2f1e0c3b4a59",
                   "resource": {"resourceType": "Patient", "active": true},
                   "request": {"method": "POST", "url": "Patient"}}]}));
    let search_form = Some((
        "application/x-www-form-urlencoded",
        b"identifier=M-1".to_vec(),
    ));
    let audit_event = fhir_json(json!({"resourceType": "AuditEvent"}));
    let token_form = Some((
        "application/x-www-form-urlencoded",
        b"grant_type=client_credentials&scope=system%2FPatient.rs".to_vec(),
    ));
    type Row<'a> = (&'a str, String, Option<(&'a str, Vec<u8>)>, [u16; 8]);
    // What each caller may do, by kind of endpoint: a read of one of the
    // own partner's resources is 200 to whoever may read that type and 404
    // to the other partner and to a specialist with no case (no existence
    // leak); a search is 200 to every reader, and answers only what the
    // caller may see (tests/cases.rs, the fhirpy scenario above).
    const READ: [u16; 8] = [200, 404, 200, 403, 200, 200, 404, 401];
    const SEARCH: [u16; 8] = [200, 200, 200, 403, 200, 200, 200, 401];
    const STAFF_ONLY_SEARCH: [u16; 8] = [200, 200, 200, 403, 200, 403, 403, 401];
    const ANYONE: [u16; 8] = [200; 8];
    // The audit trail takes no writes from anybody: the interaction is not
    // allowed on the type (405), once the caller is known.
    const NOBODY_WRITES_AUDIT: [u16; 8] = [405, 405, 405, 405, 405, 405, 405, 401];
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        // spec: a specialist with no case assigned, who sees no patient's
        // records (tests/cases.rs has one with a case).
        //                                                            coord spec appr audit admin own other anon
        // FHIR reads of each kind of record of the own partner's case.
        ("GET", format!("/fhir/Patient/{patient_id}"), None,          READ),
        ("GET", format!("/fhir/ServiceRequest/{sr}"), None,           READ),
        ("GET", format!("/fhir/Task/{task}"), None,                   READ),
        ("GET", format!("/fhir/Consent/{consent}"), None,             READ),
        ("GET", format!("/fhir/DocumentReference/{document}"), None,  READ),
        ("GET", format!("/fhir/Binary/{binary}"), None,               READ),
        ("GET", format!("/fhir/ImagingStudy/{imaging}"), None,        READ),
        // History: instance, version, type, system.
        ("GET", format!("/fhir/Patient/{patient_id}/_history"), None, READ),
        ("GET", format!("/fhir/Task/{task}/_history/1"), None,        READ),
        ("GET", "/fhir/Patient/_history".into(), None,                SEARCH),
        ("GET", "/fhir/_history".into(), None,                        STAFF_ONLY_SEARCH),
        // Searches, by GET and by POST.
        ("GET", "/fhir/Patient?identifier=M-1".into(), None,          SEARCH),
        ("POST", "/fhir/Patient/_search".into(), search_form,         SEARCH),
        ("GET", format!("/fhir/Task?focus=ServiceRequest/{sr}"), None, SEARCH),
        ("GET", format!("/fhir/DiagnosticReport?based-on=ServiceRequest/{sr}"), None,
                                                                      SEARCH),
        // A specialist searches by patient only, and a Subscription has none.
        ("GET", "/fhir/Subscription".into(), None,                    [200, 403, 200, 403, 200, 200, 200, 401]),
        // Writes.
        ("POST", "/fhir/Patient".into(), new_patient.clone(),         [201, 403, 403, 403, 201, 201, 201, 401]),
        ("PUT", format!("/fhir/Patient/{patient_id}"), same_patient,  [200, 403, 403, 403, 200, 200, 403, 401]),
        ("POST", "/fhir".into(), one_patient_transaction,             [200, 403, 403, 403, 200, 200, 200, 401]),
        ("DELETE", "/fhir/Patient/no-such-patient".into(), None,      [403, 403, 403, 403, 204, 204, 403, 401]),
        // Validation reads and writes no record: open to every caller known.
        ("POST", "/fhir/Patient/$validate".into(), new_patient,       [200, 200, 200, 200, 200, 200, 200, 401]),
        // The audit trail: read by the auditor alone, written by nobody.
        ("GET", "/fhir/AuditEvent".into(), None,                      [403, 403, 403, 200, 403, 403, 403, 401]),
        ("POST", "/fhir/AuditEvent".into(), audit_event,              NOBODY_WRITES_AUDIT),
        ("DELETE", "/fhir/AuditEvent/any".into(), None,               NOBODY_WRITES_AUDIT),
        // The workflow operations, each by its role alone.
        ("POST", "/fhir/Task/no-such-task/$assign".into(), fhir_json(assign),
                                                                      [404, 403, 403, 403, 404, 403, 403, 401]),
        ("POST", "/fhir/Task/no-such-task/$propose".into(), fhir_json(empty.clone()),
                                                                      [404, 403, 403, 403, 404, 403, 403, 401]),
        ("POST", "/fhir/DiagnosticReport/no-such-report/$approve".into(), fhir_json(empty.clone()),
                                                                      [403, 403, 404, 403, 403, 403, 403, 401]),
        ("POST", "/fhir/DiagnosticReport/no-such-report/$return".into(), fhir_json(empty),
                                                                      [403, 403, 404, 403, 404, 403, 403, 401]),
        ("POST", "/fhir/ImagingStudy/no-such-study/$link".into(), fhir_json(link),
                                                                      [404, 403, 403, 403, 404, 403, 403, 401]),
        // Discovery, open to all.
        ("GET", "/fhir/metadata".into(), None,                        ANYONE),
        ("GET", "/fhir/.well-known/smart-configuration".into(), None, ANYONE),
        // DICOMweb: search at each level, retrieve each kind, store.
        ("GET", "/dicomweb/studies".into(), None,                     SEARCH),
        ("GET", "/dicomweb/series".into(), None,                      SEARCH),
        ("GET", "/dicomweb/instances".into(), None,                   SEARCH),
        ("GET", format!("/dicomweb/studies/{study_uid}/series"), None, SEARCH),
        ("GET", format!("/dicomweb/studies/{study_uid}"), None,       READ),
        ("GET", format!("/dicomweb/studies/{study_uid}/metadata"), None,
                                                                      READ),
        ("GET", format!("/dicomweb/studies/{study_uid}/series/{series_uid}/metadata"), None,
                                                                      READ),
        ("GET", instance_path.clone(), None,                          READ),
        ("GET", format!("{instance_path}/frames/1"), None,            READ),
        ("GET", format!("{instance_path}/bulkdata/7FE00010"), None,   READ),
        ("POST", "/dicomweb/studies".into(), Some((&stow_type, stow.clone())),
                                                                      [403, 403, 403, 403, 403, 200, 403, 401]),
        ("POST", format!("/dicomweb/studies/{study_uid}"), Some((&stow_type, stow.clone())),
                                                                      [403, 403, 403, 403, 403, 200, 403, 401]),
        // Operational endpoints carry no PHI and need no token; the token
        // endpoint authenticates by client assertion, never by bearer.
        ("GET", "/healthz".into(), None,                              ANYONE),
        ("GET", "/readyz".into(), None,                               ANYONE),
        ("GET", "/auth/jwks.json".into(), None,                       ANYONE),
        ("POST", "/auth/token".into(), token_form,                    [400; 8]),
    ];
    let mut wrong = Vec::new();
    for (method, path, body, expected) in &rows {
        for (i, caller) in CALLERS.iter().enumerate() {
            let (status, text) = send(method, path, &tokens[i], body.clone());
            if status != expected[i] {
                wrong.push(format!(
                    "{method} {path} as {caller}: {status} (expected {}) {}",
                    expected[i],
                    text.chars().take(200).collect::<String>()
                ));
            }
            // A refusal of the caller is an OperationOutcome, on DICOMweb
            // as on FHIR (the token endpoint answers in OAuth's terms).
            let refused = status == 403 || status == 401;
            if refused && !path.starts_with("/auth/") {
                let outcome: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if outcome["resourceType"] != "OperationOutcome" {
                    wrong.push(format!(
                        "{method} {path} as {caller}: {status} without an OperationOutcome"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "access matrix:\n{}", wrong.join("\n"));

    // A staff token with an unknown signature, and a tampered one: 401.
    let mut tampered = tokens[0].clone().unwrap().into_bytes();
    let at = tampered.len() - 20;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let (status, _) = send("GET", "/fhir/Patient", &Some(tampered), None);
    assert_eq!(status, 401);
}

#[test]
fn staff_keys_come_from_the_issuers_discovery_and_follow_its_rotation() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("idp");
    let dir = keys.to_str().unwrap();
    for args in [
        vec!["idp", dir],
        vec!["idp", dir, "idp2", "idp-2"],
        vec!["idp", dir, "stranger", "idp-9"],
        vec!["idp", dir, "odd", "idp-3"],
    ] {
        let out = python("auth.py", &args);
        assert!(out.status.success(), "auth.py idp: {}", stderr(&out));
    }
    let jwks = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(keys.join(format!("{name}.jwks.json"))).unwrap())
            .unwrap()
    };
    let serve = |set: Vec<Value>| {
        std::fs::write(
            keys.join("served.jwks.json"),
            json!({"keys": set}).to_string(),
        )
        .unwrap()
    };
    serve(vec![jwks("idp")["keys"][0].clone()]);
    let port_file = work.path().join("issuer.port");
    // The loopback OpenID Connect issuer of `auth.py idp-serve`.
    let _issuer = KillOnDrop(
        std::process::Command::new("python3")
            .arg(common::peers_dir().join("auth.py"))
            .args(["idp-serve", dir, port_file.to_str().unwrap()])
            .spawn()
            .expect("python3"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let port = loop {
        if let Ok(port) = std::fs::read_to_string(&port_file) {
            break port;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the issuer did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let issuer = format!("http://127.0.0.1:{port}");
    let gw = Gateway::start_secure(
        work.path(),
        &format!("[auth]\nstaff_issuer = {issuer:?}\nstaff_audience = \"konsil\"\n"),
        ["", ""],
    );
    let token = |key: &str, kid: &str, subject: &str| {
        let out = python(
            "auth.py",
            &[
                "idp-token",
                dir,
                &issuer,
                "konsil",
                subject,
                "coordinator",
                key,
                kid,
            ],
        );
        assert!(out.status.success(), "auth.py idp-token: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let fetches = || {
        std::fs::read_to_string(keys.join("fetches.log"))
            .map(|log| log.lines().count())
            .unwrap_or(0)
    };
    assert_eq!(
        fetches(),
        0,
        "nothing is fetched before a staff token comes"
    );
    let status = |token: &str| get_bearer(&gw, "/fhir/Patient", token).0;
    assert_eq!(status(&token("idp", "idp-1", "alice")), 200, "{}", gw.log());
    assert_eq!(status(&token("idp", "idp-1", "bob")), 200);
    assert_eq!(fetches(), 1, "the keys are fetched once, then kept");
    // The issuer rotates: a token of its new key makes Konsil fetch again.
    // (idp-3 is published for RS384 only; its tokens say RS256.)
    let mut odd = jwks("odd")["keys"][0].clone();
    odd["alg"] = json!("RS384");
    serve(vec![
        jwks("idp")["keys"][0].clone(),
        jwks("idp2")["keys"][0].clone(),
        odd,
    ]);
    assert_eq!(
        status(&token("idp2", "idp-2", "carol")),
        200,
        "{}",
        gw.log()
    );
    assert_eq!(fetches(), 2);
    // A made-up key id right after is refused without another fetch, and a
    // known key id on a token another key signed is refused.
    assert_eq!(status(&token("stranger", "idp-9", "mallory")), 401);
    assert_eq!(
        fetches(),
        2,
        "unknown key ids do not make Konsil hammer the issuer"
    );
    assert_eq!(status(&token("stranger", "idp-1", "mallory")), 401);
    assert_eq!(
        status(&token("odd", "idp-3", "mallory")),
        401,
        "key published for another algorithm"
    );
    assert_eq!(fetches(), 2);
    // An issuer that is not https (and not this machine) is refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_konsil"))
        .env(
            "KONSIL_AUTH_STAFF_ISSUER",
            "http://login.example.org/realms/konsil",
        )
        .args([
            "--config",
            gw.config_path().to_str().unwrap(),
            "token",
            "--role",
            "admin",
            "--subject",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("must be an https URL"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn staff_sign_in_with_the_configured_openid_connect_issuer() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("idp");
    let out = python("auth.py", &["idp", keys.to_str().unwrap()]);
    assert!(out.status.success(), "auth.py idp: {}", stderr(&out));
    let out = python("auth.py", &["keys", keys.to_str().unwrap()]);
    assert!(out.status.success(), "auth.py keys: {}", stderr(&out));
    let issuer = "https://login.example.org/realms/konsil";
    let gw = Gateway::start_secure(
        work.path(),
        &format!(
            "[auth]\nstaff_issuer = {issuer:?}\nstaff_jwks_file = {:?}\nstaff_audience = \"konsil\"\n",
            keys.join("idp.jwks.json").display().to_string()
        ),
        ["", ""],
    );
    let token = |args: &[&str]| {
        let mut all = vec!["idp-token", keys.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = python("auth.py", &all);
        assert!(out.status.success(), "auth.py idp-token: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let coordinator = token(&[issuer, "konsil", "alice", "coordinator"]);
    let (status, bundle) = get_bearer(&gw, "/fhir/Patient", &coordinator);
    assert_eq!(status, 200, "{bundle}");
    // The roles claim decides: an auditor reads the trail, not patients.
    let auditor = token(&[issuer, "konsil", "bob", "auditor"]);
    assert_eq!(get_bearer(&gw, "/fhir/Patient", &auditor).0, 403);
    assert_eq!(get_bearer(&gw, "/fhir/AuditEvent", &auditor).0, 200);
    // Refused: no roles, another audience, another issuer, another key.
    assert_eq!(
        get_bearer(
            &gw,
            "/fhir/Patient",
            &token(&[issuer, "konsil", "carol", "-"])
        )
        .0,
        403
    );
    for forged in [
        token(&[issuer, "someone-else", "alice", "coordinator"]),
        token(&["https://evil.example", "konsil", "alice", "coordinator"]),
        token(&[issuer, "konsil", "alice", "coordinator", "st-mary-ehr"]),
    ] {
        let (status, body) = get_bearer(&gw, "/fhir/Patient", &forged);
        assert_eq!(status, 401, "{body}");
    }
    // The sign-in is the audit trail's agent.
    let events = wait_for_audit(&gw, &auditor, |events| {
        events
            .iter()
            .any(|e| e["agent"][0]["who"]["identifier"]["value"] == "alice")
    });
    assert!(
        events
            .iter()
            .any(|e| e["agent"][0]["who"]["identifier"]["value"] == "alice"
                && e["agent"][0]["role"][0]["text"] == "coordinator"),
        "no audit event names alice as coordinator"
    );
}
