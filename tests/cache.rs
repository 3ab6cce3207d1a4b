//! The response cache, with counted upstream calls: hits, misses, single-flight, what is
//! never stored, per-request control, streaming replay, stale-if-error, the byte bound,
//! and Redis as a shared tier (with a real redis-server).

mod common;

use std::time::Duration;

use common::start;
use serde_json::{json, Value};

const CACHED: &str = r#"
server:
  request_timeout: 30s
  attempt_timeout: 5s
retry: { max_retries: 0 }
cache: { mode: deterministic, max_bytes: 1MiB, ttl: 10m, stale_ttl: 1h }
providers:
  mock: { kind: openai, base_url: "{mock}" }
models:
  primary:   { provider: mock, model_id: p }
  secondary: { provider: mock, model_id: s }
chains:
  main: [primary, secondary]
  everything:
    models: [primary]
    cache: { mode: all, ttl: 1h }
  uncached:
    models: [primary]
    cache: { mode: off }
  no_stale:
    models: [primary]
    cache: { stale: false }
"#;

fn body(chain: &str, question: &str, stream: bool) -> String {
    json!({"model": chain, "temperature": 0, "stream": stream,
           "messages": [{"role": "user", "content": question}]})
    .to_string()
}

async fn ask(h: &common::Harness, chain: &str, q: &str, headers: &[(&str, &str)]) -> common::Reply {
    h.post_raw(body(chain, q, false), headers).await
}

