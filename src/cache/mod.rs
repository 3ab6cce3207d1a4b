//! The response cache: moka in process (bounded by bytes), Redis as an optional shared
//! tier, single-flight for identical misses, stale-if-error, and streaming replay.
//!
//! Stored: only complete answers whose `finish_reason` is `stop`, `length` or
//! `tool_calls`, in OpenAI's non-streaming shape. A streamed miss is assembled as it
//! passes (`Assembler`); a streamed hit is replayed as chunks (`replay`).

mod key;
mod redis_tier;

use crate::name::Name;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use moka::notification::RemovalCause;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;

pub use key::Key;

use crate::api::output::{self, Assembled, ChunkWriter};
use crate::api::{ChatRequest, Usage};
use crate::config::{CacheMode, CacheSettings, Chain};
use crate::metrics::Metrics;
use redis_tier::RedisTier;

/// One cached answer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The answer as a `chat.completion` body.
    pub body: Bytes,
    /// Pool and provider names of the model that answered.
    pub model: Name,
    pub provider: Name,
    pub stored: Instant,
    pub fresh_until: Instant,
    /// The stored answer carries `usage` (a stream stored without it does not).
    pub has_usage: bool,
}

impl Entry {
    /// Whether this entry can answer a request that does or does not expect usage.
    pub fn serves(&self, req: &ChatRequest) -> bool {
        self.has_usage || (req.stream && !req.include_usage)
    }

    fn weight(&self) -> u32 {
        (self.body.len() + self.model.len() + self.provider.len() + 96).min(u32::MAX as usize)
            as u32
    }

    pub fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until
    }

    /// Whole seconds since it was stored (the `Age` header).
    pub fn age_secs(&self) -> u64 {
        self.stored.elapsed().as_secs()
    }
}

/// The value of `x-cascade-cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }
}

/// What the cache may do for one request.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    pub key: Option<Key>,
    /// Look the request up (false with `Cache-Control: no-cache`).
    pub read: bool,
    /// Store the answer (false with `Cache-Control: no-store`).
    pub write: bool,
    pub ttl: Duration,
    /// Answer from an expired entry when the whole chain fails.
    pub stale: bool,
}

impl Decision {
    const BYPASS: Decision = Decision {
        key: None,
        read: false,
        write: false,
        ttl: Duration::ZERO,
        stale: false,
    };

    /// What a request that was not looked up reports.
    pub fn unread_outcome(&self) -> Outcome {
        if self.read {
            Outcome::Miss
        } else {
            Outcome::Bypass
        }
    }
}

/// The longest an entry stays fresh, whatever a request asks for.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Finish reasons of answers worth storing.
pub fn storable_finish(reason: Option<&str>) -> bool {
    matches!(reason, Some("stop" | "length" | "tool_calls"))
}

type Flight = Arc<OnceCell<Arc<dyn std::any::Any + Send + Sync>>>;

pub struct ResponseCache {
    settings: CacheSettings,
    store: moka::future::Cache<Key, Arc<Entry>>,
    inflight: Mutex<HashMap<Key, Flight>>,
    redis: Option<RedisTier>,
}

/// Entries live for their own TTL plus the stale window.
struct KeepFor {
    stale_ttl: Duration,
}

impl moka::Expiry<Key, Arc<Entry>> for KeepFor {
    fn expire_after_create(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.fresh_until.saturating_duration_since(v.stored) + self.stale_ttl)
    }
}

