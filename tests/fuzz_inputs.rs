//! The fuzz targets' seeds and every regression input (fuzz findings and
//! hand-made hostile inputs under tests/fuzz/regressions/<target>/) through
//! the same entry points the fuzzers call (src/fuzzing.rs). Seeds are valid
//! and must pass every check; a regression input must be refused cleanly,
//! unless its name starts with `ok-` (hostile but valid: accepted). The
//! kept fuzz corpus (tests/fuzz/corpus/<target>/, what the fuzzers found
//! new coverage with, minimized) goes through too, with no verdict asked.
//! An input that panics or overflows the stack fails this test.

use std::path::Path;

/// (kind, file name, bytes) of every input of `target`.
fn inputs(target: &str) -> Vec<(&'static str, String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions", "corpus"] {
        let dir = root.join(kind).join(target);
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let bytes = std::fs::read(entry.path()).unwrap();
            found.push((
                kind,
                entry.file_name().to_string_lossy().into_owned(),
                bytes,
            ));
        }
    }
    found.sort();
    found
}

/// Run `entry` on each input on a thread with a runtime worker's stack
/// (2 MiB), so unbounded recursion shows here as it would in the server;
/// `accepted` says whether its verdict means "would be stored".
fn run_each<T: Send + std::fmt::Debug + 'static>(
    target: &str,
    entry: fn(&[u8]) -> T,
    accepted: fn(&T) -> bool,
) {
    let all = inputs(target);
    assert!(
        all.iter().any(|(kind, ..)| *kind == "seeds"),
        "{target}: no seeds"
    );
    assert!(
        all.iter().any(|(kind, ..)| *kind == "regressions"),
        "{target}: no regressions"
    );
    for (kind, name, bytes) in all {
        let verdict = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || entry(&bytes))
            .unwrap()
            .join()
            .unwrap_or_else(|_| panic!("{target}: {kind}/{name} panicked"));
        if kind == "corpus" {
            continue;
        }
        assert_eq!(
            accepted(&verdict),
            kind == "seeds" || name.starts_with("ok-"),
            "{target}: {kind}/{name}: {verdict:?}"
        );
    }
}

#[test]
fn stow_multipart_inputs() {
    run_each("stow_multipart", konsil::fuzzing::stow_input, |parts| {
        parts.first().is_some_and(|p| p.is_ok())
    });
}

#[test]
fn dicom_data_set_inputs() {
    run_each("dicom_data_set", konsil::fuzzing::dimse_data_set, |r| {
        r.is_ok()
    });
}

#[test]
fn fhir_json_inputs() {
    run_each("fhir_json", konsil::fuzzing::fhir_resource, |r| {
        r.as_ref().is_ok_and(|errors| errors.is_empty())
    });
}
