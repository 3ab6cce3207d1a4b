//! Configuration: YAML -> raw serde DTOs (`raw`) -> validated, immutable runtime types (this file).
//!
//! The runtime config is built once at startup; the request path only reads `Arc`s from it.

mod env;
pub mod fingerprint;
pub mod lint;
pub mod litellm;
pub mod raw;
pub mod units;
pub mod yaml;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use indexmap::IndexMap;

use raw::{ChainForm, RawAction, RawBreaker, RawBudget, RawConfig, RawRetry};
pub use raw::{ProviderKind, Scheduler};

use crate::classify::{Action, ErrorClass};
pub use crate::name::Name;

/// A number no other chain or model built by this process has.
fn next_uid() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
use crate::resilience::breaker::{Breaker, BreakerSettings};
use crate::resilience::budget::BudgetSettings;
use crate::resilience::health::{Health, HealthSettings};
use crate::resilience::registry::{Generation, TargetKey, TargetRegistry, TargetState};
pub use crate::resilience::retry::RetrySettings;
use crate::secret::Secret;
pub use fingerprint::Fingerprints;

/// A configuration problem, located by its dotted YAML path (`chains.default[1]`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {message}")]
    Load { file: String, message: String },
    #[error("config error at {path}: {message}")]
    At { path: String, message: String },
}

impl ConfigError {
    pub(crate) fn at(path: &str, message: impl Into<String>) -> Self {
        ConfigError::At {
            path: if path.is_empty() {
                ".".into()
            } else {
                path.into()
            },
            message: message.into(),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The validated configuration used at run time.
#[derive(Debug)]
pub struct Config {
    pub server: ServerSettings,
    pub providers: IndexMap<String, Arc<Provider>>,
    pub models: IndexMap<String, Arc<Model>>,
    /// Chains as configured under `chains:`.
    pub chains: IndexMap<String, Arc<Chain>>,
    /// One implicit chain per pool model: the model followed by its `fallbacks`.
    pub model_chains: HashMap<String, Arc<Chain>>,
    pub mock: Option<MockSettings>,
    pub retry_budget: BudgetSettings,
    pub hedge_budget: BudgetSettings,
    /// Seed for the backoff jitter; `None` seeds from the clock.
    pub jitter_seed: Option<u64>,
    pub cache: CacheSettings,
    pub health: HealthSettings,
    /// Seed for shadow sampling; `None` seeds from the clock.
    pub shadow_seed: Option<u64>,
    /// `None` with `store.enabled: false`.
    pub store: Option<crate::store::StoreSettings>,
    pub log: LogSettings,
    pub report: Option<ReportSchedule>,
    pub responses: ResponsesSettings,
    /// `server.passthrough`: where other `/v1/*` paths go.
    pub passthrough: Option<Arc<Provider>>,
    /// `state.redis_url`: breakers and health shared across replicas.
    pub state_redis_url: Option<String>,
    /// `admin`: where `/admin/*`, `/ui` and `/metrics` are served, and who may call them.
    pub admin: AdminSettings,
    /// The first 12 hex digits of the file's SHA-256 (`cascade_config_info{hash}`).
    pub hash: String,
    /// What a reload compares.
    pub fingerprints: Fingerprints,
}

/// The first 12 hex digits of the SHA-256 of a config file's text.
pub fn text_hash(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// How long and how many Responses objects are kept (`responses:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsesSettings {
    pub ttl: Duration,
    pub max_memory: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// One `info` line per request.
    pub requests: bool,
}

/// The scheduled report (`report:`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSchedule {
    pub every: Duration,
    pub by: crate::store::report::GroupBy,
    pub dir: std::path::PathBuf,
    pub webhook: Option<http::Uri>,
}

/// Which requests the response cache serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Only requests whose answer should not vary: temperature 0, or a `seed`.
    Deterministic,
    All,
    Off,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub mode: CacheMode,
    pub max_bytes: u64,
    pub ttl: Duration,
    /// How long an expired entry is kept to answer when the whole chain fails.
    pub stale_ttl: Duration,
    pub redis_url: Option<String>,
}

/// A chain's cache settings, over the global ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainCache {
    pub mode: Option<CacheMode>,
    pub ttl: Option<Duration>,
    /// Serve stale entries when the chain fails (default true).
    pub stale: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    pub attempt_timeout: Duration,
    pub first_token_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_body: usize,
    /// Worker threads; the number of cores unless set.
    pub worker_threads: usize,
    pub scheduler: Scheduler,
    /// After SIGTERM, how long the listener still accepts (while `/readyz` says 503).
    pub drain_delay: Duration,
    /// After the listener closes, how long requests and streams in flight may take.
    pub drain_timeout: Duration,
}

/// Game-day fault injection on a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chaos {
    /// Share of calls that get the fault.
    pub rate: f64,
    pub class: ErrorClass,
    pub latency: Duration,
    /// Share of committed streams cut after their first chunk.
    pub cut_stream: f64,
}

#[derive(Debug)]
pub struct Provider {
    pub name: Name,
    /// `name` as a response header value, built once (`None` if it cannot be one).
    pub name_header: Option<HeaderValue>,
    pub kind: ProviderKind,
    pub base_url: url::Url,
    /// `base_url`'s host (and port, unless the scheme's default) for the `Host` header.
    pub host: Option<HeaderValue>,
    /// The full URL of the chat endpoint, resolved once.
    pub chat_url: String,
    pub api_key: Option<Secret>,
    /// The credential header for this provider's kind, built once (marked sensitive).
    pub auth: Option<(HeaderName, HeaderValue)>,
    pub extra_headers: HeaderMap,
    pub drop_params: Vec<String>,
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// `azure_openai`: `api-version`; `anthropic`: `anthropic-version`.
    pub api_version: String,
}

impl Provider {
    /// Whether forwarded OpenAI bodies must be rewritten beyond `model`.
    pub fn rewrites_body(&self) -> bool {
        !self.drop_params.is_empty() || self.extra_body.is_some()
    }
}

