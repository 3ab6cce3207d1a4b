//! `cascade import litellm`: LiteLLM proxy configs shaped like the ones teams run
//! (`tests/fixtures/litellm/`) become cascade configs that pass `cascade check`, carry
//! over what maps, list on stderr what does not, and route the same way.

mod common;

use std::path::Path;
use std::process::Command;

use common::{start, TempDir};
use serde_json::{json, Value};

struct Imported {
    yaml: String,
    tree: Value,
    notes: String,
    file: std::path::PathBuf,
    _dir: TempDir,
}

fn import(fixture: &str) -> Imported {
    let dir = TempDir::new("import");
    let file = dir.path().join("cascade.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["import", "litellm"])
        .arg(Path::new("tests/fixtures/litellm").join(fixture))
        .arg("-o")
        .arg(&file)
        .output()
        .expect("cascade runs");
    let notes = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{fixture}: {notes}");
    assert!(out.stdout.is_empty(), "-o writes the file, not stdout");
    let yaml = std::fs::read_to_string(&file).expect("output written");
    Imported {
        tree: cascade::config::yaml::parse(&yaml).expect("output is YAML"),
        yaml,
        notes,
        file,
        _dir: dir,
    }
}

/// Every `${VAR}` of the output, with a value shaped like the field it sits in (a URL
/// in a base URL) or like what it names (a Redis host or port).
fn env_of(yaml: &str) -> Vec<(String, String)> {
    let mut vars = std::collections::BTreeMap::new();
    for line in yaml.lines() {
        let in_url = line.trim_start().starts_with("base_url:");
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            let tail = &rest[i + 2..];
            let end = tail.find('}').expect("closed ${");
            let v = tail[..end].to_string();
            let value = if in_url {
                "http://127.0.0.1:9"
            } else if v.contains("PORT") {
                "6379"
            } else if v.contains("HOST") {
                "127.0.0.1"
            } else {
                "test-secret"
            };
            vars.insert(v, value.to_string());
            rest = &tail[end..];
        }
    }
    vars.into_iter().collect()
}

/// `cascade check --format json` on the output, with its variables set: no errors.
fn check(imported: &Imported) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["check", "--format", "json", "--config"])
        .arg(&imported.file)
        .envs(env_of(&imported.yaml))
        .output()
        .expect("cascade runs");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", imported.yaml);
    assert_eq!(v["ok"], true, "{v}");
    v
}

#[test]
fn the_reliability_guide_config_keeps_its_groups_fallbacks_and_settings() {
    let i = import("reliability.yaml");
    let checked = check(&i);
    assert_eq!(
        checked["chains"]["gpt-3.5-turbo"],
        json!([
            "gpt-3.5-turbo-azure",
            "gpt-3.5-turbo-azure-2",
            "gpt-3.5-turbo-openai",
            "gpt-4o",
            "llama3",
            "claude-3-5-sonnet"
        ]),
        "the group's deployments in order, its fallbacks, then the context-window fallback"
    );
    assert_eq!(
        checked["chains"]["claude-3-5-sonnet"],
        json!(["claude-3-5-sonnet", "gpt-4o"])
    );
    assert_eq!(checked["chains"]["llama3"], json!(["llama3"]));
    let t = &i.tree;
    assert_eq!(
        t["chains"]["gpt-3.5-turbo"]["on"]["context_overflow"]["jump_to"],
        "claude-3-5-sonnet"
    );
    assert_eq!(t["retry"]["max_retries"], 3, "num_retries");
    assert_eq!(t["breaker"]["consecutive_failures"], 3, "allowed_fails");
    assert_eq!(t["breaker"]["cooldown"], "30s", "cooldown_time");
    assert_eq!(t["server"]["request_timeout"], "30s", "request_timeout");
    // os.environ/VAR as ${VAR}; Azure without an api_version gets the default.
    let p = &t["providers"];
    assert_eq!(p["azure"]["base_url"], "${AZURE_API_BASE_EU}");
    assert_eq!(p["azure"]["api_key"], "${AZURE_API_KEY_EU}");
    assert_eq!(p["azure"]["api_version"], "2024-10-21");
    assert_eq!(p["azure-2"]["api_version"], "2024-02-15-preview");
    assert_eq!(
        p["azure-2"]["base_url"],
        "https://my-endpoint-canada-berri992.openai.azure.com"
    );
    assert_eq!(p["azure"]["kind"], "azure_openai");
    assert_eq!(p["anthropic"]["kind"], "anthropic");
    assert_eq!(p["ollama"]["base_url"], "http://localhost:11434/v1");
    assert_eq!(
        t["models"]["gpt-3.5-turbo-azure"]["model_id"],
        "chatgpt-v-2"
    );
    assert_eq!(t["models"]["gpt-4o"]["cost_per_1k_input"], 0.0025);
    assert_eq!(t["models"]["claude-3-5-sonnet"]["context_window"], 200000);
    for n in [
        "success_callback",
        "drop_params",
        "general_settings",
        "cascade's table",
    ] {
        assert!(i.notes.contains(n), "{n}: {}", i.notes);
    }
    assert!(!i.notes.contains("LITELLM_MASTER_KEY"), "{}", i.notes);
}

