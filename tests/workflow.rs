//! The second-opinion case end to end (`tests/peers/workflow.py` plays every
//! role with real clients, each signed in with its own token: fhirpy with
//! the referrer's SMART Backend Services token, DCMTK storescu, requests with
//! coordinator, specialist, approver and auditor staff tokens, a rest-hook
//! receiver), then the public validators check every resource the server
//! emitted and pdftotext reads the opinion back.

mod common;

use std::process::Command;

use serde_json::Value;

use common::{
    dicom_files, partner_token, python_json, stderr, stdout, storescu, test_clients, Gateway,
    ST_MARY_AE,
};

/// A gateway with St Mary's and City Clinic as SMART clients (`st_mary`:
/// more keys of St Mary's partner table) and `workflow` settings, and St
/// Mary's and the auditor's tokens.
fn start(work: &std::path::Path, workflow: &str, st_mary: &str) -> (Gateway, Tokens) {
    let [clients, city] = test_clients(&work.join("keys"));
    let st_mary = format!("{st_mary}{clients}");
    let gw = Gateway::start_secure(work, &format!("[workflow]\n{workflow}"), [&st_mary, &city]);
    let tokens = Tokens {
        partner: partner_token(&gw, work, "st-mary-ehr", "system/*.cruds"),
        auditor: gw.staff_token_as("auditor", "audit-1"),
    };
    (gw, tokens)
}

/// The `[workflow]` settings of the end-to-end case: short waits.
const E2E_WORKFLOW: &str = "imaging_quiet_secs = 2\ncheck_interval_secs = 1\nnotify_first_retry_secs = 1\nnotify_max_backoff_secs = 2";