/// One entry of the model pool: a callable target.
#[derive(Debug)]
pub struct Model {
    pub name: Name,
    /// This object's own number: a reload builds new models with new numbers (metric
    /// handles bound for one config are matched by it).
    pub uid: u64,
    /// Position in `Config::models` (metric handles are bound by it).
    pub index: usize,
    /// `name` as a response header value, built once (`None` if it cannot be one).
    pub name_header: Option<HeaderValue>,
    pub provider: Arc<Provider>,
    pub model_id: String,
    /// `model_id` already encoded as a JSON string, for splicing into forwarded bodies.
    pub model_id_json: Box<str>,
    pub max_tokens: Option<u32>,
    pub context_window: Option<u64>,
    pub cost_per_1k_input: f64,
    pub cost_per_1k_output: f64,
    pub cost_per_1k_cached_input: f64,
    pub fallbacks: Vec<String>,
    /// The upstream URLs for this model, built and parsed once.
    pub url: http::Uri,
    pub stream_url: http::Uri,
    pub chaos: Option<Chaos>,
    pub kind: ModelKind,
    /// An embedding model's vector size.
    pub dimensions: Option<u32>,
    pub embedding_space: Option<String>,
    /// The upstream embeddings URL (embedding models only).
    pub embed_url: Option<http::Uri>,
    pub capabilities: Capabilities,
    /// Runtime state shared by every chain that uses this model.
    pub breaker: Arc<Breaker>,
    pub health: Arc<Health>,
    // The model's own settings, merged into each chain target's policy.
    attempt_timeout: Option<Duration>,
    first_token_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    retry: Option<RawRetry>,
}

impl Model {
    /// What identifies this target across reloads.
    pub fn target_key(&self) -> TargetKey {
        TargetKey {
            name: self.name.to_string(),
            provider: self.provider.name.to_string(),
            base_url: self.provider.base_url.to_string(),
            model_id: self.model_id.clone(),
        }
    }

    pub fn state(&self) -> TargetState {
        TargetState {
            breaker: self.breaker.clone(),
            health: self.health.clone(),
        }
    }

    /// The price of an answer: cached prompt tokens at the cached price (the input
    /// price unless set), the rest of the prompt at the input price, output at the output price.
    pub fn cost_usd(&self, u: &crate::api::Usage) -> f64 {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        ((u.prompt_tokens - cached) as f64 * self.cost_per_1k_input
            + cached as f64 * self.cost_per_1k_cached_input
            + u.completion_tokens as f64 * self.cost_per_1k_output)
            / 1000.0
    }
}

/// What a pool model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Chat,
    Embedding,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
        }
    }
}

pub use crate::api::Capabilities;

/// An ordered fallback chain.
#[derive(Debug)]
pub struct Chain {
    pub name: Name,
    /// This object's own number: a reload builds new chains with new numbers.
    pub uid: u64,
    /// Position in `Config::chains`, then `Config::model_chains` (metric handles are
    /// bound by it).
    pub index: usize,
    /// `name` as a response header value, built once (`None` if it cannot be one).
    pub name_header: Option<HeaderValue>,
    pub targets: Vec<Target>,
    pub strategy: Strategy,
    pub max_attempts: u32,
    pub when_all_open: WhenAllOpen,
    pub request_timeout: Duration,
    pub cache: ChainCache,
    /// Shadow traffic: a sampled share of requests also runs on these targets.
    pub shadow: Option<ShadowPlan>,
}

/// A chain's shadow settings (`chains.NAME.shadow`).
#[derive(Debug, Clone)]
pub struct ShadowPlan {
    /// The shadow targets, in config order (each with the chain's settings for it).
    pub targets: Vec<Target>,
    /// Share of requests sampled, 0..=1.
    pub sample: f64,
    /// USD per hour; sampling pauses for the rest of the hour when reached.
    pub max_cost_per_hour: Option<f64>,
    /// Shadow calls in flight for this chain at most.
    pub max_inflight: usize,
}

/// A model at one position of one chain, with the settings that apply there.
#[derive(Debug, Clone)]
pub struct Target {
    pub model: Arc<Model>,
    pub policy: Arc<TargetPolicy>,
}

/// Timeouts, retries and per-class actions for one chain target
/// (a chain's setting beats the model's, which beats the global one).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetPolicy {
    pub attempt_timeout: Duration,
    pub first_token_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub retry: RetrySettings,
    pub actions: [Action; ErrorClass::ALL.len()],
}

impl TargetPolicy {
    pub fn action(&self, class: ErrorClass) -> Action {
        self.actions[class.index()]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    Sequential,
    /// Start the first `k` targets at once; the first valid answer wins.
    Race {
        k: usize,
    },
    /// Start the next target when no first token has come by the delay.
    Hedge {
        delay: HedgeDelay,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    Fixed(Duration),
    /// The target's p95 time to answer from its health window.
    P95,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenAllOpen {
    TrySoonest,
    Fail,
}

#[derive(Debug, Clone)]
pub struct MockSettings {
    pub listen: SocketAddr,
}

impl Config {
    /// Loads and validates a YAML file, reading `${VAR}`s from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_in(path, &mut TargetRegistry::default().generation())
    }

    /// [`Config::load`], taking each target's live state from `targets`: the state of
    /// the running config for a reload.
    pub fn load_in(path: &Path, targets: &mut Generation<'_>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_yaml_in(&text, &|name| std::env::var(name).ok(), targets).map_err(|e| match e {
            ConfigError::Load { message, .. } => ConfigError::Load {
                file: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses YAML text; `env` resolves `${VAR}` references.
    pub fn from_yaml_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Self::from_yaml_in(text, env, &mut TargetRegistry::default().generation())
    }

    /// [`Config::from_yaml_with_env`], taking each target's live state from `targets`.
    pub fn from_yaml_in(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        targets: &mut Generation<'_>,
    ) -> Result<Config, ConfigError> {
        let mut tree: serde_json::Value = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load {
                file: "<inline>".into(),
                message: e.to_string(),
            })?;
        env::interpolate(&mut tree, env)?;
        // A section with every entry commented out is YAML null: read it as empty.
        if let Some(map) = tree.as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        let prints = Fingerprints::of(&tree);
        let raw: RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
            let mut path = e.path().to_string();
            let message = e.into_inner().to_string();
            // Point at the unknown key itself, not at the map that holds it.
            if let Some(key) = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
            {
                if path == "." {
                    path = key.to_string();
                } else if !path.ends_with(key) {
                    path = format!("{path}.{key}");
                }
            }
            ConfigError::at(&path, message)
        })?;
        let mut config = validate(raw, targets)?;
        config.hash = text_hash(text);
        config.fingerprints = prints;
        Ok(config)
    }

