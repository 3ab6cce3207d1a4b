//! Prometheus metrics. Labels stay low-cardinality: chain, model, provider, outcome class.

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub attempts_total: IntCounterVec,
    pub fallbacks_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub overhead: Histogram,
    pub inflight: IntGauge,
    pub circuit_state: IntGaugeVec,
    pub retries_total: IntCounterVec,
    pub hedges_total: IntCounterVec,
    pub ttft: HistogramVec,
    pub retry_budget_exhausted: IntCounter,
    pub tokens_total: IntCounterVec,
    pub cost_usd_total: CounterVec,
    pub cache_requests: IntCounterVec,
    pub cache_bytes: IntGauge,
    pub cache_evictions: IntCounterVec,
    pub cache_errors: IntCounterVec,
}

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let requests_total = counter(
            "cascade_requests_total",
            "Chat requests answered, by chain and HTTP status.",
            &["chain", "status"],
        );
        let attempts_total = counter(
            "cascade_attempts_total",
            "Upstream calls, by outcome (ok or the error class).",
            &["chain", "model", "provider", "outcome"],
        );
        let fallbacks_total = counter(
            "cascade_fallbacks_total",
            "Moves from one chain target to the next, by the failure that caused them.",
            &["chain", "from_model", "to_model", "reason"],
        );
        let request_duration = histogram(
            "cascade_request_duration_seconds",
            "Time to answer a chat request (to the first byte for streams).",
            &["chain"],
            DURATION_BUCKETS,
        );
        let upstream_duration = histogram(
            "cascade_upstream_duration_seconds",
            "Time of one upstream call (to the first content for streams).",
            &["model", "provider"],
            DURATION_BUCKETS,
        );
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "cascade_overhead_seconds",
                "Time spent in the gateway itself: request time minus upstream time.",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(overhead.clone()))
            .expect("unique metric");
        let inflight = IntGauge::new("cascade_inflight_requests", "Chat requests in progress.")
            .expect("valid metric");
        registry
            .register(Box::new(inflight.clone()))
            .expect("unique metric");
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "cascade_circuit_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ),
            &["model"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(circuit_state.clone()))
            .expect("unique metric");
        let retries_total = counter(
            "cascade_retries_total",
            "Same-target retries, by the failure class that caused them.",
            &["model", "class"],
        );
        let hedges_total = counter(
            "cascade_hedges_total",
            "Hedged calls: fired, won (the hedge answered first), lost, denied (budget).",
            &["chain", "outcome"],
        );
        let ttft = histogram(
            "cascade_ttft_seconds",
            "Time to the first content delta of a stream, per upstream call.",
            &["model"],
            DURATION_BUCKETS,
        );
        let retry_budget_exhausted = IntCounter::new(
            "cascade_retry_budget_exhausted_total",
            "Retries refused because the gateway-wide retry budget was spent.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(retry_budget_exhausted.clone()))
            .expect("unique metric");
        let tokens_total = counter(
            "cascade_tokens_total",
            "Tokens reported by upstreams, by kind (prompt, completion, cached).",
            &["model", "kind"],
        );
        let cost_usd_total = CounterVec::new(
            Opts::new(
                "cascade_cost_usd_total",
                "Cost of answers in US dollars, from the pool's prices.",
            ),
            &["model"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(cost_usd_total.clone()))
            .expect("unique metric");
        let cache_requests = counter(
            "cascade_cache_requests_total",
            "Cache lookups by result: hit, miss, stale, bypass.",
            &["chain", "result"],
        );
        let cache_evictions = counter(
            "cascade_cache_evictions_total",
            "Entries removed from the in-process cache, by cause.",
            &["cause"],
        );
        let cache_errors = counter(
            "cascade_cache_errors_total",
            "Cache tier failures (the request went on without the tier).",
            &["tier"],
        );
        let cache_bytes =
            IntGauge::new("cascade_cache_bytes", "Bytes held by the in-process cache.")
                .expect("valid metric");
        registry
            .register(Box::new(cache_bytes.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            cache_requests,
            cache_bytes,
            cache_evictions,
            cache_errors,
            tokens_total,
            cost_usd_total,
            circuit_state,
            retries_total,
            hedges_total,
            ttft,
            retry_budget_exhausted,
            requests_total,
            attempts_total,
            fallbacks_total,
            request_duration,
            upstream_duration,
            overhead,
            inflight,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec only fails on invalid metric families, which `new` prevents.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