#[test]
fn a_referral_goes_from_intake_to_delivered_opinion_and_follow_up() {
    let work = tempfile::tempdir().unwrap();
    let (gw, tokens) = start(work.path(), E2E_WORKFLOW, "");
    let roles = serde_json::json!({
        "partner": tokens.partner,
        "coordinator": gw.staff_token_as("coordinator", "coord-1"),
        // On the roster as the requested oncologist (workflow.py).
        "specialist": gw.staff_token_as("specialist", "dr-requested"),
        // The other oncologist on the roster, not assigned.
        "other_specialist": gw.staff_token_as("specialist", "dr-other"),
        "approver": gw.staff_token_as("approver", "approver-1"),
        "admin": gw.staff_token_as("admin", "admin-1"),
        "auditor": tokens.auditor,
    });
    let tokens_file = work.path().join("tokens.json");
    std::fs::write(&tokens_file, roles.to_string()).unwrap();
    let base = format!("http://127.0.0.1:{}/fhir", gw.http);
    let result = python_json(
        &gw,
        "workflow.py",
        &[
            &base,
            &gw.dicom.to_string(),
            work.path().to_str().unwrap(),
            tokens_file.to_str().unwrap(),
        ],
    );
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
    assert!(facts["stray_header"]
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

    let (gw, tokens) = follow_up_is_refused_once_its_window_closed(gw, work.path(), facts);
    let second = a_second_referral_of_the_same_patient(&gw, facts, &tokens);
    retention_discards_the_submitted_records_and_keeps_the_opinion(&gw, facts, &tokens);
    second_referral_keeps_its_records(&gw, &tokens, &second);
    // `konsil retention` ran as its own process, so the gateway still takes
    // the study's series for known: the PACS sending the study again must
    // not trip on that.
    let ct: Vec<std::path::PathBuf> = std::fs::read_dir(work.path().join("ct"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let paths: Vec<&std::path::Path> = ct.iter().map(|p| p.as_path()).collect();
    assert_eq!(paths.len(), 4);
    let sent = storescu(&gw, ST_MARY_AE, &paths);
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert_eq!(gw.instance_count(), 4, "{}", stdout(&sent));

    // Every resource the server emitted passes both public validators: what
    // the clients kept on the way, and every version of every resource the
    // server holds at the end (system history as admin, the audit trail as
    // auditor), so resources the workflow wrote in the background are in.
    let mut resources = result["resources"].as_array().unwrap().clone();
    assert!(resources.len() >= 12, "{} resources", resources.len());
    let admin = gw.staff_token_as("admin", "admin-1");
    let held = every_entry(&gw, &admin, "/fhir/_history?_count=100");
    let audit = every_entry(&gw, &tokens.auditor, "/fhir/AuditEvent?_count=100");
    for kind in [
        "Patient",
        "ServiceRequest",
        "Task",
        "Consent",
        "DocumentReference",
        "ImagingStudy",
        "DiagnosticReport",
        "Communication",
    ] {
        assert!(
            held.iter().any(|r| r["resourceType"] == kind),
            "no {kind} in the system history"
        );
    }
    // Every version of the case's Task, ImagingStudies and Subscriptions is
    // named by the event stored with it: the client's, an operation's, a
    // delivery attempt's, or (study arrivals, deadlines) the workflow's own.
    let named: std::collections::HashSet<&str> = audit
        .iter()
        .flat_map(|e| e["entity"].as_array().into_iter().flatten())
        .filter_map(|e| e["what"]["reference"].as_str())
        .collect();
    let unnamed: Vec<String> = held
        .iter()
        .filter(|r| {
            ["Task", "ImagingStudy", "Subscription"].contains(&r["resourceType"].as_str().unwrap())
        })
        .map(|r| {
            format!(
                "{}/{}/_history/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap(),
                r["meta"]["versionId"].as_str().unwrap()
            )
        })
        .filter(|v| !named.contains(v.as_str()))
        .collect();
    assert!(
        unnamed.is_empty(),
        "versions no AuditEvent names: {unnamed:?}"
    );
    assert!(
        audit.iter().any(|e| {
            e["subtype"][1]["code"] == "workflow"
                && e["agent"][0]["who"]["reference"] == "Organization/konsil"
                && e["entity"].as_array().is_some_and(|es| {
                    es.iter().any(|x| {
                        x["what"]["reference"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("ImagingStudy/"))
                    })
                })
        }),
        "no workflow event for the study's arrival"
    );
    resources.extend(held);
    resources.extend(audit);
    let report = common::public_validators(&resources);
    let failures: Vec<&Value> = report
        .iter()
        .filter(|r| {
            !r["medplum"].as_array().unwrap().is_empty()
                || !r["fhirjs"].as_array().unwrap().is_empty()
        })
        .collect();
    assert!(failures.is_empty(), "validator findings: {failures:#?}");
}

/// The same delivered case, served again with a follow-up window of 0
/// days: a question now is refused with the reason, and opens nothing.
/// Returns the gateway as restarted, and its tokens.
fn follow_up_is_refused_once_its_window_closed(
    gw: Gateway,
    work: &std::path::Path,
    facts: &Value,
) -> (Gateway, Tokens) {
    assert!(gw.terminate().success());
    let (gw, tokens) = start(work, &format!("{E2E_WORKFLOW}\nfollow_up_days = 0"), "");
    let task = format!("Task/{}", facts["task_id"].as_str().unwrap());
    let case = read_as_partner(&gw, &tokens, &format!("/fhir/{task}"));
    assert_eq!(
        case["businessStatus"]["coding"][0]["code"], "delivered",
        "{case}"
    );
    let children = |gw: &Gateway| {
        read_as_partner(
            gw,
            &tokens,
            &format!("/fhir/Task?part-of={task}&_summary=count"),
        )["total"]
            .as_u64()
            .unwrap()
    };
    let before = children(&gw);
    let question = serde_json::json!({
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": task}],
        "payload": [{"contentString": "And the follow-up scan?"}]
    });
    let (status, body) = send_fhir(
        &gw,
        reqwest::Method::POST,
        "/Communication",
        &tokens.partner,
        &question,
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("the follow-up window of 0 days after delivery has closed"),
        "{body}"
    );
    assert_eq!(
        children(&gw),
        before,
        "a refused question opens no child Task"
    );
    let asked = read_as_partner(
        &gw,
        &tokens,
        &format!("/fhir/Communication?part-of={task}&_summary=count"),
    );
    assert_eq!(
        asked["total"], 1,
        "only the question asked in the window is stored"
    );
    (gw, tokens)
}

/// `Type/id` of what each entry of a transaction response made.
fn created(response: &Value) -> Vec<String> {
    response["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let location = e["response"]["location"].as_str().unwrap();
            location.split('/').take(2).collect::<Vec<_>>().join("/")
        })
        .collect()
}

/// The resources of every page of the Bundle at `path` (a search or a
/// history), read with `token` by following `next` links.
fn every_entry(gw: &Gateway, token: &str, path: &str) -> Vec<Value> {
    let bearer = format!("Bearer {token}");
    let mut resources = Vec::new();
    let mut next = Some(path.to_owned());
    while let Some(path) = next.take() {
        let (status, body) = gw.get_with(&path, &[("Authorization", bearer.as_str())]);
        assert_eq!(status, 200, "{path}: {body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        for entry in page["entry"].as_array().into_iter().flatten() {
            // History entries of deletions carry no resource.
            if entry["resource"].is_object() && entry["search"]["mode"] != "outcome" {
                resources.push(entry["resource"].clone());
            }
        }
        next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(|url| {
                let at = url.find("/fhir").expect("next link under /fhir");
                url[at..].to_owned()
            });
    }
    resources
}

/// `method` `body` to `/fhir{path}` with `token`; the status and the
/// response body.
fn send_fhir(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: &Value,
) -> (u16, String) {
    let response = reqwest::blocking::Client::new()
        .request(method, format!("http://127.0.0.1:{}/fhir{path}", gw.http))
        .bearer_auth(token)
        .header("Content-Type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

/// GET `path` as the partner: it must answer 200 with JSON.
fn read_as_partner(gw: &Gateway, tokens: &Tokens, path: &str) -> Value {
    let bearer = format!("Bearer {}", tokens.partner);
    let (status, body) = gw.get_with(path, &[("Authorization", bearer.as_str())]);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// POST a transaction Bundle as the partner.
fn post_transaction(gw: &Gateway, tokens: &Tokens, body: &Value) -> (u16, String) {
    send_fhir(gw, reqwest::Method::POST, "", &tokens.partner, body)
}

/// PUT `resource` (it has its type and id) with `token`.
fn put(gw: &Gateway, token: &str, resource: &Value) -> (u16, String) {
    let path = format!(
        "/{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    send_fhir(gw, reqwest::Method::PUT, &path, token, resource)
}

/// Later, St Mary's refers the same patient again: a second case, still
/// waiting for records when the first one's retention runs. Returns the
/// second case's documents and their Binaries (`Type/id`): one filed for
/// the new referral, one filed for the patient only.
fn a_second_referral_of_the_same_patient(
    gw: &Gateway,
    facts: &Value,
    tokens: &Tokens,
) -> Vec<String> {
    let first = read_as_partner(
        gw,
        tokens,
        &format!(
            "/fhir/ServiceRequest/{}",
            facts["request_id"].as_str().unwrap()
        ),
    );
    let mut request = first.clone();
    let request = request.as_object_mut().unwrap();
    for element in ["id", "meta", "supportingInfo", "identifier"] {
        request.remove(element);
    }
    let note = |uuid: &str, binary: &str, related: bool| {
        let mut document = serde_json::json!({"resourceType": "DocumentReference", "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}]},
            "subject": first["subject"].clone(),
            "date": "2026-11-23T10:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain", "url": binary, "title": "Progress note"}}]});
        if related {
            document["context"] = serde_json::json!({"related": [{"reference": "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000001"}]});
        }
        serde_json::json!({"fullUrl": uuid, "resource": document,
            "request": {"method": "POST", "url": "DocumentReference"}})
    };
    let binary = |uuid: &str, text: &str| {
        use base64::Engine as _;
        serde_json::json!({"fullUrl": uuid, "resource": {"resourceType": "Binary", "contentType": "text/plain",
            "data": base64::engine::general_purpose::STANDARD.encode(text)},
            "request": {"method": "POST", "url": "Binary"}})
    };
    // St Mary's sends its own Task, tagged with a legal hold: the case
    // adopts the Task, not the hold (staff set that).
    let their_task = serde_json::json!({"resourceType": "Task", "status": "requested", "intent": "order",
        "meta": {"tag": [{"system": "http://konsil.dev/fhir/CodeSystem/case-flag", "code": "legal-hold"}]},
        "focus": {"reference": "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000001"},
        "for": first["subject"].clone(), "requester": first["requester"].clone()});
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000001", "resource": request,
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"fullUrl": "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000007", "resource": their_task,
         "request": {"method": "POST", "url": "Task"}},
        binary("urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000002", "Seen again in November."),
        note("urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000003", "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000002", true),
        binary("urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000004", "Filed for the patient."),
        note("urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000005", "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000004", false),
    ]});
    let (status, response) = post_transaction(gw, tokens, &bundle);
    assert_eq!(status, 200, "{response}");
    let response: Value = serde_json::from_str(&response).unwrap();
    let locations = created(&response);
    // The second referral is a case of its own (their Task, adopted),
    // waiting for records, with no legal hold.
    let tasks = read_as_partner(gw, tokens, &format!("/fhir/Task?focus={}", locations[0]));
    assert_eq!(tasks["total"], 1, "{tasks}");
    let case = &tasks["entry"][0]["resource"];
    assert_eq!(
        format!("Task/{}", case["id"].as_str().unwrap()),
        locations[1]
    );
    assert!(!case.to_string().contains("legal-hold"), "{case}");
    let delivered = read_as_partner(
        gw,
        tokens,
        &format!("/fhir/Task/{}", facts["task_id"].as_str().unwrap()),
    );
    the_referrer_cannot_steer_retention(gw, tokens, &delivered, case);
    // Nor claim imaging that never arrived: what Konsil derives from the
    // DICOM it received is its own.
    let claimed = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:2d0e0c52-4f4c-4b8e-9d7e-000000000006", "resource": {
            "resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.999"}],
            "subject": first["subject"].clone(), "basedOn": [{"reference": locations[0]}],
            "endpoint": [{"reference": "Endpoint/konsil-dicomweb"}],
            "numberOfSeries": 1, "numberOfInstances": 1},
         "request": {"method": "POST", "url": "ImagingStudy"}}]});
    let (status, outcome) = post_transaction(gw, tokens, &claimed);
    assert_eq!(status, 422, "{outcome}");
    assert!(outcome.contains("kept by Konsil"), "{outcome}");
    // The received study of the first case: the referrer may annotate it,
    // not change what Konsil derived from the images.
    let studies = read_as_partner(
        gw,
        tokens,
        &format!(
            "/fhir/ImagingStudy?basedon=ServiceRequest/{}",
            facts["request_id"].as_str().unwrap()
        ),
    );
    let received = studies["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|s| s["endpoint"].is_array())
        .expect("the received study")
        .clone();
    let mut annotated = received.clone();
    annotated["description"] = serde_json::json!("CT chest, as sent by St Mary's");
    let (status, body) = put(gw, &tokens.partner, &annotated);
    assert_eq!(status, 200, "a note on the study is the referrer's: {body}");
    let mut inflated = annotated.clone();
    inflated["numberOfInstances"] = serde_json::json!(400);
    let (status, body) = put(gw, &tokens.partner, &inflated);
    assert_eq!(status, 422, "the counts are Konsil's: {body}");
    // The records of the second case: its documents and Binaries.
    locations[2..].to_vec()
}

