//! Retries, budgets, breakers, deadlines, health ordering, race, hedge and chaos.
//! Every timing test runs on tokio's paused clock: waits are virtual and exact.

mod common;

use std::time::Duration;

use common::start;
use tokio::time::Instant;

/// Three targets on one mock, with the resilience settings under test spliced in.
fn config(extra_top: &str, chain: &str) -> String {
    format!(
        r#"
server:
  request_timeout: 60s
  attempt_timeout: 5s
{extra_top}
providers:
  mock: {{ kind: openai, base_url: "{{mock}}" }}
models:
  primary:   {{ provider: mock, model_id: p }}
  secondary: {{ provider: mock, model_id: s }}
  tertiary:  {{ provider: mock, model_id: t }}
chains:
  main:
    models: [primary, secondary, tertiary]
{chain}
"#
    )
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(start_paused = true)]
async fn retries_a_transient_failure_with_bounded_backoff() {
    let h = start(&config(
        "retry: { max_retries: 2, base: 200ms, cap: 5s, seed: 7 }",
        "",
    ))
    .await;
    h.mock.set("p", "fail_first=2,status=503");
    let t0 = Instant::now();
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(r.header("x-cascade-attempts"), Some("3"));
    assert_eq!(r.header("x-cascade-fallbacks"), Some("0"));
    assert_eq!(h.mock.calls("p"), 3);
    assert_eq!(h.mock.calls("s"), 0);
    let trace = r.header("x-cascade-trace").unwrap();
    let entries: Vec<&str> = trace.split(',').collect();
    assert_eq!(entries.len(), 3, "{trace}");
    assert!(
        entries[0].starts_with("primary:503:") && entries[2].starts_with("primary:ok:"),
        "{trace}"
    );
    // Full jitter: the two waits are at most 200ms and 400ms.
    assert!(
        t0.elapsed() <= Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    let m = h.get("/metrics").await.text;
    assert_eq!(
        metric(
            &m,
            r#"cascade_retries_total{class="transient",model="primary"}"#
        ),
        2.0
    );
}

#[tokio::test(start_paused = true)]
async fn honours_retry_after() {
    let h = start(&config(
        "retry: { max_retries: 1, base: 10ms, seed: 1 }",
        "",
    ))
    .await;
    h.mock.set("p", "status=429,retry_after=3");
    let t0 = Instant::now();
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(h.mock.calls("p"), 2);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_moves_on_without_waiting() {
    let h = start(&config(
        "retry: { max_retries: 2, max_retry_wait: 10s, seed: 1 }",
        "",
    ))
    .await;
    h.mock.set("p", "status=429,retry_after=60");
    let t0 = Instant::now();
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(h.mock.calls("p"), 1);
    assert!(t0.elapsed() < Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_moves_on() {
    let h = start(&config(
        "retry: { max_retries: 3, seed: 1 }",
        "    request_timeout: 5s",
    ))
    .await;
    h.mock.set("p", "status=503,retry_after=8");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(h.mock.calls("p"), 1);
}

#[tokio::test(start_paused = true)]
async fn the_attempt_budget_spans_the_whole_chain() {
    let h = start(&config(
        "retry: { max_retries: 2, base: 1ms, seed: 1 }",
        "    max_attempts: 4",
    ))
    .await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "status=500");
    }
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cascade-attempts"), Some("4"));
    assert_eq!(
        (h.mock.calls("p"), h.mock.calls("s"), h.mock.calls("t")),
        (3, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_stops_a_retry_storm() {
    let top = "retry: { max_retries: 2, base: 1ms, seed: 1 }\nretry_budget: { ratio: 0.0, min_per_second: 0.2, window: 10s }\nbreaker: { consecutive_failures: 1000 }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "status=500");
    for _ in 0..5 {
        let r = h.chat("main", &[]).await;
        assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    }
    // The floor allows 0.2/s * 10s = 2 retries in the window; the rest move on at once.
    assert_eq!(h.mock.calls("p"), 5 + 2);
    let m = h.get("/metrics").await.text;
    assert!(
        metric(&m, "cascade_retry_budget_exhausted_total") >= 3.0,
        "{m}"
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_skips_and_recovers_through_half_open() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 3, cooldown: 30s, close_after: 2 }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "status=500");
    for _ in 0..3 {
        assert_eq!(
            h.chat("main", &[]).await.header("x-cascade-model"),
            Some("secondary")
        );
    }
    assert_eq!(h.mock.calls("p"), 3);

    // Open: skipped without a call and without waiting.
    let t0 = Instant::now();
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(r.header("x-cascade-attempts"), Some("1"));
    assert_eq!(
        r.header("x-cascade-fallbacks"),
        Some("1"),
        "chain positions, not plan positions"
    );
    assert_eq!(h.mock.calls("p"), 3);
    assert!(t0.elapsed() < Duration::from_millis(5));
    let health = h.get("/admin/health").await.json();
    let primary = &health["targets"][0];
    assert_eq!(primary["model"], "primary");
    assert_eq!(primary["state"], "open");
    assert!(primary["retry_at"].is_string());
    assert_eq!(primary["calls"], 3);
    assert_eq!(primary["success_rate"], 0.0);
    let m = h.get("/metrics").await.text;
    assert_eq!(metric(&m, r#"cascade_circuit_state{model="primary"}"#), 2.0);

    // After the cooldown the provider has recovered: probes close the breaker.
    h.mock.set("p", "");
    tokio::time::advance(Duration::from_secs(30)).await;
    let r = h.chat("main", &[]).await;
    assert_eq!(
        r.header("x-cascade-model"),
        Some("primary"),
        "a half-open probe"
    );
    assert_eq!(
        h.get("/admin/health").await.json()["targets"][0]["state"],
        "half_open"
    );
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(
        h.get("/admin/health").await.json()["targets"][0]["state"],
        "closed"
    );
    let m = h.get("/metrics").await.text;
    assert_eq!(metric(&m, r#"cascade_circuit_state{model="primary"}"#), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_longer() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 1, cooldown: 10s, max_cooldown: 1m }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "status=500");
    h.chat("main", &[]).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    h.chat("main", &[]).await; // the probe fails
    assert_eq!(h.mock.calls("p"), 2);
    tokio::time::advance(Duration::from_secs(10)).await;
    h.chat("main", &[]).await;
    assert_eq!(h.mock.calls("p"), 2, "the cooldown doubled to 20s");
    tokio::time::advance(Duration::from_secs(10)).await;
    h.chat("main", &[]).await;
    assert_eq!(h.mock.calls("p"), 3);
}

#[tokio::test(start_paused = true)]
async fn bad_requests_never_open_a_breaker_or_fall_back() {
    let top = "retry: { max_retries: 2 }\nbreaker: { consecutive_failures: 2, min_calls: 2 }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "status=400");
    for _ in 0..6 {
        assert_eq!(h.chat("main", &[]).await.status, 400);
    }
    assert_eq!(h.mock.calls("p"), 6, "no retries and never skipped");
    assert_eq!(h.mock.calls("s"), 0);
    assert_eq!(
        h.get("/admin/health").await.json()["targets"][0]["state"],
        "closed"
    );
}

#[tokio::test(start_paused = true)]
async fn when_all_open_try_soonest_or_fail() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 1, cooldown: 30s }";
    let h = start(&config(
        top,
        "  strict:\n    models: [secondary, tertiary]\n    when_all_open: fail",
    ))
    .await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "status=500");
    }
    assert_eq!(h.chat("main", &[]).await.status, 502);
    // All open: `fail` answers 503 at once; `try_soonest` calls the soonest one anyway.
    let r = h.chat("strict", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "all_targets_open");
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(h.mock.total_calls(), 3);
    h.mock.set("p", "");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(h.mock.total_calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn degraded_targets_move_to_the_end() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 1000, min_calls: 1000 }\nhealth: { window: 5m, degraded_below: 0.8, min_calls: 5 }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "status=500");
    for _ in 0..5 {
        h.chat("main", &[]).await;
    }
    assert_eq!(h.mock.calls("p"), 5);
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(
        r.header("x-cascade-attempts"),
        Some("1"),
        "the degraded primary went last"
    );
    assert_eq!(h.mock.calls("p"), 5);
}

#[tokio::test(start_paused = true)]
async fn first_token_timeout_falls_back_before_commit() {
    let h = start(&config(
        "retry: { max_retries: 0 }",
        "    first_token_timeout: 1s",
    ))
    .await;
    h.mock.set("p", "ttft=10s");
    let t0 = Instant::now();
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(r.streamed_text(), "Hello from s! This is a mock answer.");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1100),
        "{waited:?}"
    );
    assert!(r
        .header("x-cascade-trace")
        .unwrap()
        .starts_with("primary:timeout:1000"));
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_ends_a_committed_stream_with_an_error() {
    let h = start(&config("retry: { max_retries: 0 }", "    idle_timeout: 2s")).await;
    h.mock.set("p", "chunks=4,gap=5s");
    let t0 = Instant::now();
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    let last = r.events().last().cloned().unwrap();
    assert!(last.contains("\"code\":\"idle_timeout\""), "{last}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(h.mock.calls("s"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_can_shorten_but_not_lengthen_the_deadline() {
    let h = start(&config(
        "retry: { max_retries: 0 }",
        "    request_timeout: 10s",
    ))
    .await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "stall");
    }
    let t0 = Instant::now();
    let r = h.chat("main", &[("x-cascade-timeout-ms", "1500")]).await;
    assert_eq!(r.status, 504);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_millis(1600),
        "{waited:?}"
    );

    let t0 = Instant::now();
    let r = h.chat("main", &[("x-cascade-timeout-ms", "999999")]).await;
    assert_eq!(r.status, 504);
    assert!(
        t0.elapsed() <= Duration::from_secs(10),
        "the chain's 10s still rules"
    );

    let r = h.chat("main", &[("x-cascade-timeout-ms", "soon")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "x-cascade-timeout-ms");
}

#[tokio::test(start_paused = true)]
async fn hedging_answers_from_the_backup_when_the_primary_is_slow() {
    let h = start(&config(
        "retry: { max_retries: 0 }",
        "    strategy: hedge\n    hedge_delay: 100ms",
    ))
    .await;
    h.mock.set("p", "ttft=3s,gap=100ms,chunks=4");
    let t0 = Instant::now();
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(200),
        "{waited:?}"
    );
    let m = h.get("/metrics").await.text;
    assert_eq!(
        metric(&m, r#"cascade_hedges_total{chain="main",outcome="fired"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"cascade_hedges_total{chain="main",outcome="won"}"#),
        1.0
    );
    // The losing primary's stream was closed by the gateway.
    for _ in 0..100 {
        if h.mock.cancelled() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.mock.cancelled(), 1);

    // A fast primary answers alone: no hedge fires.
    h.mock.set("p", "");
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    assert_eq!(h.mock.calls("s"), 1);
}

#[tokio::test(start_paused = true)]
async fn hedging_cuts_tail_latency() {
    let h = start(&config(
        "retry: { max_retries: 0 }\nhedge_budget: { ratio: 1.0, min_per_second: 100 }",
        "    strategy: hedge\n    hedge_delay: 50ms\n  plain: [primary, secondary]",
    ))
    .await;
    // Every fourth primary call is very slow.
    h.mock.set("p", "error_rate=0.25,mix");
    h.mock.set("p", "latency=2s,error_rate=0.25,status=200");
    let mut plain = Vec::new();
    let mut hedged = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        h.chat("plain", &[]).await;
        plain.push(t0.elapsed());
        let t0 = Instant::now();
        h.chat("main", &[]).await;
        hedged.push(t0.elapsed());
    }
    plain.sort();
    hedged.sort();
    assert!(plain[19] >= Duration::from_secs(2), "{plain:?}");
    assert!(
        hedged[19] < Duration::from_millis(100),
        "hedged p99 {:?}",
        hedged[19]
    );
}

