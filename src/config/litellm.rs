//! `cascade import litellm`: a LiteLLM proxy `config.yaml` as the equivalent cascade
//! config, and a note for everything that could not be carried over.
//!
//! What maps to what:
//! - each `model_list` entry is a pool model; its `litellm_params.model` prefix (and
//!   `api_base`) gives the provider, one cascade provider per distinct endpoint and key;
//! - each model group (`model_name`) is a chain of the same name, so clients keep
//!   sending the same `model`: the group's deployments in config order (LiteLLM
//!   spreads load over them; cascade tries them in order), then the deployments of
//!   each group in its `fallbacks`;
//! - `context_window_fallbacks` and `content_policy_fallbacks` become `on:` jumps, the
//!   jump target also sitting in the chain;
//! - router and `litellm_settings` retries, timeouts and cooldowns become `retry`,
//!   `server` and `breaker` settings; `os.environ/VAR` becomes `${VAR}`.
//!
//! The output is loaded and linted here before it is returned, so it passes
//! `cascade check` (given its environment variables).

use indexmap::IndexMap;
use serde_json::{json, Map, Value};

use super::lint::{self, Severity};
use super::Config;

/// The converted config and what the conversion left behind.
#[derive(Debug)]
pub struct Imported {
    /// The cascade config, as YAML.
    pub yaml: String,
    /// One line per setting not carried over, or carried over approximately.
    pub notes: Vec<String>,
}

/// `litellm_params` keys the import reads (or notes itself).
const CONSUMED: &[&str] = &[
    "model",
    "api_base",
    "api_key",
    "api_version",
    "organization",
    "extra_headers",
    "custom_llm_provider",
    "timeout",
    "stream_timeout",
    "max_retries",
    "max_tokens",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "max_input_tokens",
    "output_vector_size",
    "rpm",
    "tpm",
    "max_parallel_requests",
    "weight",
    "order",
];

/// The Azure `api-version` used when a deployment gives none.
const AZURE_API_VERSION: &str = "2024-10-21";

/// Converts a LiteLLM proxy config. Errors are for input that is not one.
pub fn import(text: &str) -> Result<Imported, String> {
    let root = super::yaml::parse(text).map_err(|e| format!("not YAML: {e}"))?;
    let Value::Object(root) = root else {
        return Err("not a LiteLLM config: expected a mapping with a model_list".into());
    };
    let mut import = Import::default();
    import.read(&root)?;
    import.finish()
}

#[derive(Debug, Clone, PartialEq)]
struct Provider {
    kind: &'static str,
    base_url: String,
    api_key: Option<String>,
    api_version: Option<String>,
    headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Deployment {
    /// Pool name.
    name: String,
    group: String,
    provider: String,
    model_id: String,
    embedding: bool,
    fields: Map<String, Value>,
}

#[derive(Debug, Default)]
struct Import {
    providers: IndexMap<String, Provider>,
    deployments: Vec<Deployment>,
    /// Group name -> pool names of its deployments, in config order.
    groups: IndexMap<String, Vec<String>>,
    /// Group -> (class, jump target group), in the order found.
    jumps: IndexMap<String, Vec<(&'static str, String)>>,
    /// Group -> fallback groups, in order.
    fallbacks: IndexMap<String, Vec<String>>,
    top: Map<String, Value>,
    notes: Vec<String>,
}

impl Import {
    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    fn read(&mut self, root: &Map<String, Value>) -> Result<(), String> {
        let list = match root.get("model_list") {
            Some(Value::Array(list)) => list,
            _ => return Err("not a LiteLLM config: no model_list".into()),
        };
        for (i, entry) in list.iter().enumerate() {
            self.deployment(i, entry);
        }
        if self.deployments.is_empty() {
            return Err("model_list has no deployment cascade can call".into());
        }
        let empty = Map::new();
        let router = root
            .get("router_settings")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let settings = root
            .get("litellm_settings")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        self.settings(router, settings);
        for (key, what) in [
            (
                "general_settings",
                "general_settings (master key, database, UI, alerting)",
            ),
            (
                "environment_variables",
                "environment_variables: set them in cascade's environment",
            ),
        ] {
            if root.get(key).is_some_and(|v| !is_empty(v)) {
                self.note(format!("{what}: not carried over"));
            }
        }
        for key in root.keys() {
            if ![
                "model_list",
                "router_settings",
                "litellm_settings",
                "general_settings",
                "environment_variables",
            ]
            .contains(&key.as_str())
            {
                self.note(format!("{key}: not carried over (no cascade equivalent)"));
            }
        }
        Ok(())
    }