fn content(r: &common::Reply) -> String {
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn a_repeat_is_a_hit_with_no_upstream_call() {
    let h = start(CACHED).await;
    let first = ask(&h, "main", "q1", &[]).await;
    assert_eq!(first.header("x-cascade-cache"), Some("miss"));
    let second = ask(&h, "main", "q1", &[]).await;
    assert_eq!(second.header("x-cascade-cache"), Some("hit"));
    assert_eq!(h.mock.calls("p"), 1);
    assert_eq!(second.json(), first.json(), "the same answer");
    assert_eq!(second.header("x-cascade-model"), Some("primary"));
    assert_eq!(second.header("x-cascade-attempts"), Some("0"));
    // Field order and whitespace do not matter; `user` and `stream_options` do not count.
    let reordered = r#"{ "messages": [ {"content": "q1", "role": "user"} ], "temperature": 0.0, "user": "u9", "model": "main" }"#;
    let r = h.post_raw(reordered, &[]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("hit"));
    assert_eq!(h.mock.calls("p"), 1);
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains(r#"cascade_cache_requests_total{chain="main",result="hit"} 2"#),
        "{m}"
    );
    assert!(m.contains(r#"cascade_cache_requests_total{chain="main",result="miss"} 1"#));
}

#[tokio::test(start_paused = true)]
async fn only_deterministic_requests_unless_a_chain_opts_in() {
    let h = start(CACHED).await;
    let random = json!({"model": "main", "temperature": 0.7, "messages": [{"role": "user", "content": "q"}]}).to_string();
    for _ in 0..2 {
        let r = h.post_raw(random.clone(), &[]).await;
        assert_eq!(r.header("x-cascade-cache"), Some("bypass"));
    }
    assert_eq!(h.mock.calls("p"), 2);
    let seeded =
        json!({"model": "main", "seed": 42, "messages": [{"role": "user", "content": "q"}]})
            .to_string();
    h.post_raw(seeded.clone(), &[]).await;
    assert_eq!(
        h.post_raw(seeded, &[]).await.header("x-cascade-cache"),
        Some("hit")
    );
    let any = json!({"model": "everything", "temperature": 0.9, "messages": [{"role": "user", "content": "q"}]}).to_string();
    h.post_raw(any.clone(), &[]).await;
    assert_eq!(
        h.post_raw(any, &[]).await.header("x-cascade-cache"),
        Some("hit")
    );
    for _ in 0..2 {
        assert_eq!(
            ask(&h, "uncached", "q", &[])
                .await
                .header("x-cascade-cache"),
            Some("bypass")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_identical_misses_make_one_upstream_call() {
    let h = std::sync::Arc::new(start(CACHED).await);
    h.mock.set("p", "latency=300ms");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { ask(&h, "main", "same", &[]).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        answers.push(content(&r));
    }
    assert_eq!(h.mock.calls("p"), 1, "single-flight");
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "each caller gets the same answer"
    );
}

#[tokio::test(start_paused = true)]
async fn errors_cut_streams_and_filtered_answers_are_never_stored() {
    let h = start(CACHED).await;
    h.mock.set("p", "status=500");
    h.mock.set("s", "status=500");
    assert_eq!(ask(&h, "main", "q", &[]).await.status, 502);
    h.mock.set("p", "");
    assert_eq!(
        ask(&h, "main", "q", &[]).await.header("x-cascade-cache"),
        Some("miss")
    );

    // A stream cut after its first token is not stored.
    h.mock.set("p", "chunks=5,cut_after=2");
    let r = h.post_raw(body("main", "cut", true), &[]).await;
    assert!(r.events().last().unwrap().contains("error"));
    h.mock.set("p", "");
    assert_eq!(
        ask(&h, "main", "cut", &[]).await.header("x-cascade-cache"),
        Some("miss")
    );

    // A refusal (the last target's content filter) is returned but not stored.
    h.mock.set("p", "finish_reason=content_filter,content=");
    h.mock.set("s", "finish_reason=content_filter,content=");
    assert_eq!(
        ask(&h, "main", "filtered", &[]).await.json()["choices"][0]["finish_reason"],
        "content_filter"
    );
    h.mock.set("p", "");
    assert_eq!(
        ask(&h, "main", "filtered", &[])
            .await
            .header("x-cascade-cache"),
        Some("miss")
    );
    // An empty answer is never stored either (it is a failure).
    h.mock.set("p", "empty");
    h.mock.set("s", "empty");
    ask(&h, "main", "empty", &[]).await;
    h.mock.set("p", "");
    assert_eq!(
        ask(&h, "main", "empty", &[])
            .await
            .header("x-cascade-cache"),
        Some("miss")
    );
}

#[tokio::test(start_paused = true)]
async fn no_cache_refreshes_and_no_store_skips_the_write() {
    let h = start(CACHED).await;
    h.mock.set("p", "content=old");
    ask(&h, "main", "q", &[]).await;
    h.mock.set("p", "content=new");
    let r = ask(&h, "main", "q", &[("cache-control", "no-cache")]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("bypass"));
    assert_eq!(content(&r), "new");
    let r = ask(&h, "main", "q", &[]).await;
    assert_eq!(
        (r.header("x-cascade-cache"), content(&r).as_str()),
        (Some("hit"), "new"),
        "refreshed"
    );

    let r = ask(&h, "main", "other", &[("cache-control", "no-store")]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("miss"));
    assert_eq!(
        ask(&h, "main", "other", &[])
            .await
            .header("x-cascade-cache"),
        Some("miss")
    );
    assert_eq!(h.mock.calls("p"), 4);
}

#[tokio::test(start_paused = true)]
async fn the_ttl_header_sets_the_lifetime() {
    let h = start(CACHED).await;
    ask(&h, "main", "q", &[("x-cascade-cache-ttl", "5")]).await;
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        ask(&h, "main", "q", &[]).await.header("x-cascade-cache"),
        Some("hit")
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        ask(&h, "main", "q", &[]).await.header("x-cascade-cache"),
        Some("miss")
    );
}

#[tokio::test(start_paused = true)]
async fn streamed_answers_are_stored_and_replayed() {
    let h = start(CACHED).await;
    h.mock.set("p", "chunks=6");
    let first = h.post_raw(body("main", "s", true), &[]).await;
    assert_eq!(first.header("x-cascade-cache"), Some("miss"));
    let replay = h.post_raw(body("main", "s", true), &[]).await;
    assert_eq!(replay.header("x-cascade-cache"), Some("hit"));
    assert_eq!(replay.streamed_text(), first.streamed_text());
    assert_eq!(replay.events().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(h.mock.calls("p"), 1);
    // That stream did not report usage, so its entry cannot answer a request that
    // expects usage: the non-streaming form goes upstream once and refreshes the entry...
    let whole = ask(&h, "main", "s", &[]).await;
    assert_eq!(whole.header("x-cascade-cache"), Some("miss"));
    assert_eq!(content(&whole), first.streamed_text());
    // ...which then serves both forms.
    assert_eq!(
        ask(&h, "main", "s", &[]).await.header("x-cascade-cache"),
        Some("hit")
    );
    let again = h.post_raw(body("main", "s", true), &[]).await;
    assert_eq!(again.header("x-cascade-cache"), Some("hit"));
    assert_eq!(again.streamed_text(), first.streamed_text());
    assert_eq!(h.mock.calls("p"), 2);

    // Tool calls and usage survive a replay.
    h.mock.set("p", "tool=get_weather");
    let b = json!({"model": "main", "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "weather"}]})
    .to_string();
    h.post_raw(b.clone(), &[]).await;
    let r = h.post_raw(b, &[]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("hit"));
    let chunks: Vec<Value> = r.chunks();
    let call = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
        .unwrap();
    assert_eq!(call[0]["function"]["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(call[0]["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
    assert!(
        chunks.last().unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_answers_when_every_target_is_down() {
    let h = start(CACHED).await;
    let fresh = ask(&h, "main", "q", &[]).await;
    tokio::time::advance(Duration::from_secs(11 * 60)).await;
    h.mock.set("p", "status=503");
    h.mock.set("s", "status=503");
    let r = ask(&h, "main", "q", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cascade-cache"), Some("stale"));
    assert_eq!(r.header("warning"), Some("110 - \"Response is Stale\""));
    assert!(r.header("age").unwrap().parse::<u64>().unwrap() >= 660);
    assert_eq!(content(&r), content(&fresh));
    // Streaming requests get the stale answer replayed.
    let r = h.post_raw(body("main", "q", true), &[]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("stale"));
    assert_eq!(r.streamed_text(), content(&fresh));
    // A caller's own bad request is not covered up by a stale answer.
    h.mock.set("p", "status=400");
    assert_eq!(ask(&h, "main", "q", &[]).await.status, 400);
    // A chain can turn stale answers off.
    h.mock.set("p", "");
    ask(&h, "no_stale", "q", &[]).await;
    tokio::time::advance(Duration::from_secs(11 * 60)).await;
    h.mock.set("p", "status=503");
    assert_eq!(ask(&h, "no_stale", "q", &[]).await.status, 502);
}

#[tokio::test(start_paused = true)]
async fn tenants_never_share_answers() {
    let h = start(CACHED).await;
    ask(&h, "main", "q", &[("authorization", "Bearer tenant-a")]).await;
    let r = ask(&h, "main", "q", &[("authorization", "Bearer tenant-b")]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("miss"));
    let r = ask(&h, "main", "q", &[("authorization", "Bearer tenant-a")]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("hit"));
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_holds_under_a_fill() {
    let h = start(&CACHED.replace("max_bytes: 1MiB", "max_bytes: 16KiB")).await;
    h.mock.set("p", &format!("content={}", "x".repeat(1000)));
    for i in 0..100 {
        ask(&h, "main", &format!("q{i}"), &[]).await;
    }
    let bytes = h.state.cache.weighted_size().await;
    assert!(bytes <= 16 * 1024, "{bytes} bytes held");
    assert!(bytes > 8 * 1024, "the cache is used: {bytes}");
    let m = h.get("/metrics").await.text;
    let evicted: f64 = m
        .lines()
        .find(|l| l.starts_with(r#"cascade_cache_evictions_total{cause="size"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(evicted >= 80.0, "{m}");
    assert!(m.contains("cascade_cache_bytes "));
}

use common::redis::redis_or_skip;

#[tokio::test]
async fn redis_shares_hits_between_gateways_and_its_loss_is_survivable() {
    let Some(mut redis) = redis_or_skip() else {
        return;
    };
    let yaml = CACHED.replace(
        "stale_ttl: 1h }",
        &format!(
            "stale_ttl: 1h, redis_url: \"redis://127.0.0.1:{}\" }}",
            redis.port
        ),
    );
    let first = start(&yaml).await;
    let r = ask(&first, "main", "shared", &[]).await;
    assert_eq!(r.header("x-cascade-cache"), Some("miss"));

    // A second gateway (its own process state, its own moka) shares the same mock and Redis.
    let second_yaml = yaml.replace("{mock}", &first.mock.url());
    let second = start(&second_yaml).await;
    let mut hit = None;
    for _ in 0..50 {
        let r = ask(&second, "main", "shared", &[]).await;
        if r.header("x-cascade-cache") == Some("hit") {
            hit = Some(r);
            break;
        }
        // The first gateway writes Redis in the background.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hit = hit.expect("the second gateway serves the first one's answer from Redis");
    assert_eq!(content(&hit), content(&r));
    assert_eq!(first.mock.calls("p"), 1);
    assert_eq!(second.mock.calls("p"), 0);

    // Kill Redis: the gateways keep answering, as misses, and count the errors.
    redis.stop();
    for i in 0..3 {
        let r = ask(&second, "main", &format!("after-{i}"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cascade-cache"), Some("miss"));
    }
    let m = second.get("/metrics").await.text;
    assert!(
        m.contains(r#"cascade_cache_errors_total{tier="redis"}"#),
        "{m}"
    );
}

#[tokio::test(start_paused = true)]
async fn absurd_ttls_are_clamped_not_fatal() {
    let h = start(CACHED).await;
    let r = ask(
        &h,
        "main",
        "q",
        &[("x-cascade-cache-ttl", "18446744073709551615")],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = h
        .post_raw(
            body("main", "q2", true),
            &[("x-cascade-cache-ttl", "18446744073709551615")],
        )
        .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        ask(&h, "main", "q", &[]).await.header("x-cascade-cache"),
        Some("hit")
    );
}

#[tokio::test]
async fn an_unreachable_redis_costs_nothing_after_the_first_failure() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = CACHED.replace(
        "stale_ttl: 1h }",
        &format!("stale_ttl: 1h, redis_url: \"redis://127.0.0.1:{port}\" }}"),
    );
    let h = start(&yaml).await;
    let t0 = std::time::Instant::now();
    for i in 0..20 {
        let r = ask(&h, "main", &format!("q{i}"), &[]).await;
        assert_eq!(r.status, 200);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{:?} for 20 requests",
        t0.elapsed()
    );
    let m = h.get("/metrics").await.text;
    assert!(
        m.contains(r#"cascade_cache_errors_total{tier="redis"}"#),
        "{m}"
    );
}
