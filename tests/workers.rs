//! `scheduler: per_core`: worker threads with their own runtimes and upstream pools,
//! serving one socket, draining on shutdown.

use std::sync::Arc;
use std::time::Duration;

use cascade::config::{Config, Scheduler};
use cascade::mock::MockServer;
use cascade::server::{self, AppState};
use serde_json::json;

const CONFIG: &str = r#"
server: { worker_threads: 2 }
store: { enabled: false }
providers:
  mock: { kind: openai, base_url: "{mock}", api_key: "sk-test" }
models:
  fast: { provider: mock, model_id: fast }
  slow: { provider: mock, model_id: slow }
chains:
  default: [fast]
  slow: [slow]
"#;

struct PerCore {
    addr: std::net::SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl PerCore {
    fn start(mock: &MockServer) -> PerCore {
        let yaml = CONFIG.replace("{mock}", &mock.url());
        let config = Config::from_yaml_with_env(&yaml, &|_| None).expect("valid config");
        assert_eq!(config.server.scheduler, Scheduler::PerCore, "the default");
        assert_eq!(config.server.worker_threads, 2);
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = AppState::new(Arc::new(config)).expect("state");
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            server::serve_per_core(served, listener, async move {
                let _ = stopped.await;
            })
        });
        PerCore {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Signals shutdown and waits (bounded) for every worker to return.
    async fn shut_down(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take().expect("running");
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::task::spawn_blocking(move || thread.join()),
        )
        .await
        .expect("workers stop within 10 s")
        .expect("join task")
        .expect("no worker panicked")
    }
}

impl Drop for PerCore {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A client that opens a new connection per request, so the workers share them out.
fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

async fn ask(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    model: &str,
) -> (u16, serde_json::Value) {
    let resp = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .send()
        .await
        .expect("gateway answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).expect("JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_answer_concurrent_connections_and_stop_on_signal() {
    let mock = MockServer::start("127.0.0.1:0").await.expect("mock");
    let gw = PerCore::start(&mock);
    let http = fresh_connections();
    let answers =
        futures_util::future::join_all((0..40).map(|_| ask(&http, gw.addr, "default"))).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "fast");
    }
    assert_eq!(mock.calls("fast"), 40);

    let addr = gw.addr;
    gw.shut_down().await.expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the socket is closed once every worker stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_shutdown_drains_requests_in_flight() {
    let mock = MockServer::start("127.0.0.1:0").await.expect("mock");
    mock.set("slow", "latency=300ms");
    let gw = PerCore::start(&mock);
    let http = fresh_connections();
    let addr = gw.addr;
    let in_flight: Vec<_> = (0..6)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { ask(&http, addr, "slow").await })
        })
        .collect();
    // Wait (bounded) until every request reached the upstream, then stop.
    for _ in 0..500 {
        if mock.calls("slow") == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(mock.calls("slow"), 6, "all six reached the mock");
    gw.shut_down().await.expect("clean shutdown");
    for r in in_flight {
        let (status, body) = r.await.expect("task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], "slow");
    }
}

impl PerCore {
    /// Open connections per worker, as `cascade_worker_connections` shows them.
    fn open_per_worker(&self) -> [i64; 2] {
        let g = &self.state.metrics.worker_connections;
        [
            g.with_label_values(&["0"]).get(),
            g.with_label_values(&["1"]).get(),
        ]
    }
}

/// Opens a keep-alive connection and has one request answered on it, so the gateway
/// has accepted it.
async fn open_connection(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("answered within 5 s")
            .expect("read");
        assert!(n > 0, "the gateway closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_share_keep_alive_connections_evenly() {
    let mock = MockServer::start("127.0.0.1:0").await.expect("mock");
    let gw = PerCore::start(&mock);
    // A client pool opening its connections at once: the first worker awake would
    // take the whole burst. (Bounds, not exact halves: a worker that waited its
    // 5 ms for a busy sibling takes the connection itself.)
    let burst = futures_util::future::join_all((0..16).map(|_| open_connection(gw.addr))).await;
    let [a, b] = gw.open_per_worker();
    assert_eq!(a + b, 16);
    assert!(
        (a - b).abs() <= 4,
        "sixteen connections shared out: {a} and {b}"
    );
    // Closed connections are counted off.
    drop(burst);
    for _ in 0..200 {
        if gw.open_per_worker() == [0, 0] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(gw.open_per_worker(), [0, 0]);
    // One after another, each to the worker holding fewer.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(open_connection(gw.addr).await);
    }
    let [a, b] = gw.open_per_worker();
    assert!(
        (a - b).abs() <= 2,
        "eight connections one by one: {a} and {b}"
    );
    drop(held);
    gw.shut_down().await.expect("clean shutdown");
}
