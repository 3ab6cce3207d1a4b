//! Runs the end-to-end suite in `tests/sdk/` (the real `openai` Python SDK against a
//! `cascade serve` process) as part of `cargo test`.
//!
//! Needs `pip install -r tests/sdk/requirements.txt`. Without those packages the test
//! is skipped locally and fails in CI (`CI` set), where `.ci/run` installs them.

use std::process::Command;

#[test]
fn openai_python_sdk_end_to_end() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args([
            "-c",
            "import openai, anthropic, pytest, jsonschema, yaml, prometheus_client",
        ])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "the SDK suite needs `pip install -r tests/sdk/requirements.txt`"
        );
        eprintln!("SKIPPED: python packages for tests/sdk are missing (pip install -r tests/sdk/requirements.txt)");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk"])
        .current_dir(root)
        .env("CASCADE_BIN", env!("CARGO_BIN_EXE_cascade"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the openai SDK suite failed:\n{stdout}"
    );
}
