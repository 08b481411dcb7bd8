//! DIMSE C-ECHO / C-STORE against real peers: DCMTK (storescu, echoscu,
//! dcmsend) and pynetdicom. Issue 2.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn work() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn echo_and_association_access_control() {
    let work = work();
    let gw = Gateway::start(work.path(), "");

    let ok = echoscu(&gw, ST_MARY_AE, "KONSIL");
    assert!(ok.status.success(), "echoscu: {}", stderr(&ok));
    let py = pyscu(&gw, "echo", &[]);
    assert_eq!(py[0].0, "0x0000");

    let unknown = echoscu(&gw, "STRANGER", "KONSIL");
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("Calling AE Title Not Recognized"),
        "{}",
        stderr(&unknown)
    );
    let wrong_called = echoscu(&gw, ST_MARY_AE, "SOMEONE");
    assert!(stderr(&wrong_called).contains("Called AE Title Not Recognized"));

    let log = gw.log();
    assert!(
        log.contains("add it to a partner's ae_titles in konsil.toml") && log.contains("STRANGER"),
        "the log says how to add the AE title:\n{log}"
    );
    let (_, metrics) = gw.get("/metrics");
    assert!(
        metrics.contains("konsil_dimse_associations_total{outcome=\"accepted\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("konsil_dimse_associations_total{outcome=\"rejected\"} 2"),
        "{metrics}"
    );
}

#[test]
fn sample_files_across_transfer_syntaxes_round_trip_unchanged() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let samples = dicom_files(&["samples", work.path().join("samples").to_str().unwrap()]);
    assert!(samples.len() >= 19);
    // A real sample without StudyInstanceUID: refused, see the bad-input test.
    let (refused, good): (Vec<_>, Vec<_>) = samples
        .iter()
        .partition(|f| f.path.ends_with("JPEGLSNearLossless_08.dcm"));
    assert_eq!(refused.len(), 1);

    // pynetdicom: one presentation context per (SOP class, transfer syntax),
    // so each file travels in its own transfer syntax.
    let paths: Vec<&str> = good.iter().map(|f| f.path.to_str().unwrap()).collect();
    let results = pyscu(&gw, "store", &paths);
    assert_eq!(results.len(), good.len());
    for (status, file, comment) in &results {
        assert_eq!(status, "0x0000", "{file}: {comment}");
    }
    // Every transfer syntax is kept as received: nothing was transcoded.
    let seen_ts: std::collections::BTreeSet<_> =
        good.iter().map(|f| f.transfer_syntax.clone()).collect();
    for ts in [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    ] {
        let n = sql(
            &gw.data_dir,
            &format!("SELECT COUNT(*) FROM instances WHERE transfer_syntax = '{ts}'"),
        );
        assert!(
            n.trim() != "0",
            "nothing stored in transfer syntax {ts} (sent: {seen_ts:?})"
        );
    }

    // DCMTK dcmsend proposes each file's own transfer syntax; a second
    // partner, so nothing is a duplicate of the pynetdicom copies.
    let dcmsend = Command::new("/usr/bin/dcmsend")
        .env("TCP_NODELAY", "1")
        .args([
            "-aet",
            "CITYPACS",
            "-aec",
            "KONSIL",
            "127.0.0.1",
            &gw.dicom.to_string(),
        ])
        .args(good.iter().map(|f| f.path.as_os_str()))
        .output()
        .unwrap();
    assert!(dcmsend.status.success(), "dcmsend: {}", stderr(&dcmsend));
    for f in &good {
        // Some samples' file meta name another instance than their data set;
        // both peers send the data set's own UID.
        let sop = python_sop_uid(&f.path);
        // pynetdicom sent every file in its own transfer syntax.
        let stored = stored_blob(&gw.data_dir, "st-mary", &sop, &f.transfer_syntax);
        assert_same_data_set(&f.path, &stored);
        // dcmsend converts uncompressed files to the first syntax it proposes
        // (explicit VR little endian); compressed ones travel as they are.
        // Either way, what arrived is what is stored.
        let uncompressed = [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
        ];
        let arrived_ts = if uncompressed.contains(&f.transfer_syntax.as_str()) {
            "1.2.840.10008.1.2.1"
        } else {
            f.transfer_syntax.as_str()
        };
        let from_dcmsend = stored_blob(&gw.data_dir, "city-clinic", &sop, arrived_ts);
        if arrived_ts == f.transfer_syntax {
            assert_same_data_set(&f.path, &from_dcmsend);
        }
    }
    // Character sets survive into the index as text.
    let names = sql(
        &gw.data_dir,
        "SELECT patient_name FROM studies WHERE partner = 'city-clinic'",
    );
    assert!(
        names.contains("Wang^XiaoDong=王^小東"),
        "ISO 2022 Chinese name decoded: {names}"
    );
}

