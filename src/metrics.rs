//! Prometheus metrics. Labels stay low-cardinality: chain, model, provider, outcome class.

use crate::name::Name;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::api::Usage;
use arc_swap::ArcSwap;

use crate::config::{Chain, Config, Model};

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub attempts_total: IntCounterVec,
    pub fallbacks_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub overhead: Histogram,
    pub inflight: IntGauge,
    /// Open client connections per per-core worker (the accept balance's counts).
    pub worker_connections: IntGaugeVec,
    pub circuit_state: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    /// Failed operations on the shared-state Redis (`state.redis_url`).
    pub state_errors: IntCounter,
    config_info: IntGaugeVec,
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
    /// Cost of answered requests by chain, and what the chain's first model would have
    /// charged for the same tokens: their difference is the fallback cost differential.
    pub request_cost_usd_total: CounterVec,
    pub primary_cost_usd_total: CounterVec,
    pub store: crate::store::StoreMetrics,
    /// Log lines dropped because the log writer fell behind.
    pub log_dropped: IntCounter,
    pub shadow_requests_total: IntCounterVec,
    pub shadow_skipped_total: IntCounterVec,
    pub shadow_similarity: HistogramVec,
    pub shadow_cost_usd_total: CounterVec,
    /// Serializes [`Metrics::sync_log_dropped`] between concurrent scrapes.
    log_dropped_sync: std::sync::Mutex<()>,
    /// Handles for the configured chains and models, bound once so the hot path does
    /// not hash label values. Empty until [`Metrics::for_config`].
    bound: ArcSwap<Bound>,
}

/// The `result` label values of `cascade_cache_requests_total`.
pub const CACHE_RESULTS: [&str; 4] = ["hit", "miss", "stale", "bypass"];

#[derive(Default)]
struct Bound {
    /// By `Chain::index`.
    chains: Vec<Option<ChainHandles>>,
    /// By `Model::index`.
    models: Vec<ModelHandles>,
}

struct ChainHandles {
    /// `Chain::uid` of the chain these were bound for.
    uid: u64,
    duration: Histogram,
    answered_ok: IntCounter,
    cache: [IntCounter; CACHE_RESULTS.len()],
    /// `cascade_attempts_total{outcome="ok"}` per target position.
    attempts_ok: Vec<IntCounter>,
    request_cost: Counter,
    primary_cost: Counter,
}

