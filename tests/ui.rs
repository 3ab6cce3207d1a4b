//! The status page in a real browser: headless Chromium (Debian's `chromium`) driven by
//! `playwright-core` (tests/ui/page.mjs), against a live gateway and mock. The page
//! loads without console errors, shows the chain in its live order, shows the
//! primary's breaker open within 5 s of the primary starting to fail and closed again
//! after it recovers, and shows the fallback. Screenshots go to target/ui-screenshots/.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{start, TempDir};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn config(dir: &TempDir) -> String {
    format!(
        r#"
server: {{ request_timeout: 30s }}
retry: {{ max_retries: 0 }}
breaker: {{ consecutive_failures: 2, cooldown: 4s, max_cooldown: 4s, close_after: 1 }}
store: {{ path: "{}", flush_interval: 10ms }}
providers:
  mock: {{ kind: openai, base_url: "{{mock}}" }}
  other: {{ kind: anthropic, base_url: "http://{{mock_addr}}", api_key: "sk-ant-test" }}
models:
  primary:   {{ provider: mock, model_id: p, cost_per_1k_input: 0.01, cost_per_1k_output: 0.02 }}
  secondary: {{ provider: other, model_id: s, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }}
chains:
  main: [primary, secondary]
"#,
        dir.path().join("c.db").display()
    )
}

fn tools_or_skip() -> bool {
    let ready = Path::new("/usr/bin/chromium").exists()
        && Path::new("tests/ui/node_modules/playwright-core").exists();
    if !ready {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide chromium and playwright-core (.ci/run installs them)"
        );
        eprintln!("skipped: needs /usr/bin/chromium and `npm ci --prefix tests/ui`");
    }
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_follows_a_failure_and_a_recovery_in_a_real_browser() {
    if !tools_or_skip() {
        return;
    }
    let dir = TempDir::new("ui");
    let h = start(&config(&dir)).await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = tokio::process::Command::new("node")
        .arg("tests/ui/page.mjs")
        .arg(format!("http://{}", h.addr))
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut stdin = node.stdin.take().unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // The next line the page script prints (60 s at most for the whole script).
    let deadline = Instant::now() + Duration::from_secs(60);
    macro_rules! expect_line {
        ($prefix:expr) => {{
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = tokio::time::timeout(left, out.next_line())
                    .await
                    .expect("the page script answers in time")
                    .unwrap()
                    .unwrap_or_else(|| panic!("the page script ended: {seen:?}"));
                eprintln!("page: {line}");
                seen.push(line.clone());
                assert!(!line.starts_with("FAILED"), "{seen:?}");
                if let Some(rest) = line.strip_prefix(concat!($prefix, " ")) {
                    break rest.to_string();
                }
                if line == $prefix {
                    break String::new();
                }
            }
        }};
    }

    assert_eq!(expect_line!("ORDER"), "primary,secondary");
    assert_eq!(
        expect_line!("IDLE"),
        "true",
        "a page with no traffic says so"
    );
    assert_eq!(expect_line!("NOEVENTS"), "true");
    expect_line!("READY");

    // The primary starts failing: two failures open its breaker.
    h.mock.set("p", "status=503");
    for _ in 0..2 {
        let r = h.chat("main", &[]).await;
        assert_eq!(
            r.header("x-cascade-model"),
            Some("secondary"),
            "{} {}",
            r.status,
            r.text
        );
    }
    h.state.store.clone().unwrap().flush().await;
    stdin.write_all(b"FAILING\n").await.unwrap();
    let open_ms: u64 = expect_line!("OPEN").parse().unwrap();
    assert!(open_ms <= 5000, "{open_ms} ms");
    // An open breaker leaves its target in place.
    assert_eq!(expect_line!("ORDER"), "primary,secondary");
    let event = expect_line!("EVENT");
    assert!(
        event.contains("primary → secondary")
            && event.contains("transient")
            && event.contains("503"),
        "{event}"
    );
    expect_line!("WAITING");

    // The primary recovers: after the cooldown a probe succeeds and closes it.
    h.mock.set("p", "");
    let recovered = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = h.chat("main", &[]).await;
        let health = h.get("/admin/health").await.json();
        if common::health_of(&health, "primary")["state"] == "closed" {
            break;
        }
        assert!(recovered.elapsed() < Duration::from_secs(10), "{health}");
    }
    stdin.write_all(b"RECOVERED\n").await.unwrap();
    let closed_ms: u64 = expect_line!("CLOSED").parse().unwrap();
    assert!(closed_ms <= 5000, "{closed_ms} ms");
    let overflow: i64 = expect_line!("PHONE_OVERFLOW").parse().unwrap();
    assert!(
        overflow <= 0,
        "the page is wider than a phone by {overflow} px"
    );
    assert_eq!(expect_line!("ERRORS"), "[]", "no console errors");
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(20), node.wait())
        .await
        .expect("the page script exits")
        .unwrap();
    assert!(status.success());
    for shot in ["1-no-traffic", "2-breaker-open", "3-recovered", "4-phone"] {
        let file = shots.join(format!("{shot}.png"));
        assert!(
            std::fs::metadata(&file)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "{shot}"
        );
    }
}
