//! Serde DTOs mirroring the YAML file exactly. Nothing here is used at request time:
//! `super::validate` turns these into the runtime types.

use std::fmt;
use std::time::Duration;

use indexmap::IndexMap;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::units;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub providers: IndexMap<String, RawProvider>,
    pub models: IndexMap<String, RawModel>,
    #[serde(default)]
    pub chains: IndexMap<String, RawChain>,
    /// Demo/bench only: start the built-in mock provider inside the gateway process.
    #[serde(default)]
    pub mock: Option<RawMock>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub retry_budget: RawBudget,
    #[serde(default)]
    pub hedge_budget: RawBudget,
    #[serde(default)]
    pub breaker: RawBreaker,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub log: RawLog,
    /// The scheduled fallback-cost report; off unless present.
    #[serde(default)]
    pub report: Option<RawReport>,
    /// Seed for shadow sampling: the same requests are sampled the same way every run.
    #[serde(default)]
    pub shadow_seed: Option<u64>,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
    #[serde(default)]
    pub responses: RawResponses,
    /// Breakers and health shared across replicas.
    #[serde(default)]
    pub state: RawState,
    /// Where the admin endpoints, the status page and `/metrics` are served, and their token.
    #[serde(default)]
    pub admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<crate::secret::Secret>,
    pub metrics_on_main: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub redis_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponses {
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
    /// Most memory the kept responses take (oldest evicted first).
    #[serde(default, deserialize_with = "opt_size")]
    pub max_memory: Option<u64>,
}

/// The embedded store of calls and requests.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub enabled: Option<bool>,
    pub path: Option<String>,
    /// A PostgreSQL URL; it carries a password, so it never prints.
    pub url: Option<crate::secret::Secret>,
    /// PEM certificates to trust for the PostgreSQL server, with `sslmode=require`.
    pub ca_file: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub retention: Option<Duration>,
    pub queue: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub flush_interval: Option<Duration>,
}

/// The gateway's log output.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub requests: Option<bool>,
}

/// The scheduled report: every period, a Markdown and a JSON file, and a webhook.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    #[serde(default, deserialize_with = "opt_duration")]
    pub every: Option<Duration>,
    pub by: Option<String>,
    pub dir: Option<String>,
    pub webhook: Option<String>,
}

/// The response cache.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub mode: Option<String>,
    #[serde(default, deserialize_with = "opt_size")]
    pub max_bytes: Option<u64>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub stale_ttl: Option<Duration>,
    pub redis_url: Option<String>,
}

/// A chain's own cache settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChainCache {
    pub mode: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
    pub stale: Option<bool>,
}

/// Retry settings; each level (global, model, chain) may set any subset.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_retries: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub base: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub cap: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_retry_wait: Option<Duration>,
    /// Seed for the backoff jitter (global only): makes waits reproducible.
    pub seed: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub ratio: Option<f64>,
    pub min_per_second: Option<f64>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub window: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<f64>,
    pub min_calls: Option<u64>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub window: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub cooldown: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_cooldown: Option<Duration>,
    pub half_open_probes: Option<u32>,
    pub close_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    #[serde(default, deserialize_with = "opt_duration")]
    pub window: Option<Duration>,
    pub degraded_below: Option<f64>,
    pub min_calls: Option<u64>,
}

/// Fault injection for game days; off unless present.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChaos {
    pub rate: f64,
    pub class: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub latency: Option<Duration>,
    pub cut_stream: Option<f64>,
}

/// What to do with a failure class: `retry | next | fail | { jump_to: MODEL }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawAction {
    Word(String),
    Jump { jump_to: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub attempt_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub first_token_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_size")]
    pub max_body: Option<u64>,
    pub worker_threads: Option<usize>,
    pub scheduler: Option<Scheduler>,
    /// The provider other `/v1/*` paths are forwarded to unchanged.
    pub passthrough: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub drain_delay: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
}

