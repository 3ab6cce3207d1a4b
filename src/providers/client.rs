//! The upstream HTTP client: hyper's pooled client over rustls, shared by every call.
//! One connection pool with `TCP_NODELAY`; it never retries on its own (retries belong
//! to the target stack). Thinner than a full HTTP client library: the request path only
//! needs POST, headers, a body and a streamed answer.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::AttemptError;
use crate::classify::ErrorClass;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One client (one connection pool) per worker thread. A pooled connection is driven
/// by a task on the runtime that opened it, so with per-core workers a shared pool
/// would hand calls to another thread; see `crate::workers`.
pub struct HttpClients {
    per_worker: Box<[HttpClient]>,
}

impl HttpClients {
    pub fn new(pools: usize) -> Self {
        HttpClients {
            per_worker: (0..pools.max(1)).map(|_| http_client()).collect(),
        }
    }

    /// The calling worker's client.
    pub fn local(&self) -> &HttpClient {
        &self.per_worker[crate::workers::index() % self.per_worker.len()]
    }
}

/// The connector every upstream client uses: `TCP_NODELAY`, a 5 s connect timeout,
/// keep-alive probes, and TLS (webpki roots) or plain HTTP by the URL's scheme.
pub fn https_connector() -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .build(https_connector())
}

/// Sends one POST. Transport failures come back classified.
pub async fn post(
    client: &HttpClient,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response<Incoming>, AttemptError> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    client.request(req).await.map_err(|e| transport_error(&e))
}

/// The whole body (answers are bounded by the upstream; errors are cut at `limit`).
pub async fn read_body(body: Incoming, limit: Option<usize>) -> Result<Bytes, AttemptError> {
    match limit {
        None => crate::body::read_all(body)
            .await
            .map_err(|e| transport_error(&e)),
        Some(limit) => {
            let mut body = body;
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    let room = limit.saturating_sub(out.len());
                    out.extend_from_slice(&data[..data.len().min(room)]);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out.into())
        }
    }
}

/// The next data chunk of a streamed body; `None` at its end.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, AttemptError>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
                // Trailers carry nothing for us.
            }
            Err(e) => return Some(Err(transport_error(&e))),
        }
    }
}

/// A transport failure, classified, with its causes spelled out (never a URL).
pub(crate) fn transport_error(e: &(dyn std::error::Error + 'static)) -> AttemptError {
    let mut msg = e.to_string();
    let mut src = e.source();
    let mut timed_out = false;
    while let Some(s) = src {
        let text = s.to_string();
        timed_out |= text.contains("timed out");
        msg.push_str(": ");
        msg.push_str(&text);
        src = s.source();
    }
    let class = if timed_out {
        ErrorClass::Timeout
    } else {
        ErrorClass::Transient
    };
    AttemptError::new(class, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn each_worker_gets_its_own_pool() {
        let clients = Arc::new(HttpClients::new(2));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (clients.clone(), seen.clone());
        crate::workers::run(2, move |i| {
            let (c, s) = (c.clone(), s.clone());
            async move {
                let local: *const HttpClient = c.local();
                s.lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .push((i, local as usize));
                Ok(())
            }
        })
        .unwrap();
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        let expected: Vec<(usize, usize)> = (0..2)
            .map(|i| (i, &clients.per_worker[i] as *const HttpClient as usize))
            .collect();
        assert_eq!(seen, expected);
        assert_ne!(seen[0].1, seen[1].1);
    }

    #[test]
    fn outside_workers_the_first_pool_serves() {
        let one = HttpClients::new(1);
        assert!(std::ptr::eq(one.local(), &one.per_worker[0]));
        let zero = HttpClients::new(0);
        assert_eq!(zero.per_worker.len(), 1, "never an empty set");
    }
}