#[tokio::test(start_paused = true)]
async fn race_takes_the_first_answer_and_cancels_the_rest() {
    let h = start(&config(
        "retry: { max_retries: 0 }",
        "    strategy: race\n    race_k: 2",
    ))
    .await;
    h.mock.set("p", "ttft=5s,gap=100ms");
    let t0 = Instant::now();
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert!(t0.elapsed() < Duration::from_millis(50));
    assert_eq!(
        (h.mock.calls("p"), h.mock.calls("s"), h.mock.calls("t")),
        (1, 1, 0)
    );
    for _ in 0..100 {
        if h.mock.cancelled() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.mock.cancelled(), 1, "the loser's connection was closed");
}

#[tokio::test(start_paused = true)]
async fn chaos_injects_faults_without_calling_upstream() {
    let yaml = config("retry: { max_retries: 0 }", "").replace(
        "primary:   { provider: mock, model_id: p }",
        "primary:   { provider: mock, model_id: p, chaos: { rate: 1.0, class: rate_limited, latency: 200ms } }",
    );
    let h = start(&yaml).await;
    let t0 = Instant::now();
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(
        r.header("x-cascade-trace")
            .unwrap()
            .starts_with("primary:429:200"),
        "{:?}",
        r.header("x-cascade-trace")
    );
    assert_eq!(h.mock.calls("p"), 0);
}

