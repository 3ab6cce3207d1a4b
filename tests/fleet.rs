//! Running a fleet, on the real binary: hot reload (SIGHUP, `POST /admin/reload`, the
//! file watch with rename and symlink swaps), state kept across a reload, and the
//! graceful drain on SIGTERM.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade::mock::MockServer;
use common::process::Gateway;
use common::TempDir;
use serde_json::{json, Value};

fn config(mock: &MockServer, order: &str, extra: &str) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:{{port}}", request_timeout: 30s }}
retry: {{ max_retries: 0 }}
breaker: {{ consecutive_failures: 2, cooldown: 60s }}
providers:
  mock: {{ kind: openai, base_url: "{}", api_key: "sk-reload-SECRET" }}
models:
  primary:   {{ provider: mock, model_id: p }}
  secondary: {{ provider: mock, model_id: s }}
chains:
  main: [{order}]
store: {{ enabled: false }}
{extra}
"#,
        mock.url()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn body(stream: bool) -> Value {
    json!({"model": "main", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// The served model of one request (`None` when it failed).
async fn served(c: &reqwest::Client, g: &Gateway) -> Option<String> {
    let r = c
        .post(g.url("/v1/chat/completions"))
        .json(&body(false))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.headers()
        .get("x-cascade-model")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn metrics(c: &reqwest::Client, g: &Gateway) -> String {
    c.get(g.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sends requests one after another until `stop`, at most 5,000; the served models
/// in order, `None` for a failure.
fn load(
    g: &Gateway,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, Option<String>)>> {
    let url = g.url("/v1/chat/completions");
    tokio::spawn(async move {
        let c = client();
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) && out.len() < 5_000 {
            let r = c.post(&url).json(&body(false)).send().await;
            let model = match r {
                Ok(r) if r.status() == 200 => r
                    .headers()
                    .get("x-cascade-model")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                _ => None,
            };
            out.push((Instant::now(), model));
        }
        out
    })
}

/// Rewrites the config the way an editor does: a new file renamed over the old one.
fn replace(path: &Path, text: &str, port: u16) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text.replace("{port}", &port.to_string())).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_that_reorders_a_chain_moves_new_requests_without_a_failure() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "latency=2ms");
    mock.set("s", "latency=2ms");
    let dir = TempDir::new("reload-hup");
    let g = Gateway::start(dir.path(), &config(&mock, "primary, secondary", ""));
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&g, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    replace(&g.config, &config(&mock, "secondary, primary", ""), g.port);
    let sent = Instant::now();
    g.signal("HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.unwrap();

    assert!(seen.len() > 20, "the load ran: {} requests", seen.len());
    assert!(
        seen.iter().all(|(_, m)| m.is_some()),
        "no request failed during the reload"
    );
    assert_eq!(seen[0].1.as_deref(), Some("primary"));
    // Every request sent a second after the signal went to the new first model.
    let late: Vec<_> = seen
        .iter()
        .filter(|(at, _)| *at > sent + Duration::from_secs(1))
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|(_, m)| m.as_deref() == Some("secondary")),
        "served after the reload: {late:?}"
    );
    let c = client();
    let text = metrics(&c, &g).await;
    assert!(
        text.contains("cascade_config_reloads_total{result=\"ok\"}"),
        "{text}"
    );
    let hash = cascade::config::text_hash(&std::fs::read_to_string(&g.config).unwrap());
    assert!(
        text.contains(&format!("cascade_config_info{{hash=\"{hash}\"}} 1")),
        "one info series, for the new file"
    );
    assert_eq!(text.matches("cascade_config_info{").count(), 1);
    let (code, out, err) = g.stop();
    assert_eq!(code, 0, "{err}");
    // The watcher may see the new file before the signal comes: one of the two
    // reloads applies the change, and the signal's reload is logged either way.
    let lines: Vec<&str> = out
        .lines()
        .chain(err.lines())
        .filter(|l| l.contains("config reloaded"))
        .collect();
    assert!(lines.iter().any(|l| l.contains("sighup")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("changed=[\"main\"]")),
        "{lines:?}"
    );
    assert!(!out.contains("sk-reload-SECRET") && !err.contains("sk-reload-SECRET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing_and_admin_reload_says_where() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let dir = TempDir::new("reload-bad");
    let g = Gateway::start(dir.path(), &config(&mock, "primary, secondary", ""));
    let c = client();
    // Unknown model in the chain: a config error with its YAML path.
    replace(&g.config, &config(&mock, "primary, nonesuch", ""), g.port);
    let r = c.post(g.url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_config");
    assert_eq!(e["error"]["param"], "chains.main[1]", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("nonesuch"));
    // Still serving on the old config.
    assert_eq!(served(&c, &g).await.as_deref(), Some("primary"));
    assert!(metrics(&c, &g)
        .await
        .contains("cascade_config_reloads_total{result=\"error\"} "));

    // A valid change that also touches restart-only settings: applied, and named.
    let next = config(&mock, "secondary", "")
        .replace(
            "request_timeout: 30s }",
            "request_timeout: 30s, worker_threads: 1 }",
        )
        .replace(
            "  main: [secondary]",
            "  main: [secondary]\n  extra: [primary]",
        );
    replace(&g.config, &next, g.port);
    let r = c.post(g.url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["result"], "ok");
    assert_eq!(done["added"], json!(["extra"]));
    assert_eq!(done["removed"], json!([]));
    assert_eq!(done["changed"], json!(["main"]));
    assert_eq!(done["restart_required"], json!(["server.worker_threads"]));
    assert_eq!(
        done["hash"].as_str().unwrap(),
        cascade::config::text_hash(&std::fs::read_to_string(&g.config).unwrap())
    );
    assert_eq!(served(&c, &g).await.as_deref(), Some("secondary"));
    let (code, _, err) = g.stop();
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_survives_a_reload_that_leaves_its_target_alone() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "status=500");
    let dir = TempDir::new("reload-breaker");
    let g = Gateway::start(dir.path(), &config(&mock, "primary, secondary", ""));
    let c = client();
    for _ in 0..2 {
        assert_eq!(served(&c, &g).await.as_deref(), Some("secondary"));
    }
    let health = common::health_of;
    let before = admin_health(&c, &g).await;
    let primary = health(&before, "primary");
    assert_eq!(primary["state"], "open", "{primary}");

    // Another chain added; `primary` itself untouched.
    let next = config(&mock, "primary, secondary", "").replace(
        "  main: [primary, secondary]",
        "  main: [primary, secondary]\n  other: [secondary]",
    );
    replace(&g.config, &next, g.port);
    let r = c.post(g.url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let after = admin_health(&c, &g).await;
    let kept = health(&after, "primary");
    assert_eq!(kept["state"], "open");
    assert_eq!(kept["retry_at"], primary["retry_at"], "same retry_at");
    assert_eq!(kept["calls"], primary["calls"], "same health window");
    let calls = mock.calls("p");
    assert_eq!(served(&c, &g).await.as_deref(), Some("secondary"));
    assert_eq!(mock.calls("p"), calls, "the open breaker skipped primary");

    // Changing the target's identity starts it fresh.
    let moved = next.replace("model_id: p }", "model_id: p2 }");
    replace(&g.config, &moved, g.port);
    let r = c.post(g.url("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let fresh = admin_health(&c, &g).await;
    assert_eq!(health(&fresh, "primary")["state"], "closed");
    assert_eq!(served(&c, &g).await.as_deref(), Some("primary"));
}

async fn admin_health(c: &reqwest::Client, g: &Gateway) -> Value {
    let r = c.get(g.url("/admin/health")).send().await.unwrap();
    r.json().await.unwrap()
}

/// Waits up to `limit` for the served model to become `want`.
async fn until_served(c: &reqwest::Client, g: &Gateway, want: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if served(c, g).await.as_deref() == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_sees_a_rename_and_a_configmap_symlink_swap() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let c = client();

    // An editor's save: a new file renamed over the old one. No signal.
    let dir = TempDir::new("reload-watch");
    let g = Gateway::start(dir.path(), &config(&mock, "primary, secondary", ""));
    replace(&g.config, &config(&mock, "secondary, primary", ""), g.port);
    assert!(until_served(&c, &g, "secondary", Duration::from_secs(5)).await);
    drop(g);

    // A Kubernetes ConfigMap mount: cascade.yaml -> ..data/cascade.yaml, and an
    // update swaps the `..data` link to a new directory.
    let dir = TempDir::new("reload-configmap");
    let port = common::process::free_port();
    let write_version = |name: &str, order: &str| {
        let v = dir.path().join(name);
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(
            v.join("cascade.yaml"),
            config(&mock, order, "").replace("{port}", &port.to_string()),
        )
        .unwrap();
    };
    write_version("..v1", "primary, secondary");
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/cascade.yaml", dir.path().join("cascade.yaml")).unwrap();
    let g = Gateway::start_existing(dir.path(), port);
    assert_eq!(served(&c, &g).await.as_deref(), Some("primary"));
    write_version("..v2", "secondary, primary");
    std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    assert!(until_served(&c, &g, "secondary", Duration::from_secs(5)).await);
    let text = metrics(&c, &g).await;
    assert!(
        text.contains("cascade_config_reloads_total{result=\"ok\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_slow_requests_ends_open_streams_with_an_error_and_exits_zero() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    // Slow answers finish within the drain; streams outlast it.
    mock.set("p", "latency=1500ms;chunks=200;gap=100ms");
    let dir = TempDir::new("drain");
    let yaml = config(&mock, "primary", "")
        .replace(
            "store: { enabled: false }",
            &format!(
                "store: {{ path: \"{}\" }}",
                dir.path().join("drain.db").display()
            ),
        )
        .replace(
            "request_timeout: 30s }",
            "request_timeout: 60s, drain_delay: 500ms, drain_timeout: 3s }",
        );
    let g = Gateway::start(dir.path(), &yaml);
    let c = client();
    let url = g.url("/v1/chat/completions");
    let slow = (0..100).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let r = c.post(url).json(&body(false)).send().await.unwrap();
            r.status().as_u16()
        })
    });
    let slow: Vec<_> = slow.collect();
    let streams = (0..20).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let r = c.post(url).json(&body(true)).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        })
    });
    let streams: Vec<_> = streams.collect();
    // Everything is in flight (the streams are past their first chunk).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let signalled = Instant::now();
    g.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Draining: not ready, still accepting during drain_delay.
    let ready = c.get(g.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // After the delay, new connections are refused.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", g.port)).is_err(),
        "the listener is closed"
    );

    let mut answered = 0;
    for s in slow {
        assert_eq!(
            s.await.unwrap(),
            200,
            "a slow request finished during the drain"
        );
        answered += 1;
    }
    for s in streams {
        let (status, text) = s.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            text.contains("shutting_down"),
            "the stream ended with an error event: {}",
            &text[text.len().saturating_sub(300)..]
        );
        assert!(!text.contains("[DONE]"));
    }
    let (code, _, err) = g.wait();
    assert_eq!(code, 0, "{err}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "drain_delay + drain_timeout bound the exit: {took:?}"
    );

    let conn = rusqlite::Connection::open(dir.path().join("drain.db")).unwrap();
    let rows = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        rows("SELECT COUNT(*) FROM requests WHERE status = 200 AND error_type IS NULL"),
        answered
    );
    assert_eq!(
        rows("SELECT COUNT(*) FROM requests WHERE error_type = 'shutting_down'"),
        20
    );
    assert_eq!(rows("SELECT COUNT(*) FROM requests"), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_with_code_one() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "latency=30s");
    let dir = TempDir::new("drain-twice");
    let g = Gateway::start(dir.path(), &config(&mock, "primary", ""));
    let c = client();
    let inflight = Arc::new(AtomicUsize::new(0));
    let url = g.url("/v1/chat/completions");
    let waiting = {
        let inflight = inflight.clone();
        tokio::spawn(async move {
            inflight.fetch_add(1, Ordering::Relaxed);
            c.post(url)
                .json(&body(false))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    g.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.signal("TERM");
    let (code, out, err) = g.wait();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    waiting.abort();
    assert_eq!(inflight.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_waiting_at_the_end_of_the_drain_gets_503_shutting_down() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "latency=30s");
    let dir = TempDir::new("drain-cut");
    let yaml = config(&mock, "primary", "").replace(
        "request_timeout: 30s }",
        "request_timeout: 60s, drain_timeout: 1s }",
    );
    let g = Gateway::start(dir.path(), &yaml);
    let c = client();
    let url = g.url("/v1/responses");
    let waiting = tokio::spawn(async move {
        let r = c
            .post(url)
            .json(&json!({"model": "main", "input": "hi"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.signal("TERM");
    let (status, e) = waiting.await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(e["error"]["code"], "shutting_down", "{e}");
    let (code, _, err) = g.wait();
    assert_eq!(code, 0, "{err}");
}

/// Two replicas on one PostgreSQL store: both write to it, and one report (the CLI's
/// and either replica's `/admin/report`) covers both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_store_share_one_report() {
    let Some(pg) = common::postgres::postgres_or_skip() else {
        return;
    };
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let yaml = config(&mock, "primary, secondary", "").replace(
        "store: { enabled: false }",
        &format!("store: {{ url: \"{}\", flush_interval: 20ms }}", pg.url()),
    );
    let (dir_a, dir_b) = (TempDir::new("fleet-pg-a"), TempDir::new("fleet-pg-b"));
    let a = Gateway::start(dir_a.path(), &yaml);
    let b = Gateway::start(dir_b.path(), &yaml);
    let c = client();
    for _ in 0..3 {
        assert_eq!(served(&c, &a).await.as_deref(), Some("primary"));
    }
    mock.set("p", "status=500");
    for _ in 0..4 {
        assert_eq!(served(&c, &b).await.as_deref(), Some("secondary"));
    }
    // SIGTERM flushes each replica's queue before it exits.
    let (code_a, _, err_a) = a.stop();
    let (code_b, _, err_b) = b.stop();
    assert_eq!((code_a, code_b), (0, 0), "{err_a}\n{err_b}");
    assert!(!format!("{err_a}{err_b}").contains("store: write failed"));

    let out = std::process::Command::new(common::process::BIN)
        .args(["report", "--since", "1h", "--format", "json", "--db"])
        .arg(pg.url())
        .arg("--config")
        .arg(dir_a.path().join("cascade.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["totals"]["requests"], 7, "{report}");
    let main = &report["rows"][0];
    assert_eq!(
        (&main["chain"], &main["requests"]),
        (&json!("main"), &json!(7))
    );
    assert!((main["fallback_rate"].as_f64().unwrap() - 4.0 / 7.0).abs() < 1e-3);

    // A replica started later restores the fleet's health and reports the same.
    let dir_c = TempDir::new("fleet-pg-c");
    let g = Gateway::start(dir_c.path(), &yaml);
    let live: Value = c
        .get(g.url("/admin/report?since=1h&by=model"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let primary = live["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "primary")
        .unwrap();
    // Replica B's breaker opened after two failures (consecutive_failures: 2).
    assert_eq!(
        (&primary["calls"], &primary["errors"]),
        (&json!(5), &json!({"transient": 2})),
        "{live}"
    );
    let health = admin_health(&c, &g).await;
    assert_eq!(
        common::health_of(&health, "primary")["calls"],
        5,
        "both replicas' calls restored: {health}"
    );
    let (code, _, _) = g.stop();
    assert_eq!(code, 0);
}
