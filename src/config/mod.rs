//! Configuration: YAML -> raw serde DTOs (`raw`) -> validated, immutable runtime types (this file).
//!
//! The runtime config is built once at startup; the request path only reads `Arc`s from it.

mod env;
pub mod raw;
pub mod units;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use indexmap::IndexMap;

pub use raw::ProviderKind;
use raw::{ChainForm, RawConfig};

use crate::secret::Secret;

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
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    pub attempt_timeout: Duration,
    pub max_body: usize,
    pub worker_threads: Option<usize>,
}

#[derive(Debug)]
pub struct Provider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub base_url: url::Url,
    /// The full URL of the chat endpoint, resolved once.
    pub chat_url: String,
    pub api_key: Option<Secret>,
    pub extra_headers: HeaderMap,
}

/// One entry of the model pool: a callable target.
#[derive(Debug)]
pub struct Model {
    pub name: Arc<str>,
    pub provider: Arc<Provider>,
    pub model_id: String,
    /// `model_id` already encoded as a JSON string, for splicing into forwarded bodies.
    pub model_id_json: Box<str>,
    pub max_tokens: Option<u32>,
    pub context_window: Option<u64>,
    pub cost_per_1k_input: f64,
    pub cost_per_1k_output: f64,
    pub attempt_timeout: Duration,
    pub fallbacks: Vec<String>,
}

/// An ordered fallback chain.
#[derive(Debug)]
pub struct Chain {
    pub name: Arc<str>,
    pub targets: Vec<Arc<Model>>,
}

#[derive(Debug, Clone)]
pub struct MockSettings {
    pub listen: SocketAddr,
}

impl Config {
    /// Loads and validates a YAML file, reading `${VAR}`s from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_yaml_with_env(&text, &|name| std::env::var(name).ok()).map_err(|e| match e {
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
        let mut tree: serde_json::Value = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load {
                file: "<inline>".into(),
                message: e.to_string(),
            })?;
        env::interpolate(&mut tree, env)?;
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
        validate(raw)
    }

    /// The chain names and pool model names a request may use, for error messages and `/v1/models`.
    pub fn routable_names(&self) -> impl Iterator<Item = &str> {
        self.chains
            .keys()
            .map(String::as_str)
            .chain(self.models.keys().map(String::as_str))
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let server = validate_server(&raw.server)?;

    let mut providers = IndexMap::new();
    for (name, p) in &raw.providers {
        let path = format!("providers.{name}");
        providers.insert(name.clone(), Arc::new(validate_provider(&path, name, p)?));
    }

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
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::at(
                    &format!("{path}.{field}"),
                    "must be a non-negative number",
                ));
            }
        }
        let model_id_json = serde_json::to_string(&m.model_id)
            .map_err(|e| ConfigError::at(&format!("{path}.model_id"), e.to_string()))?
            .into_boxed_str();
        models.insert(
            name.clone(),
            Arc::new(Model {
                name: name.as_str().into(),
                provider: provider.clone(),
                model_id: m.model_id.clone(),
                model_id_json,
                max_tokens: m.max_tokens,
                context_window: m.context_window,
                cost_per_1k_input: m.cost_per_1k_input,
                cost_per_1k_output: m.cost_per_1k_output,
                attempt_timeout: m.attempt_timeout.unwrap_or(server.attempt_timeout),
                fallbacks: m.fallbacks.clone(),
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
        let list_path = match c.form {
            ChainForm::Short => format!("chains.{name}"),
            ChainForm::Long => format!("chains.{name}.models"),
        };
        if c.models.is_empty() {
            return Err(ConfigError::at(
                &list_path,
                "chain is empty: list at least one model",
            ));
        }
        let targets = c
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| lookup(&format!("{list_path}[{i}]"), m))
            .collect::<Result<Vec<_>, _>>()?;
        chains.insert(
            name.clone(),
            Arc::new(Chain {
                name: name.as_str().into(),
                targets,
            }),
        );
    }

    let mut model_chains = HashMap::new();
    for (name, m) in &models {
        let mut targets = vec![m.clone()];
        for (i, f) in m.fallbacks.iter().enumerate() {
            targets.push(lookup(&format!("models.{name}.fallbacks[{i}]"), f)?);
        }
        model_chains.insert(
            name.clone(),
            Arc::new(Chain {
                name: name.as_str().into(),
                targets,
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
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        worker_threads: s.worker_threads,
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
    let chat_url = match p.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => format!("{base}/chat/completions"),
        ProviderKind::AzureOpenai | ProviderKind::Anthropic | ProviderKind::Gemini => {
            return Err(ConfigError::at(
                &format!("{path}.kind"),
                format!(
                    "kind {:?} is not supported by this build yet (supported: openai, openai_compatible)",
                    p.kind.as_str()
                ),
            ))
        }
    };
    let mut extra_headers = HeaderMap::new();
    for (k, v) in &p.extra_headers {
        let hpath = format!("{path}.extra_headers.{k}");
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| ConfigError::at(&hpath, "invalid header name"))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| ConfigError::at(&hpath, "invalid header value"))?;
        extra_headers.insert(name, value);
    }
    Ok(Provider {
        name: name.into(),
        kind: p.kind,
        base_url,
        chat_url,
        api_key: p
            .api_key
            .as_ref()
            .filter(|k| !k.is_empty())
            .map(|k| Secret::new(k.clone())),
        extra_headers,
    })
}

fn join_keys<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    keys.map(String::as_str).collect::<Vec<_>>().join(", ")
}