    fn deployment(&mut self, i: usize, entry: &Value) {
        let at = format!("model_list[{i}]");
        let Some(group) = entry.get("model_name").and_then(Value::as_str) else {
            self.note(format!("{at}: no model_name: skipped"));
            return;
        };
        let empty = Map::new();
        let params = entry
            .get("litellm_params")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let info = entry
            .get("model_info")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let Some(model) = params.get("model").and_then(Value::as_str) else {
            self.note(format!("{at} ({group}): no litellm_params.model: skipped"));
            return;
        };
        if group.contains('*') || model.contains('*') {
            self.note(format!(
                "{at} ({group}): wildcard routing ({model}) is not carried over: name each model"
            ));
            return;
        }
        let mode = info.get("mode").and_then(Value::as_str).unwrap_or("chat");
        if !matches!(mode, "chat" | "completion" | "embedding" | "responses") {
            self.note(format!(
                "{at} ({group}): model_info.mode {mode}: cascade serves chat and embeddings only: skipped"
            ));
            return;
        }
        let custom = params.get("custom_llm_provider").and_then(Value::as_str);
        let (prefix, id) = match (custom, model.split_once('/')) {
            (Some(p), _) if PREFIXES.iter().any(|(name, _)| *name == p) => {
                // The provider is named apart; the model keeps its own slashes.
                let id = model.strip_prefix(&format!("{p}/")).unwrap_or(model);
                (
                    PREFIXES
                        .iter()
                        .find(|(name, _)| *name == p)
                        .map_or("openai", |(n, _)| *n),
                    id,
                )
            }
            (Some(p), _) => {
                self.note(format!(
                    "{at} ({group}): custom_llm_provider {p:?} has no cascade wire format: skipped"
                ));
                return;
            }
            (None, split) => match split {
                Some((p, id)) if PREFIXES.iter().any(|(name, _)| *name == p) => (p, id),
                Some((p, _)) => {
                    self.note(format!(
                    "{at} ({group}): {p:?} is not a provider prefix cascade knows: {model} is read as an OpenAI model id"
                ));
                    ("openai", model)
                }
                None => (infer_prefix(model), model),
            },
        };
        for k in [
            "azure_ad_token",
            "tenant_id",
            "client_id",
            "client_secret",
            "azure_ad_token_provider",
        ] {
            if params.contains_key(k) {
                self.note(format!(
                    "{at} ({group}): Azure AD auth ({k}) is not supported: the provider expects an api_key"
                ));
                break;
            }
        }
        for k in params.keys() {
            let azure_ad = [
                "azure_ad_token",
                "tenant_id",
                "client_id",
                "client_secret",
                "azure_ad_token_provider",
            ];
            if !CONSUMED.contains(&k.as_str()) && !azure_ad.contains(&k.as_str()) {
                self.note(format!(
                    "{at} ({group}): litellm_params.{k}: not carried over"
                ));
            }
        }
        let api_base = params.get("api_base").and_then(Value::as_str).map(env);
        let Some(kind_base) = PREFIXES
            .iter()
            .find(|(name, _)| *name == prefix)
            .map(|(_, k)| *k)
        else {
            self.note(format!(
                "{at} ({group}): provider {prefix:?} ({model}) has no cascade wire format: skipped"
            ));
            return;
        };
        let (kind, default_base, key_var) = kind_base;
        if kind.is_empty() {
            self.note(format!(
                "{at} ({group}): provider {prefix:?} ({model}) has no cascade wire format: skipped"
            ));
            return;
        }
        let base_url = match (api_base, default_base, kind) {
            // LiteLLM calls Ollama's own API at the host; its OpenAI-compatible API
            // lives under /v1.
            (Some(b), _, _) if matches!(prefix, "ollama" | "ollama_chat") => with_v1(&b),
            (Some(b), _, _) => b.trim_end_matches('/').to_string(),
            (None, Some(d), _) => d.to_string(),
            (None, None, "azure_openai") => "${AZURE_API_BASE}".to_string(),
            (None, None, _) => {
                self.note(format!(
                    "{at} ({group}): {model} needs an api_base: skipped"
                ));
                return;
            }
        };
        let api_key = match params.get("api_key").and_then(Value::as_str) {
            Some(k) if k.starts_with("os.environ/") => Some(env(k)),
            Some(k) if !k.is_empty() => {
                self.note(format!(
                    "{at} ({group}): a literal api_key was copied into the output; move it to an environment variable"
                ));
                Some(k.to_string())
            }
            _ => key_var.map(|v| format!("${{{v}}}")),
        };
        let api_version = if kind == "azure_openai" {
            Some(
                params
                    .get("api_version")
                    .filter(|v| !v.is_null())
                    .map(|v| env(&scalar(v)))
                    .unwrap_or_else(|| AZURE_API_VERSION.to_string()),
            )
        } else {
            None
        };
        let mut headers: Vec<(String, String)> = params
            .get("extra_headers")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (k.clone(), env(&scalar(v))))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(org) = params.get("organization").and_then(Value::as_str) {
            headers.push(("OpenAI-Organization".into(), env(org)));
        }
        let provider = self.provider(
            prefix,
            Provider {
                kind,
                base_url,
                api_key,
                api_version,
                headers,
            },
        );

