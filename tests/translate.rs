//! Golden tests for each direction of each translation. Inputs are real-shaped JSON
//! from the wire-format reference, under `tests/fixtures/`; outputs are snapshots in
//! `tests/fixtures/<provider>/{requests,responses}/`. Run with `UPDATE_GOLDEN=1` to
//! rewrite the snapshots after a deliberate change, then review the diff.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use cascade::api::chat::TypedChat;
use cascade::config::Config;
use cascade::providers::sse::SseEvent;
use cascade::providers::{anthropic, errors, gemini, StreamItem};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares `actual` with the snapshot at `path` (or writes it with UPDATE_GOLDEN=1).
fn golden(path: PathBuf, actual: &Value) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(actual).unwrap() + "\n").unwrap();
        return;
    }
    assert!(
        path.exists(),
        "missing snapshot {} (run with UPDATE_GOLDEN=1)",
        path.display()
    );
    let expected = read(&path);
    assert_eq!(
        &expected,
        actual,
        "snapshot {} differs:\n{}",
        path.display(),
        serde_json::to_string_pretty(actual).unwrap()
    );
}

fn cases(file: &str) -> Vec<Value> {
    read(&fixtures().join(file)).as_array().unwrap().clone()
}

/// The translated answer without its clock-dependent `created`.
fn answer(bytes: Bytes) -> Value {
    let mut v: Value = serde_json::from_slice(&bytes).unwrap();
    v.as_object_mut().unwrap().shift_remove("created");
    v
}

#[test]
fn openai_requests_to_anthropic() {
    for case in cases("openai_requests.json") {
        let chat: TypedChat = serde_json::from_value(case["request"].clone()).unwrap();
        let stream = case["request"]["stream"].as_bool().unwrap_or(false);
        let out = anthropic::to_anthropic(&chat, "claude-x", Some(4096), stream).unwrap();
        golden(
            fixtures().join(format!(
                "anthropic/requests/{}.json",
                case["name"].as_str().unwrap()
            )),
            &out,
        );
    }
}

#[test]
fn openai_requests_to_gemini() {
    for case in cases("openai_requests.json") {
        let chat: TypedChat = serde_json::from_value(case["request"].clone()).unwrap();
        let out = gemini::to_gemini(&chat, Some(4096)).unwrap();
        golden(
            fixtures().join(format!(
                "gemini/requests/{}.json",
                case["name"].as_str().unwrap()
            )),
            &out,
        );
    }
}

#[test]
fn anthropic_responses_to_openai() {
    for case in cases("anthropic/responses.json") {
        let body = serde_json::to_vec(&case["response"]).unwrap();
        let out = answer(anthropic::from_anthropic(&body, "claude-x").unwrap());
        check_usage_invariants(&out["usage"]);
        golden(
            fixtures().join(format!(
                "anthropic/responses/{}.json",
                case["name"].as_str().unwrap()
            )),
            &out,
        );
    }
}

#[test]
fn gemini_responses_to_openai() {
    for case in cases("gemini/responses.json") {
        let body = serde_json::to_vec(&case["response"]).unwrap();
        let out = answer(gemini::from_gemini(&body, "gemini-x").unwrap());
        if !out["usage"].is_null() {
            check_usage_invariants(&out["usage"]);
        }
        golden(
            fixtures().join(format!(
                "gemini/responses/{}.json",
                case["name"].as_str().unwrap()
            )),
            &out,
        );
    }
}

fn check_usage_invariants(u: &Value) {
    let n = |k: &str| u[k].as_u64().unwrap();
    assert_eq!(
        n("total_tokens"),
        n("prompt_tokens") + n("completion_tokens"),
        "{u}"
    );
    assert!(
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            <= n("prompt_tokens")
    );
    assert!(
        u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            <= n("completion_tokens")
    );
}

/// What the OpenAI SDK rebuilds from a stream (or reads from a whole answer).
#[derive(Debug, PartialEq)]
struct Message {
    content: Option<String>,
    tool_calls: Vec<(String, String, Value)>,
    finish_reason: String,
    usage: Value,
}