fn python_sop_uid(path: &std::path::Path) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import pydicom,sys; print(pydicom.dcmread(sys.argv[1], stop_before_pixels=True).SOPInstanceUID)",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    stdout(&out).trim().to_owned()
}

#[test]
fn ct_study_via_storescu_is_indexed_and_logs_carry_no_phi() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let files = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "12",
        "GW-PHI-4711",
        "ACC-PHI-1",
    ]);
    let paths: Vec<_> = files.iter().map(|f| f.path.as_path()).collect();
    let out = storescu(&gw, ST_MARY_AE, &paths);
    assert!(out.status.success(), "storescu: {}", stderr(&out));
    assert_eq!(gw.instance_count(), 12);
    let study = sql(
        &gw.data_dir,
        "SELECT partner, patient_id, accession_number, patient_name, study_date FROM studies",
    );
    assert_eq!(
        study.trim(),
        "st-mary\tGW-PHI-4711\tACC-PHI-1\tMüller^Jürgen\t20260101"
    );
    let series = sql(&gw.data_dir, "SELECT modality, series_number FROM series");
    assert_eq!(series.trim(), "CT\t1");
    let row = sql(
        &gw.data_dir,
        &format!(
            "SELECT source, calling_ae, length(dataset_sha256), rows, columns, instance_number, size > 500000, conflict FROM instances WHERE sop_instance_uid = '{}'",
            files[3].sop_instance
        ),
    );
    assert_eq!(row.trim(), "dimse\tTESTSCU\t64\t512\t512\t4\t1\t0");
    for f in files.iter().step_by(5) {
        let stored = stored_blob(&gw.data_dir, "st-mary", &f.sop_instance, &f.transfer_syntax);
        assert_same_data_set(&f.path, &stored);
    }
    let (_, metrics) = gw.get("/metrics");
    assert!(
        metrics.contains("konsil_instances_received_total{source=\"dimse\",outcome=\"stored\"} 12"),
        "{metrics}"
    );
    let (indexed, rows) = indexed_bytes(&gw.data_dir);
    assert!(
        gw.segment_bytes() - indexed < rows * 512,
        "nothing but the instances and their framing is stored"
    );
    let log = gw.log();
    for phi in ["GW-PHI-4711", "ACC-PHI-1", "Müller", "Jürgen", "19700101"] {
        assert!(!log.contains(phi), "log contains PHI {phi:?}:\n{log}");
    }
}