#[test]
fn router_settings_redis_cache_prices_and_what_cannot_be_carried_over() {
    let i = import("router.yaml");
    let checked = check(&i);
    assert_eq!(
        checked["chains"]["smart"],
        json!([
            "smart-openai",
            "smart-gemini",
            "fast-groq",
            "fast-together-ai",
            "safe"
        ])
    );
    assert_eq!(
        checked["chains"]["fast"],
        json!(["fast-groq", "fast-together-ai", "safe"])
    );
    assert_eq!(checked["chains"]["embeddings"], json!(["embeddings"]));
    assert!(
        checked["chains"].get("titan").is_none(),
        "bedrock is skipped"
    );
    assert!(
        checked["chains"].get("*").is_none(),
        "wildcards are skipped"
    );
    let t = &i.tree;
    assert_eq!(
        t["chains"]["smart"]["on"]["content_policy"]["jump_to"],
        "safe"
    );
    assert_eq!(t["server"]["attempt_timeout"], "30s", "timeout");
    assert_eq!(t["server"]["first_token_timeout"], "5s", "stream_timeout");
    assert_eq!(t["retry"]["max_retries"], 2);
    assert_eq!(t["breaker"]["consecutive_failures"], 1);
    assert_eq!(t["breaker"]["cooldown"], "60s");
    assert_eq!(
        t["state"]["redis_url"],
        "redis://:${REDIS_PASSWORD}@${REDIS_HOST}:${REDIS_PORT}"
    );
    assert_eq!(t["cache"]["mode"], "all");
    assert_eq!(t["cache"]["ttl"], "600s");
    assert_eq!(t["cache"]["redis_url"], "redis://cache.internal:6380");
    let smart = &t["models"]["smart-openai"];
    assert_eq!(smart["context_window"], 128000);
    assert_eq!(smart["cost_per_1k_output"], 0.01);
    assert_eq!(smart["attempt_timeout"], "60s");
    assert_eq!(smart["first_token_timeout"], "10s");
    assert_eq!(
        t["models"]["safe"]["provider"], "anthropic",
        "a bare claude model"
    );
    assert_eq!(t["providers"]["gemini"]["kind"], "gemini");
    assert_eq!(
        t["providers"]["groq"]["base_url"],
        "https://api.groq.com/openai/v1"
    );
    assert_eq!(t["models"]["embeddings"]["kind"], "embedding");
    assert_eq!(t["models"]["embeddings"]["dimensions"], 1536);
    for n in ["bedrock", "wildcard", "rpm", "routing_strategy"] {
        assert!(i.notes.contains(n), "{n}: {}", i.notes);
    }
}

#[test]
fn azure_teams_keep_per_deployment_timeouts_and_retries() {
    let i = import("azure_teams.yaml");
    let checked = check(&i);
    assert_eq!(checked["chains"]["gpt-4-team1"], json!(["gpt-4-team1"]));
    let m = &i.tree["models"]["gpt-4-team1"];
    assert_eq!(m["attempt_timeout"], "5s");
    assert_eq!(m["first_token_timeout"], "500ms");
    assert_eq!(m["retry"]["max_retries"], 4);
    assert_eq!(i.tree["providers"]["azure"]["api_version"], "2023-05-15");
    assert_eq!(i.tree["providers"]["azure-2"]["api_version"], "2024-10-21");
    assert!(i.notes.contains("tpm"), "{}", i.notes);
}

