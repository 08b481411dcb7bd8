//! The README's shell examples run as they are written, with `bash -e`,
//! from a folder laid out like the repository. Only the ports change, so
//! that they run next to other tests.
//!
//! - The quick start (issues 2, 3, 4): the blocks after each
//!   `<!-- tests/readme.rs: quick start -->`, in order, against the README's
//!   first command (`serve --dev --config konsil.example.toml`).
//! - The walk-through of a case (issue 5, with issue 6's tokens): the block
//!   after `<!-- tests/readme.rs runs the next block -->`; it starts its own
//!   gateway.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{free_port, KillOnDrop};

const WALK_THROUGH: &str = "<!-- tests/readme.rs runs the next block -->";
const QUICK_START: &str = "<!-- tests/readme.rs: quick start -->";

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The shell block after each occurrence of `marker`, in order.
fn blocks_after<'a>(readme: &'a str, marker: &str) -> Vec<&'a str> {
    readme
        .match_indices(marker)
        .map(|(at, _)| {
            let rest = &readme[at + marker.len()..];
            let start =
                rest.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
            let len = rest[start..].find("\n```\n").expect("the block ends");
            &rest[start..start + len]
        })
        .collect()
}

/// `text` talking to the gateway on `http` and `dicom` instead of the
/// default ports.
fn with_ports(text: &str, http: u16, dicom: u16) -> String {
    let text = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("127.0.0.1:11112", &format!("127.0.0.1:{dicom}"))
        .replace("127.0.0.1 11112", &format!("127.0.0.1 {dicom}"));
    // A new spelling of the default ports would otherwise reach a gateway
    // that is not this test's.
    assert!(
        !text.contains("8080") && !text.contains("11112"),
        "the README names the default ports in a way this test does not rewrite:\n{text}"
    );
    text
}

/// A temporary folder laid out like the repository: `conformance/` and
/// `tests/` are the repository's, `target/release/konsil` is the binary
/// under test.
fn repository_like() -> tempfile::TempDir {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    for dir in ["conformance", "tests"] {
        std::os::unix::fs::symlink(repo.join(dir), work.path().join(dir)).unwrap();
    }
    std::fs::create_dir_all(work.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(konsil_binary(), work.path().join("target/release/konsil")).unwrap();
    work
}

fn konsil_binary() -> std::path::PathBuf {
    std::fs::canonicalize(env!("CARGO_BIN_EXE_konsil")).unwrap()
}

/// Run `script` with `bash -e` in `dir`, `konsil` on the path, for at most
/// five minutes.
fn run_script(dir: &Path, script: &str) -> Output {
    let bin = konsil_binary();
    Command::new("timeout")
        .args(["300", "bash", "-e", "-c", script])
        .current_dir(dir)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.parent().unwrap().display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .output()
        .unwrap()
}

#[test]
fn the_readme_quick_start_runs_against_the_first_command() {
    let readme = readme();
    // The first command of "The two commands", as a reader types it.
    let first = blocks_after(&readme, "## The two commands")[0];
    let args = first
        .strip_prefix("cargo run --release -- ")
        .expect("the first command runs the release build with cargo run");
    let args: Vec<&str> = args.split_whitespace().collect();
    assert_eq!(
        args,
        ["serve", "--dev", "--config", "konsil.example.toml"],
        "the quick start below assumes the development identity and the example configuration"
    );

    let work = repository_like();
    let (http, dicom) = (free_port(), free_port());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(repo.join("konsil.example.toml")).unwrap();
    std::fs::write(
        work.path().join("konsil.example.toml"),
        with_ports(&example, http, dicom),
    )
    .unwrap();
    let log_path = work.path().join("konsil.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // The gateway the README's first command starts, stopped at the end.
    let _gateway = KillOnDrop(
        Command::new(konsil_binary())
            .args(&args)
            .current_dir(work.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let blocks = blocks_after(&readme, QUICK_START);
    assert!(
        blocks.len() >= 4,
        "the quick start has its DIMSE, import, DICOMweb and FHIR blocks"
    );
    let script = format!(
        "for i in $(seq 300); do curl -sf 127.0.0.1:8080/readyz > /dev/null && break; sleep 0.2; done\n{}",
        blocks.join("\n")
    );
    let run = run_script(work.path(), &with_ports(&script, http, dicom));
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the quick start failed ({}):\n--- stdout\n{out}\n--- stderr\n{}\n--- konsil.log\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr),
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    // What the README says each block prints.
    let lines: Vec<&str> = out.lines().collect();
    for expected in [
        r#"konsil_instances_received_total{source="dimse",outcome="stored"} 20"#,
        "stored: 4",
        "rejected: 0",
        "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322 CompressedSamples^CT1",
    ] {
        assert!(lines.contains(&expected), "no line {expected:?} in\n{out}");
    }
    let json: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let [patient, search, metadata] = &json[..] else {
        panic!("three FHIR answers expected:\n{out}");
    };
    assert_eq!(patient["resourceType"], "Patient", "{patient}");
    assert_eq!(patient["meta"]["versionId"], "1", "{patient}");
    assert_eq!(search["total"], 1, "{search}");
    assert_eq!(
        search["entry"][0]["resource"]["id"], patient["id"],
        "{search}"
    );
    assert_eq!(
        metadata["resourceType"], "CapabilityStatement",
        "{metadata}"
    );
    // The import went to the same store the running gateway serves.
    let studies = Command::new("curl")
        .args([
            "-sf",
            &format!("127.0.0.1:{http}/dicomweb/studies?PatientID=CD-PID"),
        ])
        .output()
        .unwrap();
    let studies: serde_json::Value = serde_json::from_slice(&studies.stdout).unwrap();
    assert_eq!(studies.as_array().map(Vec::len), Some(1), "{studies}");
}

#[test]
fn the_readme_walk_through_plays_a_case_to_delivery() {
    let readme = readme();
    let walk_through = blocks_after(&readme, WALK_THROUGH);
    assert_eq!(walk_through.len(), 1, "one walk-through");
    let (http, dicom) = (free_port(), free_port());
    let script = with_ports(walk_through[0], http, dicom);

    let work = repository_like();
    let run = run_script(work.path(), &script);
    let out = String::from_utf8_lossy(&run.stdout);
    let walk = work.path().join("walkthrough");
    let log = std::fs::read_to_string(walk.join("konsil.log")).unwrap_or_default();
    assert!(
        run.status.success(),
        "the walk-through failed ({}):\n--- stdout\n{out}\n--- stderr\n{}\n--- konsil.log\n{log}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );

    // What the README says it prints.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.get(..6),
        Some(
            &[
                "Awaiting records",
                "missing: imaging",
                "Under review",
                "0",
                "final",
                "Delivered"
            ][..]
        ),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("would discard 1 studies (3 instances)")),
        "{out}"
    );
    // The opinion is the approved report, rendered.
    let pdf = walk.join("opinion.pdf");
    let text = Command::new("pdftotext")
        .arg(&pdf)
        .arg("-")
        .output()
        .unwrap();
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("lobectomy after PET-CT"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}
