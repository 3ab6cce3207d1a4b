//! The protected admin surface, on the real binary: loopback only by default (no
//! header makes a remote client local), a bearer token when `admin.token` is set, and
//! a listener of its own with `admin.listen`.

mod common;

use std::net::{IpAddr, SocketAddr};

use cascade::mock::MockServer;
use common::process::{free_port, Gateway};
use common::TempDir;

const TOKEN: &str = "admin-SECRET-0123456789abcdef";

fn config(mock: &MockServer, listen: &str, admin: &str) -> String {
    format!(
        r#"
server: {{ listen: "{listen}" }}
providers:
  mock: {{ kind: openai, base_url: "{}" }}
models:
  primary: {{ provider: mock, model_id: p }}
chains:
  main: [primary]
store: {{ enabled: false }}
{admin}
"#,
        mock.url()
    )
}

/// This machine's address on its default route: a client that is not loopback.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // No packet is sent: connecting a UDP socket only picks the route.
    s.connect("203.0.113.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// `method path` on `addr` from a client bound to `from`: (status, body).
async fn call(
    method: reqwest::Method,
    from: IpAddr,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let c = reqwest::Client::builder()
        .no_proxy()
        .local_address(from)
        .build()
        .unwrap();
    let mut req = c.request(method, format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn get_from(
    from: IpAddr,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    call(reqwest::Method::GET, from, addr, path, headers).await
}

async fn post_from(from: IpAddr, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    call(reqwest::Method::POST, from, addr, path, headers)
        .await
        .0
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_admin_paths_answer_only_loopback_clients() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let dir = TempDir::new("admin-default");
    let g = Gateway::start(dir.path(), &config(&mock, "0.0.0.0:{port}", ""));
    let local: SocketAddr = ([127, 0, 0, 1], g.port).into();
    assert_eq!(get_from(LOCAL, local, "/admin/health", &[]).await.0, 200);
    // A loopback connection that speaks for someone else is not local: a proxy on the
    // same host, a rebound DNS name, another site's page.
    for (k, v) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("host", "attacker.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let (status, body) = get_from(LOCAL, local, "/admin/health", &[(k, v)]).await;
        assert_eq!(status, 403, "{k}: {body}");
    }
    assert_eq!(
        get_from(
            LOCAL,
            local,
            "/admin/health",
            &[("sec-fetch-site", "same-origin")]
        )
        .await
        .0,
        200,
        "the status page's own requests"
    );
    // `/admin` itself is no pass-through path.
    assert_eq!(get_from(LOCAL, local, "/admin", &[]).await.0, 404);
    assert_eq!(get_from(LOCAL, local, "/admin/", &[]).await.0, 404);
    let Some(remote_ip) = non_loopback_ip() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs an address other than loopback to test a remote client"
        );
        eprintln!("skipped the remote half: this machine has no address besides loopback");
        return;
    };
    let remote: SocketAddr = (remote_ip, g.port).into();
    for path in ["/admin/health", "/admin/report"] {
        let (status, body) = get_from(remote_ip, remote, path, &[]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("admin.token"), "{body}");
    }
    assert_eq!(
        post_from(remote_ip, remote, "/admin/reload", &[]).await,
        403
    );
    // No header makes a remote client local.
    for (k, v) in [
        ("x-forwarded-for", "127.0.0.1"),
        ("forwarded", "for=127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
    ] {
        let (status, _) = get_from(remote_ip, remote, "/admin/health", &[(k, v)]).await;
        assert_eq!(status, 403, "{k}");
    }
    // The API and the scrape stay open to everyone.
    assert_eq!(get_from(remote_ip, remote, "/metrics", &[]).await.0, 200);
    assert_eq!(get_from(remote_ip, remote, "/v1/models", &[]).await.0, 200);
    g.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_admin_request_needs_it() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    let dir = TempDir::new("admin-token");
    let yaml = config(
        &mock,
        "0.0.0.0:{port}",
        &format!("admin: {{ token: \"{TOKEN}\" }}"),
    );
    let g = Gateway::start(dir.path(), &yaml);
    let local: SocketAddr = ([127, 0, 0, 1], g.port).into();
    let bearer = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");
    for headers in [
        vec![],
        vec![("authorization", wrong.as_str())],
        vec![("authorization", TOKEN)],
        vec![("authorization", "Bearer ")],
    ] {
        let (status, body) = get_from(LOCAL, local, "/admin/health", &headers).await;
        assert_eq!(status, 401, "{headers:?}");
        assert!(!body.contains(TOKEN), "{body}");
        assert!(body.contains("\"code\":\"unauthorized\""), "{body}");
    }
    assert_eq!(post_from(LOCAL, local, "/admin/reload", &[]).await, 401);
    let ok = [("authorization", bearer.as_str())];
    assert_eq!(get_from(LOCAL, local, "/admin/health", &ok).await.0, 200);
    let lower = format!("bearer {TOKEN}");
    assert_eq!(
        get_from(
            LOCAL,
            local,
            "/admin/health",
            &[("authorization", lower.as_str())]
        )
        .await
        .0,
        200,
        "the scheme in any case"
    );
    assert_eq!(
        get_from(LOCAL, local, "/admin/report?since=1h", &ok)
            .await
            .0,
        409,
        "the store is off, but the token passed"
    );
    assert_eq!(post_from(LOCAL, local, "/admin/reload", &ok).await, 200);
    // From another address, the token is what counts.
    if let Some(ip) = non_loopback_ip() {
        let remote: SocketAddr = (ip, g.port).into();
        assert_eq!(get_from(ip, remote, "/admin/health", &ok).await.0, 200);
        assert_eq!(get_from(ip, remote, "/admin/health", &[]).await.0, 401);
    }
    let (code, out, err) = g.stop();
    assert_eq!(code, 0);
    assert!(
        !format!("{out}{err}").contains(TOKEN),
        "the token never prints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_moves_admin_and_metrics_off_the_main_listener() {
    let mock = MockServer::start("127.0.0.1:0").await.unwrap();
    for metrics_on_main in [false, true] {
        let dir = TempDir::new("admin-listen");
        let admin_port = free_port();
        let yaml = config(
            &mock,
            "127.0.0.1:{port}",
            &format!("admin: {{ listen: \"127.0.0.1:{admin_port}\", metrics_on_main: {metrics_on_main} }}"),
        );
        let g = Gateway::start(dir.path(), &yaml);
        let main: SocketAddr = ([127, 0, 0, 1], g.port).into();
        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        for path in ["/admin/health", "/admin/report", "/admin/nothing"] {
            assert_eq!(
                get_from(LOCAL, main, path, &[]).await.0,
                404,
                "{path} on main"
            );
        }
        assert_eq!(post_from(LOCAL, main, "/admin/reload", &[]).await, 404);
        let main_metrics = get_from(LOCAL, main, "/metrics", &[]).await.0;
        assert_eq!(main_metrics, if metrics_on_main { 200 } else { 404 });
        assert_eq!(get_from(LOCAL, admin, "/admin/health", &[]).await.0, 200);
        let (status, text) = get_from(LOCAL, admin, "/metrics", &[]).await;
        assert_eq!(status, 200);
        assert!(
            text.contains("cascade_requests_total") || text.contains("cascade_"),
            "{text}"
        );
        assert_eq!(post_from(LOCAL, admin, "/admin/reload", &[]).await, 200);
        // The API stays on the main listener only.
        assert_eq!(get_from(LOCAL, main, "/v1/models", &[]).await.0, 200);
        assert_eq!(get_from(LOCAL, admin, "/v1/models", &[]).await.0, 404);
        let (code, _, err) = g.stop();
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn admin_settings_are_checked() {
    let yaml = |admin: &str| {
        format!(
            "providers:\n  mock: {{ kind: openai, base_url: \"http://127.0.0.1:9/v1\" }}\nmodels:\n  m: {{ provider: mock, model_id: m }}\nstore: {{ enabled: false }}\nadmin: {admin}\n"
        )
    };
    for (admin, path) in [
        ("{ token: short }", "admin.token"),
        ("{ token: \"\" }", "admin.token"),
        ("{ listen: nowhere }", "admin.listen"),
        ("{ metrics_on_main: true }", "admin.metrics_on_main"),
        ("{ tokens: x }", "admin"),
    ] {
        let e = cascade::config::Config::from_yaml_with_env(&yaml(admin), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(path), "{admin}: {e}");
        assert!(!e.contains("short") || path != "admin.token", "{e}");
    }
}
