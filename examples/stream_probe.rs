//! Measures streaming latency for `bench/`: time to the first content chunk and the gaps
//! between chunks, over N sequential streamed requests.
//!
//! `cargo run --release --example stream_probe -- URL MODEL N` prints JSON:
//! `{"ttft_ms":[..],"gap_ms":[..],"chunks":[..],"errors":n}`.

use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, model, n) = match args.as_slice() {
        [_, url, model, n, ..] => (
            url.clone(),
            model.clone(),
            n.parse::<usize>().unwrap_or(100),
        ),
        _ => {
            eprintln!("usage: stream_probe URL MODEL N");
            std::process::exit(2);
        }
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .expect("client");
    let body = serde_json::json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "stream please"}]}).to_string();
    let (mut ttft, mut gaps, mut chunks, mut errors) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
    for _ in 0..n {
        let start = Instant::now();
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let Ok(mut resp) = resp else {
            errors += 1;
            continue;
        };
        let mut buf = Vec::new();
        let mut count = 0usize;
        let mut last: Option<Instant> = None;
        while let Ok(Some(bytes)) = resp.chunk().await {
            buf.extend_from_slice(&bytes);
            // Count complete events carrying content.
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&event);
                if text.contains("\"content\":\"") && !text.contains("\"content\":\"\"") {
                    let now = Instant::now();
                    match last {
                        None => ttft.push(now.duration_since(start).as_secs_f64() * 1000.0),
                        Some(prev) => gaps.push(now.duration_since(prev).as_secs_f64() * 1000.0),
                    }
                    last = Some(now);
                    count += 1;
                }
            }
        }
        chunks.push(count);
    }
    println!(
        "{}",
        serde_json::json!({"ttft_ms": ttft, "gap_ms": gaps, "chunks": chunks, "errors": errors})
    );
}