impl ResponseCache {
    pub fn new(settings: &CacheSettings, metrics: Arc<Metrics>) -> ResponseCache {
        let evictions = metrics.cache_evictions.clone();
        let store = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|_k: &Key, v: &Arc<Entry>| v.weight())
            .expire_after(KeepFor {
                stale_ttl: settings.stale_ttl,
            })
            .eviction_listener(move |_k, _v, cause| {
                let cause = match cause {
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit => "explicit",
                    RemovalCause::Replaced => "replaced",
                    RemovalCause::Size => "size",
                };
                evictions.with_label_values(&[cause]).inc();
            })
            .build();
        ResponseCache {
            redis: settings
                .redis_url
                .as_deref()
                .and_then(|u| RedisTier::new(u, metrics)),
            settings: settings.clone(),
            store,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// What the cache may do for `req` on `chain`, given the request's headers.
    /// The cache mode that applies to `chain` (its own, else the global one).
    pub fn mode(&self, chain: &Chain) -> CacheMode {
        chain.cache.mode.unwrap_or(self.settings.mode)
    }

    pub fn decide(&self, chain: &Chain, req: &ChatRequest, headers: &HeaderMap) -> Decision {
        let cacheable = match self.mode(chain) {
            CacheMode::Off => false,
            CacheMode::All => true,
            CacheMode::Deterministic => req.temperature == Some(0.0) || req.seed.is_some(),
        };
        if !cacheable {
            return Decision::BYPASS;
        }
        let directives: Vec<String> = headers
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        let ttl = headers
            .get("x-cascade-cache-ttl")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .or(chain.cache.ttl)
            .unwrap_or(self.settings.ttl)
            .min(MAX_TTL);
        // One tenant never sees another's answers: the caller's credentials namespace the key.
        let namespace = crate::api::tenant(headers).to_le_bytes();
        // A Messages request is keyed by its own bytes: fields with no chat form
        // (`thinking`, `cache_control`) still tell two requests apart.
        // ...and a Messages body is never read as a chat body of the same bytes.
        // A translated request (Responses) keeps its own entries too: they hold the
        // upstream's answer as it was judged, for that surface to write.
        let (body, chain_key) = match &req.native {
            Some(n) => (&n.body, format!("{}\u{0}messages", chain.name)),
            None if req.reads_answer => (&req.body, format!("{}\u{0}translated", chain.name)),
            None => (&req.body, String::new()),
        };
        let chain_key = if chain_key.is_empty() {
            &*chain.name
        } else {
            chain_key.as_str()
        };
        Decision {
            key: key::key(&namespace, chain_key, body),
            read: !directives.iter().any(|d| d == "no-cache"),
            write: !directives.iter().any(|d| d == "no-store") && !ttl.is_zero(),
            ttl,
            stale: chain.cache.stale.unwrap_or(true),
        }
    }

    /// An entry for `key`, fresh or not, from moka then Redis.
    pub async fn get(&self, key: Key) -> Option<Arc<Entry>> {
        if let Some(e) = self.store.get(&key).await {
            return Some(e);
        }
        let redis = self.redis.as_ref()?;
        let e = Arc::new(redis.get(key).await?);
        if Instant::now()
            < e.stored + self.keep_for(e.fresh_until.saturating_duration_since(e.stored))
        {
            self.store.insert(key, e.clone()).await;
            return Some(e);
        }
        None
    }

    fn keep_for(&self, ttl: Duration) -> Duration {
        ttl + self.settings.stale_ttl
    }

    /// Stores an answer in both tiers. Redis is written in the background.
    pub async fn put(
        self: &Arc<Self>,
        key: Key,
        body: Bytes,
        model: Name,
        provider: Name,
        ttl: Duration,
        has_usage: bool,
    ) {
        let now = Instant::now();
        let entry = Arc::new(Entry {
            body,
            model,
            provider,
            stored: now,
            fresh_until: now.checked_add(ttl).unwrap_or(now),
            has_usage,
        });
        self.store.insert(key, entry.clone()).await;
        if self.redis.is_some() {
            let this = self.clone();
            let keep = self.keep_for(ttl);
            tokio::spawn(async move {
                if let Some(r) = &this.redis {
                    r.set(key, &entry, keep).await;
                }
            });
        }
    }

    /// Runs `f` once for all concurrent callers with the same key; each gets its result.
    /// If the caller running it goes away, another waiter takes over.
    pub async fn single_flight<T, F, Fut>(&self, key: Key, f: F) -> Arc<T>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let cell: Flight = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        // Whether the flight ends or every caller goes away, its cell leaves the map.
        let _leave = LeaveFlight {
            map: &self.inflight,
            key,
            cell: cell.clone(),
        };
        let value = cell
            .get_or_init(|| async { Arc::new(f().await) as Arc<dyn std::any::Any + Send + Sync> })
            .await
            .clone();
        match value.downcast::<T>() {
            Ok(v) => v,
            // Every flight for one key runs the same code, so the types always agree.
            Err(_) => unreachable!("single-flight result of another type"),
        }
    }

