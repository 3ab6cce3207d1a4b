//! Bad configs stop startup with exit code 2 and a message naming the YAML path.

use std::process::Command;

use cascade::config::{Config, Scheduler};

const GOOD: &str = r#"
server:
  listen: 127.0.0.1:8080
  request_timeout: 120s
  attempt_timeout: 30s
  max_body: 10MiB
providers:
  openai:   { kind: openai, base_url: https://api.openai.com/v1, api_key: "${OPENAI_API_KEY}" }
  together: { kind: openai_compatible, base_url: https://api.together.xyz/v1, api_key: "${TOGETHER_API_KEY:-none}" }
models:
  gpt-4o:
    provider: openai
    model_id: gpt-4o
    max_tokens: 4096
    context_window: 128000
    cost_per_1k_input: 0.005
    cost_per_1k_output: 0.015
  gpt-4o-mini: { provider: openai, model_id: gpt-4o-mini, max_tokens: 4096, context_window: 128000, cost_per_1k_input: 0.00015, cost_per_1k_output: 0.0006 }
  llama-3.1-70b: { provider: together, model_id: meta-llama/Llama-3.1-70B, fallbacks: [gpt-4o-mini] }
chains:
  default: [gpt-4o, gpt-4o-mini]
  simple_generation:
    models: [gpt-4o-mini, gpt-4o, llama-3.1-70b]
"#;

fn env(name: &str) -> Option<String> {
    (name == "OPENAI_API_KEY").then(|| "sk-from-env".to_string())
}

fn error_of(yaml: &str) -> String {
    match Config::from_yaml_with_env(yaml, &env) {
        Ok(_) => panic!("config should be rejected:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_contract_example_loads() {
    let c = Config::from_yaml_with_env(GOOD, &env).unwrap();
    assert_eq!(c.server.max_body, 10 * 1024 * 1024);
    assert_eq!(c.server.request_timeout.as_secs(), 120);
    assert_eq!(
        c.providers["openai"].api_key.as_ref().unwrap().expose(),
        "sk-from-env"
    );
    assert_eq!(
        c.providers["together"].api_key.as_ref().unwrap().expose(),
        "none"
    );
    assert_eq!(
        c.providers["openai"].chat_url,
        "https://api.openai.com/v1/chat/completions"
    );
    let names = |chain: &str| {
        c.chains[chain]
            .targets
            .iter()
            .map(|t| t.model.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names("default"), ["gpt-4o", "gpt-4o-mini"]);
    assert_eq!(
        names("simple_generation"),
        ["gpt-4o-mini", "gpt-4o", "llama-3.1-70b"]
    );
    let implicit = &c.model_chains["llama-3.1-70b"];
    assert_eq!(implicit.targets.len(), 2);
    // Secrets never print.
    assert!(!format!("{c:?}").contains("sk-from-env"));
}

#[test]
fn workers_default_to_one_per_core_on_per_core_runtimes() {
    let c = Config::from_yaml_with_env(GOOD, &env).unwrap();
    assert_eq!(c.server.scheduler, Scheduler::PerCore);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(c.server.worker_threads, cores);
    let yaml = GOOD.replace(
        "max_body: 10MiB",
        "max_body: 10MiB\n  scheduler: work_stealing\n  worker_threads: 3",
    );
    let c = Config::from_yaml_with_env(&yaml, &env).unwrap();
    assert_eq!(c.server.scheduler, Scheduler::WorkStealing);
    assert_eq!(c.server.worker_threads, 3);
}

#[test]
fn a_default_chain_is_optional() {
    let yaml = GOOD.replace("  default: [gpt-4o, gpt-4o-mini]\n", "");
    assert!(Config::from_yaml_with_env(&yaml, &env)
        .unwrap()
        .chains
        .get("default")
        .is_none());
}

#[test]
fn errors_name_the_path() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            GOOD.replace("${OPENAI_API_KEY}", "${MISSING_KEY}"),
            "providers.openai.api_key",
            "MISSING_KEY",
        ),
        (
            GOOD.replace("default: [gpt-4o, gpt-4o-mini]", "default: [gpt-4o, gpt-5]"),
            "chains.default[1]",
            "gpt-5",
        ),
        (
            GOOD.replace(
                "models: [gpt-4o-mini, gpt-4o, llama-3.1-70b]",
                "models: [gpt-4o-mini, nope]",
            ),
            "chains.simple_generation.models[1]",
            "nope",
        ),
        (
            GOOD.replace(
                "gpt-4o:\n    provider: openai",
                "gpt-4o:\n    provider: opnai",
            ),
            "models.gpt-4o.provider",
            "opnai",
        ),
        (
            GOOD.replace("default: [gpt-4o, gpt-4o-mini]", "default: []"),
            "chains.default",
            "empty",
        ),
        (
            GOOD.replace("request_timeout: 120s", "request_timeout: soon"),
            "server.request_timeout",
            "duration",
        ),
        (
            GOOD.replace("base_url: https://api.openai.com/v1", "base_url: not a url"),
            "providers.openai.base_url",
            "URL",
        ),
        (
            GOOD.replace(
                "base_url: https://api.openai.com/v1",
                "base_url: ftp://x/v1",
            ),
            "providers.openai.base_url",
            "http",
        ),
        (
            GOOD.replace(
                "    max_tokens: 4096\n    context_window",
                "    max_tokns: 4096\n    context_window",
            ),
            "models.gpt-4o.max_tokns",
            "unknown field",
        ),
        (
            GOOD.replace("server:", "srever:"),
            "srever",
            "unknown field",
        ),
        (
            GOOD.replace("kind: openai,", "kind: bedrock,"),
            "providers.openai.kind",
            "bedrock",
        ),
        (
            GOOD.replace("max_body: 10MiB", "max_body: 10 parsecs"),
            "server.max_body",
            "size",
        ),
        (
            GOOD.replace(
                "max_body: 10MiB",
                "max_body: 10MiB\n  scheduler: round_robin",
            ),
            "server.scheduler",
            "round_robin",
        ),
        (
            GOOD.replace("max_body: 10MiB", "max_body: 10MiB\n  worker_threads: 0"),
            "server.worker_threads",
            "at least 1",
        ),
        (
            GOOD.replace("listen: 127.0.0.1:8080", "listen: localhost"),
            "server.listen",
            "HOST:PORT",
        ),
        (
            GOOD.replace("fallbacks: [gpt-4o-mini]", "fallbacks: [ghost]"),
            "models.llama-3.1-70b.fallbacks[0]",
            "ghost",
        ),
        (
            GOOD.replace(
                "attempt_timeout: 30s",
                "attempt_timeout: 30s\n  idle_timeout: 0s",
            ),
            "server.idle_timeout",
            "greater than zero",
        ),
        (
            GOOD.replace("request_timeout: 120s", "request_timeout: 300000000000y"),
            "server.request_timeout",
            "too long",
        ),
        (
            format!("{GOOD}cache: {{ redis_url: \"http://user:hunter2@cache:6379\" }}\n"),
            "cache.redis_url",
            "invalid Redis URL",
        ),
    ];
    for (yaml, path, detail) in cases {
        let e = error_of(&yaml);
        assert!(
            e.contains(&format!("at {path}:")),
            "expected path {path} in: {e}"
        );
        assert!(e.contains(detail), "expected {detail:?} in: {e}");
        assert!(
            !e.contains("hunter2"),
            "a password in a URL is never repeated: {e}"
        );
    }
}

#[test]
fn an_emptied_section_is_read_as_empty() {
    let yaml = GOOD.replace(
        "chains:\n  default: [gpt-4o, gpt-4o-mini]\n  simple_generation:\n    models: [gpt-4o-mini, gpt-4o, llama-3.1-70b]\n",
        "chains:\n  # nothing yet\n",
    );
    assert!(yaml.contains("# nothing yet"));
    let c = Config::from_yaml_with_env(&yaml, &env).unwrap();
    assert!(c.chains.is_empty());
}

#[test]
fn cli_exits_2_on_bad_config_and_check_prints_chains() {
    let dir = std::env::temp_dir().join(format!("cascade-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, GOOD).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        GOOD.replace("default: [gpt-4o, gpt-4o-mini]", "default: [gpt-4o, gpt-5]"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_cascade");

    let out = Command::new(bin)
        .args(["check", "--config"])
        .arg(&good)
        .env("OPENAI_API_KEY", "sk-x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "default: gpt-4o -> gpt-4o-mini\nsimple_generation: gpt-4o-mini -> gpt-4o -> llama-3.1-70b\n"
    );

    for args in [
        &["check", "--config"][..],
        &["serve", "--config"][..],
        &["--config"][..],
    ] {
        let out = Command::new(bin)
            .args(args)
            .arg(&bad)
            .env("OPENAI_API_KEY", "sk-x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("chains.default[1]") && stderr.contains("gpt-5"),
            "{stderr}"
        );
    }

    // An unset variable stops `serve` too, naming the variable.
    let out = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&good)
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPENAI_API_KEY"));

    let out = Command::new(bin)
        .args(["check", "--config"])
        .arg(dir.join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bundled_configs_are_valid() {
    for file in ["config/demo.yaml", "config/cascade.yaml"] {
        let text = std::fs::read_to_string(file).unwrap();
        Config::from_yaml_with_env(&text, &|name| {
            name.ends_with("_API_KEY").then(|| "test-key".into())
        })
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

const EMBEDDINGS: &str = r#"
providers:
  openai: { kind: openai, base_url: https://api.openai.com/v1, api_key: k }
  azure:  { kind: azure_openai, base_url: https://r.openai.azure.com, api_key: k, api_version: "2024-10-21" }
  claude: { kind: anthropic, base_url: https://api.anthropic.com, api_key: k }
models:
  chat:   { provider: openai, model_id: gpt-4o }
  small:  { provider: openai, model_id: text-embedding-3-small, kind: embedding, dimensions: 1536, embedding_space: te3s }
  small2: { provider: azure, model_id: te3s-deploy, kind: embedding, dimensions: 1536, embedding_space: te3s }
  large:  { provider: openai, model_id: text-embedding-3-large, kind: embedding, dimensions: 3072 }
  other:  { provider: azure, model_id: ada, kind: embedding, dimensions: 1536, embedding_space: ada }
chains:
  emb: [small, small2]
"#;

#[test]
fn an_embedding_chain_keeps_one_vector_space() {
    let ok = Config::from_yaml_with_env(EMBEDDINGS, &env).unwrap();
    let emb = &ok.chains["emb"];
    assert_eq!(emb.targets.len(), 2);
    assert_eq!(
        emb.targets[1].model.embed_url.as_ref().unwrap().to_string(),
        "https://r.openai.azure.com/openai/deployments/te3s-deploy/embeddings?api-version=2024-10-21"
    );
    assert_eq!(
        emb.targets[0].model.embed_url.as_ref().unwrap().to_string(),
        "https://api.openai.com/v1/embeddings"
    );
    for (chain, path, words) in [
        ("emb: [small, large]", "chains.emb[1]", "dimensions"),
        ("emb: [small, other]", "chains.emb[1]", "embedding_space"),
        ("emb: [small, chat]", "chains.emb[1]", "one kind"),
        (
            "emb: [small, small2, large]",
            "chains.emb[2]",
            "vector space",
        ),
    ] {
        let e = error_of(&EMBEDDINGS.replace("emb: [small, small2]", chain));
        assert!(e.contains(path) && e.contains(words), "{chain}: {e}");
    }
    let e =
        error_of(&EMBEDDINGS.replace("kind: embedding, dimensions: 3072 }", "kind: embedding }"));
    assert!(e.contains("models.large.dimensions"), "{e}");
    let e =
        error_of(&EMBEDDINGS.replace("other:  { provider: azure,", "other:  { provider: claude,"));
    assert!(
        e.contains("models.other.provider") && e.contains("Anthropic"),
        "{e}"
    );
    let e = error_of(&EMBEDDINGS.replace("model_id: gpt-4o }", "model_id: gpt-4o, kind: vision }"));
    assert!(e.contains("models.chat.kind"), "{e}");
}

#[test]
fn names_keep_their_case() {
    // Pool, provider and chain names are the operator's: `GPT-4o` is not `gpt-4o`.
    let c = Config::from_yaml_with_env(
        r#"
providers:
  OpenAI: { kind: openai, base_url: "http://127.0.0.1:9/v1" }
models:
  GPT-4o: { provider: OpenAI, model_id: gpt-4o }
  gpt-4o: { provider: OpenAI, model_id: gpt-4o-2024 }
chains:
  Default: [GPT-4o, gpt-4o]
store: { enabled: false }
"#,
        &env,
    )
    .unwrap();
    assert_eq!(c.models.len(), 2);
    assert_eq!(&*c.models["GPT-4o"].provider.name, "OpenAI");
    let chain = &c.chains["Default"];
    assert_eq!(&*chain.targets[0].model.name, "GPT-4o");
    assert_eq!(chain.targets[1].model.model_id, "gpt-4o-2024");
}

/// `cascade check --format json` on `yaml`: (exit code, the JSON).
fn check_json(yaml: &str) -> (i32, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!(
        "cascade-lint-{}-{}",
        std::process::id(),
        yaml.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["check", "--format", "json", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), json)
}

const LINT_BASE: &str = r#"
store: { enabled: false }
providers:
  a: { kind: openai, base_url: "http://127.0.0.1:9/v1" }
  b: { kind: anthropic, base_url: "http://127.0.0.1:9" }
models:
  small: { provider: a, model_id: s, context_window: 8000, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }
  big:   { provider: b, model_id: b, context_window: 200000, cost_per_1k_input: 0.003, cost_per_1k_output: 0.015 }
  other: { provider: a, model_id: o, context_window: 8000 }
  blind: { provider: b, model_id: x }
"#;

#[test]
fn check_finds_configs_that_load_but_do_not_do_what_they_say() {
    let (code, json) = check_json(&format!("{LINT_BASE}chains:\n  main: [small, big]\n"));
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["ok"], true);
    assert_eq!(json["findings"], serde_json::json!([]));
    assert_eq!(json["chains"]["main"], serde_json::json!(["small", "big"]));

    let broken = LINT_BASE
        .replace(
            "  small: { provider: a, model_id: s,",
            "  small: { provider: a, model_id: s, fallbacks: [other],",
        )
        .replace(
            "  other: { provider: a, model_id: o,",
            "  other: { provider: a, model_id: o, fallbacks: [small],",
        )
        + "chains:
  back:
    models: [small, big]
    on: { rate_limited: { jump_to: small } }
  shrink:
    models: [big, other, small]
    on: { context_overflow: { jump_to: small } }
  one_provider: [small, other]
  unsure:
    models: [blind, big]
    on: { context_overflow: { jump_to: big } }
  shadowed:
    models: [small, big]
    shadow: { models: [other], sample: 0.1 }
";
    let (code, json) = check_json(&broken);
    assert_eq!(code, 2, "{json}");
    assert_eq!(json["ok"], false);
    let findings: Vec<(String, String)> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["severity"].as_str().unwrap().to_string(),
                f["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let has = |severity: &str, path: &str| findings.iter().any(|(s, p)| s == severity && p == path);
    for path in [
        "models.small.fallbacks[0]",
        "models.other.fallbacks[0]",
        "chains.back.on.rate_limited.jump_to",
        "chains.shrink.on.context_overflow.jump_to",
    ] {
        assert!(has("error", path), "{path}: {json}");
    }
    for path in [
        "chains.one_provider",
        "models.other.cost_per_1k_input",
        // An unknown window before a jump may be smaller: a warning, not an error.
        "chains.unsure.on.context_overflow.jump_to",
        // A model with fallbacks is a chain too.
        "models.small.fallbacks",
    ] {
        assert!(has("warning", path), "{path}: {json}");
    }
    assert!(
        !has("error", "chains.unsure.on.context_overflow.jump_to"),
        "{json}"
    );
    assert!(
        !has("warning", "chains.back") && !has("warning", "models.small.cost_per_1k_input"),
        "{json}"
    );
    let cycle = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "models.small.fallbacks[0]")
        .unwrap();
    assert!(
        cycle["message"]
            .as_str()
            .unwrap()
            .contains("small -> other -> small"),
        "{cycle}"
    );
    // Errors first.
    assert_eq!(json["findings"][0]["severity"], "error");

    // A config that does not load is one finding with its path, in the same shape.
    let (code, json) = check_json(&format!("{LINT_BASE}chains:\n  main: [small, nope]\n"));
    assert_eq!(code, 2);
    assert_eq!(json["findings"][0]["path"], "chains.main[1]", "{json}");
    assert_eq!(json["chains"], serde_json::json!({}));

    // Warnings alone exit 0, and text mode prints them on stderr.
    let dir = std::env::temp_dir().join(format!("cascade-lint-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.yaml");
    std::fs::write(
        &file,
        format!("{LINT_BASE}chains:\n  main: [small, other]\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "main: small -> other\n"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning")
            && stderr.contains("chains.main")
            && stderr.contains("no provider diversity"),
        "{stderr}"
    );
}

#[test]
fn an_open_admin_listener_without_a_token_is_a_warning() {
    let base = format!("{LINT_BASE}chains:\n  main: [small, big]\n");
    let (code, json) = check_json(&format!("{base}admin: {{ listen: \"0.0.0.0:9091\" }}\n"));
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["findings"][0]["path"], "admin.listen", "{json}");
    assert_eq!(json["findings"][0]["severity"], "warning");
    for admin in [
        "admin: { listen: \"127.0.0.1:9091\" }",
        "admin: { listen: \"0.0.0.0:9091\", token: \"0123456789abcdef0123\" }",
    ] {
        let (code, json) = check_json(&format!("{base}{admin}\n"));
        assert_eq!(code, 0);
        assert_eq!(json["findings"], serde_json::json!([]), "{admin}: {json}");
    }
}

#[test]
fn bundled_configs_have_no_check_errors() {
    for file in [
        "config/demo.yaml",
        "config/cascade.yaml",
        "deploy/cascade.yaml",
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        let config = Config::from_yaml_with_env(&text, &|name| match name {
            "CASCADE_STORE_URL" => Some("postgres://u@db/cascade".into()),
            n if n.ends_with("_API_KEY") => Some("test-key".into()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let errors: Vec<_> = cascade::config::lint::lint(&config)
            .into_iter()
            .filter(|f| f.severity == cascade::config::lint::Severity::Error)
            .collect();
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
}