    /// The chain names and pool model names a request may use, for error messages and `/v1/models`.
    pub fn routable_names(&self) -> impl Iterator<Item = &str> {
        self.chains
            .keys()
            .map(String::as_str)
            .chain(self.models.keys().map(String::as_str))
    }
}

fn validate(raw: RawConfig, targets: &mut Generation<'_>) -> Result<Config, ConfigError> {
    let server = validate_server(&raw.server)?;
    let global_breaker = breaker_settings("breaker", &raw.breaker, BreakerSettings::default())?;
    let health = health_settings(&raw.health)?;
    check_retry("retry", &raw.retry)?;

    let mut providers = IndexMap::new();
    for (name, p) in &raw.providers {
        let path = format!("providers.{name}");
        providers.insert(name.clone(), Arc::new(validate_provider(&path, name, p)?));
    }
    let passthrough = match &raw.server.passthrough {
        None => None,
        Some(name) => Some(providers.get(name).cloned().ok_or_else(|| {
            ConfigError::at(
                "server.passthrough",
                format!(
                    "unknown provider {name:?} (providers: {})",
                    join_keys(providers.keys())
                ),
            )
        })?),
    };

    if raw.models.is_empty() {
        return Err(ConfigError::at("models", "the model pool is empty"));
    }
    let mut models: IndexMap<String, Arc<Model>> = IndexMap::new();
    for (name, m) in &raw.models {
        let path = format!("models.{name}");
        let provider = providers.get(&m.provider).ok_or_else(|| {
            ConfigError::at(
                &format!("{path}.provider"),
                format!(
                    "unknown provider {:?} (known providers: {})",
                    m.provider,
                    join_keys(providers.keys())
                ),
            )
        })?;
        if m.model_id.trim().is_empty() {
            return Err(ConfigError::at(
                &format!("{path}.model_id"),
                "must not be empty",
            ));
        }
        for (field, v) in [
            ("cost_per_1k_input", m.cost_per_1k_input),
            ("cost_per_1k_output", m.cost_per_1k_output),
            (
                "cost_per_1k_cached_input",
                m.cost_per_1k_cached_input.unwrap_or(0.0),
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::at(
                    &format!("{path}.{field}"),
                    "must be a non-negative number",
                ));
            }
        }
        if let Some(r) = &m.retry {
            check_retry(&format!("{path}.retry"), r)?;
        }
        positive(
            &path,
            &[
                ("attempt_timeout", m.attempt_timeout),
                ("first_token_timeout", m.first_token_timeout),
                ("idle_timeout", m.idle_timeout),
            ],
        )?;
        let breaker = match &m.breaker {
            Some(b) => breaker_settings(&format!("{path}.breaker"), b, global_breaker)?,
            None => global_breaker,
        };
        let chaos = m
            .chaos
            .as_ref()
            .map(|c| chaos(&format!("{path}.chaos"), c))
            .transpose()?;
        let (url, stream_url) = model_urls(provider, &m.model_id).map_err(|e| {
            ConfigError::at(
                &format!("{path}.model_id"),
                format!("cannot build the upstream URL: {e}"),
            )
        })?;
        let kind = match m.kind.as_deref() {
            None | Some("chat") => ModelKind::Chat,
            Some("embedding") => ModelKind::Embedding,
            Some(other) => {
                return Err(ConfigError::at(
                    &format!("{path}.kind"),
                    format!("unknown model kind {other:?} (expected chat or embedding)"),
                ))
            }
        };
        let embed_url = match kind {
            ModelKind::Chat => None,
            ModelKind::Embedding => {
                if m.dimensions.is_none_or(|d| d == 0) {
                    return Err(ConfigError::at(
                        &format!("{path}.dimensions"),
                        "an embedding model must declare its vector size (a positive number)",
                    ));
                }
                Some(
                    embed_url(provider, &m.model_id)
                        .map_err(|e| ConfigError::at(&format!("{path}.provider"), e))?,
                )
            }
        };
        let capabilities = match &m.capabilities {
            None => Capabilities::ALL,
            Some(list) => {
                let mut caps = Capabilities::NONE;
                for (i, c) in list.iter().enumerate() {
                    caps = caps.with(Capabilities::from_name(c).ok_or_else(|| {
                        ConfigError::at(
                            &format!("{path}.capabilities[{i}]"),
                            format!("unknown capability {c:?} (known: tools, vision, json_schema, reasoning)"),
                        )
                    })?);
                }
                caps
            }
        };
        let model_id_json = serde_json::to_string(&m.model_id)
            .map_err(|e| ConfigError::at(&format!("{path}.model_id"), e.to_string()))?
            .into_boxed_str();
        let state = targets.target(
            TargetKey {
                name: name.clone(),
                provider: provider.name.to_string(),
                base_url: provider.base_url.to_string(),
                model_id: m.model_id.clone(),
            },
            breaker,
            health,
        );
        models.insert(
            name.clone(),
            Arc::new(Model {
                uid: next_uid(),
                name: Name::new(name),
                index: models.len(),
                name_header: HeaderValue::from_str(name).ok(),
                provider: provider.clone(),
                model_id: m.model_id.clone(),
                model_id_json,
                max_tokens: m.max_tokens,
                context_window: m.context_window,
                cost_per_1k_input: m.cost_per_1k_input,
                cost_per_1k_output: m.cost_per_1k_output,
                cost_per_1k_cached_input: m.cost_per_1k_cached_input.unwrap_or(m.cost_per_1k_input),
                fallbacks: m.fallbacks.clone(),
                url,
                stream_url,
                chaos,
                kind,
                dimensions: m.dimensions,
                embedding_space: m.embedding_space.clone(),
                embed_url,
                capabilities,
                breaker: state.breaker,
                health: state.health,
                attempt_timeout: m.attempt_timeout,
                first_token_timeout: m.first_token_timeout,
                idle_timeout: m.idle_timeout,
                retry: m.retry.clone(),
            }),
        );
    }

    let lookup = |path: &str, name: &str| -> Result<Arc<Model>, ConfigError> {
        models.get(name).cloned().ok_or_else(|| {
            ConfigError::at(
                path,
                format!(
                    "unknown model {name:?} (models in the pool: {})",
                    join_keys(models.keys())
                ),
            )
        })
    };

    let mut chains = IndexMap::new();
    for (name, c) in &raw.chains {
        let path = format!("chains.{name}");
        let list_path = match c.form {
            ChainForm::Short => path.clone(),
            ChainForm::Long => format!("{path}.models"),
        };
        let spec = &c.spec;
        if spec.models.is_empty() {
            return Err(ConfigError::at(
                &list_path,
                "chain is empty: list at least one model",
            ));
        }
        let members = spec
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| lookup(&format!("{list_path}[{i}]"), m))
            .collect::<Result<Vec<_>, _>>()?;
        same_space(&list_path, &members)?;
        if let Some(r) = &spec.retry {
            check_retry(&format!("{path}.retry"), r)?;
        }
        positive(
            &path,
            &[
                ("request_timeout", spec.request_timeout),
                ("attempt_timeout", spec.attempt_timeout),
                ("first_token_timeout", spec.first_token_timeout),
                ("idle_timeout", spec.idle_timeout),
            ],
        )?;
        let mut actions: [Action; ErrorClass::ALL.len()] =
            ErrorClass::ALL.map(ErrorClass::default_action);
        for (class_name, action) in &spec.on {
            let apath = format!("{path}.on.{class_name}");
            let class = ErrorClass::from_name(class_name).ok_or_else(|| {
                let names: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
                ConfigError::at(
                    &apath,
                    format!("unknown error class (known: {})", names.join(", ")),
                )
            })?;
            actions[class.index()] = match action {
                RawAction::Word(w) => match w.as_str() {
                    "retry" => Action::Retry,
                    "next" => Action::Next,
                    "fail" => Action::Fail,
                    other => {
                        return Err(ConfigError::at(
                            &apath,
                            format!("unknown action {other:?} (expected retry, next, fail or {{ jump_to: MODEL }})"),
                        ))
                    }
                },
                RawAction::Jump { jump_to } => {
                    let pos = spec.models.iter().position(|m| m == jump_to).ok_or_else(|| {
                        ConfigError::at(
                            &format!("{apath}.jump_to"),
                            format!("{jump_to:?} is not a model of this chain"),
                        )
                    })?;
                    Action::JumpTo(pos)
                }
            };
        }
        let settings = ChainLevel {
            attempt_timeout: spec.attempt_timeout,
            first_token_timeout: spec.first_token_timeout,
            idle_timeout: spec.idle_timeout,
            retry: spec.retry.clone(),
            actions,
        };
        let strategy = strategy(&path, spec)?;
        let when_all_open = match spec.when_all_open.as_deref() {
            None | Some("try_soonest") => WhenAllOpen::TrySoonest,
            Some("fail") => WhenAllOpen::Fail,
            Some(other) => {
                return Err(ConfigError::at(
                    &format!("{path}.when_all_open"),
                    format!("unknown value {other:?} (expected try_soonest or fail)"),
                ))
            }
        };
        let max_attempts = spec.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 {
            return Err(ConfigError::at(
                &format!("{path}.max_attempts"),
                "must be at least 1",
            ));
        }
        let shadow = spec
            .shadow
            .as_ref()
            .map(|sh| {
                shadow_plan(&format!("{path}.shadow"), sh, &members, &lookup, &|m| {
                    target(m, &server, &raw.retry, &settings)
                })
            })
            .transpose()?;
        chains.insert(
            name.clone(),
            Arc::new(Chain {
                shadow,
                uid: next_uid(),
                name: Name::new(name),
                index: chains.len(),
                name_header: HeaderValue::from_str(name).ok(),
                targets: members
                    .into_iter()
                    .map(|m| target(m, &server, &raw.retry, &settings))
                    .collect(),
                strategy,
                max_attempts,
                when_all_open,
                request_timeout: spec.request_timeout.unwrap_or(server.request_timeout),
                cache: chain_cache(&path, spec.cache.as_ref())?,
            }),
        );
    }

    let default_level = ChainLevel {
        attempt_timeout: None,
        first_token_timeout: None,
        idle_timeout: None,
        retry: None,
        actions: ErrorClass::ALL.map(ErrorClass::default_action),
    };
    let mut model_chains = HashMap::new();
    for (name, m) in &models {
        let mut members = vec![m.clone()];
        for (i, f) in m.fallbacks.iter().enumerate() {
            members.push(lookup(&format!("models.{name}.fallbacks[{i}]"), f)?);
        }
        same_space(&format!("models.{name}.fallbacks"), &members)?;
        model_chains.insert(
            name.clone(),
            Arc::new(Chain {
                uid: next_uid(),
                name: Name::new(name),
                index: chains.len() + model_chains.len(),
                name_header: HeaderValue::from_str(name).ok(),
                targets: members
                    .into_iter()
                    .map(|m| target(m, &server, &raw.retry, &default_level))
                    .collect(),
                strategy: Strategy::Sequential,
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                when_all_open: WhenAllOpen::TrySoonest,
                request_timeout: server.request_timeout,
                cache: ChainCache::default(),
                shadow: None,
            }),
        );
    }

    let mock = raw
        .mock
        .as_ref()
        .map(|m| {
            m.listen
                .parse()
                .map(|listen| MockSettings { listen })
                .map_err(|e| {
                    ConfigError::at(
                        "mock.listen",
                        format!("invalid address {:?}: {e}", m.listen),
                    )
                })
        })
        .transpose()?;

    Ok(Config {
        server,
        providers,
        models,
        chains,
        model_chains,
        mock,
        retry_budget: budget("retry_budget", &raw.retry_budget, (0.2, 10.0))?,
        hedge_budget: budget("hedge_budget", &raw.hedge_budget, (0.1, 5.0))?,
        jitter_seed: raw.retry.seed,
        health,
        shadow_seed: raw.shadow_seed,
        store: store_settings(&raw.store)?,
        log: log_settings(&raw.log)?,
        report: report_schedule(&raw)?,
        passthrough,
        responses: ResponsesSettings {
            ttl: raw
                .responses
                .ttl
                .unwrap_or(Duration::from_secs(30 * 86_400)),
            max_memory: raw.responses.max_memory.unwrap_or(256 << 20),
        },
        cache: cache_settings(&raw.cache)?,
        state_redis_url: match &raw.state.redis_url {
            None => None,
            Some(url) => {
                redis::Client::open(url.as_str()).map_err(|e| {
                    ConfigError::at("state.redis_url", format!("invalid Redis URL: {e}"))
                })?;
                Some(url.clone())
            }
        },
        admin: admin_settings(&raw.admin)?,
        hash: String::new(),
        fingerprints: Fingerprints::default(),
    })
}