fn from_answer(v: &Value) -> Message {
    let m = &v["choices"][0]["message"];
    Message {
        content: m["content"].as_str().map(str::to_string),
        tool_calls: m["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let args =
                    serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
                (
                    c["id"].as_str().unwrap().into(),
                    c["function"]["name"].as_str().unwrap().into(),
                    args,
                )
            })
            .collect(),
        finish_reason: v["choices"][0]["finish_reason"].as_str().unwrap().into(),
        usage: v["usage"].clone(),
    }
}

/// Reassembles chunks the way the OpenAI SDK does, checking the stream invariants.
fn from_chunks(chunks: &[Value]) -> Message {
    let ids: std::collections::HashSet<_> = chunks
        .iter()
        .map(|c| (c["id"].clone(), c["created"].clone(), c["model"].clone()))
        .collect();
    assert_eq!(ids.len(), 1, "same id, created and model in every chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content: Option<String> = None;
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = Vec::new();
    let mut usage = Value::Null;
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        if c["choices"].as_array().unwrap().is_empty() {
            usage = c["usage"].clone();
            continue;
        }
        assert!(usage.is_null(), "the usage chunk comes last");
        let d = &c["choices"][0]["delta"];
        if let Some(t) = d["content"].as_str().filter(|t| !t.is_empty()) {
            content.get_or_insert_with(String::new).push_str(t);
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert!(
                    tc["id"].is_string() && tc["function"]["name"].is_string(),
                    "first delta names the call"
                );
                assert_eq!(tc["type"], "function");
                calls.push((
                    tc["id"].as_str().unwrap().into(),
                    tc["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            }
            calls[i]
                .2
                .push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish.push(f.to_string());
        }
    }
    assert_eq!(finish.len(), 1, "exactly one finish_reason");
    Message {
        content,
        tool_calls: calls
            .into_iter()
            .map(|(id, name, args)| {
                let args = if args.is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&args).unwrap()
                };
                (id, name, args)
            })
            .collect(),
        finish_reason: finish.remove(0),
        usage,
    }
}

fn run_stream(
    events: &[Value],
    mut feed: impl FnMut(&SseEvent) -> Vec<StreamItem>,
    tail: Vec<StreamItem>,
) -> Vec<Value> {
    let mut items: Vec<StreamItem> = events
        .iter()
        .flat_map(|e| {
            feed(&SseEvent {
                event: e["type"].as_str().map(str::to_string),
                data: Bytes::from(e.to_string()),
            })
        })
        .collect();
    items.extend(tail);
    assert_eq!(items.last(), Some(&StreamItem::Done));
    items
        .iter()
        .filter_map(|i| match i {
            StreamItem::Chunk { data, .. } => Some(serde_json::from_slice(data).unwrap()),
            StreamItem::Done | StreamItem::Usage(_) => None,
        })
        .collect()
}

#[test]
fn anthropic_stream_reassembles_to_the_non_streaming_answer() {
    let case = read(&fixtures().join("anthropic/stream.json"));
    let mut state = anthropic::StreamState::with_model_id("claude-x".into(), true);
    let chunks = run_stream(
        case["events"].as_array().unwrap(),
        |e| state.on_event(e).unwrap(),
        Vec::new(),
    );
    let whole =
        anthropic::from_anthropic(&serde_json::to_vec(&case["same_as"]).unwrap(), "claude-x")
            .unwrap();
    assert_eq!(
        from_chunks(&chunks),
        from_answer(&serde_json::from_slice(&whole).unwrap())
    );
    golden(
        fixtures().join("anthropic/stream.chunks.json"),
        &strip_created(chunks),
    );
}

#[test]
fn gemini_stream_reassembles_to_the_non_streaming_answer() {
    let case = read(&fixtures().join("gemini/stream.json"));
    let mut state = gemini::StreamState::with_model_id("gemini-x".into(), true);
    let mut chunks = Vec::new();
    for e in case["events"].as_array().unwrap() {
        let ev = SseEvent {
            event: None,
            data: Bytes::from(e.to_string()),
        };
        chunks.extend(state.on_event(&ev).unwrap());
    }
    chunks.extend(state.at_eof());
    assert_eq!(chunks.last(), Some(&StreamItem::Done));
    let chunks: Vec<Value> = chunks
        .iter()
        .filter_map(|i| match i {
            StreamItem::Chunk { data, .. } => Some(serde_json::from_slice(data).unwrap()),
            StreamItem::Done | StreamItem::Usage(_) => None,
        })
        .collect();
    let whole =
        gemini::from_gemini(&serde_json::to_vec(&case["same_as"]).unwrap(), "gemini-x").unwrap();
    assert_eq!(
        from_chunks(&chunks),
        from_answer(&serde_json::from_slice(&whole).unwrap())
    );
    golden(
        fixtures().join("gemini/stream.chunks.json"),
        &strip_created(chunks),
    );
}

#[test]
fn a_gemini_stream_cut_before_its_finish_is_not_complete() {
    let mut state = gemini::StreamState::with_model_id("gemini-x".into(), false);
    let ev = SseEvent {
        event: None,
        data: Bytes::from(
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hi"}]},"index":0}],"responseId":"r"}"#,
        ),
    };
    assert_eq!(state.on_event(&ev).unwrap().len(), 2);
    assert!(state.at_eof().is_empty(), "no [DONE] for a cut stream");
}

#[test]
fn anthropic_in_stream_error_is_classified() {
    let mut state = anthropic::StreamState::with_model_id("claude-x".into(), false);
    let ev = SseEvent {
        event: Some("error".into()),
        data: Bytes::from(
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ),
    };
    let e = state.on_event(&ev).unwrap_err();
    assert_eq!(e.class.as_str(), "transient");
    assert!(e.message.contains("overloaded_error"));
}

fn strip_created(chunks: Vec<Value>) -> Value {
    Value::Array(
        chunks
            .into_iter()
            .map(|mut c| {
                c.as_object_mut().unwrap().shift_remove("created");
                c
            })
            .collect(),
    )
}

fn any_model() -> std::sync::Arc<cascade::config::Model> {
    let yaml = r#"
providers: { p: { kind: openai, base_url: "http://127.0.0.1:9/v1", api_key: "sk-redact-me" } }
models: { m: { provider: p, model_id: x } }
"#;
    Config::from_yaml_with_env(yaml, &|_| None).unwrap().models["m"].clone()
}

#[test]
fn every_error_class_from_anthropic_and_gemini() {
    let model = any_model();
    for file in ["anthropic/errors.json", "gemini/errors.json"] {
        for case in cases(file) {
            let body = match &case["body"] {
                Value::String(s) => s.clone().into_bytes(),
                v => serde_json::to_vec(v).unwrap(),
            };
            let hint = case["retry_after"]
                .as_str()
                .map(|s| std::time::Duration::from_secs(s.parse().unwrap()));
            let e = errors::classify(case["status"].as_u64().unwrap() as u16, hint, &body, &model);
            assert_eq!(
                e.class.as_str(),
                case["class"].as_str().unwrap(),
                "{file}: {case}"
            );
            if let Some(secs) = case["retry_after_secs"]
                .as_u64()
                .or(hint.map(|h| h.as_secs()))
            {
                assert_eq!(
                    e.retry_after,
                    Some(std::time::Duration::from_secs(secs)),
                    "{case}"
                );
            }
            if e.class.as_str() == "bad_request" {
                let client = e
                    .client_error
                    .expect("a fail-fast error carries the client's error");
                assert_eq!(client.status.as_u16(), 400);
            }
        }
    }
    // Keys are scrubbed from upstream messages.
    let e = errors::classify(
        500,
        None,
        br#"{"error":{"message":"bad key sk-redact-me"}}"#,
        &model,
    );
    assert!(!e.message.contains("sk-redact-me"), "{}", e.message);
}
