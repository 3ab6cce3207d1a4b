//! Micro-benchmarks of the request path: parsing, pass-through splicing, each
//! translator (whole answers and per SSE event), cache-key hashing, chain resolution.
//! Run with `cargo bench`; CI builds them (`cargo bench --no-run`) so they cannot rot.

use bytes::Bytes;
use cascade::api::ChatRequest;
use cascade::config::Config;
use cascade::providers::sse::{SseDecoder, SseEvent};
use cascade::providers::{anthropic, gemini};
use divan::{black_box, Bencher};

fn main() {
    divan::main();
}

fn request(size: usize) -> Bytes {
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    Bytes::from(
        serde_json::json!({
            "model": "default",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": &text[..size]}
            ]
        })
        .to_string(),
    )
}

const CONFIG: &str = r#"
providers: { p: { kind: openai, base_url: "http://127.0.0.1:9/v1" } }
models:
  a: { provider: p, model_id: a }
  b: { provider: p, model_id: b, fallbacks: [a] }
chains:
  default: [a, b]
  other: [b, a]
"#;

#[divan::bench(args = [1024, 16384])]
fn parse_request(bencher: Bencher, size: usize) {
    let body = request(size);
    bencher.bench(|| ChatRequest::parse(black_box(body.clone())).map(|r| r.stream));
}

#[divan::bench(args = [1024, 16384])]
fn splice_model_for_pass_through(bencher: Bencher, size: usize) {
    let req = ChatRequest::parse(request(size)).unwrap();
    bencher.bench(|| black_box(&req).body_for_model("\"gpt-4o-mini\""));
}

#[divan::bench(args = [1024, 16384])]
fn cache_key(bencher: Bencher, size: usize) {
    let config = Config::from_yaml_with_env(CONFIG, &|_| None).unwrap();
    let cache = cascade::cache::ResponseCache::new(
        &config.cache,
        std::sync::Arc::new(cascade::metrics::Metrics::new()),
    );
    let req = ChatRequest::parse(request(size)).unwrap();
    let chain = config.chains["default"].clone();
    let headers = http::HeaderMap::new();
    bencher.bench(|| {
        cache
            .decide(black_box(&chain), black_box(&req), &headers)
            .key
    });
}

#[divan::bench]
fn resolve_chain(bencher: Bencher) {
    let config = Config::from_yaml_with_env(CONFIG, &|_| None).unwrap();
    bencher.bench(|| {
        cascade::routing::resolve(black_box(&config), None, Some(black_box("b")))
            .map(|c| c.targets.len())
    });
}

#[divan::bench]
fn to_anthropic(bencher: Bencher) {
    let req = ChatRequest::parse(request(1024)).unwrap();
    let chat = req.typed().unwrap().clone();
    bencher.bench(|| anthropic::to_anthropic(black_box(&chat), "claude-x", Some(1024), true));
}

#[divan::bench]
fn to_gemini(bencher: Bencher) {
    let req = ChatRequest::parse(request(1024)).unwrap();
    let chat = req.typed().unwrap().clone();
    bencher.bench(|| gemini::to_gemini(black_box(&chat), Some(1024)));
}

#[divan::bench]
fn from_anthropic(bencher: Bencher) {
    let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"Hello there, this is a short answer."}],"stop_reason":"end_turn","usage":{"input_tokens":20,"output_tokens":9}}"#;
    bencher.bench(|| anthropic::from_anthropic(black_box(body), "claude-x"));
}