/// Who may call the admin endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// `admin.listen`: a listener of their own; the main one no longer serves them.
    pub listen: Option<SocketAddr>,
    /// `admin.token`: every `/admin/*` request needs `Authorization: Bearer TOKEN`.
    pub token: Option<Secret>,
    /// `admin.metrics_on_main`: keep `/metrics` on the main listener too.
    pub metrics_on_main: bool,
}

fn admin_settings(a: &raw::RawAdmin) -> Result<AdminSettings, ConfigError> {
    let listen = match &a.listen {
        None => None,
        Some(text) => Some(text.parse().map_err(|e| {
            ConfigError::at(
                "admin.listen",
                format!("invalid address {text:?} (expected HOST:PORT): {e}"),
            )
        })?),
    };
    if let Some(t) = &a.token {
        // Short tokens are guessable; an empty one would let anyone in.
        if t.expose().trim().len() < 16 {
            return Err(ConfigError::at(
                "admin.token",
                "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            ));
        }
    }
    if a.metrics_on_main.is_some() && listen.is_none() {
        return Err(ConfigError::at(
            "admin.metrics_on_main",
            "only means something with admin.listen (without it, /metrics is on the main listener)",
        ));
    }
    Ok(AdminSettings {
        listen,
        token: a.token.clone(),
        metrics_on_main: a.metrics_on_main.unwrap_or(false),
    })
}

fn cache_mode(path: &str, mode: &str) -> Result<CacheMode, ConfigError> {
    match mode {
        "deterministic" => Ok(CacheMode::Deterministic),
        "all" => Ok(CacheMode::All),
        "off" => Ok(CacheMode::Off),
        other => Err(ConfigError::at(
            path,
            format!("unknown cache mode {other:?} (expected deterministic, all or off)"),
        )),
    }
}

fn cache_settings(c: &raw::RawCache) -> Result<CacheSettings, ConfigError> {
    let mode = c
        .mode
        .as_deref()
        .map(|m| cache_mode("cache.mode", m))
        .transpose()?
        .unwrap_or(CacheMode::Deterministic);
    if let Some(url) = c.redis_url.as_deref().filter(|u| !u.is_empty()) {
        // The URL may hold a password: the message never repeats it.
        if let Err(e) = redis::Client::open(url) {
            return Err(ConfigError::at(
                "cache.redis_url",
                format!(
                    "invalid Redis URL (expected redis://, rediss:// or unix://): {:?}",
                    e.kind()
                ),
            ));
        }
    }
    positive("cache", &[("ttl", c.ttl)])?;
    Ok(CacheSettings {
        mode,
        max_bytes: c.max_bytes.unwrap_or(256 * 1024 * 1024),
        ttl: c.ttl.unwrap_or(Duration::from_secs(600)),
        stale_ttl: c.stale_ttl.unwrap_or(Duration::from_secs(24 * 3600)),
        redis_url: c.redis_url.clone().filter(|u| !u.is_empty()),
    })
}

fn chain_cache(path: &str, c: Option<&raw::RawChainCache>) -> Result<ChainCache, ConfigError> {
    let Some(c) = c else {
        return Ok(ChainCache::default());
    };
    positive(&format!("{path}.cache"), &[("ttl", c.ttl)])?;
    Ok(ChainCache {
        mode: c
            .mode
            .as_deref()
            .map(|m| cache_mode(&format!("{path}.cache.mode"), m))
            .transpose()?,
        ttl: c.ttl,
        stale: c.stale,
    })
}

/// A chain's own settings, before they are merged with each model's.
struct ChainLevel {
    attempt_timeout: Option<Duration>,
    first_token_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    retry: Option<RawRetry>,
    actions: [Action; ErrorClass::ALL.len()],
}

/// Resolves one chain target: chain beats model beats global.
fn target(
    model: Arc<Model>,
    server: &ServerSettings,
    global_retry: &RawRetry,
    chain: &ChainLevel,
) -> Target {
    let layers = [
        chain.retry.as_ref(),
        model.retry.as_ref(),
        Some(global_retry),
    ];
    let pick = |f: &dyn Fn(&RawRetry) -> Option<Duration>, dflt: Duration| {
        layers.iter().flatten().find_map(|r| f(r)).unwrap_or(dflt)
    };
    let retry = RetrySettings {
        max_retries: layers
            .iter()
            .flatten()
            .find_map(|r| r.max_retries)
            .unwrap_or(2),
        base: pick(&|r| r.base, Duration::from_millis(200)),
        cap: pick(&|r| r.cap, Duration::from_secs(5)),
        max_retry_wait: pick(&|r| r.max_retry_wait, Duration::from_secs(10)),
    };
    let attempt_timeout = chain
        .attempt_timeout
        .or(model.attempt_timeout)
        .unwrap_or(server.attempt_timeout);
    let policy = TargetPolicy {
        attempt_timeout,
        first_token_timeout: chain
            .first_token_timeout
            .or(model.first_token_timeout)
            .or(server.first_token_timeout)
            .unwrap_or(attempt_timeout),
        idle_timeout: chain
            .idle_timeout
            .or(model.idle_timeout)
            .or(server.idle_timeout),
        retry,
        actions: chain.actions,
    };
    Target {
        model,
        policy: Arc::new(policy),
    }
}

fn strategy(path: &str, spec: &raw::RawChainSpec) -> Result<Strategy, ConfigError> {
    match spec.strategy.as_deref() {
        None | Some("sequential") => Ok(Strategy::Sequential),
        Some("race") => {
            let k = spec.race_k.unwrap_or(spec.models.len());
            if k < 1 {
                return Err(ConfigError::at(
                    &format!("{path}.race_k"),
                    "must be at least 1",
                ));
            }
            Ok(Strategy::Race {
                k: k.min(spec.models.len()),
            })
        }
        Some("hedge") => {
            let delay = match spec.hedge_delay.as_deref() {
                None => HedgeDelay::Fixed(Duration::from_millis(500)),
                Some("p95") => HedgeDelay::P95,
                Some(d) => HedgeDelay::Fixed(
                    units::parse_duration(d)
                        .map_err(|e| ConfigError::at(&format!("{path}.hedge_delay"), e))?,
                ),
            };
            Ok(Strategy::Hedge { delay })
        }
        Some(other) => Err(ConfigError::at(
            &format!("{path}.strategy"),
            format!("unknown strategy {other:?} (expected sequential, race or hedge)"),
        )),
    }
}

/// The chat URLs of a model (plain and streaming), by its provider's kind.
fn model_urls(p: &Provider, model_id: &str) -> Result<(http::Uri, http::Uri), String> {
    let id: String = url::form_urlencoded::byte_serialize(model_id.as_bytes()).collect();
    let (plain, stream) = match p.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Anthropic => {
            (p.chat_url.clone(), p.chat_url.clone())
        }
        ProviderKind::AzureOpenai => {
            let u = format!(
                "{}{id}/chat/completions?api-version={}",
                p.chat_url, p.api_version
            );
            (u.clone(), u)
        }
        ProviderKind::Gemini => (
            format!("{}{id}:generateContent", p.chat_url),
            format!("{}{id}:streamGenerateContent?alt=sse", p.chat_url),
        ),
    };
    let parse = |u: &str| -> Result<http::Uri, String> {
        let checked = url::Url::parse(u).map_err(|e| e.to_string())?;
        http::Uri::try_from(checked.as_str()).map_err(|e| e.to_string())
    };
    Ok((parse(&plain)?, parse(&stream)?))
}

/// A chain serves one kind of request, and an embedding chain one vector space: a
/// fallback to vectors of another size or model would corrupt the caller's index.
/// The error names the first entry that differs from the chain's first.
fn same_space(list_path: &str, members: &[Arc<Model>]) -> Result<(), ConfigError> {
    let Some(first) = members.first() else {
        return Ok(());
    };
    // The implicit chain's path names `fallbacks`, whose entries start after the model.
    let offset = usize::from(list_path.ends_with(".fallbacks"));
    for (i, m) in members.iter().enumerate().skip(1) {
        let at = format!("{list_path}[{}]", i - offset);
        if m.kind != first.kind {
            return Err(ConfigError::at(
                &at,
                format!(
                    "{:?} is a {} model, and the chain's first model {:?} is a {} model: a chain serves one kind",
                    m.name, m.kind.as_str(), first.name, first.kind.as_str()
                ),
            ));
        }
        if m.kind != ModelKind::Embedding {
            continue;
        }
        if m.dimensions != first.dimensions {
            return Err(ConfigError::at(
                &at,
                format!(
                    "{:?} makes vectors of {} dimensions and {:?} of {}: a fallback must not change the vector space",
                    m.name,
                    m.dimensions.unwrap_or(0),
                    first.name,
                    first.dimensions.unwrap_or(0)
                ),
            ));
        }
        match (&m.embedding_space, &first.embedding_space) {
            (Some(a), Some(b)) if a != b => {
                return Err(ConfigError::at(
                    &at,
                    format!(
                        "{:?} declares embedding_space {a:?} and {:?} declares {b:?}: a fallback must not change the vector space",
                        m.name, first.name
                    ),
                ));
            }
            (Some(_), Some(_)) => {}
            // Without a declared space, only the same model id is known to share one.
            _ if m.model_id != first.model_id => {
                return Err(ConfigError::at(
                    &at,
                    format!(
                        "{:?} ({}) and {:?} ({}) are different models: declare the same embedding_space on both if their vectors are interchangeable",
                        m.name, m.model_id, first.name, first.model_id
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The embeddings URL of a model on provider `p`.
fn embed_url(p: &Provider, model_id: &str) -> Result<http::Uri, String> {
    let id: String = url::form_urlencoded::byte_serialize(model_id.as_bytes()).collect();
    let u = match p.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            format!("{}embeddings", p.chat_url.trim_end_matches("chat/completions"))
        }
        ProviderKind::AzureOpenai => format!(
            "{}{id}/embeddings?api-version={}",
            p.chat_url, p.api_version
        ),
        ProviderKind::Gemini => format!("{}{id}:batchEmbedContents", p.chat_url),
        ProviderKind::Anthropic => {
            return Err("Anthropic serves no embeddings: use an openai, azure_openai, openai_compatible or gemini provider".into())
        }
    };
    let checked = url::Url::parse(&u).map_err(|e| e.to_string())?;
    http::Uri::try_from(checked.as_str()).map_err(|e| e.to_string())
}

/// Durations that must be greater than zero when set.
fn positive(path: &str, fields: &[(&str, Option<Duration>)]) -> Result<(), ConfigError> {
    for (name, d) in fields {
        if d.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::at(
                &format!("{path}.{name}"),
                "must be greater than zero",
            ));
        }
    }
    Ok(())
}

fn check_retry(path: &str, r: &RawRetry) -> Result<(), ConfigError> {
    if let (Some(base), Some(cap)) = (r.base, r.cap) {
        if cap < base {
            return Err(ConfigError::at(
                &format!("{path}.cap"),
                "must not be smaller than base",
            ));
        }
    }
    Ok(())
}

fn ratio(path: &str, v: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::at(path, "must be between 0 and 1"))
    }
}

fn budget(
    path: &str,
    b: &RawBudget,
    (ratio_default, floor_default): (f64, f64),
) -> Result<BudgetSettings, ConfigError> {
    let min_per_second = b.min_per_second.unwrap_or(floor_default);
    if !(min_per_second.is_finite() && min_per_second >= 0.0) {
        return Err(ConfigError::at(
            &format!("{path}.min_per_second"),
            "must be a non-negative number",
        ));
    }
    let r = b.ratio.unwrap_or(ratio_default);
    if !(r.is_finite() && r >= 0.0) {
        return Err(ConfigError::at(
            &format!("{path}.ratio"),
            "must be a non-negative number",
        ));
    }
    Ok(BudgetSettings {
        ratio: r,
        min_per_second,
        window: b.window.unwrap_or(Duration::from_secs(10)),
    })
}

fn breaker_settings(
    path: &str,
    b: &RawBreaker,
    base: BreakerSettings,
) -> Result<BreakerSettings, ConfigError> {
    let s = BreakerSettings {
        consecutive_failures: b.consecutive_failures.unwrap_or(base.consecutive_failures),
        failure_rate: b
            .failure_rate
            .map(|r| ratio(&format!("{path}.failure_rate"), r))
            .transpose()?
            .unwrap_or(base.failure_rate),
        min_calls: b.min_calls.unwrap_or(base.min_calls),
        window: b.window.unwrap_or(base.window),
        cooldown: b.cooldown.unwrap_or(base.cooldown),
        max_cooldown: b.max_cooldown.unwrap_or(base.max_cooldown),
        half_open_probes: b.half_open_probes.unwrap_or(base.half_open_probes),
        close_after: b.close_after.unwrap_or(base.close_after),
    };
    if s.consecutive_failures == 0 {
        return Err(ConfigError::at(
            &format!("{path}.consecutive_failures"),
            "must be at least 1",
        ));
    }
    if s.half_open_probes == 0 {
        return Err(ConfigError::at(
            &format!("{path}.half_open_probes"),
            "must be at least 1",
        ));
    }
    if s.max_cooldown < s.cooldown {
        return Err(ConfigError::at(
            &format!("{path}.max_cooldown"),
            "must not be smaller than cooldown",
        ));
    }
    Ok(s)
}

/// Finds a pool model by name, or an error at the given YAML path.
type ModelLookup<'a> = dyn Fn(&str, &str) -> Result<Arc<Model>, ConfigError> + 'a;

/// A chain's shadow block: models of the pool (default: the chain after its first).
fn shadow_plan(
    path: &str,
    sh: &raw::RawShadow,
    members: &[Arc<Model>],
    lookup: &ModelLookup<'_>,
    target: &dyn Fn(Arc<Model>) -> Target,
) -> Result<ShadowPlan, ConfigError> {
    let models = match &sh.models {
        Some(names) => names
            .iter()
            .enumerate()
            .map(|(i, n)| lookup(&format!("{path}.models[{i}]"), n))
            .collect::<Result<Vec<_>, _>>()?,
        None => members.iter().skip(1).cloned().collect(),
    };
    for (i, m) in models.iter().enumerate() {
        if models[..i].iter().any(|o| Arc::ptr_eq(o, m)) {
            return Err(ConfigError::at(
                &format!("{path}.models[{i}]"),
                format!("{:?} is listed twice", m.name),
            ));
        }
    }
    let sample = ratio(&format!("{path}.sample"), sh.sample.unwrap_or(0.05))?;
    if let Some(c) = sh.max_cost_per_hour {
        if !(c.is_finite() && c >= 0.0) {
            return Err(ConfigError::at(
                &format!("{path}.max_cost_per_hour"),
                "must be a non-negative number of US dollars",
            ));
        }
    }
    let max_inflight = sh.max_inflight.unwrap_or(32);
    if max_inflight == 0 {
        return Err(ConfigError::at(
            &format!("{path}.max_inflight"),
            "must be at least 1",
        ));
    }
    Ok(ShadowPlan {
        targets: models.into_iter().map(target).collect(),
        sample,
        max_cost_per_hour: sh.max_cost_per_hour,
        max_inflight,
    })
}

pub const DEFAULT_STORE_PATH: &str = "cascade.db";

fn store_settings(s: &raw::RawStore) -> Result<Option<crate::store::StoreSettings>, ConfigError> {
    if s.enabled == Some(false) {
        return Ok(None);
    }
    let backend = match (&s.path, &s.url) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at(
                "store.url",
                "store.path and store.url are both set: choose one store (path: a SQLite \
                 file on this machine; url: a PostgreSQL database shared by a fleet)",
            ))
        }
        (_, Some(url)) => {
            let ca = s.ca_file.as_deref().map(std::path::Path::new);
            let url = crate::store::PgUrl::with_ca(url.expose(), ca).map_err(|e| {
                match e.strip_prefix("store.ca_file: ") {
                    Some(rest) => ConfigError::at("store.ca_file", rest),
                    None => ConfigError::at("store.url", e),
                }
            })?;
            crate::store::Backend::Postgres(url)
        }
        (path, None) => {
            if s.ca_file.is_some() {
                return Err(ConfigError::at(
                    "store.ca_file",
                    "is for a PostgreSQL store (store.url)",
                ));
            }
            let path = path.as_deref().unwrap_or(DEFAULT_STORE_PATH);
            if path.trim().is_empty() {
                return Err(ConfigError::at("store.path", "must not be empty"));
            }
            crate::store::Backend::Sqlite(path.into())
        }
    };
    let queue = s.queue.unwrap_or(65_536);
    if queue == 0 {
        return Err(ConfigError::at("store.queue", "must be at least 1"));
    }
    positive(
        "store",
        &[
            ("retention", s.retention),
            ("flush_interval", s.flush_interval),
        ],
    )?;
    Ok(Some(crate::store::StoreSettings {
        backend,
        retention: s.retention.unwrap_or(Duration::from_secs(30 * 86_400)),
        queue,
        flush_interval: s.flush_interval.unwrap_or(Duration::from_secs(1)),
    }))
}

