//! The shipped deployment, tested without Docker: a real Prometheus (Debian's
//! package) scrapes a live gateway under load; every dashboard query returns series,
//! every alert rule loads and evaluates (and returns data when its condition is
//! made to hold); `promtool` accepts the config and rules; the compose and Kubernetes
//! files parse and name only paths that exist in the repo and configs that load.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cascade::mock::MockServer;
use common::process::{free_port, Gateway};
use common::TempDir;
use serde_json::{json, Value};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A YAML file as JSON, keys as written, merge keys applied as compose applies them.
fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cascade::config::yaml::parse(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (Debian's prometheus package; .ci/run installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_prometheus_config_and_the_alert_rules() {
    promtool(&[
        "check",
        "config",
        repo("deploy/prometheus/prometheus.yml").to_str().unwrap(),
    ]);
    promtool(&[
        "check",
        "rules",
        repo("deploy/prometheus/alerts.yml").to_str().unwrap(),
    ]);
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every dashboard query, `$__rate_interval` replaced by what Grafana would pick for
/// a 1 s scrape.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/cascade.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                !expr.replace("$__rate_interval", "").contains('$'),
                "only $__rate_interval: {expr}"
            );
            out.push((
                p["title"].as_str().unwrap().to_string(),
                expr.replace("$__rate_interval", "30s"),
            ));
        }
    }
    out
}

