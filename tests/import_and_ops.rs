//! `konsil import`, the operational endpoints and the CLI. Issue 2.

mod common;

use std::process::Command;

use common::*;

fn konsil(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_konsil"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn import_a_dicomdir_and_a_folder() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "[workflow]\ncheck_interval_secs = 1");
    let cd = work.path().join("cd");
    let files = dicom_files(&[
        "ct",
        cd.join("IMG").to_str().unwrap(),
        "4",
        "CD-PID",
        "CD-ACC",
        "--noext",
    ]);
    let mk = Command::new("dcmmkdir")
        .current_dir(&cd)
        .args(["+r", "IMG"])
        .output()
        .unwrap();
    assert!(mk.status.success(), "dcmmkdir: {}", stderr(&mk));
    // Not referenced by the DICOMDIR: ignored on the DICOMDIR path.
    std::fs::write(cd.join("AUTORUN.INF"), b"[autorun]").unwrap();
    let config = gw.config_path().to_str().unwrap().to_owned();
    let import = |path: &str, partner: &str| {
        konsil(&["--config", &config, "import", path, "--partner", partner])
    };

    let out = import(cd.join("DICOMDIR").to_str().unwrap(), "st-mary");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("stored: 4"), "{report}");
    assert!(report.contains("rejected: 0"), "{report}");
    assert_eq!(gw.instance_count(), 4);
    let source = sql(
        &gw.data_dir,
        "SELECT DISTINCT source, partner FROM instances",
    );
    assert_eq!(source.trim(), "import\tst-mary");
    // The import is in the audit trail: who ran it, the study, the count.
    let trail = sql(
        &gw.data_dir,
        "SELECT body FROM fhir_resource WHERE type = 'AuditEvent' AND body LIKE '%konsil import%'",
    );
    let event: serde_json::Value =
        serde_json::from_str(trail.lines().next().expect("an import AuditEvent")).unwrap();
    assert_eq!(event["subtype"][0]["code"], "110104", "{event}");
    assert!(event["agent"][0]["who"]["display"]
        .as_str()
        .unwrap()
        .starts_with("server operator"));
    assert_eq!(
        event["entity"][0]["description"], "4 instance(s)",
        "{event}"
    );
    let stored = stored_blob(
        &gw.data_dir,
        "st-mary",
        &files[0].sop_instance,
        &files[0].transfer_syntax,
    );
    assert_same_data_set(&files[0].path, &stored);
    // The running server's workflow picks the imported study up from the
    // index's durable arrival note: with no referral it waits, unmatched,
    // for staff to link it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let unmatched = loop {
        let (status, body) = gw.get_with(
            "/fhir/ImagingStudy?basedon:missing=true",
            &[("X-Konsil-Partner", "st-mary")],
        );
        assert_eq!(status, 200, "{body}");
        let bundle: serde_json::Value = serde_json::from_str(&body).unwrap();
        if bundle["total"] == 1 || std::time::Instant::now() > deadline {
            break bundle;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(unmatched["total"], 1, "{unmatched}");
    assert_eq!(unmatched["entry"][0]["resource"]["numberOfInstances"], 4);
    assert_eq!(
        sql(&gw.data_dir, "SELECT count(*) FROM study_arrivals").trim(),
        "0"
    );

    // A folder: the same files again are duplicates; the non-DICOM file is
    // skipped; a broken DICOM file is rejected with its reason (exit 1).
    let bad = work.path().join("bad");
    assert!(python("dicom_files.py", &["bad", bad.to_str().unwrap()])
        .status
        .success());
    std::fs::copy(bad.join("nostudy.dcm"), cd.join("IMG/NOSTUDY")).unwrap();
    let out = import(cd.join("IMG").to_str().unwrap(), "st-mary");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let report = stdout(&out);
    assert!(report.contains("duplicate: 4"), "{report}");
    assert!(report.contains("rejected: 1"), "{report}");
    assert!(
        report.contains("NOSTUDY: StudyInstanceUID (0020,000D) is missing"),
        "{report}"
    );
    assert_eq!(gw.instance_count(), 4);

    let out = import(cd.to_str().unwrap(), "nobody");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("partner nobody is not configured"),
        "{}",
        stderr(&out)
    );
    // The store's clean-shutdown mark: not while the gateway has the store
    // open (an import closing meanwhile does not write it), then written
    // by whichever process closes it last.
    let mark = gw.data_dir.join("segments").join("clean-shutdown");
    assert!(!mark.exists(), "the gateway still has the store open");
    assert!(gw.terminate().success());
    assert!(mark.exists(), "the gateway closed the store last");
    let out = import(cd.join("IMG").to_str().unwrap(), "st-mary");
    assert!(stdout(&out).contains("duplicate: 4"), "{}", stdout(&out));
    assert!(mark.exists(), "an import alone closes the store cleanly");
}

/// Poll `query` on the store of `data_dir` until it prints a number above 0.
fn wait_for_rows(data_dir: &std::path::Path, query: &str) {
    wait_until(query, std::time::Duration::from_secs(60), || {
        sql(data_dir, query).trim().parse::<u64>().unwrap_or(0) > 0
    });
}