/// Inactivity (`Task.lastModified`) and the legal hold decide what
/// retention discards: the referrer can change neither; staff set the hold.
fn the_referrer_cannot_steer_retention(
    gw: &Gateway,
    tokens: &Tokens,
    delivered: &Value,
    task: &Value,
) {
    // A write is activity; backdating is not: the delivered case keeps its
    // time (back to when it was authored would make it due sooner).
    let mut backdated = delivered.clone();
    backdated["lastModified"] = delivered["authoredOn"].clone();
    assert_ne!(backdated["lastModified"], delivered["lastModified"]);
    let (status, body) = put(gw, &tokens.partner, &backdated);
    assert_eq!(status, 200, "{body}");
    let now = read_as_partner(
        gw,
        tokens,
        &format!("/fhir/Task/{}", delivered["id"].as_str().unwrap()),
    );
    assert_eq!(now["lastModified"], delivered["lastModified"], "{now}");
    let mut held = task.clone();
    held["meta"]["tag"] = serde_json::json!([{"system": "http://konsil.dev/fhir/CodeSystem/case-flag", "code": "legal-hold"}]);
    let (status, body) = put(gw, &tokens.partner, &held);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("legal-hold"), "{body}");
    let (status, body) = put(gw, &gw.staff_token_as("coordinator", "coord-1"), &held);
    assert_eq!(status, 200, "staff set the hold: {body}");
}