#[test]
fn bad_input_gets_its_status_and_nothing_is_stored() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let dir = work.path().join("bad");
    let out = python("dicom_files.py", &["bad", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let samples = dicom_files(&["samples", work.path().join("samples").to_str().unwrap()]);
    let sample = |name: &str| {
        samples
            .iter()
            .find(|f| f.path.ends_with(name))
            .unwrap()
            .path
            .to_str()
            .unwrap()
            .to_owned()
    };
    let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();

    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        // Garbage: the structure walk (or the header parse) says where.
        (vec![file("garbage.dcm")], "0xC000", "data set"),
        (
            vec![
                file("conflict_a.dcm"),
                "--instance".into(),
                "1.2.3.4".into(),
            ],
            "0xA900",
            "SOPInstanceUID in data set",
        ),
        (
            vec![file("nostudy.dcm")],
            "0xA900",
            "StudyInstanceUID (0020,000D) is missing",
        ),
        (vec![file("baduid.dcm")], "0xC001", "leading zero"),
        (
            vec![sample("MR_small.dcm"), "--cut".into(), "5".into()],
            "0xC000",
            "truncated",
        ),
        (
            vec![sample("JPEG2000.dcm"), "--cut".into(), "20".into()],
            "0xC000",
            "truncated inside element (7FE0,0010)",
        ),
        (
            vec![sample("test-SR.dcm"), "--cut".into(), "100".into()],
            "0xC000",
            "truncated",
        ),
        (
            vec![sample("image_dfl.dcm"), "--cut".into(), "20".into()],
            "0xC000",
            "deflate",
        ),
        (
            vec![sample("MR_small.dcm"), "--garbage".into()],
            "0xC000",
            "data set",
        ),
        (
            vec![sample("JPEGLSNearLossless_08.dcm")],
            "0xA900",
            "StudyInstanceUID",
        ),
    ];
    for (args, status, reason) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = pyscu(&gw, "raw", &args);
        assert_eq!(&result[0].0, status, "{args:?}: {:?}", result[0]);
        assert!(
            result[0].2.contains(reason),
            "{args:?}: comment {:?} lacks {reason:?}",
            result[0].2
        );
    }
    assert_eq!(gw.instance_count(), 0, "nothing refused is indexed");
    assert_eq!(
        gw.segment_bytes(),
        0,
        "nothing refused is kept in the blob store"
    );
    let (_, metrics) = gw.get("/metrics");
    assert!(
        metrics.contains("konsil_store_failures_total{source=\"dimse\",status=\"0xC000\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("konsil_store_failures_total{source=\"dimse\",status=\"0xA900\"} 3"),
        "{metrics}"
    );

    // The same good file afterwards is stored: the association state is clean.
    let ok = pyscu(&gw, "raw", &[&sample("MR_small.dcm")]);
    assert_eq!(ok[0].0, "0x0000");
}

#[test]
fn resend_is_stored_once_and_conflicts_keep_both() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let dir = work.path().join("bad");
    assert!(python("dicom_files.py", &["bad", dir.to_str().unwrap()])
        .status
        .success());
    let a = dir.join("conflict_a.dcm");
    let b = dir.join("conflict_b.dcm");
    let first = pyscu(&gw, "store", &[a.to_str().unwrap()]);
    let again = storescu(&gw, ST_MARY_AE, &[&a]);
    assert_eq!(first[0].0, "0x0000");
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(gw.instance_count(), 1, "an identical resend is stored once");
    let one_copy = gw.segment_bytes();
    assert!(
        one_copy < 2 * std::fs::metadata(&a).unwrap().len(),
        "the resent bytes were not kept"
    );

    let other = pyscu(&gw, "store", &[b.to_str().unwrap()]);
    assert_eq!(
        other[0].0, "0x0000",
        "a conflicting object is accepted, not lost"
    );
    let rows = sql(
        &gw.data_dir,
        "SELECT conflict, blob_offset FROM instances ORDER BY id",
    );
    let rows: Vec<_> = rows.lines().collect();
    assert_eq!(rows.len(), 2, "both versions kept: {rows:?}");
    assert!(
        rows.iter().all(|r| r.starts_with("1\t")),
        "both flagged: {rows:?}"
    );
    assert_ne!(rows[0], rows[1]);
    assert!(gw.log().contains("both kept and flagged as conflict"));
    let (_, metrics) = gw.get("/metrics");
    assert!(metrics.contains("outcome=\"duplicate\"} 1"), "{metrics}");
    assert!(metrics.contains("outcome=\"conflict\"} 1"), "{metrics}");
}

#[test]
fn storage_failure_is_a700_and_recovers() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let files = dicom_files(&["tiny", work.path().join("t").to_str().unwrap(), "2"]);
    // Make the blob store unusable: a new segment cannot be created, as on a
    // full or broken disk (root ignores permissions, so replace the directory
    // with a file). The directory is moved aside, not removed: it holds this
    // process's presence file.
    let tmp = gw.data_dir.join("segments");
    let aside = gw.data_dir.join("segments.aside");
    std::fs::rename(&tmp, &aside).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let failed = pyscu(&gw, "store", &[files[0].path.to_str().unwrap()]);
    assert_eq!(failed[0].0, "0xA700");
    assert!(failed[0].2.contains("storage failure"), "{:?}", failed[0]);
    assert!(
        !failed[0].2.contains(gw.data_dir.to_str().unwrap()),
        "no paths leak to the peer"
    );
    assert!(gw.log().contains("C-STORE failed at the receiver"));
    assert_eq!(gw.instance_count(), 0);

    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(&aside, &tmp).unwrap();
    let ok = pyscu(&gw, "store", &[files[1].path.to_str().unwrap()]);
    assert_eq!(ok[0].0, "0x0000");
    assert_eq!(gw.instance_count(), 1);
}