        let mut fields = Map::new();
        let num = |k: &str| {
            params
                .get(k)
                .or_else(|| info.get(k))
                .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
        };
        let context_window = num("max_input_tokens").map(|n| n as u64);
        // Only a request default: `model_info.max_tokens` is LiteLLM's note of the
        // model's limit, and as cascade's default it would cap every answer.
        if let Some(n) = params
            .get("max_tokens")
            .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
        {
            fields.insert("max_tokens".into(), json!(n as u64));
        }
        if let Some(w) = context_window {
            fields.insert("context_window".into(), json!(w));
        }
        for (from, to) in [
            ("input_cost_per_token", "cost_per_1k_input"),
            ("output_cost_per_token", "cost_per_1k_output"),
            ("cache_read_input_token_cost", "cost_per_1k_cached_input"),
        ] {
            if let Some(c) = num(from) {
                fields.insert(to.into(), json!(round(c * 1000.0)));
            }
        }
        for (from, to) in [
            ("timeout", "attempt_timeout"),
            ("stream_timeout", "first_token_timeout"),
        ] {
            if let Some(s) = num(from) {
                fields.insert(to.into(), json!(duration(s)));
            }
        }
        if let Some(n) = num("max_retries") {
            fields.insert("retry".into(), json!({ "max_retries": n as u64 }));
        }
        let embedding = mode == "embedding" || id.contains("embedding") || id.contains("embed-");
        if embedding {
            let dims = num("output_vector_size")
                .map(|d| d as u64)
                .or_else(|| known_dimensions(id));
            let Some(dims) = dims else {
                self.note(format!(
                    "{at} ({group}): embedding model {model} without model_info.output_vector_size: skipped (cascade needs its dimensions)"
                ));
                return;
            };
            fields.insert("kind".into(), json!("embedding"));
            fields.insert("dimensions".into(), json!(dims));
            // LiteLLM treats a group's deployments as one model: one vector space.
            fields.insert("embedding_space".into(), json!(group));
        }
        for k in ["rpm", "tpm", "max_parallel_requests"] {
            if params.contains_key(k) || entry.get(k).is_some() {
                self.note(format!(
                    "{at} ({group}): litellm_params.{k} (rate limits per deployment): not carried over"
                ));
            }
        }
        if params.contains_key("weight") || params.contains_key("order") {
            self.note(format!(
                "{at} ({group}): weight/order: cascade tries a group's deployments in config order"
            ));
        }
        if let Some(h) = params.get("extra_headers").and_then(Value::as_object) {
            if h.values().any(|v| !scalar(v).starts_with("os.environ/")) {
                self.note(format!(
                    "{at} ({group}): extra_headers values were copied as written; move any secret among them to an environment variable"
                ));
            }
        }
        self.deployments.push(Deployment {
            embedding,
            name: String::new(),
            group: group.to_string(),
            provider,
            model_id: id.to_string(),
            fields,
        });
        self.groups.entry(group.to_string()).or_default();
    }

    /// The provider's name: the same endpoint and key share one.
    fn provider(&mut self, prefix: &str, p: Provider) -> String {
        if let Some((name, _)) = self.providers.iter().find(|(_, q)| **q == p) {
            return name.clone();
        }
        let base = prefix.replace('_', "-");
        let mut name = base.clone();
        let mut n = 2;
        while self.providers.contains_key(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        self.providers.insert(name.clone(), p);
        name
    }

    fn settings(&mut self, router: &Map<String, Value>, settings: &Map<String, Value>) {
        // A key in router_settings wins over the same key in litellm_settings.
        let get = |k: &str| router.get(k).or_else(|| settings.get(k));
        let num = |k: &str| get(k).and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()));
        let mut server = Map::new();
        for (from, to) in [
            ("timeout", "attempt_timeout"),
            ("stream_timeout", "first_token_timeout"),
            ("request_timeout", "request_timeout"),
        ] {
            if let Some(s) = num(from) {
                server.insert(to.into(), json!(duration(s)));
            }
        }
        // LiteLLM's default request timeout is 6000 s; cascade's own default is kept
        // unless the attempt timeout needs more.
        if let (Some(a), None) = (num("timeout"), num("request_timeout")) {
            if a > 60.0 {
                server.insert("request_timeout".into(), json!(duration(a * 2.0)));
            }
        }
        if !server.is_empty() {
            self.top.insert("server".into(), Value::Object(server));
        }
        if let Some(n) = num("num_retries") {
            self.top
                .insert("retry".into(), json!({ "max_retries": n as u64 }));
        }
        let mut breaker = Map::new();
        if let Some(n) = num("allowed_fails") {
            breaker.insert("consecutive_failures".into(), json!((n as u64).max(1)));
        }
        if let Some(s) = num("cooldown_time") {
            // LiteLLM's cooldown is fixed; cascade's grows up to max_cooldown.
            breaker.insert("cooldown".into(), json!(duration(s)));
            breaker.insert("max_cooldown".into(), json!(duration(s)));
        }
        if !breaker.is_empty() {
            self.top.insert("breaker".into(), Value::Object(breaker));
        }
        let state_redis = router
            .get("redis_url")
            .and_then(Value::as_str)
            .map(env)
            .or_else(|| redis_url(router));
        if let Some(redis) = state_redis {
            self.top
                .insert("state".into(), json!({ "redis_url": redis }));
        }
        if router
            .get("redis_password")
            .is_some_and(|v| !scalar(v).starts_with("os.environ/"))
        {
            self.note("router_settings.redis_password: copied as written; move it to an environment variable");
        }
        if get("cache").is_some_and(|v| v.as_bool() == Some(true)) {
            self.cache(settings.get("cache_params").and_then(Value::as_object));
        }
        if get("disable_cooldowns").is_some_and(|v| v.as_bool() == Some(true)) {
            self.note("disable_cooldowns: not carried over (cascade's breakers stay on; raise breaker.consecutive_failures instead)");
        }