fn log_settings(l: &raw::RawLog) -> Result<LogSettings, ConfigError> {
    let format = match l.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(ConfigError::at(
                "log.format",
                format!("unknown format {other:?} (expected text or json)"),
            ))
        }
    };
    Ok(LogSettings {
        format,
        requests: l.requests.unwrap_or(true),
    })
}

fn report_schedule(raw: &RawConfig) -> Result<Option<ReportSchedule>, ConfigError> {
    let Some(r) = &raw.report else {
        return Ok(None);
    };
    if raw.store.enabled == Some(false) {
        return Err(ConfigError::at(
            "report",
            "the scheduled report reads the store, and store.enabled is false",
        ));
    }
    let every = r
        .every
        .ok_or_else(|| ConfigError::at("report.every", "missing: how often to report (e.g. 7d)"))?;
    if every < Duration::from_secs(1) {
        return Err(ConfigError::at("report.every", "must be at least 1s"));
    }
    let by = crate::store::report::GroupBy::parse(r.by.as_deref().unwrap_or("chain"))
        .map_err(|e| ConfigError::at("report.by", e))?;
    let webhook = r
        .webhook
        .as_deref()
        .filter(|w| !w.is_empty())
        .map(|w| {
            url::Url::parse(w)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .and_then(|u| http::Uri::try_from(u.as_str()).ok())
                .ok_or_else(|| {
                    ConfigError::at("report.webhook", "expected an http:// or https:// URL")
                })
        })
        .transpose()?;
    Ok(Some(ReportSchedule {
        every,
        by,
        dir: r.dir.as_deref().unwrap_or("reports").into(),
        webhook,
    }))
}