#[test]
fn over_the_association_cap_is_a_transient_rejection() {
    let work = work();
    let gw = Gateway::start(work.path(), "max_associations = 1");
    let mut holder = common::hold_association(&gw, 6);
    let busy = echoscu(&gw, ST_MARY_AE, "KONSIL");
    assert!(!busy.status.success());
    let err = stderr(&busy);
    assert!(err.contains("Rejected Transient"), "{err}");
    assert!(
        err.contains("Local Limit Exceeded")
            || err.contains("local-limit-exceeded")
            || err.contains("Service Provider"),
        "{err}"
    );
    assert!(holder.wait().unwrap().success());
    // Once the slot is free the same caller gets in.
    let ok = echoscu(&gw, ST_MARY_AE, "KONSIL");
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn idle_association_is_closed_after_the_idle_timeout() {
    let work = work();
    let gw = Gateway::start(work.path(), "idle_timeout_secs = 1");
    // pynetdicom holds the association open without sending anything; its
    // own outcome does not matter, the gateway's log below does.
    let _held = python(
        "pyscu.py",
        &[
            "hold",
            "127.0.0.1",
            &gw.dicom.to_string(),
            PY_AE,
            "KONSIL",
            "3",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("idle timeout") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gw.log().contains("idle timeout"), "{}", gw.log());
}

/// Wait until at least `min` bytes of an unfinished object are on disk.
fn wait_for_partial(data_dir: &std::path::Path, min: u64) {
    wait_until("a partial object", Duration::from_secs(60), || {
        segment_bytes(data_dir) >= min
    });
}

#[test]
fn kill_9_during_a_transfer_leaves_nothing_and_resend_succeeds() {
    let work = work();
    let big = dicom_files(&["big", work.path().join("big.dcm").to_str().unwrap(), "300"]);
    let gw = Gateway::start(work.path(), "");
    let data_dir = gw.data_dir.clone();
    let mut sender = storescu_cmd(&gw, ST_MARY_AE, &[&big[0].path])
        .spawn()
        .unwrap();
    wait_for_partial(&data_dir, 8 << 20);
    gw.kill9();
    let sent = sender.wait().unwrap();
    assert!(!sent.success(), "the sender must not see success");
    assert!(
        segment_bytes(&data_dir) >= 8 << 20,
        "the crash left a partial object behind"
    );

    let gw = Gateway::start_with(work.path(), &data_dir, "");
    assert_eq!(gw.segment_bytes(), 0, "restart removed the partial object");
    assert_eq!(gw.instance_count(), 0, "no partial instance is visible");
    assert!(
        gw.log()
            .contains("discarded unfinished objects left by an earlier run"),
        "{}",
        gw.log()
    );
    let again = storescu(&gw, ST_MARY_AE, &[&big[0].path]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(gw.instance_count(), 1);
    let stored = stored_blob(
        &gw.data_dir,
        "st-mary",
        &big[0].sop_instance,
        &big[0].transfer_syntax,
    );
    let sent_len = std::fs::metadata(&big[0].path).unwrap().len();
    let stored_len = std::fs::metadata(&stored).unwrap().len();
    // Same data set; only the file meta header differs in size.
    assert!(
        sent_len.abs_diff(stored_len) < 512,
        "{sent_len} vs {stored_len}"
    );
}

/// Every stored instance is in the audit trail, even when the server dies
/// before the association whose one event names them has ended: each
/// instance's index transaction notes its transfer, and the next start
/// turns what a kill left noted into the event. A normal end clears the
/// notes in the transaction that stores its event.
#[test]
fn instances_of_an_association_cut_by_a_kill_are_audited_at_the_next_start() {
    let work = work();
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "3",
        "KILL-1",
        "ACC-1",
    ]);
    let gw = Gateway::start(work.path(), "");
    let data_dir = gw.data_dir.clone();
    let files: Vec<&std::path::Path> = ct.iter().map(|f| f.path.as_path()).collect();
    let (mut holder, lines) = pyscu_holding(gw.dicom, None, "store-hold", 60, &files);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.starts_with("0x0000\t")), "{lines:?}");
    gw.kill9();
    let _ = holder.kill();
    let _ = holder.wait();
    // The three instances are indexed and noted; no event names them yet.
    let study = sql(&data_dir, "SELECT DISTINCT study_uid FROM instances");
    assert_eq!(
        sql(
            &data_dir,
            "SELECT study_uid, instances, calling_ae FROM transfers_unaudited"
        )
        .trim(),
        format!("{}\t3\t{PY_AE}", study.trim())
    );
    assert_eq!(store_events(&data_dir), Vec::<serde_json::Value>::new());

    let gw = Gateway::start_with(work.path(), &data_dir, "");
    assert_eq!(gw.instance_count(), 3);
    let events = store_events(&data_dir);
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event["action"], "C", "{event}");
    assert_eq!(event["agent"][0]["altId"], PY_AE, "{event}");
    assert_eq!(
        event["agent"][0]["who"]["identifier"]["value"], "st-mary",
        "{event}"
    );
    assert_eq!(
        event["entity"][0]["what"]["identifier"]["value"],
        format!("urn:oid:{}", study.trim()),
        "{event}"
    );
    assert_eq!(
        event["entity"][0]["description"], "3 instance(s)",
        "{event}"
    );
    assert!(
        event["outcomeDesc"]
            .as_str()
            .is_some_and(|d| d.contains("its process stopped")),
        "{event}"
    );
    assert_eq!(
        sql(&data_dir, "SELECT count(*) FROM transfers_unaudited").trim(),
        "0"
    );
    assert!(
        gw.log()
            .contains("stored the audit records of DICOM transfers"),
        "{}",
        gw.log()
    );

    // An association that ends normally: its event, and no note left.
    let more = dicom_files(&[
        "ct",
        work.path().join("more").to_str().unwrap(),
        "2",
        "KILL-2",
        "ACC-2",
    ]);
    let sent = storescu(&gw, ST_MARY_AE, &[&more[0].path, &more[1].path]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let deadline = Instant::now() + Duration::from_secs(20);
    while store_events(&data_dir).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let normal = store_events(&data_dir)
        .into_iter()
        .find(|e| e["agent"][0]["altId"] == ST_MARY_AE)
        .expect("the normal association's event");
    assert_eq!(
        normal["entity"][0]["description"], "2 instance(s)",
        "{normal}"
    );
    assert!(normal.get("outcomeDesc").is_none(), "{normal}");
    assert_eq!(
        sql(&data_dir, "SELECT count(*) FROM transfers_unaudited").trim(),
        "0"
    );
}