struct ModelHandles {
    /// `Model::uid` of the model these were bound for.
    uid: u64,
    upstream: Histogram,
    ttft: Histogram,
    prompt_tokens: IntCounter,
    completion_tokens: IntCounter,
    cached_tokens: IntCounter,
    cost: Counter,
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
        let worker_connections = IntGaugeVec::new(
            Opts::new(
                "cascade_worker_connections",
                "Open client connections per worker (scheduler: per_core).",
            ),
            &["worker"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(worker_connections.clone()))
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
        let config_reloads = counter(
            "cascade_config_reloads_total",
            "Config reloads, by result (ok, error).",
            &["result"],
        );
        let state_errors = IntCounter::new(
            "cascade_state_errors_total",
            "Failed operations on the shared-state Redis (breakers and health across replicas).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(state_errors.clone()))
            .expect("unique metric");
        // Both series exist from the start, so a dashboard shows 0 before any reload.
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let config_info = IntGaugeVec::new(
            Opts::new(
                "cascade_config_info",
                "The config in use: 1 for the first 12 hex digits of its file's SHA-256.",
            ),
            &["hash"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_info.clone()))
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
        let cost_counter = |name: &str, help: &str| {
            let c = CounterVec::new(Opts::new(name, help), &["chain"]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let request_cost_usd_total = cost_counter(
            "cascade_request_cost_usd_total",
            "Cost of answered requests in US dollars, by chain.",
        );
        let primary_cost_usd_total = cost_counter(
            "cascade_primary_cost_usd_total",
            "What the chain's first model would have charged for the same requests' tokens.",
        );
        let int = |c: IntCounter| {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let store_dropped = int(IntCounter::new(
            "cascade_store_dropped_total",
            "Store rows lost (full queue, write failure), one per row.",
        )
        .expect("valid metric"));
        let log_dropped = int(IntCounter::new(
            "cascade_log_dropped_total",
            "Log lines dropped because the log writer fell behind.",
        )
        .expect("valid metric"));
        let store_rows = counter(
            "cascade_store_rows_total",
            "Rows committed to the store, by table.",
            &["table"],
        );
        let store_queue = IntGauge::new(
            "cascade_store_queue_depth",
            "Store rows waiting for the writer.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(store_queue.clone()))
            .expect("unique metric");
        let store_flush = Histogram::with_opts(
            HistogramOpts::new(
                "cascade_store_flush_seconds",
                "Time to commit one batch of store rows.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(store_flush.clone()))
            .expect("unique metric");
        let shadow_requests_total = counter(
            "cascade_shadow_requests_total",
            "Shadow calls, by outcome (ok or the error class).",
            &["chain", "model", "outcome"],
        );
        let shadow_skipped_total = counter(
            "cascade_shadow_skipped_total",
            "Shadow calls not started: cost_cap, inflight, breaker_open.",
            &["chain", "reason"],
        );
        let shadow_similarity = histogram(
            "cascade_shadow_similarity",
            "Word-set similarity of each shadow answer to the served one (0..1).",
            &["chain", "model"],
            &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
        );
        let shadow_cost_usd_total = CounterVec::new(
            Opts::new(
                "cascade_shadow_cost_usd_total",
                "Cost of shadow calls in US dollars.",
            ),
            &["chain", "model"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(shadow_cost_usd_total.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            worker_connections,
            config_reloads,
            config_info,
            state_errors,
            shadow_requests_total,
            shadow_skipped_total,
            shadow_similarity,
            shadow_cost_usd_total,
            request_cost_usd_total,
            primary_cost_usd_total,
            store: crate::store::StoreMetrics {
                rows: store_rows,
                dropped: store_dropped,
                queue_depth: store_queue,
                flush_seconds: store_flush,
            },
            log_dropped,
            log_dropped_sync: std::sync::Mutex::new(()),
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
            bound: ArcSwap::from_pointee(Bound::default()),
        }
    }

    /// `cascade_config_info{hash}`: one series, the config in use.
    pub fn config_info(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1);
    }

    /// Metrics with handles bound for every chain and model of `config`.
    pub fn for_config(config: &Config) -> Metrics {
        let m = Metrics::new();
        m.rebind(config);
        m
    }

    /// Binds handles for the chains and models of `config` (at start and on reload).
    /// A request still running on the config before holds chains these handles do
    /// not match: its metrics go through the label lookup instead.
    pub fn rebind(&self, config: &Config) {
        let chains = config.chains.values().chain(config.model_chains.values());
        let mut bound = Bound {
            chains: Vec::new(),
            models: config
                .models
                .values()
                .map(|model| self.bind_model(model))
                .collect(),
        };
        for chain in chains {
            if bound.chains.len() <= chain.index {
                bound.chains.resize_with(chain.index + 1, || None);
            }
            bound.chains[chain.index] = Some(self.bind_chain(chain));
        }
        self.bound.store(Arc::new(bound));
    }

    fn bind_chain(&self, chain: &Chain) -> ChainHandles {
        let name = &*chain.name;
        ChainHandles {
            uid: chain.uid,
            duration: self.request_duration.with_label_values(&[name]),
            answered_ok: self.requests_total.with_label_values(&[name, "200"]),
            cache: CACHE_RESULTS.map(|r| self.cache_requests.with_label_values(&[name, r])),
            attempts_ok: chain
                .targets
                .iter()
                .map(|t| {
                    let m = &t.model;
                    self.attempts_total
                        .with_label_values(&[name, &m.name, &m.provider.name, "ok"])
                })
                .collect(),
            request_cost: self.request_cost_usd_total.with_label_values(&[name]),
            primary_cost: self.primary_cost_usd_total.with_label_values(&[name]),
        }
    }

    fn bind_model(&self, model: &Model) -> ModelHandles {
        let name = &*model.name;
        ModelHandles {
            uid: model.uid,
            upstream: self
                .upstream_duration
                .with_label_values(&[name, &model.provider.name]),
            ttft: self.ttft.with_label_values(&[name]),
            prompt_tokens: self.tokens_total.with_label_values(&[name, "prompt"]),
            completion_tokens: self.tokens_total.with_label_values(&[name, "completion"]),
            cached_tokens: self.tokens_total.with_label_values(&[name, "cached"]),
            cost: self.cost_usd_total.with_label_values(&[name]),
        }
    }

    /// The bound handles for `chain`, if it belongs to the config these metrics were
    /// made for.
    fn chain<'a>(bound: &'a Bound, chain: &Chain) -> Option<&'a ChainHandles> {
        Self::chain_at(bound, chain.uid, chain.index)
    }

    fn chain_at(bound: &Bound, uid: u64, index: usize) -> Option<&ChainHandles> {
        bound.chains.get(index)?.as_ref().filter(|h| h.uid == uid)
    }

    fn model<'a>(bound: &'a Bound, model: &Model) -> Option<&'a ModelHandles> {
        bound.models.get(model.index).filter(|h| h.uid == model.uid)
    }

    /// One answered chat request: its duration and status.
    pub fn observe_request(&self, chain: &Chain, status: http::StatusCode, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        match Self::chain(&self.bound.load(), chain) {
            Some(h) if status == http::StatusCode::OK => {
                h.duration.observe(secs);
                h.answered_ok.inc();
            }
            _ => {
                self.request_duration
                    .with_label_values(&[&chain.name])
                    .observe(secs);
                self.requests_total
                    .with_label_values(&[&chain.name, status.as_str()])
                    .inc();
            }
        }
    }

    /// One cache lookup result (one of [`CACHE_RESULTS`]) for `chain`.
    pub fn count_cache(&self, chain: &Chain, result: &'static str) {
        let slot = CACHE_RESULTS.iter().position(|r| *r == result);
        match (Self::chain(&self.bound.load(), chain), slot) {
            (Some(h), Some(i)) => h.cache[i].inc(),
            _ => self
                .cache_requests
                .with_label_values(&[&chain.name, result])
                .inc(),
        }
    }

    /// One upstream call by the target at `position` of chain `chain` (its name and
    /// `Chain::index`), ended with `outcome` (`ok`, `cancelled` or an error class).
    pub fn count_attempt(
        &self,
        (chain, index, uid): (&Name, usize, u64),
        position: usize,
        model: &Model,
        outcome: &str,
    ) {
        let handles = self.bound.load();
        let bound = Self::chain_at(&handles, uid, index).and_then(|h| h.attempts_ok.get(position));
        match bound {
            Some(c) if outcome == "ok" => c.inc(),
            _ => self
                .attempts_total
                .with_label_values(&[chain, &model.name, &model.provider.name, outcome])
                .inc(),
        }
    }

    /// The time of one upstream call, and its time to first token for a stream.
    pub fn observe_upstream(&self, model: &Model, latency: Duration, ttft: Option<Duration>) {
        match Self::model(&self.bound.load(), model) {
            Some(h) => {
                h.upstream.observe(latency.as_secs_f64());
                if let Some(t) = ttft {
                    h.ttft.observe(t.as_secs_f64());
                }
            }
            None => {
                self.upstream_duration
                    .with_label_values(&[&model.name, &model.provider.name])
                    .observe(latency.as_secs_f64());
                if let Some(t) = ttft {
                    self.ttft
                        .with_label_values(&[&model.name])
                        .observe(t.as_secs_f64());
                }
            }
        }
    }

    /// Tokens and cost of one answer of `model`.
    pub fn record_usage(&self, model: &Model, u: &Usage) {
        let cost = model.cost_usd(u);
        match Self::model(&self.bound.load(), model) {
            Some(h) => {
                h.prompt_tokens.inc_by(u.prompt_tokens);
                h.completion_tokens.inc_by(u.completion_tokens);
                if u.cached_tokens > 0 {
                    h.cached_tokens.inc_by(u.cached_tokens);
                }
                h.cost.inc_by(cost);
            }
            None => {
                let name = &*model.name;
                let tokens = &self.tokens_total;
                tokens
                    .with_label_values(&[name, "prompt"])
                    .inc_by(u.prompt_tokens);
                tokens
                    .with_label_values(&[name, "completion"])
                    .inc_by(u.completion_tokens);
                if u.cached_tokens > 0 {
                    tokens
                        .with_label_values(&[name, "cached"])
                        .inc_by(u.cached_tokens);
                }
                self.cost_usd_total.with_label_values(&[name]).inc_by(cost);
            }
        }
    }

    /// What one answered request cost, and what its chain's first model would have.
    pub fn record_request_cost(&self, chain: &Chain, cost: f64, primary: f64) {
        match Self::chain(&self.bound.load(), chain) {
            Some(h) => {
                h.request_cost.inc_by(cost.max(0.0));
                h.primary_cost.inc_by(primary.max(0.0));
            }
            None => {
                self.request_cost_usd_total
                    .with_label_values(&[&chain.name])
                    .inc_by(cost.max(0.0));
                self.primary_cost_usd_total
                    .with_label_values(&[&chain.name])
                    .inc_by(primary.max(0.0));
            }
        }
    }

    /// Brings `cascade_log_dropped_total` up to `dropped` (the log writer's own count).
    pub fn sync_log_dropped(&self, dropped: u64) {
        let _one_at_a_time = self.log_dropped_sync.lock();
        let seen = self.log_dropped.get();
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
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