/// The first case's retention left the second case's records alone: the
/// document filed for the second referral and the one filed for the
/// patient keep their content, and their Binaries stay.
fn second_referral_keeps_its_records(gw: &Gateway, tokens: &Tokens, records: &[String]) {
    let bearer = format!("Bearer {}", tokens.partner);
    let partner = [("Authorization", bearer.as_str())];
    assert_eq!(records.len(), 4, "{records:?}");
    for record in records {
        let (status, body) = gw.get_with(&format!("/fhir/{record}"), &partner);
        assert_eq!(status, 200, "{record}: {body}");
        if record.starts_with("DocumentReference/") {
            let document: Value = serde_json::from_str(&body).unwrap();
            assert!(
                document["content"][0]["attachment"]["url"]
                    .as_str()
                    .is_some_and(|url| url.starts_with("Binary/")),
                "{document}"
            );
        }
    }
}

/// `konsil retention` with a shifted clock (seven months on): the study,
/// the Binaries and the documents' content go, everywhere (index, history,
/// segment files); the opinion, the case and the audit trail stay.
/// The bearer tokens the Rust side reads with.
struct Tokens {
    partner: String,
    auditor: String,
}

fn retention_discards_the_submitted_records_and_keeps_the_opinion(
    gw: &Gateway,
    facts: &Value,
    tokens: &Tokens,
) {
    let as_of = utc_from_now("+214 days", "+%Y-%m-%d");
    let run = |dry: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_konsil"));
        cmd.args([
            "--config",
            gw.config_path().to_str().unwrap(),
            "retention",
            "--as-of",
            &as_of,
        ]);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().expect("konsil retention");
        assert!(out.status.success(), "retention: {}", stderr(&out));
        stdout(&out)
    };
    let task = format!("Task/{}", facts["task_id"].as_str().unwrap());
    // Today nothing is old enough.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_konsil"));
    cmd.args([
        "--config",
        gw.config_path().to_str().unwrap(),
        "retention",
        "--dry-run",
    ]);
    let today = stdout(&cmd.output().unwrap());
    assert!(today.starts_with("0 case(s)"), "{today}");

    let dry = run(true);
    assert!(
        dry.contains(&task)
            && dry.contains(
                "would discard 1 studies (4 instances), the content of 4 documents, 4 binaries"
            ),
        "{dry}"
    );
    let study_uid = facts["study_uid"].as_str().unwrap();
    let bearer = format!("Bearer {}", tokens.partner);
    let partner = [("Authorization", bearer.as_str())];
    let (status, _) = gw.get_with(&format!("/dicomweb/studies/{study_uid}/metadata"), &partner);
    assert_eq!(status, 200, "a dry run changes nothing");

    // The DICOM segment files cannot be written during this run (each is a
    // directory for now): the case's records go from the index all the
    // same, and the bytes wait in the queue for the next run.
    let segments = gw.data_dir.join("segments");
    let seg_files: Vec<std::path::PathBuf> = std::fs::read_dir(&segments)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert!(!seg_files.is_empty());
    for seg in &seg_files {
        std::fs::rename(seg, seg.with_extension("kept")).unwrap();
        std::fs::create_dir(seg).unwrap();
    }
    let done = run(false);
    assert!(
        done.contains(&task) && done.contains("discarded 1 studies (4 instances)"),
        "{done}"
    );
    let (status, _) = gw.get_with(&format!("/dicomweb/studies/{study_uid}/metadata"), &partner);
    assert_eq!(status, 404, "the study is gone from DICOMweb");
    assert_eq!(gw.instance_count(), 0);
    let queued = || {
        common::sql(
            &gw.data_dir,
            "SELECT count(*) FROM blob_discards WHERE store = 'dicom'",
        )
        .trim()
        .parse::<u32>()
        .unwrap()
    };
    assert_eq!(queued(), 4, "the four instances' bytes wait in the queue");
    for seg in &seg_files {
        std::fs::remove_dir(seg).unwrap();
        std::fs::rename(seg.with_extension("kept"), seg).unwrap();
    }
    assert!(run(false).starts_with("0 case(s)"), "the case is done");
    assert_eq!(queued(), 0, "the next run destroyed them");
    // The bytes are gone from the segment files too (the patient's name was
    // in every instance).
    let mut found = false;
    for entry in walk(&gw.data_dir) {
        let bytes = std::fs::read(&entry).unwrap();
        found |= bytes
            .windows("Jürgen".len())
            .any(|w| w == "Jürgen".as_bytes());
    }
    assert!(!found, "discarded DICOM content still on disk");

    let locations: Vec<&str> = facts["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    for location in &locations {
        let mut parts = location.split('/');
        let (kind, id) = (parts.next().unwrap(), parts.next().unwrap());
        let (status, body) = gw.get_with(&format!("/fhir/{kind}/{id}"), &partner);
        match kind {
            "Binary" => {
                assert_eq!(status, 410, "{location}: {body}");
                let (status, _) = gw.get_with(&format!("/fhir/{kind}/{id}/_history/1"), &partner);
                assert_eq!(status, 410, "{location} v1 is purged");
            }
            "DocumentReference" => {
                assert_eq!(status, 200);
                let doc: Value = serde_json::from_str(&body).unwrap();
                let attachment = &doc["content"][0]["attachment"];
                assert!(
                    attachment.get("url").is_none() && attachment.get("data").is_none(),
                    "{doc}"
                );
                let (status, _) = gw.get_with(&format!("/fhir/{kind}/{id}/_history/1"), &partner);
                assert_eq!(status, 410, "{location} v1 is purged");
            }
            _ => {}
        }
    }
    // Kept: the opinion and its PDF, the case (now closed), the audit trail.
    let (status, body) = gw.get_with(
        &format!(
            "/fhir/DiagnosticReport/{}",
            facts["report_id"].as_str().unwrap()
        ),
        &partner,
    );
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "final");
    assert!(report["presentedForm"][0]["data"].as_str().unwrap().len() > 100);
    let (_, body) = gw.get_with(
        &format!(
            "/fhir/DocumentReference/{}",
            facts["opinion_document"].as_str().unwrap()
        ),
        &partner,
    );
    let opinion_doc: Value = serde_json::from_str(&body).unwrap();
    assert!(opinion_doc["content"][0]["attachment"]["data"].is_string());
    let (_, body) = gw.get_with(&format!("/fhir/{task}"), &partner);
    let case: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(case["businessStatus"]["coding"][0]["code"], "closed");
    assert!(case["output"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["type"]["coding"][0]["code"] == "records-discarded"));
    let auditor = format!("Bearer {}", tokens.auditor);
    let (_, body) = gw.get_with(
        "/fhir/AuditEvent?subtype=retention",
        &[("Authorization", auditor.as_str())],
    );
    assert!(body.contains("DICOM Study Deleted"), "{body}");
    // A second run finds nothing more to do.
    assert!(run(false).starts_with("0 case(s)"));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "seg") {
            out.push(path);
        }
    }
    out
}