/// How requests are spread over the worker threads (see `crate::workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// One single-threaded runtime and upstream pool per worker thread.
    #[default]
    PerCore,
    /// tokio's multi-threaded, work-stealing runtime with one shared upstream pool.
    WorkStealing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    OpenaiCompatible,
    AzureOpenai,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::OpenaiCompatible => "openai_compatible",
            ProviderKind::AzureOpenai => "azure_openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key: Option<crate::secret::Secret>,
    /// Extra headers sent with every upstream call (e.g. OpenRouter's `HTTP-Referer`).
    #[serde(default)]
    pub extra_headers: IndexMap<String, String>,
    /// Request fields removed before forwarding (servers that reject them, e.g. Groq's `logprobs`).
    #[serde(default)]
    pub drop_params: Vec<String>,
    /// Fields merged into every forwarded request body.
    #[serde(default)]
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// `azure_openai`: the `api-version` query parameter. `anthropic`: the `anthropic-version` header.
    pub api_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub provider: String,
    pub model_id: String,
    pub max_tokens: Option<u32>,
    pub context_window: Option<u64>,
    #[serde(default)]
    pub cost_per_1k_input: f64,
    #[serde(default)]
    pub cost_per_1k_output: f64,
    /// Price of cached prompt tokens; the input price when absent.
    pub cost_per_1k_cached_input: Option<f64>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub attempt_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub first_token_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Models tried after this one when a request names this model directly.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    pub retry: Option<RawRetry>,
    pub breaker: Option<RawBreaker>,
    pub chaos: Option<RawChaos>,
    /// `chat` (the default) or `embedding`.
    pub kind: Option<String>,
    /// An embedding model's vector size (required for `kind: embedding`).
    pub dimensions: Option<u32>,
    /// Names the vector space; models in one embedding chain must agree on it.
    pub embedding_space: Option<String>,
    /// What requests the model can serve (absent: everything).
    pub capabilities: Option<Vec<String>>,
}

/// Which YAML form a chain was written in; error paths follow the form the user wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainForm {
    /// `name: [a, b]`
    Short,
    /// `name: { models: [a, b] }`
    Long,
}

#[derive(Debug)]
pub struct RawChain {
    pub form: ChainForm,
    pub spec: RawChainSpec,
}

/// A chain in its long form; the short form fills only `models`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChainSpec {
    pub models: Vec<String>,
    pub strategy: Option<String>,
    pub race_k: Option<usize>,
    /// A duration, or "p95" (from the health window).
    pub hedge_delay: Option<String>,
    pub max_attempts: Option<u32>,
    pub when_all_open: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub attempt_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub first_token_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub on: IndexMap<String, RawAction>,
    pub retry: Option<RawRetry>,
    pub cache: Option<RawChainCache>,
    pub shadow: Option<RawShadow>,
}

/// Shadow traffic for a chain: a sampled share of requests also runs on backups.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    pub models: Option<Vec<String>>,
    pub sample: Option<f64>,
    pub max_cost_per_hour: Option<f64>,
    pub max_inflight: Option<usize>,
}

impl<'de> Deserialize<'de> for RawChain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ChainVisitor;
        impl<'de> Visitor<'de> for ChainVisitor {
            type Value = RawChain;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of model names, or a map with `models:`")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawChain, A::Error> {
                let models =
                    Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(RawChain {
                    form: ChainForm::Short,
                    spec: RawChainSpec {
                        models,
                        ..Default::default()
                    },
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawChain, A::Error> {
                let spec = RawChainSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawChain {
                    form: ChainForm::Long,
                    spec,
                })
            }
        }
        d.deserialize_any(ChainVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMock {
    pub listen: String,
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| units::parse_duration(&s).map_err(de::Error::custom))
        .transpose()
}

fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeRepr {
        Int(u64),
        Str(String),
    }
    match Option::<SizeRepr>::deserialize(d)? {
        None => Ok(None),
        Some(SizeRepr::Int(n)) => Ok(Some(n)),
        Some(SizeRepr::Str(s)) => units::parse_size(&s).map(Some).map_err(de::Error::custom),
    }
}