        for (key, class) in [
            ("fallbacks", None),
            ("context_window_fallbacks", Some("context_overflow")),
            ("content_policy_fallbacks", Some("content_policy")),
        ] {
            let Some(list) = get(key).and_then(Value::as_array) else {
                continue;
            };
            for item in list {
                let Some(map) = item.as_object() else {
                    continue;
                };
                for (group, to) in map {
                    let to: Vec<String> = match to {
                        Value::Array(a) => a
                            .iter()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect(),
                        Value::String(s) => vec![s.clone()],
                        _ => Vec::new(),
                    };
                    self.add_fallbacks(key, class, group, to);
                }
            }
        }
        if let Some(defaults) = get("default_fallbacks").and_then(Value::as_array) {
            let to: Vec<String> = defaults
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            let groups: Vec<String> = self.groups.keys().cloned().collect();
            for g in groups {
                if !self.fallbacks.contains_key(&g) && !to.contains(&g) {
                    self.add_fallbacks("default_fallbacks", None, &g, to.clone());
                }
            }
        }

        for (key, why) in [
            ("routing_strategy", "cascade tries a group's deployments in order, healthy ones first"),
            ("retry_policy", "per-error retry counts: set chains.NAME.on per class instead"),
            ("allowed_fails_policy", "per-error allowed fails: cascade's breaker counts every failure that is the target's fault"),
            ("enable_pre_call_checks", "cascade skips a target whose context_window is smaller than the prompt when the window is set"),
            ("model_group_alias", "aliases: name the chain instead"),
            ("max_fallbacks", "cascade walks the whole chain within max_attempts"),
            ("success_callback", "callbacks: cascade records every call in its store and log instead"),
            ("failure_callback", "callbacks: cascade records every call in its store and log instead"),
            ("callbacks", "callbacks: cascade records every call in its store and log instead"),
            ("drop_params", "set drop_params per provider for servers that reject a field"),
            ("set_verbose", "use RUST_LOG"),
        ] {
            if router.contains_key(key) || settings.contains_key(key) {
                self.note(format!("{key}: not carried over ({why})"));
            }
        }
    }

    /// `cache: true` with its `cache_params`: exact-match caching of every request, in
    /// memory or in Redis. Other cache types and opt-in modes are not cascade's.
    fn cache(&mut self, params: Option<&Map<String, Value>>) {
        let empty = Map::new();
        let p = params.unwrap_or(&empty);
        if p.get("mode").and_then(Value::as_str) == Some("default_off") {
            self.note("cache_params.mode: default_off (caching only on request): not carried over; cascade caches by cache.mode for every request");
            return;
        }
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("local");
        let mut cache = Map::new();
        cache.insert("mode".into(), json!("all"));
        if let Some(ttl) = p.get("ttl").and_then(Value::as_f64) {
            cache.insert("ttl".into(), json!(duration(ttl)));
        }
        match kind {
            "local" | "memory" => {}
            "redis" => {
                match p
                    .get("url")
                    .and_then(Value::as_str)
                    .map(env)
                    .or_else(|| redis_url(p))
                {
                    Some(url) => {
                        cache.insert("redis_url".into(), json!(url));
                    }
                    None => self.note(
                        "cache_params: a redis cache without host or url: kept in memory only",
                    ),
                }
                if p.get("password")
                    .is_some_and(|v| !scalar(v).starts_with("os.environ/"))
                {
                    self.note("cache_params.password: copied as written; move it to an environment variable");
                }
            }
            other => {
                self.note(format!(
                    "cache_params.type: {other} (semantic, s3, disk...) is not cascade's: not carried over"
                ));
                return;
            }
        }
        self.top.insert("cache".into(), Value::Object(cache));
    }

    fn add_fallbacks(
        &mut self,
        key: &str,
        class: Option<&'static str>,
        group: &str,
        to: Vec<String>,
    ) {
        if !self.groups.contains_key(group) {
            self.note(format!(
                "{key}: {group:?} is not a model group of model_list: skipped"
            ));
            return;
        }
        let mut known = Vec::new();
        for t in to {
            if self.groups.contains_key(&t) && t != group {
                known.push(t);
            } else if t != group {
                self.note(format!(
                    "{key} of {group:?}: {t:?} is not a model group of model_list: skipped"
                ));
            }
        }
        match class {
            None => self
                .fallbacks
                .entry(group.to_string())
                .or_default()
                .extend(known),
            Some(class) => {
                let jumps = self.jumps.entry(group.to_string()).or_default();
                for t in known {
                    jumps.push((class, t));
                }
            }
        }
    }