/// The UTC time `offset` from now (`+214 days`, `+3 seconds`) in `format`
/// (`+%F`), by date(1).
fn utc_from_now(offset: &str, format: &str) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", offset, format])
        .output()
        .expect("date");
    stdout(&out).trim().to_owned()
}

/// The time-driven checks take each open case on its own: a case that
/// cannot be checked (its referral is gone from the store) is skipped with a
/// warning, and another case's consent still runs out on time. Through the
/// API a case's referral cannot be deleted at all.
#[test]
fn a_case_that_cannot_be_checked_does_not_hold_up_the_time_driven_checks() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "[workflow]\ncheck_interval_secs = 1");
    let http = reqwest::blocking::Client::new();
    let base = format!("http://127.0.0.1:{}/fhir", gw.http);
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| -> (u16, Value) {
        let mut request = http
            .request(method, format!("{base}{path}"))
            .header("X-Konsil-Partner", "st-mary")
            .header("Content-Type", "application/fhir+json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    // A referral with a consent that runs out at `consent_end`.
    let referral = |name: &str, consent_end: &str| -> String {
        let patient = format!("urn:uuid:00000000-0000-4000-8000-00000000000{name}");
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": patient, "resource": {"resourceType": "Patient", "name": [{"family": format!("Tick{name}")}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": format!("urn:uuid:00000000-0000-4000-9000-00000000000{name}"),
             "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "category": [{"coding": [{"system": "http://konsil.dev/fhir/CodeSystem/referral-type", "code": "second-opinion"}]}],
                "code": {"coding": [{"system": "http://konsil.dev/fhir/CodeSystem/specialty", "code": "oncology"}]},
                "subject": {"reference": patient}, "requester": {"reference": "Organization/st-mary"},
                "reasonCode": [{"text": "staging"}]},
             "request": {"method": "POST", "url": "ServiceRequest"}},
            {"resource": {"resourceType": "Consent", "status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": {"reference": patient},
                "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
                "provision": {"type": "permit", "period": {"end": consent_end}}},
             "request": {"method": "POST", "url": "Consent"}},
        ]});
        let (status, answer) = send(reqwest::Method::POST, "", Some(bundle));
        assert_eq!(status, 200, "{answer}");
        answer["entry"][1]["response"]["location"]
            .as_str()
            .unwrap()
            .split("/_history")
            .next()
            .unwrap()
            .to_owned()
    };
    let case_of = |request: &str| -> Value {
        let (status, bundle) = send(
            reqwest::Method::GET,
            &format!("/Task?focus={request}"),
            None,
        );
        assert_eq!(status, 200, "{bundle}");
        bundle["entry"][0]["resource"].clone()
    };
    // Case A, created first: the API keeps its referral; then the row goes.
    let broken = referral("1", "2099-01-01");
    let (status, outcome) = send(reqwest::Method::DELETE, &format!("/{broken}"), None);
    assert_eq!(status, 409, "{outcome}");
    assert!(outcome.to_string().contains("withdraw it"), "{outcome}");
    let id = broken.trim_start_matches("ServiceRequest/");
    let script = "import sqlite3,sys\ncon=sqlite3.connect(sys.argv[1],timeout=30)\ncon.execute(\"UPDATE fhir_resource SET deleted=1, body=NULL WHERE type='ServiceRequest' AND id=?\",(sys.argv[2],))\ncon.commit()";
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            gw.data_dir.join("index.sqlite").to_str().unwrap(),
            id,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Case B: its consent ends in a few seconds.
    let end = utc_from_now("+3 seconds", "+%Y-%m-%dT%H:%M:%SZ");
    let request = referral("2", &end);
    let reason = |task: &Value| {
        task["statusReason"]["text"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert!(!reason(&case_of(&request)).contains("period has ended"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let task = case_of(&request);
        if reason(&task).contains("period has ended") {
            assert_eq!(task["status"], "on-hold", "{task}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the expired consent was never noticed: {task}\n{}",
            gw.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(gw.log().contains("time-driven check of a case failed"));
}

/// Reconciliation by patient, end to end: St Mary's PACS sends studies
/// without the referral's accession number. One whose PatientID is the
/// case patient's record number (in St Mary's configured
/// `patient_id_system`, or naming its issuer) joins the case; one naming
/// another issuer, one without an issuer whose number the patient has in
/// another system, and one City Clinic sends for a patient with the same
/// number, wait unlinked. Staff `$link` the first to the case; the second
/// cannot be linked across partners.
#[test]
fn studies_join_cases_by_patient_id_and_issuer_or_wait_for_link() {
    let work = tempfile::tempdir().unwrap();
    // The worked example's patient is GW-TEST-0001 in urn:oid:1.2.3.4.5.6.7.
    let (gw, tokens) = start(
        work.path(),
        "imaging_quiet_secs = 1\ncheck_interval_secs = 1",
        "patient_id_system = \"urn:oid:1.2.3.4.5.6.7\"\n",
    );
    let coordinator = gw.staff_token_as("coordinator", "coord-1");
    // The worked referral without its manifest: only the patient can match.
    let mut bundle: Value = serde_json::from_str(
        &std::fs::read_to_string("conformance/examples/referral-transaction.json").unwrap(),
    )
    .unwrap();
    let entries = bundle["entry"].as_array_mut().unwrap();
    entries.retain(|e| e["resource"]["resourceType"] != "ImagingStudy");
    // The patient also has a number of another of St Mary's schemes.
    let patient = entries
        .iter_mut()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .unwrap();
    patient["resource"]["identifier"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"system": "urn:oid:7.7.7", "value": "LAB-77"}));
    let (status, response) = post_transaction(&gw, &tokens, &bundle);
    assert_eq!(status, 200, "{response}");
    let response: Value = serde_json::from_str(&response).unwrap();
    let locations = created(&response);
    let first = |kind: &str| -> String {
        locations
            .iter()
            .find(|l| l.starts_with(&format!("{kind}/")))
            .unwrap_or_else(|| panic!("no {kind} in {response}"))
            .clone()
    };
    let request = first("ServiceRequest");
    let task = first("Task");

    let send = |name: &str, ae: &str, patient_id: &str, study: &str, extra: &[&str]| {
        let out = work.path().join(name);
        let mut args = vec!["ct", out.to_str().unwrap(), "1", patient_id, "-"];
        args.extend(["--study", study]);
        args.extend(extra);
        let files = dicom_files(&args);
        let sent = storescu(&gw, ae, &[files[0].path.as_path()]);
        assert!(sent.status.success(), "{}", stderr(&sent));
    };
    let root = "1.2.826.0.1.3680043.8.498.4242";
    let by_system = format!("{root}.1");
    let by_issuer = format!("{root}.2");
    let other_issuer = format!("{root}.3");
    let other_partner = format!("{root}.4");
    let other_system = format!("{root}.5");
    let mrn = "GW-TEST-0001";
    send("by-system", ST_MARY_AE, mrn, &by_system, &[]);
    send(
        "by-issuer",
        ST_MARY_AE,
        mrn,
        &by_issuer,
        &["--issuer", "1.2.3.4.5.6.7"],
    );
    send(
        "other-issuer",
        ST_MARY_AE,
        mrn,
        &other_issuer,
        &["--issuer", "9.9.9"],
    );
    send("other-partner", "CITYPACS", mrn, &other_partner, &[]);
    send("other-system", ST_MARY_AE, "LAB-77", &other_system, &[]);

    // The ImagingStudy Konsil keeps for a study, once it is there.
    let imaging_study = |uid: &str| -> Value {
        let path = format!("/fhir/ImagingStudy?identifier=urn:dicom:uid%7Curn:oid:{uid}");
        let bearer = format!("Bearer {coordinator}");
        for _ in 0..100 {
            let (status, body) = gw.get_with(&path, &[("Authorization", bearer.as_str())]);
            assert_eq!(status, 200, "{body}");
            let bundle: Value = serde_json::from_str(&body).unwrap();
            if let Some(study) = bundle["entry"][0]["resource"].as_object() {
                return Value::Object(study.clone());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("no ImagingStudy for {uid}");
    };
    let based_on = |study: &Value| study["basedOn"][0]["reference"].as_str().map(str::to_owned);
    assert_eq!(based_on(&imaging_study(&by_system)), Some(request.clone()));
    assert_eq!(based_on(&imaging_study(&by_issuer)), Some(request.clone()));
    let waiting = imaging_study(&other_issuer);
    assert_eq!(based_on(&waiting), None, "{waiting}");
    let foreign = imaging_study(&other_partner);
    assert_eq!(based_on(&foreign), None, "{foreign}");
    let unsure = imaging_study(&other_system);
    assert_eq!(based_on(&unsure), None, "{unsure}");

    // Staff resolve the reconciliation list.
    let link = |study: &Value| {
        let path = format!("/ImagingStudy/{}/$link", study["id"].as_str().unwrap());
        let parameters = serde_json::json!({"resourceType": "Parameters",
            "parameter": [{"name": "task", "valueReference": {"reference": task}}]});
        send_fhir(&gw, reqwest::Method::POST, &path, &coordinator, &parameters)
    };
    let (status, body) = link(&waiting);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        based_on(&imaging_study(&other_issuer)),
        Some(request.clone())
    );
    let (status, body) = link(&foreign);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("different partners"), "{body}");
    assert_eq!(based_on(&imaging_study(&other_partner)), None);
    // The referrer sees its case's studies, never City Clinic's.
    let visible = read_as_partner(&gw, &tokens, "/fhir/ImagingStudy");
    let ids: Vec<&str> = visible["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "{visible}");
    assert!(!ids.contains(&foreign["id"].as_str().unwrap()));
}