fn health_settings(h: &raw::RawHealth) -> Result<HealthSettings, ConfigError> {
    let d = HealthSettings::default();
    Ok(HealthSettings {
        window: h.window.unwrap_or(d.window),
        degraded_below: h
            .degraded_below
            .map(|r| ratio("health.degraded_below", r))
            .transpose()?
            .unwrap_or(d.degraded_below),
        min_calls: h.min_calls.unwrap_or(d.min_calls),
    })
}

fn chaos(path: &str, c: &raw::RawChaos) -> Result<Chaos, ConfigError> {
    let class = match &c.class {
        None => ErrorClass::Transient,
        Some(name) => ErrorClass::from_name(name).ok_or_else(|| {
            ConfigError::at(
                &format!("{path}.class"),
                format!("unknown error class {name:?}"),
            )
        })?,
    };
    Ok(Chaos {
        rate: ratio(&format!("{path}.rate"), c.rate)?,
        class,
        latency: c.latency.unwrap_or(Duration::ZERO),
        cut_stream: c
            .cut_stream
            .map(|r| ratio(&format!("{path}.cut_stream"), r))
            .transpose()?
            .unwrap_or(0.0),
    })
}

fn validate_server(s: &raw::RawServer) -> Result<ServerSettings, ConfigError> {
    let listen_text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = listen_text.parse().map_err(|e| {
        ConfigError::at(
            "server.listen",
            format!("invalid address {listen_text:?} (expected HOST:PORT): {e}"),
        )
    })?;
    let request_timeout = s.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let attempt_timeout = s.attempt_timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT);
    for (field, d) in [
        ("server.request_timeout", request_timeout),
        ("server.attempt_timeout", attempt_timeout),
    ] {
        if d.is_zero() {
            return Err(ConfigError::at(field, "must be greater than zero"));
        }
    }
    positive(
        "server",
        &[
            ("first_token_timeout", s.first_token_timeout),
            ("idle_timeout", s.idle_timeout),
        ],
    )?;
    let max_body = s.max_body.unwrap_or(DEFAULT_MAX_BODY);
    if max_body == 0 {
        return Err(ConfigError::at(
            "server.max_body",
            "must be greater than zero",
        ));
    }
    if s.worker_threads == Some(0) {
        return Err(ConfigError::at(
            "server.worker_threads",
            "must be at least 1",
        ));
    }
    Ok(ServerSettings {
        listen,
        request_timeout,
        attempt_timeout,
        first_token_timeout: s.first_token_timeout,
        idle_timeout: s.idle_timeout,
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        worker_threads: s.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        scheduler: s.scheduler.unwrap_or_default(),
        drain_delay: s.drain_delay.unwrap_or(Duration::ZERO),
        drain_timeout: s.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
    })
}

