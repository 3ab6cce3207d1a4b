//! Breakers and health shared across replicas through a real redis-server
//! (`state.redis_url`): two gateways, each with its own mock upstream, one Redis.

mod common;

use std::time::{Duration, Instant};

use common::redis::redis_or_skip;
use common::{start, Harness};
use serde_json::Value;

fn yaml(redis: &str, breaker: &str, health: &str) -> String {
    format!(
        r#"
server: {{ request_timeout: 10s }}
retry: {{ max_retries: 0 }}
breaker: {breaker}
health: {health}
state: {{ redis_url: "{redis}" }}
providers:
  mock: {{ kind: openai, base_url: "{{mock}}" }}
models:
  primary:   {{ provider: mock, model_id: p }}
  secondary: {{ provider: mock, model_id: s }}
chains:
  main: [primary, secondary]
"#
    )
}

/// Two gateways on one config and one upstream (A's mock), as a fleet runs.
async fn replicas(config: &str) -> (Harness, Harness) {
    let a = start(config).await;
    let b = start(&config.replace("{mock}", &a.mock.url())).await;
    (a, b)
}

async fn target(h: &Harness, name: &str) -> Value {
    common::health_of(&h.get("/admin/health").await.json(), name)
}

/// Polls `/admin/health` of `h` until `name` satisfies `ok`, for at most `limit`;
/// how long it took.
async fn until(h: &Harness, name: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let t = target(h, name).await;
        if ok(&t) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{name} never got there: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_replica_opens_on_the_other_within_a_second() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let config = yaml(
        &redis.url(),
        "{ consecutive_failures: 2, cooldown: 2s, max_cooldown: 2s, close_after: 1 }",
        "{ min_calls: 1000000 }",
    );
    let (a, b) = replicas(&config).await;
    // Let both replicas see their targets once before anything changes.
    tokio::time::sleep(Duration::from_millis(500)).await;

    a.mock.set("p", "status=500");
    for _ in 0..2 {
        assert_eq!(
            a.chat("main", &[]).await.header("x-cascade-model"),
            Some("secondary")
        );
    }
    assert_eq!(target(&a, "primary").await["state"], "open");
    let took = until(&b, "primary", Duration::from_secs(3), |t| {
        t["state"] == "open"
    })
    .await;
    assert!(took <= Duration::from_secs(1), "B saw it after {took:?}");
    assert_eq!(
        target(&b, "primary").await["retry_at"],
        target(&a, "primary").await["retry_at"],
        "the same retry_at"
    );
    // B skips the target without calling it.
    let calls = a.mock.calls("p");
    let r = b.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(a.mock.calls("p"), calls);

    // A's probe after the cooldown closes it; B closes too.
    a.mock.set("p", "");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        a.chat("main", &[]).await.header("x-cascade-model"),
        Some("primary")
    );
    assert_eq!(target(&a, "primary").await["state"], "closed");
    let took = until(&b, "primary", Duration::from_secs(3), |t| {
        t["state"] == "closed"
    })
    .await;
    assert!(took <= Duration::from_secs(1), "B closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_shared_so_every_replica_orders_the_chain_alike() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let config = yaml(
        &redis.url(),
        "{ consecutive_failures: 1000000, min_calls: 1000000 }",
        "{ min_calls: 5, degraded_below: 0.8 }",
    );
    let (a, b) = replicas(&config).await;
    a.mock.set("p", "status=500");
    for _ in 0..10 {
        a.chat("main", &[]).await;
    }
    assert_eq!(target(&a, "primary").await["degraded"], true);
    let took = until(&b, "primary", Duration::from_secs(5), |t| {
        t["degraded"] == true
    })
    .await;
    assert!(
        took <= Duration::from_secs(2),
        "B saw the degradation after {took:?}"
    );
    // B, which never saw a failure, now tries the secondary first.
    let calls = a.mock.calls("p");
    let r = b.chat("main", &[]).await;
    assert_eq!(r.header("x-cascade-model"), Some("secondary"));
    assert_eq!(r.header("x-cascade-attempts"), Some("1"));
    assert_eq!(a.mock.calls("p"), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_fails_no_request_and_sharing_resumes_when_it_returns() {
    let Some(mut redis) = redis_or_skip() else {
        return;
    };
    let config = yaml(
        &redis.url(),
        "{ consecutive_failures: 2, cooldown: 60s }",
        "{ min_calls: 1000000 }",
    );
    let (a, b) = replicas(&config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.stop();
    for h in [&a, &b] {
        for _ in 0..5 {
            let t = Instant::now();
            let r = h.chat("main", &[]).await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "no Redis wait on the request path"
            );
        }
    }
    // Each replica runs on its own state meanwhile.
    a.mock.set("p", "status=500");
    for _ in 0..2 {
        a.chat("main", &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(target(&a, "primary").await["state"], "open");
    assert_eq!(target(&b, "primary").await["state"], "closed");
    let m = a.get("/metrics").await.text;
    assert!(
        m.lines()
            .any(|l| l.starts_with("cascade_state_errors_total ") && !l.ends_with(" 0")),
        "{m}"
    );

    // Redis returns (empty): A's open breaker reaches B once A reconnects.
    redis.restart();
    until(&b, "primary", Duration::from_secs(5), |t| {
        t["state"] == "open"
    })
    .await;
    assert_eq!(
        target(&b, "primary").await["retry_at"],
        target(&a, "primary").await["retry_at"]
    );
}