#[divan::bench]
fn anthropic_stream_event(bencher: Bencher) {
    let ev = SseEvent {
        event: Some("content_block_delta".into()),
        data: Bytes::from_static(br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello "}}"#),
    };
    let mut state = anthropic::StreamState::with_model_id("claude-x".into(), false);
    bencher.bench_local(|| state.on_event(black_box(&ev)).map(|v| v.len()));
}

#[divan::bench]
fn gemini_stream_event(bencher: Bencher) {
    let ev = SseEvent {
        event: None,
        data: Bytes::from_static(br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello "}]},"index":0}],"responseId":"r1"}"#),
    };
    let mut state = gemini::StreamState::with_model_id("gemini-x".into(), false);
    bencher.bench_local(|| state.on_event(black_box(&ev)).map(|v| v.len()));
}

#[divan::bench]
fn openai_answer_view(bencher: Bencher) {
    let body = br#"{"id":"chatcmpl-mock0","object":"chat.completion","created":1795302140,"model":"ok","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from ok! This is a mock answer.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":265,"completion_tokens":4,"total_tokens":269}}"#;
    bencher.bench(|| {
        cascade::api::CompletionView::parse(black_box(body), false).map(|v| v.has_content)
    });
}

#[divan::bench]
fn openai_chunk_view(bencher: Bencher) {
    let chunk = br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hello "},"logprobs":null,"finish_reason":null}]}"#;
    bencher.bench(|| cascade::api::ChunkView::parse(black_box(chunk)).map(|v| v.has_content));
}

#[divan::bench]
fn sse_decode_event(bencher: Bencher) {
    let bytes = b"data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \"}}]}\n\n";
    bencher.bench_local(|| {
        let mut d = SseDecoder::new();
        d.push(black_box(bytes));
        d.next_event().map(|e| e.data.len())
    });
}

/// A Responses request of about `size` bytes of text.
fn responses_request(size: usize) -> Bytes {
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    Bytes::from(
        serde_json::json!({"model": "default", "instructions": "You are terse.", "input": &text[..size], "store": false})
            .to_string(),
    )
}

/// The Responses surface's own work on a request: parse it, translate it, build the
/// internal request (the chat surface's counterpart is `parse_request`).
#[divan::bench(args = [1024, 16384])]
fn responses_request_to_chat(bencher: Bencher, size: usize) {
    let body = responses_request(size);
    bencher.bench(|| {
        let wire = cascade::api::responses::parse(black_box(&body)).unwrap();
        cascade::api::responses::translate(wire, &[]).map(|t| t.chat.messages)
    });
}

/// The Messages surface's own work for an Anthropic target: parse the client's
/// Messages body once (keeping its bytes), and build the internal request.
#[divan::bench(args = [1024, 16384])]
fn messages_request_native(bencher: Bencher, size: usize) {
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    let body = Bytes::from(
        serde_json::json!({"model": "default", "max_tokens": 100, "system": "You are terse.",
                           "messages": [{"role": "user", "content": &text[..size]}]})
        .to_string(),
    );
    bencher.bench(|| {
        cascade::api::messages::translate(black_box(&body))
            .map(|(t, n)| (t.stream, n.has_max_tokens))
    });
}

const CHAT_ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a short answer of a few words, as most are.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":300,"completion_tokens":16,"total_tokens":316}}"#;

/// The Responses surface's own work on an answer: read it once and write the
/// `response` object (the chat surface's counterpart is `openai_answer_view`).
#[divan::bench]
fn responses_answer_from_chat(bencher: Bencher) {
    let meta = cascade::api::responses::Meta::new(cascade::api::responses::Echo::default());
    bencher.bench(|| {
        let a = cascade::api::answer::ChatAnswer::parse(black_box(CHAT_ANSWER)).unwrap();
        serde_json::to_vec(&cascade::api::responses::from_answer(&meta, "gpt-4o", &a))
            .map(|v| v.len())
    });
}

/// One Responses stream event from one chat chunk.
#[divan::bench]
fn responses_stream_chunk(bencher: Bencher) {
    let meta = cascade::api::responses::Meta::new(cascade::api::responses::Echo::default());
    let mut ev = cascade::api::responses::Events::new(meta, "gpt-4o");
    let mut out = Vec::new();
    ev.chunk(
        br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
        &mut out,
    );
    let chunk = br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":" there"},"finish_reason":null}]}"#;
    bencher.bench_local(|| {
        out.clear();
        ev.chunk(black_box(chunk), &mut out);
        out.len()
    });
}
