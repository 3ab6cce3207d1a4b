//! Drives the store's writer as hard as it goes, for `bench/` (scenarios S8 and S9).
//!
//! `store_load PATH|postgres://URL CALLS DAYS` records CALLS `model_calls` rows and CALLS / 2
//! `requests` rows through `Store::record` (the request path's own call), with
//! timestamps spread evenly over the last DAYS days, waiting whenever the queue is
//! nearly full so nothing is dropped. It prints one JSON line: rows, seconds, rows per
//! second committed, and rows dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade::name::Name;
use cascade::store::{CallKind, CallRow, RequestRow, Row, Store, StoreSettings, Tokens};

const MODELS: [&str; 4] = ["gpt-4o", "claude-sonnet", "gpt-4o-mini", "llama-3.1-8b"];
const CHAINS: [&str; 3] = ["default", "complex_reasoning", "simple_generation"];
const ERRORS: [&str; 4] = ["transient", "rate_limited", "timeout", "empty"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: store_load PATH CALLS DAYS");
        std::process::exit(2);
    }
    let backend = if args[1].starts_with("postgres://") {
        match cascade::store::PgUrl::parse(&args[1]) {
            Ok(u) => cascade::store::Backend::Postgres(u),
            Err(e) => {
                eprintln!("store_load: {e}");
                std::process::exit(2);
            }
        }
    } else {
        cascade::store::Backend::Sqlite(args[1].clone().into())
    };
    let calls: u64 = args[2].parse().unwrap_or(100_000);
    let days: f64 = args[3].parse().unwrap_or(0.0);
    let metrics = cascade::metrics::Metrics::new();
    let queue = 65_536;
    let settings = StoreSettings {
        backend,
        retention: Duration::from_secs(3650 * 86_400),
        queue,
        flush_interval: Duration::from_secs(1),
    };
    let store = match Store::open(settings, metrics.store.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("store_load: {e}");
            std::process::exit(2);
        }
    };
    let now = cascade::clock::now_ms();
    let span_ms = (days * 86_400_000.0) as i64;
    let model: Vec<Name> = MODELS.iter().map(|m| Name::new(m)).collect();
    let chain: Vec<Name> = CHAINS.iter().map(|c| Name::new(c)).collect();
    let provider = Name::new("mock");
    let started = Instant::now();
    let mut request_id: Arc<str> = "".into();
    for i in 0..calls {
        while store.waiting() > queue - 4096 {
            std::thread::sleep(Duration::from_micros(200));
        }
        // Oldest first, as a gateway writes them.
        let at = now - span_ms + (span_ms as f64 * (i as f64 / calls as f64)) as i64;
        // Ids as the gateway makes them (UUID v7).
        if i % 2 == 0 {
            request_id = uuid::Uuid::now_v7().hyphenated().to_string().into();
        }
        let failed = i % 10 == 0;
        let m = (i % 4) as usize;
        store.record(Row::Call(CallRow {
            started_ms: at,
            request_id: request_id.clone(),
            chain: chain[m % 3],
            model: model[m],
            provider,
            kind: if i % 2 == 0 {
                CallKind::Primary
            } else {
                CallKind::Fallback
            },
            success: !failed,
            status: Some(if failed { 503 } else { 200 }),
            error_type: failed.then(|| ERRORS[(i / 10 % 4) as usize]),
            latency_ms: 50.0 + (i % 997) as f64,
            ttft_ms: None,
            tokens: (!failed).then_some(Tokens {
                input: 500,
                cached_input: 0,
                output: 120,
            }),
            cost_usd: if failed { 0.0 } else { 0.0042 },
            deadline_cut: false,
        }));
        if i % 2 == 1 {
            store.record(Row::Request(RequestRow {
                request_id: request_id.clone(),
                arrived_ms: at,
                surface: "chat",
                chain: Some(chain[m % 3]),
                status: 200,
                model: Some(model[m]),
                provider: Some(provider),
                attempts: 2,
                fallbacks: u32::from(i % 4 == 1),
                cache: "miss",
                stream: false,
                latency_ms: 120.0 + (i % 991) as f64,
                ttft_ms: None,
                tokens: Some(Tokens {
                    input: 500,
                    cached_input: 0,
                    output: 120,
                }),
                cost_usd: 0.0042,
                primary_cost_usd: 0.0061,
                error_type: None,
            }));
        }
    }
    store.flush_blocking();
    let secs = started.elapsed().as_secs_f64();
    let rows = calls + calls / 2;
    println!(
        "{{\"rows\": {rows}, \"seconds\": {secs:.3}, \"rows_per_sec\": {:.0}, \"dropped\": {}}}",
        rows as f64 / secs,
        metrics.store.dropped.get()
    );
}
