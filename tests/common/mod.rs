//! Test harness: an in-process mock provider and gateway on ephemeral 127.0.0.1 ports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use cascade::config::Config;
use cascade::mock::MockServer;
use cascade::server::{self, AppState};
use serde_json::Value;

pub struct Harness {
    pub mock: MockServer,
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A three-target setup used by most tests: models `primary`, `secondary`, `tertiary`
/// (model ids `p`, `s`, `t`) on one mock; chain `main` walks them in order. Same-target
/// retries are off here, so each fallback trigger shows as exactly one call.
pub const THREE: &str = r#"
server:
  request_timeout: 60s
  attempt_timeout: 10s
retry: { max_retries: 0, seed: 1 }
providers:
  mock: { kind: openai, base_url: "{mock}", api_key: "sk-test-SECRET-123" }
models:
  primary:   { provider: mock, model_id: p, max_tokens: 100, context_window: 8000, cost_per_1k_input: 0.01, cost_per_1k_output: 0.02 }
  secondary: { provider: mock, model_id: s, context_window: 8000, fallbacks: [tertiary] }
  tertiary:  { provider: mock, model_id: t, context_window: 8000 }
chains:
  main: [primary, secondary, tertiary]
  default:
    models: [primary, secondary]
"#;

/// Starts a mock and a gateway whose config is `yaml` with `{mock}` replaced by the
/// mock's `/v1` base URL and `{mock_addr}` by its address.
pub async fn start(yaml: &str) -> Harness {
    let mock = MockServer::start("127.0.0.1:0").await.expect("mock starts");
    let mut yaml = yaml
        .replace("{mock}", &mock.url())
        .replace("{mock_addr}", &mock.addr.to_string());
    // The store is on by default; tests that don't test it keep it off.
    if !yaml.contains("\nstore:") {
        yaml.push_str("\nstore: { enabled: false }\n");
    }
    let config = Config::from_yaml_with_env(&yaml, &|_| None).expect("valid test config");
    let state = AppState::new(Arc::new(config)).expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn({
        let state = state.clone();
        async move {
            let _ = server::serve(state, listener, std::future::pending()).await;
        }
    });
    Harness {
        mock,
        addr,
        state,
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        task,
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        self.text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Every chunk of an SSE body, parsed (the `[DONE]` marker left out).
    pub fn chunks(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("bad chunk ({err}): {e}")))
            .collect()
    }

    /// The concatenated `delta.content` of every chunk.
    pub fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }
}

impl Harness {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .http
            .post(self.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        reply(req.send().await.expect("gateway answers")).await
    }

    pub async fn chat(&self, model: &str, headers: &[(&str, &str)]) -> Reply {
        self.post_raw(chat_body(model, false).to_string(), headers)
            .await
    }

    pub async fn chat_stream(&self, model: &str, headers: &[(&str, &str)]) -> Reply {
        self.post_raw(chat_body(model, true).to_string(), headers)
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("gateway answers");
        reply(resp).await
    }
}

async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    Reply {
        status,
        headers,
        text,
    }
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "stream": stream,
    })
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cascade-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
pub mod process;

/// The entry for pool model `name` in a `GET /admin/health` answer.
pub fn health_of(health: &Value, name: &str) -> Value {
    health["targets"]
        .as_array()
        .expect("a targets list")
        .iter()
        .find(|t| t["model"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no target {name} in {health}"))
}
pub mod postgres;
pub mod redis;
pub mod stores;