#[tokio::test(start_paused = true)]
async fn the_last_targets_refusal_is_returned_as_it_is() {
    let h = start(&config(
        "retry: { max_retries: 0 }",
        "  pair: [primary, secondary]",
    ))
    .await;
    h.mock.set("p", "finish_reason=content_filter,content=");
    h.mock
        .set("s", "finish_reason=content_filter,content=redacted");
    let r = h.chat("pair", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!((h.mock.calls("p"), h.mock.calls("s")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn per_chain_actions_jump_and_fail() {
    let chain = "    on: { context_overflow: { jump_to: tertiary }, empty: fail }";
    let h = start(&config("retry: { max_retries: 0 }", chain)).await;
    h.mock.set("p", "status=400,code=context_length_exceeded");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("tertiary"));
    assert_eq!(h.mock.calls("s"), 0, "jumped over the secondary");

    h.mock.set("p", "empty");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(h.mock.calls("s"), 0, "empty is configured to fail");
}

#[tokio::test(start_paused = true)]
async fn mixed_faults_never_fail_a_request_while_a_target_can_answer() {
    let top = "retry: { max_retries: 2, base: 50ms, cap: 1s, seed: 3 }\nretry_budget: { ratio: 0.2, min_per_second: 1, window: 10s }\nbreaker: { consecutive_failures: 5, cooldown: 5s }";
    let h = start(&config(
        top,
        "    request_timeout: 20s\n    attempt_timeout: 2s\n    max_attempts: 9",
    ))
    .await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "error_rate=0.3,mix");
    }
    let requests = 60;
    let t0 = Instant::now();
    for i in 0..requests {
        let stream = i % 2 == 1;
        let start = Instant::now();
        let r = if stream {
            h.chat_stream("main", &[]).await
        } else {
            h.chat("main", &[]).await
        };
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
        assert!(!r.text.contains("\"error\""), "request {i}: {}", r.text);
        assert!(
            start.elapsed() <= Duration::from_secs(20),
            "request {i} outlived its deadline"
        );
    }
    let calls = h.mock.total_calls() as f64;
    let m = h.get("/metrics").await.text;
    let retries: f64 = m
        .lines()
        .filter(|l| l.starts_with("cascade_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let firsts = calls - retries;
    let elapsed = t0.elapsed().as_secs_f64();
    // Retries stay within ratio * first calls + the per-second floor over the run.
    // (`<` against a fractional allowance grants its ceiling.)
    assert!(
        retries <= (0.2 * firsts + 1.0 * (elapsed + 10.0)).ceil(),
        "retries {retries}, firsts {firsts}, {elapsed}s"
    );
    assert!(
        calls < requests as f64 * 3.0,
        "{calls} calls for {requests} requests"
    );
}

async fn wait_for_cancel(h: &common::Harness, n: u64) {
    for _ in 0..100 {
        if h.mock.cancelled() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.mock.cancelled(), n);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_cancels_the_upstream_call() {
    let h = start(&config("retry: { max_retries: 0 }", "")).await;
    h.mock.set("p", "chunks=10,gap=1s");
    let mut resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(common::chat_body("main", true).to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    wait_for_cancel(&h, 1).await;
    let m = h.get("/metrics").await.text;
    assert_eq!(metric(&m, "cascade_inflight_requests"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn chaos_can_cut_committed_streams() {
    let yaml = config("retry: { max_retries: 0 }", "").replace(
        "primary:   { provider: mock, model_id: p }",
        "primary:   { provider: mock, model_id: p, chaos: { rate: 0.0, cut_stream: 1.0 } }",
    );
    let h = start(&yaml).await;
    h.mock.set("p", "chunks=6,gap=10ms");
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    let last = r.events().last().cloned().unwrap();
    assert!(last.contains("chaos: stream cut"), "{last}");
    wait_for_cancel(&h, 1).await;
}

#[tokio::test(start_paused = true)]
async fn the_callers_own_deadline_never_opens_a_breaker() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 2 }";
    let h = start(&config(top, "  solo: [primary]")).await;
    h.mock.set("p", "latency=500ms");
    for _ in 0..4 {
        let r = h.chat("solo", &[("x-cascade-timeout-ms", "10")]).await;
        assert_eq!(r.status, 504);
    }
    assert_eq!(
        h.get("/admin/health").await.json()["targets"][0]["state"],
        "closed"
    );
    let r = h.chat("solo", &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(start_paused = true)]
async fn failures_after_the_commit_point_count_against_the_target() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 2, cooldown: 30s }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "chunks=5,cut_after=2");
    for _ in 0..2 {
        let r = h.chat_stream("main", &[]).await;
        assert_eq!(r.header("x-cascade-model"), Some("primary"));
        assert!(r.events().last().unwrap().contains("\"error\""));
    }
    assert_eq!(
        h.get("/admin/health").await.json()["targets"][0]["state"],
        "open"
    );
    let r = h.chat_stream("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
}

#[tokio::test(start_paused = true)]
async fn a_lost_race_is_recorded_as_cancelled() {
    let h = start(&config(
        "retry: { max_retries: 0 }",
        "    strategy: race\n    race_k: 2",
    ))
    .await;
    h.mock.set("p", "latency=5s");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(
        r.header("x-cascade-attempts"),
        Some("2"),
        "both upstream calls were made"
    );
    let trace = r.header("x-cascade-trace").unwrap();
    assert!(
        trace.contains("secondary:ok:") && trace.contains("primary:cancelled:"),
        "{trace}"
    );
}

#[tokio::test(start_paused = true)]
async fn fallbacks_count_chain_positions_on_failure_too() {
    let top = "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 1, cooldown: 1h, max_cooldown: 1h }";
    let h = start(&config(top, "")).await;
    h.mock.set("p", "status=500");
    h.chat("main", &[]).await; // opens the primary's breaker
    h.mock.set("s", "status=500");
    h.mock.set("t", "status=500");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.header("x-cascade-attempts"),
        Some("3"),
        "the open primary was skipped, then called as the last resort"
    );
    let trace = r.header("x-cascade-trace").unwrap();
    assert!(trace.ends_with(":last_resort"), "{trace}");
    assert_eq!(
        r.header("x-cascade-fallbacks"),
        Some("2"),
        "moved past positions 0 and 1"
    );
}

/// Three targets on default settings but for the deadline (retries, budget, breakers
/// and attempt limit as shipped).
const DEFAULTS: &str = r#"
server: { request_timeout: 120s }
providers:
  mock: { kind: openai, base_url: "{mock}" }
models:
  primary:   { provider: mock, model_id: p }
  secondary: { provider: mock, model_id: s }
  tertiary:  { provider: mock, model_id: t }
chains:
  main: [primary, secondary, tertiary]
"#;

/// Sends `n` requests (every other one streamed); each must be answered in full,
/// within `deadline` and the default attempt limit.
async fn every_request_answered(h: &common::Harness, n: usize, deadline: Duration) {
    for i in 0..n {
        let start = Instant::now();
        let r = if i % 2 == 1 {
            h.chat_stream("main", &[]).await
        } else {
            h.chat("main", &[]).await
        };
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
        assert!(!r.text.contains("\"error\""), "request {i}: {}", r.text);
        if i % 2 == 1 {
            assert!(
                r.text.ends_with("data: [DONE]\n\n"),
                "request {i}: {}",
                r.text
            );
        }
        let attempts: u32 = r.header("x-cascade-attempts").unwrap().parse().unwrap();
        assert!(attempts <= 10, "request {i}: {attempts} calls");
        assert!(
            start.elapsed() <= deadline,
            "request {i} outlived its deadline"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn three_targets_with_thirty_percent_mixed_faults_answer_every_request() {
    // Seeded draws: failures cluster as real ones do. Each of these runs failed a request
    // before the second pass and the last resort.
    for base in [20, 30, 40] {
        let h = start(DEFAULTS).await;
        for (m, seed) in [("p", base + 1), ("s", base + 2), ("t", base + 3)] {
            h.mock.set(m, &format!("error_rate=0.3,mix,seed={seed}"));
        }
        every_request_answered(&h, 200, Duration::from_secs(120)).await;
        // The default retry budget (20% of first calls) covers this regime.
        let m = h.get("/metrics").await.text;
        assert_eq!(
            metric(&m, "cascade_retry_budget_exhausted_total"),
            0.0,
            "seeds {base}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn three_targets_with_thirty_percent_stalls_and_timeouts_answer_every_request() {
    // A stall costs the default attempt timeout (30 s): the deadline leaves room for
    // the default 10 attempts.
    let h = start(&DEFAULTS.replace("request_timeout: 120s", "request_timeout: 300s")).await;
    for (m, seed) in [("p", 4), ("s", 5), ("t", 6)] {
        h.mock
            .set(m, &format!("error_rate=0.3,mix_slow,seed={seed}"));
    }
    every_request_answered(&h, 200, Duration::from_secs(300)).await;
}

#[tokio::test(start_paused = true)]
async fn in_an_outage_a_request_adds_at_most_one_probe_and_ends_in_time() {
    let h = start(DEFAULTS).await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "status=500");
    }
    // The first request spends each target's retries; the breakers open.
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    let first = h.mock.total_calls();
    assert_eq!(first, 9, "three calls to each target, no second pass");
    let mut last_resorts = 0;
    for i in 0..10 {
        let before = h.mock.total_calls();
        let start = Instant::now();
        let r = h.chat("main", &[]).await;
        assert_eq!(r.status, 502, "request {i}");
        let calls = h.mock.total_calls() - before;
        // As before: the soonest breaker's target, tried through it with its retries
        // (at most 3 calls); now also at most one last resort.
        let trace = r.header("x-cascade-trace").unwrap();
        let probes = trace.matches(":last_resort").count();
        assert!(probes <= 1, "request {i}: {trace}");
        last_resorts += probes;
        assert!(calls as usize - probes <= 3, "request {i}: {trace}");
        assert!(start.elapsed() <= Duration::from_secs(120));
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // Within one cooldown (30 s), each open target is a last resort once at most,
    // however many requests fail.
    assert!(last_resorts <= 3, "{last_resorts} last resorts in 10 s");
}

#[tokio::test(start_paused = true)]
async fn the_last_resort_calls_an_open_target_and_says_so_in_the_trace() {
    let h = start(DEFAULTS).await;
    // Open the primary's breaker, then let it recover; the others fail for good.
    h.mock.set("p", "status=500");
    h.mock.set("s", "status=401");
    h.mock.set("t", "status=401");
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    h.mock.set("p", "");
    let before = (h.mock.calls("p"), h.mock.calls("s"), h.mock.calls("t"));
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cascade-model"), Some("primary"));
    let trace = r.header("x-cascade-trace").unwrap();
    assert!(trace.ends_with(":last_resort"), "{trace}");
    assert!(trace.starts_with("secondary:401:"), "{trace}");
    // `auth` is never tried again: one call each to secondary and tertiary.
    assert_eq!(h.mock.calls("s") - before.1, 1);
    assert_eq!(h.mock.calls("t") - before.2, 1);
    assert_eq!(h.mock.calls("p") - before.0, 1);
}

#[tokio::test(start_paused = true)]
async fn without_retries_an_empty_answer_is_not_tried_again() {
    let yaml = DEFAULTS.replace("server:", "retry: { max_retries: 0 }\nserver:");
    let h = start(&yaml).await;
    for m in ["p", "s", "t"] {
        h.mock.set(m, "empty");
    }
    let r = h.chat("main", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(h.mock.total_calls(), 3, "one call each, as before");
}