#[test]
fn an_import_running_while_the_server_starts_keeps_its_own_audit_record() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "");
    let data_dir = gw.data_dir.clone();
    let config = gw.config_path().to_str().unwrap().to_owned();
    assert!(gw.terminate().success());
    let mut folders = Vec::new();
    for name in ["first", "second"] {
        let folder = work.path().join(name);
        let made = python(
            "dicom_files.py",
            &["tiny", folder.to_str().unwrap(), "2000"],
        );
        assert!(made.status.success(), "{}", stderr(&made));
        folders.push(folder);
    }
    let spawn_import = |folder: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_konsil"))
            .args(["--config", &config, "import", folder.to_str().unwrap()])
            .args(["--partner", "st-mary"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let notes = "SELECT count(*) FROM transfers_unaudited";

    // The server starts while an import is storing: it leaves the import's
    // notes alone, and the import's one event names all it stored.
    let import = spawn_import(&folders[0]);
    wait_for_rows(&data_dir, notes);
    let gw = Gateway::start_with(work.path(), &data_dir, "");
    let mut import = import;
    assert!(
        import.try_wait().unwrap().is_none(),
        "the import ended before the server was up; the test needs a longer one"
    );
    assert!(
        store_events(&data_dir).is_empty(),
        "{:?}",
        store_events(&data_dir)
    );
    let out = import.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("stored: 2000"), "{}", stdout(&out));
    let events = store_events(&data_dir);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]["outcomeDesc"]
        .as_str()
        .is_some_and(|d| d.starts_with("konsil import")));
    assert_eq!(events[0]["entity"][0]["description"], "2000 instance(s)");
    assert_eq!(sql(&data_dir, notes).trim(), "0");
    assert_eq!(
        sql(&data_dir, "SELECT count(*) FROM transfers_running").trim(),
        "0"
    );

    // An import killed midway: the server up meanwhile leaves its notes
    // (it does not look again); its next start stores the event for what
    // the import had stored.
    let mut import = spawn_import(&folders[1]);
    wait_for_rows(&data_dir, notes);
    import.kill().unwrap();
    import.wait().unwrap();
    let stored: u64 = sql(
        &data_dir,
        "SELECT COALESCE(SUM(instances), 0) FROM transfers_unaudited",
    )
    .trim()
    .parse()
    .unwrap();
    assert!(
        stored > 0 && stored < 2000,
        "{stored} instances before the kill"
    );
    assert!(gw.terminate().success());
    let gw = Gateway::start_with(work.path(), &data_dir, "");
    let events = store_events(&data_dir);
    let said = |e: &serde_json::Value, what: &str| {
        e["outcomeDesc"].as_str().is_some_and(|d| d.contains(what))
    };
    let cut: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| said(e, "its process stopped"))
        .collect();
    assert_eq!(cut.len(), 1, "{events:?}");
    assert_eq!(
        cut[0]["entity"][0]["description"],
        format!("{stored} instance(s)")
    );
    // Besides the first import's own event, at most one more: the kill may
    // catch an instance between its durable write and its index commit;
    // recovery indexes it again, as of a transfer not known.
    for e in &events {
        assert!(
            said(e, "konsil import for partner")
                || said(e, "its process stopped")
                || said(e, "rebuilt from the blob store"),
            "{e}"
        );
    }
    assert!(events.len() <= 3, "{events:?}");
    assert_eq!(sql(&data_dir, notes).trim(), "0");
    assert_eq!(
        sql(&data_dir, "SELECT count(*) FROM transfers_running").trim(),
        "0"
    );
    assert!(gw.terminate().success());
}

#[test]
fn health_readiness_and_metrics() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start(work.path(), "");
    assert_eq!(gw.get("/healthz").0, 200);
    assert_eq!(gw.get("/readyz").0, 200);
    let (status, metrics) = gw.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# TYPE konsil_dimse_associations_active gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("# EOF"), "{metrics}");
    // The blob store's directory gone: not ready.
    std::fs::rename(
        gw.data_dir.join("segments"),
        gw.data_dir.join("segments.moved"),
    )
    .unwrap();
    assert_eq!(gw.get("/readyz").0, 503);
    assert_eq!(gw.get("/healthz").0, 200);
}

#[test]
fn cli_documents_flags_and_rejects_bad_config() {
    let help = konsil(&["--help"]);
    let text = stdout(&help);
    for flag in [
        "--config",
        "--data-dir",
        "--http",
        "--dicom",
        "--ae-title",
        "serve",
        "import",
        "KONSIL_",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nmax_pdu = 12\n").unwrap();
    let out = konsil(&["--config", bad.to_str().unwrap(), "serve"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_pdu"), "{}", stderr(&out));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::start_full(
        work.path(),
        &work.path().join("data"),
        "",
        &[("KONSIL_LOG_FORMAT", "json")],
    );
    let ok = echoscu(&gw, ST_MARY_AE, "KONSIL");
    assert!(ok.status.success());
    assert!(gw.terminate().success());
    let log = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    let check = "import json,sys\nfor l in sys.stdin: json.loads(l)";
    let mut py = Command::new("python3")
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    py.stdin.take().unwrap().write_all(log.as_bytes()).unwrap();
    assert!(py.wait().unwrap().success(), "not JSON lines:\n{log}");
    assert!(
        log.contains("\"message\":\"association accepted\""),
        "{log}"
    );
}