#[test]
fn load_balanced_keys_become_deployments_in_order() {
    let i = import("load_balancer.yaml");
    let checked = check(&i);
    assert_eq!(
        checked["chains"]["gpt-3.5-turbo"],
        json!([
            "gpt-3.5-turbo-openai",
            "gpt-3.5-turbo-openai-2",
            "gpt-3.5-turbo-openrouter"
        ])
    );
    // Two keys on one endpoint: two providers.
    assert_eq!(i.tree["providers"]["openai"]["api_key"], "sk-first-key");
    assert_eq!(i.tree["providers"]["openai-2"]["api_key"], "sk-second-key");
    for n in [
        "literal api_key",
        "mistralai",
        "environment_variables",
        "rpm",
    ] {
        assert!(i.notes.contains(n), "{n}: {}", i.notes);
    }
    assert!(
        !i.notes.contains("sk-first-key"),
        "keys stay out of the notes"
    );
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let dir = TempDir::new("import-bad");
    let run = |text: &str| {
        let f = dir.path().join("in.yaml");
        std::fs::write(&f, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args(["import", "litellm"])
            .arg(&f)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run("general_settings: { master_key: x }\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("model_list"), "{err}");
    let (code, err) = run("model_list: [\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("not YAML"), "{err}");
    let (code, err) =
        run("model_list:\n  - model_name: x\n    litellm_params: { model: bedrock/y }\n");
    assert_eq!(code, Some(2));
    assert!(err.contains("no deployment"), "{err}");
}

/// The imported config routes as LiteLLM does: the group's deployments in order, then
/// its fallback group; a context-window error jumps to the bigger group.
#[tokio::test]
async fn the_imported_config_routes_the_same_way() {
    let i = import("routing.yaml");
    check(&i);
    let yaml = i
        .yaml
        .replace("${EAST_API_BASE}", "{mock}")
        .replace("${WEST_API_BASE}", "{mock}")
        .replace("${VLLM_API_BASE}", "{mock}")
        .replace("${EAST_API_KEY}", "east-key")
        .replace("${WEST_API_KEY}", "west-key");
    let h = start(&yaml).await;

    let r = h.chat("chat", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(h.mock.calls("primary-east"), 1);
    assert_eq!(h.mock.total_calls(), 1);

    h.mock.set("primary-east", "status=500");
    let r = h.chat("chat", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.mock.calls("primary-west"), 1, "the other deployment");

    h.mock.set("primary-west", "status=503");
    let r = h.chat("chat", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.mock.calls("backup-model"), 1, "then the fallback group");
    assert_eq!(h.mock.calls("long-model"), 0);

    // A context-window error goes to `long`, past `backup`.
    h.mock
        .set("primary-east", "status=400,code=context_length_exceeded");
    h.mock.set("primary-west", "");
    let r = h.chat("chat", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        h.mock.calls("long-model"),
        1,
        "{:?}",
        r.header("x-cascade-trace")
    );
    assert_eq!(h.mock.calls("backup-model"), 1, "not called again");
    assert_eq!(
        h.mock.calls("primary-west"),
        2,
        "the same window: jumped past"
    );
}

#[test]
fn awkward_shapes_convert_and_say_what_they_left_out() {
    let i = import("edge_cases.yaml");
    let checked = check(&i);
    let c = &checked["chains"];
    // Names that need quoting survive the round trip.
    assert_eq!(
        c["team chat: v2 #1"],
        json!(["team chat: v2 #1", "local", "big"])
    );
    // An embedding group over two providers is one vector space; default_fallbacks
    // (a chat model) are not added to it.
    assert_eq!(c["embed"], json!(["embed-azure-2", "embed-openai"]));
    assert_eq!(i.tree["models"]["embed-openai"]["embedding_space"], "embed");
    assert!(c.get("dalle").is_none());
    // A fixed LiteLLM cooldown is a breaker that does not grow.
    assert_eq!(i.tree["breaker"]["cooldown"], "600s");
    assert_eq!(i.tree["breaker"]["max_cooldown"], "600s");
    // custom_llm_provider picks the provider; a host variable gets /v1 after it.
    assert_eq!(i.tree["models"]["local"]["provider"], "ollama");
    assert_eq!(
        i.tree["providers"]["ollama"]["base_url"],
        "${OLLAMA_HOST}/v1"
    );
    assert_eq!(
        i.tree["providers"]["azure"]["base_url"],
        "${AZURE_RESOURCE}"
    );
    // model_info.max_tokens is the model's limit, not a default for every request.
    assert!(i.tree["models"]["big"].get("max_tokens").is_none());
    assert_eq!(i.tree["models"]["big"]["context_window"], 128000);
    // A literal Redis password is encoded into the URL.
    assert_eq!(
        i.tree["state"]["redis_url"],
        "redis://:p%40ss%2Fword@redis.internal:6379"
    );
    assert!(
        i.tree.get("cache").is_none(),
        "an s3 cache is not cascade's"
    );
    for n in [
        "litellm_params.temperature",
        "image_generation",
        "redis_password",
        "s3",
        "fallbacks of \"embed\"",
        "context_overflow jump is left out",
    ] {
        assert!(i.notes.contains(n), "{n}: {}", i.notes);
    }
    assert!(
        !i.notes.contains("p@ss"),
        "the password stays out of the notes"
    );
}
