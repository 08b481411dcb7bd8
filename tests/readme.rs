//! The README's walk-through of a case runs as it is written: the block
//! after `<!-- tests/readme.rs runs the next block -->`, with `bash -e`,
//! from a folder laid out like the repository (it reads
//! `../conformance/examples` and `../tests/peers`). Only the ports change,
//! so that it runs next to other tests. Issue 5 (with issue 6's tokens).

mod common;

use std::path::Path;
use std::process::Command;

use common::free_port;

const MARKER: &str = "<!-- tests/readme.rs runs the next block -->";

/// The shell block after the marker.
fn walk_through(readme: &str) -> &str {
    let at = readme
        .find(MARKER)
        .expect("the README marks its walk-through");
    let rest = &readme[at + MARKER.len()..];
    let start = rest.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let len = rest[start..].find("\n```\n").expect("the block ends");
    &rest[start..start + len]
}

#[test]
fn the_readme_walk_through_plays_a_case_to_delivery() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let (http, dicom) = (free_port(), free_port());
    let script = walk_through(&readme)
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("127.0.0.1:11112", &format!("127.0.0.1:{dicom}"))
        .replace("127.0.0.1 11112", &format!("127.0.0.1 {dicom}"));
    // A new spelling of the default ports would otherwise reach a gateway
    // that is not this test's.
    assert!(
        !script.contains("8080") && !script.contains("11112"),
        "the walk-through names the default ports in a way this test does not rewrite"
    );

    let work = tempfile::tempdir().unwrap();
    for dir in ["conformance", "tests"] {
        std::os::unix::fs::symlink(repo.join(dir), work.path().join(dir)).unwrap();
    }
    let path = std::fs::canonicalize(env!("CARGO_BIN_EXE_konsil")).unwrap();
    let bin_dir = path.parent().unwrap();
    let run = Command::new("timeout")
        .args(["300", "bash", "-e", "-c", &script])
        .current_dir(work.path())
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
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