/// The index records an instance while its object is synced, so an OS
/// crash can leave a row whose object never fully reached the disk. Such
/// an instance was never acknowledged; the restart after a crash checks
/// the last instance of every segment against its digest and withdraws it.
/// (A kill -9 keeps the page cache, so the torn bytes are made by hand.)
#[test]
fn after_a_crash_a_torn_last_instance_is_withdrawn_and_a_clean_stop_skips_the_check() {
    let work = work();
    let ct = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "2",
        "TORN-PID",
        "TORN-ACC",
    ]);
    let gw = Gateway::start(work.path(), "");
    let data_dir = gw.data_dir.clone();
    let mark = data_dir.join("segments").join("clean-shutdown");
    assert!(!mark.exists(), "a running store carries no clean mark");
    let sent = storescu(&gw, ST_MARY_AE, &[&ct[0].path, &ct[1].path]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert_eq!(gw.instance_count(), 2);
    gw.kill9();
    assert!(!mark.exists(), "a crash leaves no clean mark");

    // Tear the segment's last instance: pixel bytes that never got written.
    let row = sql(
        &data_dir,
        "SELECT blob_object, blob_offset, blob_length, sop_instance_uid FROM instances ORDER BY blob_offset DESC LIMIT 1",
    );
    let fields: Vec<&str> = row.trim().split('\t').collect();
    let (object, offset, length) = (
        fields[0],
        fields[1].parse::<u64>().unwrap(),
        fields[2].parse::<u64>().unwrap(),
    );
    let torn = fields[3].to_owned();
    overwrite_in_segment(&data_dir, object, offset + length - 8192, &[0u8; 4096]);

    let gw = Gateway::start_with(work.path(), &data_dir, "");
    assert_eq!(gw.instance_count(), 1, "the torn instance is withdrawn");
    assert_eq!(
        sql(
            &data_dir,
            &format!("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = '{torn}'")
        )
        .trim(),
        "0"
    );
    assert!(
        gw.log().contains("withdrawn from the index"),
        "{}",
        gw.log()
    );
    // Its series and study stay: the other instance still belongs to them.
    assert_eq!(sql(&data_dir, "SELECT COUNT(*) FROM series").trim(), "1");
    assert_eq!(sql(&data_dir, "SELECT COUNT(*) FROM studies").trim(), "1");
    // The sender would resend what it never saw acknowledged.
    let again = storescu(&gw, ST_MARY_AE, &[&ct[0].path, &ct[1].path]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(gw.instance_count(), 2);

    // A clean stop syncs everything and leaves the mark; the next start
    // removes it and has nothing to withdraw.
    assert!(gw.terminate().success());
    assert!(mark.exists(), "SIGTERM leaves the clean mark");
    let gw = Gateway::start_with(work.path(), &data_dir, "");
    assert!(!mark.exists(), "opening the store removes the mark");
    assert_eq!(gw.instance_count(), 2);
    assert!(
        !gw.log().contains("withdrawn from the index"),
        "{}",
        gw.log()
    );
}

/// Write `bytes` at `at` in a segment file, as a crash that kept only part
/// of a record would leave it.
fn overwrite_in_segment(data_dir: &std::path::Path, segment: &str, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(data_dir.join("segments").join(segment))
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

#[test]
fn withdrawing_one_of_two_conflicting_versions_clears_the_other_versions_flag() {
    let work = work();
    let dir = work.path().join("bad");
    assert!(python("dicom_files.py", &["bad", dir.to_str().unwrap()])
        .status
        .success());
    let gw = Gateway::start(work.path(), "");
    let data_dir = gw.data_dir.clone();
    for name in ["conflict_a.dcm", "conflict_b.dcm"] {
        let sent = storescu(&gw, ST_MARY_AE, &[&dir.join(name)]);
        assert!(sent.status.success(), "{}", stderr(&sent));
    }
    let flags = || sql(&data_dir, "SELECT conflict FROM instances ORDER BY id");
    assert_eq!(flags(), "1\n1\n", "both versions flagged");
    gw.kill9();

    // Tear the second version (the segment's last record), as an OS crash
    // before its sync would: recovery withdraws it.
    let row = sql(
        &data_dir,
        "SELECT blob_object, blob_offset, blob_length FROM instances ORDER BY blob_offset DESC LIMIT 1",
    );
    let fields: Vec<&str> = row.trim().split('\t').collect();
    let (offset, length) = (
        fields[1].parse::<u64>().unwrap(),
        fields[2].parse::<u64>().unwrap(),
    );
    overwrite_in_segment(&data_dir, fields[0], offset + length - 128, &[0xA5u8; 64]);
    let gw = Gateway::start_with(work.path(), &data_dir, "");
    assert_eq!(gw.instance_count(), 1, "the torn version is withdrawn");
    assert_eq!(flags(), "0\n", "the version left alone is no conflict");
}

#[test]
fn sender_abort_mid_transfer_discards_the_partial_instance() {
    let work = work();
    let big = dicom_files(&["big", work.path().join("big.dcm").to_str().unwrap(), "300"]);
    let gw = Gateway::start(work.path(), "");
    let mut sender = storescu_cmd(&gw, ST_MARY_AE, &[&big[0].path])
        .spawn()
        .unwrap();
    wait_for_partial(&gw.data_dir, 8 << 20);
    signal(sender.id(), "KILL");
    let _ = sender.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.segment_bytes() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        gw.segment_bytes(),
        0,
        "partial object removed without a restart"
    );
    assert_eq!(gw.instance_count(), 0);
    assert!(
        gw.log().contains("the partial instance is discarded"),
        "{}",
        gw.log()
    );
}

#[test]
fn sigterm_lets_an_in_flight_transfer_finish_then_exits_0() {
    let work = work();
    let big = dicom_files(&["big", work.path().join("big.dcm").to_str().unwrap(), "300"]);
    let gw = Gateway::start(work.path(), "");
    let data_dir = gw.data_dir.clone();
    let sender = storescu_cmd(&gw, ST_MARY_AE, &[&big[0].path])
        .spawn()
        .unwrap();
    wait_for_partial(&data_dir, 8 << 20);
    let status = gw.terminate();
    assert!(status.success(), "exit status {status:?}");
    let sent = sender.wait_with_output().unwrap();
    assert!(
        sent.status.success(),
        "the in-flight C-STORE completed: {}",
        stderr(&sent)
    );
    assert_eq!(instance_count(&data_dir), 1);
}

#[test]
fn peak_memory_is_bounded_by_buffers_not_instance_size() {
    let work = work();
    let big = dicom_files(&["big", work.path().join("big.dcm").to_str().unwrap(), "512"]);
    let gw = Gateway::start(work.path(), "");
    // The fixed start-up cost (compiled FHIR definitions, pools) is not
    // what this bounds: the growth over it is.
    let baseline = gw.peak_rss_kib() / 1024;
    let out = storescu(&gw, ST_MARY_AE, &[&big[0].path]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(gw.instance_count(), 1);
    let growth = gw.peak_rss_kib() / 1024 - baseline;
    assert!(
        growth <= 64,
        "peak RSS grew {growth} MiB (from {baseline} MiB) for a 512 MiB instance"
    );
}

#[test]
fn index_commits_lost_with_the_os_are_rebuilt_from_the_blob_store() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let files = dicom_files(&["tiny", work.path().join("t").to_str().unwrap(), "6"]);
    let paths: Vec<_> = files.iter().map(|f| f.path.as_path()).collect();
    let out = storescu(&gw, ST_MARY_AE, &paths);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(gw.instance_count(), 6);
    let data_dir = gw.data_dir.clone();
    gw.kill9();

    // What an OS crash can do with synchronous=NORMAL: the last commits
    // never reached the disk. Roll the index back to after the second
    // instance, with a recovery point that is not even a record boundary
    // (inside the second record's trailer): recovery must rescan, not cut.
    let lose = "import sqlite3,sys\ncon=sqlite3.connect(sys.argv[1])\n\
        keep=con.execute('SELECT id FROM instances ORDER BY id LIMIT 1 OFFSET 1').fetchone()[0]\n\
        end=con.execute('SELECT blob_offset+blob_length FROM instances WHERE id=?',(keep,)).fetchone()[0]\n\
        con.execute('DELETE FROM instances WHERE id>?',(keep,))\n\
        con.execute('UPDATE blob_objects SET resume_at=?',(end,))\n\
        con.commit()";
    let rolled = Command::new("python3")
        .args(["-c", lose, data_dir.join("index.sqlite").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(rolled.status.success(), "{}", stderr(&rolled));
    assert_eq!(instance_count(&data_dir), 2);

    let gw = Gateway::start_with(work.path(), &data_dir, "");
    assert_eq!(
        gw.instance_count(),
        6,
        "every acknowledged instance is back"
    );
    assert!(
        gw.log()
            .contains("re-indexed stored instances the index had lost"),
        "{}",
        gw.log()
    );
    let row = sql(
        &gw.data_dir,
        &format!(
            "SELECT source, calling_ae, partner FROM instances WHERE sop_instance_uid = '{}'",
            files[5].sop_instance
        ),
    );
    assert_eq!(
        row.trim(),
        "dimse\tTESTSCU\tst-mary",
        "provenance restored too"
    );
    let stored = stored_blob(
        &gw.data_dir,
        "st-mary",
        &files[5].sop_instance,
        &files[5].transfer_syntax,
    );
    assert_same_data_set(&files[5].path, &stored);
}

#[test]
fn unknown_sop_classes_only_with_the_switch() {
    let work = work();
    let private = dicom_files(&["private", work.path().join("private.dcm").to_str().unwrap()]);
    let file = &private[0];
    let negotiate = |gw: &Gateway| {
        pyscu(gw, "negotiate", &[&file.sop_class, &file.transfer_syntax])[0]
            .1
            .clone()
    };
    let (strict_dir, open_dir) = (work.path().join("strict"), work.path().join("open"));
    std::fs::create_dir_all(&strict_dir).unwrap();
    std::fs::create_dir_all(&open_dir).unwrap();
    let strict = Gateway::start(&strict_dir, "");
    assert_eq!(negotiate(&strict), "rejected");
    drop(strict);

    let open = Gateway::start(&open_dir, "accept_unknown_sop_classes = true");
    assert_eq!(negotiate(&open), "accepted");
    let stored = pyscu(&open, "store", &[file.path.to_str().unwrap()]);
    assert_eq!(stored[0].0, "0x0000");
    assert_eq!(open.instance_count(), 1);
}

#[test]
fn every_standard_transfer_syntax_is_negotiated_as_proposed() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let mut syntaxes: Vec<String> = [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // JPEG, JPEG-LS, JPEG 2000, JPIP, MPEG-2, H.264, HEVC, HTJ2K.
    for suffix in [
        "50", "51", "57", "70", "80", "81", "90", "91", "92", "93", "94", "95", "100", "101",
        "102", "103", "104", "105", "106", "107", "108", "201", "202", "203",
    ] {
        syntaxes.push(format!("1.2.840.10008.1.2.4.{suffix}"));
    }
    let mut args: Vec<&str> = vec!["1.2.840.10008.5.1.4.1.1.2"];
    args.extend(syntaxes.iter().map(String::as_str));
    args.push("1.2.3.4.5.6.7"); // not a transfer syntax anyone knows
    let result = pyscu(&gw, "negotiate", &args);
    for (ts, verdict, _) in &result {
        let expected = if ts == "1.2.3.4.5.6.7" {
            "rejected"
        } else {
            "accepted"
        };
        assert_eq!(verdict, expected, "transfer syntax {ts}");
    }
    assert_eq!(result.len(), syntaxes.len() + 1);
}

#[test]
fn concurrent_senders_are_all_stored() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let senders: Vec<_> = (0..4)
        .map(|i| {
            let files = dicom_files(&[
                "tiny",
                work.path().join(format!("t{i}")).to_str().unwrap(),
                "25",
            ]);
            let paths: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
            let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
            storescu_cmd(&gw, ST_MARY_AE, &refs).spawn().unwrap()
        })
        .collect();
    for sender in senders {
        let out = sender.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(gw.instance_count(), 100);
    let (_, metrics) = gw.get("/metrics");
    assert!(
        metrics.contains("konsil_dimse_associations_total{outcome=\"accepted\"} 4"),
        "{metrics}"
    );
}

#[test]
fn orthanc_as_referring_pacs_pushes_a_study_unchanged() {
    let work = work();
    let gw = Gateway::start(work.path(), "");
    let mut files = dicom_files(&[
        "ct",
        work.path().join("ct").to_str().unwrap(),
        "3",
        "ORTH-PID",
        "ORTH-ACC",
    ]);
    let samples = dicom_files(&["samples", work.path().join("samples").to_str().unwrap()]);
    files.extend(samples.into_iter().filter(|f| {
        [
            "JPEG2000.dcm",
            "MR_small_jpeg_ls_lossless.dcm",
            "image_dfl.dcm",
        ]
        .iter()
        .any(|name| f.path.ends_with(name))
    }));
    assert_eq!(files.len(), 6);
    let mut args = vec![
        "push".to_owned(),
        work.path().join("orthanc").to_str().unwrap().to_owned(),
        gw.dicom.to_string(),
    ];
    args.extend(files.iter().map(|f| f.path.to_str().unwrap().to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python("orthanc.py", &args);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("\"FailedInstancesCount\": 0"),
        "{}",
        stdout(&out)
    );

    let rows = sql(
        &gw.data_dir,
        "SELECT partner, calling_ae, COUNT(*) FROM instances GROUP BY partner, calling_ae",
    );
    assert_eq!(rows.trim(), "city-clinic\tORTHANC\t6");
    // Orthanc sends what it stores; Konsil keeps each file's transfer syntax.
    for f in &files {
        let stored = stored_blob(
            &gw.data_dir,
            "city-clinic",
            &f.sop_instance,
            &f.transfer_syntax,
        );
        assert_same_data_set(&f.path, &stored);
    }
}