    /// Names the pool models, builds the chains, and checks the result.
    fn finish(mut self) -> Result<Imported, String> {
        self.reconcile_kinds();
        self.name_deployments();
        let mut dropped_jumps: Vec<(String, &'static str)> = Vec::new();
        for _ in 0..8 {
            let (tree, from_table) = self.tree(&dropped_jumps);
            let yaml = emit(&tree);
            let config = Config::from_yaml_with_env(&emit(&for_check(&tree)), &|_| {
                Some("placeholder".into())
            })
            .map_err(|e| {
                format!("the converted config does not load (a bug in the importer): {e}")
            })?;
            let errors: Vec<_> = lint::lint(&config)
                .into_iter()
                .filter(|f| f.severity == Severity::Error)
                .collect();
            let mut changed = false;
            for f in &errors {
                // chains.NAME.on.CLASS.jump_to (a chain name may hold dots).
                let jump = f
                    .path
                    .strip_prefix("chains.")
                    .and_then(|p| p.strip_suffix(".jump_to"))
                    .and_then(|p| p.rsplit_once(".on."));
                if let Some((chain, class)) = jump {
                    let class = if class == "context_overflow" {
                        "context_overflow"
                    } else {
                        "content_policy"
                    };
                    if !dropped_jumps.iter().any(|(c, k)| c == chain && *k == class) {
                        dropped_jumps.push((chain.to_string(), class));
                        self.notes.push(format!(
                            "chains.{chain}: the {class} jump is left out ({}); its target stays in the chain",
                            f.message
                        ));
                        changed = true;
                    }
                }
            }
            if !changed {
                if let Some(f) = errors.first() {
                    return Err(format!(
                        "the converted config fails cascade check at {}: {}",
                        f.path, f.message
                    ));
                }
                let header = "# Converted from a LiteLLM proxy config by `cascade import litellm`.\n\
                     # Each model group is a chain of the same name: its deployments in order, then\n\
                     # its fallbacks. Check it with `cascade check --config FILE`.\n"
                    .to_string();
                if !from_table.is_empty() {
                    self.notes.push(format!(
                        "context windows from cascade's table of common models (the context_overflow jumps need them): {}; check them",
                        from_table.join(", ")
                    ));
                }
                return Ok(Imported {
                    yaml: header + &yaml,
                    notes: self.notes,
                });
            }
        }
        Err("the converted config does not settle (a bug in the importer)".into())
    }

    /// A chain serves one kind, and an embedding chain one vector space: a group's
    /// deployments of another kind or size, and fallbacks to another kind or another
    /// embedding group, are left out and noted (cascade would refuse them).
    fn reconcile_kinds(&mut self) {
        let mut first: IndexMap<String, (bool, Option<Value>)> = IndexMap::new();
        let mut kept = Vec::new();
        for d in std::mem::take(&mut self.deployments) {
            let dims = d.fields.get("dimensions").cloned();
            let (kind, size) = first
                .entry(d.group.clone())
                .or_insert((d.embedding, dims.clone()))
                .clone();
            if kind != d.embedding || size != dims {
                self.notes.push(format!(
                    "{} ({}): another kind or vector size than the group's first deployment: left out (a chain serves one)",
                    d.model_id, d.group
                ));
                continue;
            }
            kept.push(d);
        }
        self.deployments = kept;
        let embedding = |g: &str| first.get(g).map(|(e, _)| *e);
        let mut notes = Vec::new();
        for (g, list) in self.fallbacks.iter_mut() {
            list.retain(|f| {
                let ok = embedding(g) == Some(false) && embedding(f) == Some(false);
                if !ok {
                    notes.push(format!(
                        "fallbacks of {g:?}: {f:?} is left out ({})",
                        if embedding(g) == embedding(f) {
                            "another embedding model changes the vector space"
                        } else {
                            "a chain serves one kind"
                        }
                    ));
                }
                ok
            });
        }
        for (g, list) in self.jumps.iter_mut() {
            list.retain(|(_, f)| {
                let ok = embedding(g) == Some(false) && embedding(f) == Some(false);
                if !ok {
                    notes.push(format!(
                        "jumps of {g:?}: {f:?} is left out (a chain serves one kind)"
                    ));
                }
                ok
            });
        }
        self.notes.extend(notes);
    }

    fn name_deployments(&mut self) {
        let mut counts: IndexMap<String, usize> = IndexMap::new();
        for d in &self.deployments {
            *counts.entry(d.group.clone()).or_default() += 1;
        }
        let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
        for i in 0..self.deployments.len() {
            let d = &self.deployments[i];
            let base = if counts.get(&d.group).copied().unwrap_or(0) > 1 {
                format!("{}-{}", d.group, d.provider)
            } else {
                d.group.clone()
            };
            let mut name = base.clone();
            let mut n = 2;
            // A deployment named like another group would shadow nothing (chains come
            // first), but reads as that group: keep them apart.
            while taken.contains(&name) || (name != d.group && self.groups.contains_key(&name)) {
                name = format!("{base}-{n}");
                n += 1;
            }
            taken.insert(name.clone());
            self.groups
                .entry(d.group.clone())
                .or_default()
                .push(name.clone());
            self.deployments[i].name = name;
        }
    }

    /// The whole cascade config as a JSON tree, in the order a person reads it, and
    /// the models given a context window from cascade's table.
    fn tree(&self, dropped_jumps: &[(String, &'static str)]) -> (Value, Vec<String>) {
        let mut root = Map::new();
        for (k, v) in &self.top {
            root.insert(k.clone(), v.clone());
        }
        let mut providers = Map::new();
        for (name, p) in &self.providers {
            let mut m = Map::new();
            m.insert("kind".into(), json!(p.kind));
            m.insert("base_url".into(), json!(p.base_url));
            if let Some(k) = &p.api_key {
                m.insert("api_key".into(), json!(k));
            }
            if let Some(v) = &p.api_version {
                m.insert("api_version".into(), json!(v));
            }
            if !p.headers.is_empty() {
                let h: Map<String, Value> = p
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect();
                m.insert("extra_headers".into(), Value::Object(h));
            }
            providers.insert(name.clone(), Value::Object(m));
        }
        root.insert("providers".into(), Value::Object(providers));
        // Models of a chain that jumps on context_overflow need their windows.
        let mut windowed = std::collections::HashSet::new();
        let mut chains = Map::new();
        for group in self.groups.keys() {
            let mut members: Vec<String> = self.members(group);
            for f in self.fallbacks.get(group).into_iter().flatten() {
                for m in self.members(f) {
                    if !members.contains(&m) {
                        members.push(m);
                    }
                }
            }
            let mut on = Map::new();
            for (class, to) in self.jumps.get(group).into_iter().flatten() {
                let targets = self.members(to);
                for m in &targets {
                    if !members.contains(m) {
                        members.push(m.clone());
                    }
                }
                let dropped = dropped_jumps.iter().any(|(c, k)| c == group && k == class);
                if !on.contains_key(*class) && !dropped {
                    if let Some(first) = targets.first() {
                        on.insert((*class).into(), json!({ "jump_to": first }));
                    }
                }
            }
            if self
                .jumps
                .get(group)
                .is_some_and(|j| j.iter().any(|(c, _)| *c == "context_overflow"))
            {
                windowed.extend(members.iter().cloned());
            }
            // LiteLLM retries a group, then falls back; cascade's chain shares one
            // attempt budget, which must cover every member's retries.
            let attempts: u64 = members.iter().map(|m| 1 + self.max_retries(m)).sum();
            let chain = if on.is_empty() && attempts <= u64::from(super::DEFAULT_MAX_ATTEMPTS) {
                json!(members)
            } else {
                let mut c = Map::new();
                c.insert("models".into(), json!(members));
                if !on.is_empty() {
                    c.insert("on".into(), Value::Object(on));
                }
                if attempts > u64::from(super::DEFAULT_MAX_ATTEMPTS) {
                    c.insert("max_attempts".into(), json!(attempts));
                }
                Value::Object(c)
            };
            chains.insert(group.clone(), chain);
        }
        let mut models = Map::new();
        let mut from_table = Vec::new();
        for d in &self.deployments {
            let mut m = Map::new();
            m.insert("provider".into(), json!(d.provider));
            m.insert("model_id".into(), json!(d.model_id));
            for (k, v) in &d.fields {
                m.insert(k.clone(), v.clone());
            }
            if !m.contains_key("context_window") && windowed.contains(&d.name) {
                if let Some(w) = known_window(&d.model_id) {
                    m.insert("context_window".into(), json!(w));
                    from_table.push(format!("{} ({w})", d.name));
                }
            }
            models.insert(d.name.clone(), Value::Object(m));
        }
        root.insert("models".into(), Value::Object(models));
        root.insert("chains".into(), Value::Object(chains));
        (Value::Object(root), from_table)
    }

    /// A pool model's same-target retries: its own, else the global, else cascade's 2.
    fn max_retries(&self, model: &str) -> u64 {
        let own = self
            .deployments
            .iter()
            .find(|d| d.name == model)
            .and_then(|d| d.fields.get("retry")?.get("max_retries")?.as_u64());
        own.or_else(|| self.top.get("retry")?.get("max_retries")?.as_u64())
            .unwrap_or(2)
    }

    fn members(&self, group: &str) -> Vec<String> {
        self.groups.get(group).cloned().unwrap_or_default()
    }
}

/// The tree with its variables replaced by values of the right shape for the field
/// they sit in (a URL for a base URL), to check the output without the environment.
fn for_check(tree: &Value) -> Value {
    let mut t = tree.clone();
    if let Some(providers) = t.get_mut("providers").and_then(Value::as_object_mut) {
        for p in providers.values_mut() {
            if let Some(Value::String(url)) = p.get_mut("base_url") {
                if let Some(rest) = url.strip_prefix("${") {
                    let after = rest.split_once('}').map_or("", |(_, a)| a);
                    *url = format!("http://127.0.0.1:9{after}");
                }
                *url = without_vars(url, "x");
            }
        }
    }
    for path in [["state", "redis_url"], ["cache", "redis_url"]] {
        if let Some(Value::String(url)) = t.get_mut(path[0]).and_then(|v| v.get_mut(path[1])) {
            if url.contains("${") {
                *url = "redis://127.0.0.1:6379".into();
            }
        }
    }
    t
}

fn without_vars(s: &str, with: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        match rest[i..].find('}') {
            Some(end) => {
                out.push_str(with);
                rest = &rest[i + end + 1..];
            }
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// LiteLLM's provider prefixes with a cascade wire format: (kind, default base URL,
/// the key's environment variable as LiteLLM reads it).
type Kind = (&'static str, Option<&'static str>, Option<&'static str>);
const PREFIXES: &[(&str, Kind)] = &[
    (
        "openai",
        (
            "openai",
            Some("https://api.openai.com/v1"),
            Some("OPENAI_API_KEY"),
        ),
    ),
    ("azure", ("azure_openai", None, Some("AZURE_API_KEY"))),
    (
        "anthropic",
        (
            "anthropic",
            Some("https://api.anthropic.com"),
            Some("ANTHROPIC_API_KEY"),
        ),
    ),
    (
        "gemini",
        (
            "gemini",
            Some("https://generativelanguage.googleapis.com"),
            Some("GEMINI_API_KEY"),
        ),
    ),
    (
        "groq",
        (
            "openai_compatible",
            Some("https://api.groq.com/openai/v1"),
            Some("GROQ_API_KEY"),
        ),
    ),
    (
        "together_ai",
        (
            "openai_compatible",
            Some("https://api.together.xyz/v1"),
            Some("TOGETHERAI_API_KEY"),
        ),
    ),
    (
        "mistral",
        (
            "openai_compatible",
            Some("https://api.mistral.ai/v1"),
            Some("MISTRAL_API_KEY"),
        ),
    ),
    (
        "deepseek",
        (
            "openai_compatible",
            Some("https://api.deepseek.com/v1"),
            Some("DEEPSEEK_API_KEY"),
        ),
    ),
    (
        "fireworks_ai",
        (
            "openai_compatible",
            Some("https://api.fireworks.ai/inference/v1"),
            Some("FIREWORKS_AI_API_KEY"),
        ),
    ),
    (
        "openrouter",
        (
            "openai_compatible",
            Some("https://openrouter.ai/api/v1"),
            Some("OPENROUTER_API_KEY"),
        ),
    ),
    (
        "perplexity",
        (
            "openai_compatible",
            Some("https://api.perplexity.ai"),
            Some("PERPLEXITYAI_API_KEY"),
        ),
    ),
    (
        "xai",
        (
            "openai_compatible",
            Some("https://api.x.ai/v1"),
            Some("XAI_API_KEY"),
        ),
    ),
    (
        "deepinfra",
        (
            "openai_compatible",
            Some("https://api.deepinfra.com/v1/openai"),
            Some("DEEPINFRA_API_KEY"),
        ),
    ),
    (
        "ollama",
        ("openai_compatible", Some("http://localhost:11434/v1"), None),
    ),
    (
        "ollama_chat",
        ("openai_compatible", Some("http://localhost:11434/v1"), None),
    ),
    ("hosted_vllm", ("openai_compatible", None, None)),
    (
        "lm_studio",
        ("openai_compatible", Some("http://localhost:1234/v1"), None),
    ),
    ("text-completion-openai", ("", None, None)),
    ("bedrock", ("", None, None)),
    ("vertex_ai", ("", None, None)),
    ("cohere", ("", None, None)),
    ("huggingface", ("", None, None)),
    ("replicate", ("", None, None)),
    ("sagemaker", ("", None, None)),
];

/// A model name without a prefix, as LiteLLM reads it.
fn infer_prefix(model: &str) -> &'static str {
    if model.starts_with("claude") {
        "anthropic"
    } else if model.starts_with("gemini") {
        "gemini"
    } else {
        "openai"
    }
}

/// `os.environ/VAR` as `${VAR}`.
fn env(s: &str) -> String {
    match s.strip_prefix("os.environ/") {
        Some(var) => format!("${{{var}}}"),
        None => s.to_string(),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn with_v1(base: &str) -> String {
    let b = base.trim_end_matches('/');
    if b.ends_with("/v1") {
        b.to_string()
    } else {
        format!("{b}/v1")
    }
}

fn redis_url(m: &Map<String, Value>) -> Option<String> {
    let host = m
        .get("redis_host")
        .or_else(|| m.get("host"))
        .map(|v| env(&scalar(v)))?;
    let port = m
        .get("redis_port")
        .or_else(|| m.get("port"))
        .map(|v| env(&scalar(v)))
        .unwrap_or_else(|| "6379".into());
    let password = m
        .get("redis_password")
        .or_else(|| m.get("password"))
        .map(|v| env(&scalar(v)));
    // Literal parts are percent-encoded (a password may hold `@` or `/`); `${VAR}`
    // stays as written for the environment to fill in.
    let enc = |s: String| {
        if s.contains("${") {
            s
        } else {
            url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
        }
    };
    Some(match password {
        Some(p) if !p.is_empty() => format!("redis://:{}@{}:{}", enc(p), enc(host), enc(port)),
        _ => format!("redis://{}:{}", enc(host), enc(port)),
    })
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn round(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}

/// Seconds (LiteLLM's unit) as a cascade duration.
fn duration(secs: f64) -> String {
    let ms = (secs * 1000.0).round() as u64;
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Context windows of common models, for `context_window_fallbacks` whose configs
/// give none (LiteLLM reads them from its model map).
fn known_window(model_id: &str) -> Option<u64> {
    // Exact ids, then families whose every member shares one window. An id not here
    // gets none: a guess too small would skip a target that fits.
    const EXACT: &[(&str, u64)] = &[
        ("gpt-4", 8_192),
        ("gpt-4-0613", 8_192),
        ("gpt-4-32k", 32_768),
        ("gpt-4-32k-0613", 32_768),
        ("gpt-4-1106-preview", 128_000),
        ("gpt-4-0125-preview", 128_000),
        ("gpt-4-vision-preview", 128_000),
        ("gpt-3.5-turbo", 16_385),
        ("gpt-3.5-turbo-0125", 16_385),
        ("gpt-3.5-turbo-1106", 16_385),
        ("gpt-3.5-turbo-16k", 16_385),
        ("o1", 200_000),
        ("o1-mini", 128_000),
        ("o1-preview", 128_000),
        ("o3", 200_000),
        ("o3-mini", 200_000),
        ("o4-mini", 200_000),
    ];
    const FAMILIES: &[(&str, u64)] = &[
        ("gpt-4o", 128_000),
        ("gpt-4-turbo", 128_000),
        ("gpt-4.1", 1_047_576),
        ("claude-3", 200_000),
        ("claude-sonnet-4", 200_000),
        ("claude-opus-4", 200_000),
        ("claude-haiku-4", 200_000),
        ("gemini-1.5-pro", 2_097_152),
        ("gemini-1.5-flash", 1_048_576),
        ("gemini-2.0-flash", 1_048_576),
        ("gemini-2.5", 1_048_576),
    ];
    let id = model_id.rsplit('/').next().unwrap_or(model_id);
    EXACT
        .iter()
        .find(|(m, _)| *m == id)
        .or_else(|| FAMILIES.iter().find(|(p, _)| id.starts_with(p)))
        .map(|(_, w)| *w)
}

fn known_dimensions(model_id: &str) -> Option<u64> {
    const DIMS: &[(&str, u64)] = &[
        ("text-embedding-3-large", 3072),
        ("text-embedding-3-small", 1536),
        ("text-embedding-ada-002", 1536),
    ];
    let id = model_id.rsplit('/').next().unwrap_or(model_id);
    DIMS.iter()
        .find(|(p, _)| id.starts_with(p))
        .map(|(_, d)| *d)
}

/// Block-style YAML for a JSON tree; lists of scalars in flow style.
fn emit(v: &Value) -> String {
    let mut out = String::new();
    if let Value::Object(m) = v {
        emit_map(m, 0, &mut out);
    }
    out
}

fn emit_map(m: &Map<String, Value>, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in m {
        out.push_str(&pad);
        out.push_str(&yaml_scalar(&Value::String(k.clone())));
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_map(inner, indent + 2, out);
            }
            Value::Object(_) => out.push_str(" {}\n"),
            Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
                let items: Vec<String> = items.iter().map(yaml_scalar).collect();
                out.push_str(&format!(" [{}]\n", items.join(", ")));
            }
            Value::Array(items) => {
                out.push('\n');
                for i in items {
                    out.push_str(&pad);
                    out.push_str("  - ");
                    out.push_str(&yaml_scalar(i));
                    out.push('\n');
                }
            }
            other => {
                out.push(' ');
                out.push_str(&yaml_scalar(other));
                out.push('\n');
            }
        }
    }
}

/// A scalar, quoted (JSON style, which YAML reads) unless it is plainly a word.
fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let plain = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
                && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && !["true", "false", "yes", "no", "on", "off", "null", "y", "n"]
                    .contains(&s.to_ascii_lowercase().as_str());
            if plain {
                s.clone()
            } else {
                // JSON escapes C0 controls; YAML also wants DEL and C1 escaped.
                let mut q = String::with_capacity(s.len() + 2);
                for c in serde_json::to_string(s).unwrap_or_default().chars() {
                    if ('\u{7f}'..='\u{9f}').contains(&c) {
                        q.push_str(&format!("\\u{:04x}", c as u32));
                    } else {
                        q.push(c);
                    }
                }
                q
            }
        }
        other => other.to_string(),
    }
}