fn validate_provider(
    path: &str,
    name: &str,
    p: &raw::RawProvider,
) -> Result<Provider, ConfigError> {
    let url_path = format!("{path}.base_url");
    let base_url = url::Url::parse(&p.base_url)
        .map_err(|e| ConfigError::at(&url_path, format!("invalid URL {:?}: {e}", p.base_url)))?;
    if !matches!(base_url.scheme(), "http" | "https") || base_url.host().is_none() {
        return Err(ConfigError::at(
            &url_path,
            format!(
                "invalid URL {:?}: expected an http:// or https:// URL with a host",
                p.base_url
            ),
        ));
    }
    let base = p.base_url.trim_end_matches('/');
    let (chat_url, api_version) = match p.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            (format!("{base}/chat/completions"), String::new())
        }
        // The deployment (the model's `model_id`) and api-version are added per call.
        ProviderKind::AzureOpenai => (
            format!("{base}/openai/deployments/"),
            p.api_version.clone().unwrap_or_else(|| "2024-10-21".into()),
        ),
        ProviderKind::Anthropic => (
            format!("{base}/v1/messages"),
            p.api_version.clone().unwrap_or_else(|| "2023-06-01".into()),
        ),
        // The model and method are added per call.
        ProviderKind::Gemini => (format!("{base}/v1beta/models/"), String::new()),
    };
    if !matches!(
        p.kind,
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::AzureOpenai
    ) && (!p.drop_params.is_empty() || p.extra_body.is_some())
    {
        return Err(ConfigError::at(
            &format!("{path}.drop_params"),
            "drop_params and extra_body apply to OpenAI-format providers only",
        ));
    }
    let mut extra_headers = HeaderMap::new();
    for (k, v) in &p.extra_headers {
        let hpath = format!("{path}.extra_headers.{k}");
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| ConfigError::at(&hpath, "invalid header name"))?;
        let mut value = HeaderValue::from_str(v)
            .map_err(|_| ConfigError::at(&hpath, "invalid header value"))?;
        // Extra headers often carry credentials of their own.
        value.set_sensitive(true);
        extra_headers.insert(name, value);
    }
    let api_key = p.api_key.clone().filter(|k| !k.expose().is_empty());
    let auth = match &api_key {
        None => None,
        Some(key) => {
            let (header, value) = match p.kind {
                ProviderKind::Openai | ProviderKind::OpenaiCompatible => (
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", key.expose()),
                ),
                ProviderKind::AzureOpenai => {
                    (HeaderName::from_static("api-key"), key.expose().to_string())
                }
                ProviderKind::Anthropic => (
                    HeaderName::from_static("x-api-key"),
                    key.expose().to_string(),
                ),
                ProviderKind::Gemini => (
                    HeaderName::from_static("x-goog-api-key"),
                    key.expose().to_string(),
                ),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ConfigError::at(&format!("{path}.api_key"), "is not a valid header value")
            })?;
            value.set_sensitive(true);
            Some((header, value))
        }
    };
    // The `Host` header, built once rather than by the HTTP client on every call.
    let host = base_url.host_str().and_then(|h| match base_url.port() {
        Some(port) => HeaderValue::from_str(&format!("{h}:{port}")).ok(),
        None => HeaderValue::from_str(h).ok(),
    });
    Ok(Provider {
        name: Name::new(name),
        name_header: HeaderValue::from_str(name).ok(),
        host,
        kind: p.kind,
        base_url,
        chat_url,
        api_key,
        auth,
        extra_headers,
        drop_params: p.drop_params.clone(),
        extra_body: p.extra_body.clone(),
        api_version,
    })
}

fn join_keys<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    keys.map(String::as_str).collect::<Vec<_>>().join(", ")
}
