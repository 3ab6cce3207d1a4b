//! The operator's side of the real binary: the JSON log line by line, the store after
//! SIGTERM, `cascade report` in every format against `/admin/report`, the scheduled
//! report, and the start errors.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade::mock::MockServer;
use common::TempDir;
use serde_json::{json, Value};

use common::process::{free_port, Gateway, BIN};

fn yaml(mock: &MockServer, dir: &Path, extra: &str) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:{{port}}", request_timeout: 30s }}
retry: {{ max_retries: 0 }}
breaker: {{ consecutive_failures: 1000, failure_rate: 1.0 }}
providers:
  mock: {{ kind: openai, base_url: "{}", api_key: "sk-live-SECRET-999" }}
models:
  primary:   {{ provider: mock, model_id: p, cost_per_1k_input: 0.01, cost_per_1k_output: 0.03 }}
  secondary: {{ provider: mock, model_id: s, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }}
chains:
  main: [primary, secondary]
store: {{ path: "{}" {extra} }}
"#,
        mock.url(),
        dir.join("cascade.db").display()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn chat(c: &reqwest::Client, g: &Gateway, body: &Value) -> reqwest::Response {
    c.post(g.url("/v1/chat/completions"))
        .header("authorization", "Bearer sk-client-SECRET-555")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn body(stream: bool) -> Value {
    json!({"model": "main", "stream": stream,
           "messages": [{"role": "user", "content": "PROMPT-MARKER-42 tell me"}]})
}

fn report(g_config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("report")
        .arg("--config")
        .arg(g_config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_has_a_line_per_request_and_per_fallback_and_no_secrets() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "content=ANSWER-MARKER-77");
    mock.set("s", "content=ANSWER-MARKER-77");
    let dir = TempDir::new("log");
    let g = Gateway::start(
        dir.path(),
        &(yaml(&mock, dir.path(), ", flush_interval: 100ms") + "log: { format: json }\n"),
    );
    let c = client();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = chat(&c, &g, &body(false)).await;
        assert_eq!(r.status(), 200);
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    mock.set("p", "status=500");
    for _ in 0..2 {
        let r = chat(&c, &g, &body(false)).await;
        assert_eq!(r.headers()["x-cascade-fallbacks"], "1");
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    let r = chat(&c, &g, &body(true)).await;
    ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let bad = c
        .post(g.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    ids.push(bad.headers()["x-request-id"].to_str().unwrap().to_string());

    // The report while the gateway runs, in every format, and from the gateway itself.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let live: Value = c
        .get(g.url("/admin/report?since=1h&by=chain"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (code, json_out, _) = report(&g.config, &["--since", "1h", "--format", "json"]);
    assert_eq!(code, 0);
    let cli: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(cli["rows"], live["rows"]);
    assert_eq!(cli["totals"], live["totals"]);
    let main = cli["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["chain"] == "main")
        .unwrap();
    assert_eq!(
        (&main["requests"], &main["success_rate"]),
        (&json!(6), &json!(1.0))
    );
    let (_, csv, _) = report(&g.config, &["--since", "1h", "--format", "csv"]);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[..3], ["chain", "requests", "success_rate"]);
    let main_csv: Vec<&str> = lines
        .find(|l| l.starts_with("main,"))
        .unwrap()
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(main_csv[col("requests")], "6");
    let delta: f64 = main_csv[col("fallback_cost_delta_usd")].parse().unwrap();
    assert!((delta - main["fallback_cost_delta_usd"].as_f64().unwrap()).abs() < 1e-6);
    let (_, table, _) = report(&g.config, &["--since", "1h"]);
    let main_line = table.lines().find(|l| l.starts_with("main ")).unwrap();
    assert_eq!(main_line.split_whitespace().nth(1), Some("6"), "{table}");
    let (code, by_model, _) = report(
        &g.config,
        &["--since", "1h", "--by", "model", "--format", "csv"],
    );
    assert_eq!(code, 0);
    assert!(
        by_model
            .lines()
            .next()
            .unwrap()
            .contains("errors_transient"),
        "{by_model}"
    );

    let (code, out, err) = g.stop();
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = lines.iter().filter(|l| l["message"] == "request").collect();
    assert_eq!(requests.len(), ids.len(), "one line per request");
    for (line, id) in requests.iter().zip(&ids) {
        assert_eq!(line["request_id"], json!(id));
        assert_eq!(line["level"], "INFO");
        for key in [
            "chain",
            "status",
            "model",
            "provider",
            "attempts",
            "fallbacks",
            "cache",
            "stream",
            "latency_ms",
            "cost_usd",
            "timestamp",
        ] {
            assert!(line.get(key).is_some(), "{key} in {line}");
        }
    }
    assert_eq!(
        (&requests[0]["model"], &requests[0]["status"]),
        (&json!("primary"), &json!(200))
    );
    assert_eq!(requests[3]["fallbacks"], 1);
    assert_eq!(requests[5]["stream"], true);
    assert_eq!(
        (
            &requests[6]["provider"],
            &requests[6]["chain"],
            &requests[6]["status"]
        ),
        (&Value::Null, &Value::Null, &json!(400))
    );
    let fallbacks: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "fallback")
        .collect();
    assert_eq!(
        fallbacks.len(),
        3,
        "two plain requests and the stream fell back"
    );
    for (f, id) in fallbacks.iter().zip(&ids[3..6]) {
        assert_eq!(f["level"], "WARN");
        assert_eq!(
            (
                &f["request_id"],
                &f["chain"],
                &f["from"],
                &f["to"],
                &f["reason"],
                &f["status"]
            ),
            (
                &json!(id),
                &json!("main"),
                &json!("primary"),
                &json!("secondary"),
                &json!("transient"),
                &json!(500)
            )
        );
    }
    for secret in ["SECRET", "PROMPT-MARKER", "ANSWER-MARKER", "Bearer"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} leaked:\n{out}\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_a_burst_leaves_every_answered_request_in_the_store() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "latency=20ms");
    let dir = TempDir::new("sigterm");
    // A long flush interval: the rows are still queued when the signal comes.
    let g = Gateway::start(
        dir.path(),
        &yaml(&mock, dir.path(), ", flush_interval: 30s"),
    );
    let c = client();
    let b = body(false);
    let answers = futures_util::future::join_all((0..60).map(|_| chat(&c, &g, &b))).await;
    let ids: Vec<String> = answers
        .iter()
        .filter(|r| r.status() == 200)
        .map(|r| r.headers()["x-request-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 60);
    let (code, _, err) = g.stop();
    assert_eq!(code, 0, "{err}");
    let conn = rusqlite::Connection::open(dir.path().join("cascade.db")).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM requests WHERE status = 200",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 60, "every answered request");
    let calls: i64 = conn
        .query_row("SELECT COUNT(*) FROM model_calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(calls as u64, mock.total_calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_report_writes_its_files_and_posts_them() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |axum::Json(v): axum::Json<Value>| {
                let received = received.clone();
                async move {
                    received.lock().unwrap().push(v);
                    "ok"
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(hook, app).await });
    let dir = TempDir::new("scheduled");
    let reports = dir.path().join("out/reports");
    let g = Gateway::start(
        dir.path(),
        &(yaml(&mock, dir.path(), ", flush_interval: 50ms")
            + &format!(
                "report: {{ every: 1s, by: model, dir: \"{}\", webhook: \"http://{hook_addr}/hook\" }}\n",
                reports.display()
            )),
    );
    let c = client();
    for _ in 0..3 {
        assert_eq!(chat(&c, &g, &body(false)).await.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let posted = received.lock().unwrap().clone();
        let with_traffic = posted
            .iter()
            .find(|r| r["rows"].as_array().is_some_and(|rows| !rows.is_empty()));
        if let Some(r) = with_traffic {
            assert_eq!(r["by"], "model");
            assert_eq!(r["rows"][0]["model"], "primary");
            assert_eq!(r["rows"][0]["calls"], 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no report with traffic was posted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let files: Vec<String> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let md = files
        .iter()
        .find(|f| f.starts_with("cascade-report-") && f.ends_with("Z.md"))
        .expect("a Markdown report");
    assert_eq!(md.len(), "cascade-report-20261201T221238Z.md".len(), "{md}");
    assert!(files.contains(&md.replace(".md", ".json")));
    let (code, _, _) = g.stop();
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_keeps_its_files_and_blocks_nothing() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let dir = TempDir::new("hook-down");
    let reports = dir.path().join("reports");
    let g = Gateway::start(
        dir.path(),
        &(yaml(&mock, dir.path(), "")
            + &format!(
                "report: {{ every: 1s, dir: \"{}\", webhook: \"http://127.0.0.1:{}/hook\" }}\n",
                reports.display(),
                free_port()
            )),
    );
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert_eq!(chat(&c, &g, &body(false)).await.status(), 200);
        let n = std::fs::read_dir(&reports).map_or(0, |d| d.count());
        if n >= 4 {
            break; // two periods, each with its .md and .json
        }
        assert!(Instant::now() < deadline, "the reports were not written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, _) = g.stop();
    assert_eq!(code, 0);
    assert!(out.contains("webhook post failed"), "{out}");
}

#[test]
fn start_errors_and_report_errors_are_clear() {
    let dir = TempDir::new("errors");
    let base = r#"
providers:
  mock: { kind: openai, base_url: "http://127.0.0.1:9/v1" }
models:
  m: { provider: mock, model_id: m }
"#;
    let write = |name: &str, extra: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{base}{extra}")).unwrap();
        p
    };
    let run = |args: &[&str], config: &Path| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(config)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A store directory that does not exist: `check` and `serve` both refuse it.
    let missing = write("missing.yaml", "store: { path: /no/such/dir/c.db }\n");
    for cmd in ["check", "serve"] {
        let (code, err) = run(&[cmd], &missing);
        assert_eq!(code, 2, "{cmd}: {err}");
        assert!(
            err.contains("store.path") && err.contains("/no/such/dir"),
            "{cmd}: {err}"
        );
    }
    // A report on a store that was never written: exit 2, and no file is created.
    let fresh = write("fresh.yaml", "store: { path: never.db }\n");
    let (code, err) = run(&["report"], &fresh);
    assert_eq!(code, 2);
    assert!(err.contains("never.db"), "{err}");
    assert!(!dir.path().join("never.db").exists());
    // The store off: the report says so, and a report block is a config error.
    let off = write("off.yaml", "store: { enabled: false }\n");
    let (code, err) = run(&["report"], &off);
    assert_eq!(code, 2);
    assert!(err.contains("store.enabled"), "{err}");
    let off_with_report = write(
        "off-report.yaml",
        "store: { enabled: false }\nreport: { every: 7d }\n",
    );
    let (code, err) = run(&["check"], &off_with_report);
    assert_eq!(code, 2);
    assert!(err.contains("report"), "{err}");
    // A bad window.
    let (code, err) = run(&["report", "--since", "yesterday", "--db", "x.db"], &fresh);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_off_the_admin_report_is_a_conflict() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let dir = TempDir::new("off");
    let yaml = format!(
        r#"
server: {{ listen: "127.0.0.1:{{port}}" }}
providers:
  mock: {{ kind: openai, base_url: "{}" }}
models:
  m: {{ provider: mock, model_id: m }}
store: {{ enabled: false }}
"#,
        mock.url()
    );
    let g = Gateway::start(dir.path(), &yaml);
    let r = client().get(g.url("/admin/report")).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "store_disabled");
    assert!(!dir.path().join("cascade.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_shadow_calls_five_seconds_then_records_them_cancelled() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("s", "stall");
    let dir = TempDir::new("shadow-term");
    let yaml = yaml(&mock, dir.path(), ", flush_interval: 50ms").replace(
        "  main: [primary, secondary]",
        "  main:\n    models: [primary, secondary]\n    shadow: { models: [secondary], sample: 1.0 }",
    );
    let g = Gateway::start(dir.path(), &yaml);
    let r = chat(&client(), &g, &body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cascade-shadow"], "secondary");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let t = Instant::now();
    let (code, _, err) = g.stop();
    let waited = t.elapsed();
    assert_eq!(code, 0, "{err}");
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(9),
        "{waited:?}"
    );
    let conn = rusqlite::Connection::open(dir.path().join("cascade.db")).unwrap();
    let shadow: (String, i64) = conn
        .query_row(
            "SELECT error_type, success FROM shadow_results WHERE request_id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(shadow, ("cancelled".to_string(), 0));
    let call: String = conn
        .query_row(
            "SELECT error_type FROM model_calls WHERE request_id = ?1 AND kind = 'shadow'",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(call, "cancelled");
}