    /// Bytes held in process (for `cascade_cache_bytes`).
    pub async fn weighted_size(&self) -> u64 {
        self.store.run_pending_tasks().await;
        self.store.weighted_size()
    }
}

/// Removes a single-flight cell from the map when the last caller that knew it leaves
/// (only the cell it put there: a newer flight for the key is left alone).
struct LeaveFlight<'a> {
    map: &'a Mutex<HashMap<Key, Flight>>,
    key: Key,
    cell: Flight,
}

impl Drop for LeaveFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
            && Arc::strong_count(&self.cell) <= 3
        {
            map.remove(&self.key);
        }
    }
}

#[derive(Deserialize)]
struct CompletionParts {
    id: String,
    model: String,
    choices: Vec<ChoiceParts>,
    /// Kept as it was, so a replay reports exactly what the upstream said.
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct ChoiceParts {
    message: MessageParts,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct MessageParts {
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallParts>,
}

#[derive(Deserialize)]
struct ToolCallParts {
    id: String,
    function: FunctionParts,
}

#[derive(Deserialize)]
struct FunctionParts {
    name: String,
    arguments: String,
}

/// A stored answer replayed as SSE events (`data: ...` lines, `[DONE]` last), which the
/// OpenAI SDK reassembles into the same message: text, reasoning, tool calls and usage.
pub fn replay(body: &[u8], include_usage: bool) -> Option<Vec<Bytes>> {
    let c: CompletionParts = serde_json::from_slice(body).ok()?;
    let choice = c.choices.into_iter().next()?;
    let w = ChunkWriter::new(c.id, c.model, include_usage);
    let mut chunks = vec![w.role()];
    let m = choice.message;
    if let Some(r) = m.reasoning_content.as_deref().filter(|r| !r.is_empty()) {
        chunks.push(w.reasoning(r));
    }
    if let Some(t) = m.content.as_deref().filter(|t| !t.is_empty()) {
        chunks.push(w.content(t));
    }
    for (i, call) in m.tool_calls.iter().enumerate() {
        chunks.push(w.tool_start(i, &call.id, &call.function.name, &call.function.arguments));
    }
    chunks.push(w.finish(choice.finish_reason.as_deref().unwrap_or("stop")));
    if include_usage {
        chunks.push(match c.usage {
            Some(u) => w.usage_value(u),
            None => w.usage(&Usage::default()),
        });
    }
    let mut events: Vec<Bytes> = chunks
        .into_iter()
        .map(|c| {
            let mut e = Vec::with_capacity(c.len() + 8);
            e.extend_from_slice(b"data: ");
            e.extend_from_slice(&c);
            e.extend_from_slice(b"\n\n");
            Bytes::from(e)
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Some(events)
}

/// More tool calls than any model makes in one turn: a stream claiming more is not stored.
const MAX_TOOL_CALLS: usize = 128;

/// Builds the non-streaming answer from a stream's chunks as they pass.
#[derive(Debug, Default)]
pub struct Assembler {
    /// JSON was asked for: store only an answer that parses.
    wants_json: bool,
    id: String,
    model: String,
    content: String,
    reasoning: String,
    /// By tool-call index: id, name, arguments.
    tools: Vec<(String, String, String)>,
    finish: Option<String>,
    usage: Option<Value>,
    broken: bool,
}

#[derive(Deserialize)]
struct ChunkParts {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    delta: Option<Value>,
    finish_reason: Option<String>,
}

impl Assembler {
    /// `wants_json`: the request asked for JSON, so only an answer that parses is stored.
    pub fn new(wants_json: bool) -> Self {
        Assembler {
            wants_json,
            ..Default::default()
        }
    }

    /// Feeds one chunk (its JSON).
    pub fn push(&mut self, data: &[u8]) {
        let Ok(c) = serde_json::from_slice::<ChunkParts>(data) else {
            self.broken = true;
            return;
        };
        if self.id.is_empty() {
            self.id = c.id;
            self.model = c.model;
        }
        if c.usage.as_ref().is_some_and(|u| !u.is_null()) {
            self.usage = c.usage;
        }
        for choice in c.choices {
            if choice.index != 0 {
                // Several choices (`n` > 1) are not stored.
                self.broken = true;
                continue;
            }
            if let Some(d) = &choice.delta {
                if let Some(t) = d["content"].as_str() {
                    self.content.push_str(t);
                }
                if let Some(t) = d["reasoning_content"].as_str() {
                    self.reasoning.push_str(t);
                }
                if d["refusal"].as_str().is_some_and(|r| !r.is_empty()) {
                    // Refusals are never stored.
                    self.broken = true;
                }
                for tc in d["tool_calls"].as_array().into_iter().flatten() {
                    let i = tc["index"].as_u64().unwrap_or(0) as usize;
                    if i >= MAX_TOOL_CALLS {
                        self.broken = true;
                        continue;
                    }
                    if self.tools.len() <= i {
                        self.tools.resize(i + 1, Default::default());
                    }
                    let slot = &mut self.tools[i];
                    if let Some(id) = tc["id"].as_str() {
                        slot.0 = id.to_string();
                    }
                    if let Some(n) = tc["function"]["name"].as_str() {
                        slot.1.push_str(n);
                    }
                    if let Some(a) = tc["function"]["arguments"].as_str() {
                        slot.2.push_str(a);
                    }
                }
            }
            if choice.finish_reason.is_some() {
                self.finish = choice.finish_reason;
            }
        }
    }

    /// Whether the stream reported its usage (entries without it cannot answer
    /// requests that expect it).
    pub fn has_usage(&self) -> bool {
        self.usage.is_some()
    }

    /// The whole answer, if the stream finished with a storable reason and has
    /// something in it (and, in JSON mode, parses).
    pub fn finish(self) -> Option<Bytes> {
        if self.broken || !storable_finish(self.finish.as_deref()) {
            return None;
        }
        if self.content.trim().is_empty() && self.tools.is_empty() {
            return None;
        }
        if self.wants_json
            && self.tools.is_empty()
            && !crate::api::response::parses_as_json(&self.content)
        {
            return None;
        }
        let reason: &'static str = match self.finish.as_deref() {
            Some("length") => "length",
            Some("tool_calls") => "tool_calls",
            _ => "stop",
        };
        let a = Assembled {
            content: (!self.content.is_empty()).then_some(self.content),
            reasoning: (!self.reasoning.is_empty()).then_some(self.reasoning),
            tool_calls: self.tools,
            finish_reason: reason,
            usage: None,
        };
        let mut body = output::completion_value(&self.id, &self.model, &a);
        if let Some(u) = self.usage {
            body["usage"] = u;
        }
        serde_json::to_vec(&body).ok().map(Bytes::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_and_assembly_round_trip() {
        let body = br#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi","reasoning_content":"think","tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let events = replay(body, true).unwrap();
        assert_eq!(events.last().unwrap().as_ref(), b"data: [DONE]\n\n");
        let mut asm = Assembler::default();
        for e in &events[..events.len() - 1] {
            asm.push(&e[6..e.len() - 2]);
        }
        let rebuilt: Value = serde_json::from_slice(&asm.finish().unwrap()).unwrap();
        let original: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            rebuilt["choices"][0]["message"]["content"],
            original["choices"][0]["message"]["content"]
        );
        assert_eq!(
            rebuilt["choices"][0]["message"]["reasoning_content"],
            "think"
        );
        assert_eq!(
            rebuilt["choices"][0]["message"]["tool_calls"],
            original["choices"][0]["message"]["tool_calls"]
        );
        assert_eq!(rebuilt["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(rebuilt["usage"]["total_tokens"], 5);
    }

    #[test]
    fn cut_or_filtered_streams_are_not_stored() {
        let mut asm = Assembler::default();
        asm.push(br#"{"id":"x","model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#);
        assert!(asm.finish().is_none(), "no finish: cut");
        let mut asm = Assembler::default();
        asm.push(br#"{"id":"x","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"content_filter"}]}"#);
        assert!(asm.finish().is_none());
    }
}