async fn query(c: &reqwest::Client, port: u16, expr: &str) -> Value {
    c.get(format!("http://127.0.0.1:{port}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_gets_data_for_every_panel_and_alert() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    mock.set("p", "status=500");
    mock.set("x", "status=503");
    mock.set("s", "chunks=4;gap=5ms");
    let dir = TempDir::new("deploy");
    // Fallbacks (a failing primary whose breaker stays closed), a chain whose every
    // target fails (its breaker opens), shadow traffic, the cache, streams, and a
    // store queue too small to keep up.
    let gateway_yaml = format!(
        r#"
server: {{ listen: "127.0.0.1:{{port}}", request_timeout: 10s }}
retry: {{ max_retries: 0 }}
health: {{ min_calls: 1000000000 }}   # keep the failing primary first
providers:
  mock: {{ kind: openai, base_url: "{}", api_key: "sk-deploy" }}
models:
  primary:   {{ provider: mock, model_id: p, cost_per_1k_input: 0.01, cost_per_1k_output: 0.03,
               breaker: {{ consecutive_failures: 1000000, min_calls: 1000000 }} }}
  secondary: {{ provider: mock, model_id: s, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }}
  backup:    {{ provider: mock, model_id: b, cost_per_1k_input: 0.001, cost_per_1k_output: 0.002 }}
  dead:      {{ provider: mock, model_id: x }}
chains:
  main:
    models: [primary, secondary]
    shadow: {{ models: [backup], sample: 1.0, max_inflight: 64 }}
  cached:
    models: [secondary]
    cache: {{ mode: all }}
  broken: [dead]
store: {{ path: "{}", queue: 1, flush_interval: 5s }}
"#,
        mock.url(),
        dir.path().join("deploy.db").display()
    );
    let g = Gateway::start(dir.path(), &gateway_yaml);

    let prom_port = free_port();
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: cascade\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            repo("deploy/prometheus/alerts.yml").display(),
            g.port
        ),
    )
    .unwrap();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed (Debian's package; .ci/run installs it)");
    let _prom = Prometheus(prom);
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .get(format!("http://127.0.0.1:{prom_port}/-/ready"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < ready_by, "prometheus never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bounded load for about 8 s: 8 clients, at most 4,000 requests.
    let url = g.url("/v1/chat/completions");
    let until = Instant::now() + Duration::from_secs(8);
    let clients: Vec<_> = (0..8)
        .map(|k| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < until && n < 3_000 {
                    let chain = ["main", "main", "cached", "broken"][n % 4];
                    let body = json!({"model": chain, "stream": n % 3 == 0,
                        "messages": [{"role": "user", "content": format!("q{}", (k * 7 + n) % 10)}]});
                    let _ = c.post(&url).json(&body).send().await.map(|r| r.bytes());
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut sent = 0;
    for t in clients {
        sent += t.await.unwrap();
    }
    eprintln!("load: {sent} requests");
    // A few more scrapes after the load.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scrapes = query(&c, prom_port, "count_over_time(up[1m])").await;
    assert!(
        scrapes["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|n| n >= 5.0),
        "prometheus scraped the gateway: {scrapes}"
    );

    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        let v = query(&c, prom_port, &expr).await;
        assert_eq!(v["status"], "success", "{title}: {expr}: {v}");
        if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Alert rules: loaded and healthy; each condition holds here once its `for` is
    // set aside, except the overhead threshold, whose quantile must return data.
    let rules: Value = c
        .get(format!("http://127.0.0.1:{prom_port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rules: Vec<&Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(rules.len(), 5);
    for r in rules {
        let name = r["name"].as_str().unwrap();
        let expr = r["query"].as_str().unwrap();
        assert_ne!(r["health"], "err", "{name}: {r}");
        let full = query(&c, prom_port, expr).await;
        assert_eq!(full["status"], "success", "{name}: {full}");
        let probe = if name == "CascadeOverheadHigh" {
            without_threshold(expr)
        } else {
            expr.to_string()
        };
        let v = query(&c, prom_port, &probe).await;
        assert!(
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty()),
            "{name}: no data for {probe}: {v}"
        );
    }
}

/// The expression without its trailing `> NUMBER` threshold.
fn without_threshold(expr: &str) -> String {
    match expr.rfind('>') {
        Some(i) if expr[i + 1..].trim().parse::<f64>().is_ok() => expr[..i].trim().to_string(),
        _ => expr.to_string(),
    }
}

#[test]
fn the_compose_file_names_only_what_the_repo_has() {
    let compose = yaml(&repo("docker-compose.yml"));
    let services = compose["services"].as_object().unwrap();
    for name in [
        "gateway-a",
        "gateway-b",
        "nginx",
        "redis",
        "postgres",
        "prometheus",
        "grafana",
        "mock",
        "load",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    for (name, s) in services {
        if let Some(b) = s.get("build") {
            assert!(
                repo(b.as_str().unwrap()).join("Dockerfile").exists(),
                "{name}: build context"
            );
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            let host = v.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(repo(host).exists(), "{name}: {host} is not in the repo");
            }
        }
    }
    for name in ["mock", "load"] {
        assert_eq!(services[name]["profiles"], json!(["demo"]), "{name}");
    }
    assert_eq!(
        services["gateway-a"]["image"],
        services["gateway-b"]["image"]
    );
    // The gateways' config, as mounted, is valid with the compose environment.
    let env = services["gateway-a"]["environment"].clone();
    let text = std::fs::read_to_string(repo("deploy/cascade.yaml")).unwrap();
    let config = cascade::config::Config::from_yaml_with_env(&text, &|k| {
        env.get(k).and_then(Value::as_str).map(str::to_string)
    })
    .unwrap_or_else(|e| panic!("deploy/cascade.yaml: {e}"));
    // Both replicas write to the compose PostgreSQL, named as its service.
    let store = config.store.as_ref().map(|s| s.backend.to_string());
    assert_eq!(store.as_deref(), Some("postgres://postgres:5432/cascade"));
    assert!(services["gateway-a"]["depends_on"]["postgres"].is_object());
    // Prometheus scrapes both replicas.
    let prom = yaml(&repo("deploy/prometheus/prometheus.yml"));
    let targets = &prom["scrape_configs"][0]["static_configs"][0]["targets"];
    assert_eq!(targets, &json!(["gateway-a:8080", "gateway-b:8080"]));
    // nginx sends to both.
    let nginx = std::fs::read_to_string(repo("deploy/nginx/nginx.conf")).unwrap();
    assert!(nginx.contains("gateway-a:8080") && nginx.contains("gateway-b:8080"));
    let grafana = &services["grafana"]["volumes"];
    assert!(grafana.to_string().contains("deploy/grafana/cascade.json"));
}

#[test]
fn the_kubernetes_manifests_fit_together() {
    let dir = repo("deploy/k8s");
    let deployment = yaml(&dir.join("deployment.yaml"));
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(container["lifecycle"]["preStop"].is_object());
    // The grace period covers the drain the config asks for.
    let configmap = yaml(&dir.join("configmap.yaml"));
    let text = configmap["data"]["cascade.yaml"].as_str().unwrap();
    let config = cascade::config::Config::from_yaml_with_env(text, &|k| match k {
        "OPENAI_API_KEY" | "ANTHROPIC_API_KEY" => Some("k".into()),
        "CASCADE_STORE_URL" => Some("postgres://cascade:pw@db:5432/cascade".into()),
        _ => None,
    })
    .unwrap_or_else(|e| panic!("the ConfigMap's cascade.yaml: {e}"));
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("terminationGracePeriodSeconds in {spec}"));
    assert!(
        grace > (config.server.drain_delay + config.server.drain_timeout).as_secs(),
        "terminationGracePeriodSeconds {grace}"
    );
    // Names line up: the ConfigMap, the Secret, the mount the args read.
    let volumes = spec["volumes"].to_string();
    assert!(volumes.contains(configmap["metadata"]["name"].as_str().unwrap()));
    let secret = yaml(&dir.join("secret.example.yaml"));
    assert!(container["envFrom"]
        .to_string()
        .contains(secret["metadata"]["name"].as_str().unwrap()));
    let args = container["args"].to_string();
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(args.contains(&format!("{mount}/cascade.yaml")), "{args}");
    for key in secret["stringData"].as_object().unwrap().keys() {
        assert!(
            text.contains(&format!("${{{key}}}")),
            "{key} is used by the config"
        );
    }
    let pdb = yaml(&dir.join("pdb.yaml"));
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    let service = yaml(&dir.join("service.yaml"));
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    for r in kustomization["resources"].as_array().unwrap() {
        assert!(dir.join(r.as_str().unwrap()).exists(), "{r}");
    }
}

#[test]
fn the_healthcheck_subcommand_follows_healthz() {
    let dir = TempDir::new("healthcheck");
    let g = Gateway::start(
        dir.path(),
        r#"
server: { listen: "127.0.0.1:{port}" }
providers:
  mock: { kind: openai, base_url: "http://127.0.0.1:9/v1" }
models:
  m: { provider: mock, model_id: m }
chains:
  default: [m]
store: { enabled: false }
"#,
    );
    let ok = Command::new(common::process::BIN)
        .args(["healthcheck", "--url", &g.url("/healthz")])
        .status()
        .unwrap();
    assert!(ok.success());
    let from_env = Command::new(common::process::BIN)
        .arg("healthcheck")
        .env("CASCADE_LISTEN", format!("0.0.0.0:{}", g.port))
        .status()
        .unwrap();
    assert!(from_env.success());
    let missing = Command::new(common::process::BIN)
        .args(["healthcheck", "--url", &g.url("/nope")])
        .status()
        .unwrap();
    assert_eq!(missing.code(), Some(1));
    let port = free_port();
    let down = Command::new(common::process::BIN)
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{port}/healthz"),
        ])
        .status()
        .unwrap();
    assert_eq!(down.code(), Some(1));
}
