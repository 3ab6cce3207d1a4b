//! Who may call the admin endpoints (`/admin/*`).
//!
//! - With `admin.token`, every request needs `Authorization: Bearer TOKEN`, compared in
//!   constant time; anything else is a 401 that says no more.
//! - Without a token but with `admin.listen`, the admin listener's own address is the
//!   protection (bind it to a private interface).
//! - With neither, only clients whose *socket* address is loopback are answered. No
//!   header (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`) is trusted to make a client
//!   local; their presence makes it remote instead (a proxy on the same host, a
//!   sidecar or a `kubectl port-forward`, connects from loopback for clients who are
//!   not). So do a `Host` that is not a loopback name (DNS rebinding: a page on
//!   another site resolving its name to 127.0.0.1), a browser's `Sec-Fetch-Site` other
//!   than `same-origin` or `none`, and an `Origin` that is not the gateway's own. A
//!   same-host proxy that adds none of these headers still looks local: put
//!   `admin.token` on a gateway behind one. Such a caller gets a 403 that names
//!   `admin.token`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::middleware::Next;
use sha2::{Digest, Sha256};

use super::{error_response, AppState};
use crate::api::ApiError;

/// The middleware on every `/admin/*` route.
pub async fn guard(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response<Body> {
    let admin = &app.config().admin;
    if let Some(token) = &admin.token {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        if !same_secret(sent.as_bytes(), token.expose().trim().as_bytes()) {
            return unauthorized();
        }
        return next.run(req).await;
    }
    if admin.listen.is_some() {
        return next.run(req).await;
    }
    let local = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| is_loopback(peer))
        && !relayed_or_foreign(req.headers());
    if !local {
        return error_response(
            &ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "The admin endpoints answer only local clients. To reach them from elsewhere, \
                 set admin.token (then send Authorization: Bearer TOKEN) or serve them on a \
                 private address with admin.listen.",
            )
            .with_code("admin_local_only"),
        );
    }
    next.run(req).await
}

/// `Authorization: Bearer TOKEN`, the scheme matched in any case (RFC 9110).
fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A loopback connection that speaks for someone else: a proxy's forwarding headers, a
/// `Host` that is not a loopback name, or a browser saying the page is another site's.
fn relayed_or_foreign(h: &axum::http::HeaderMap) -> bool {
    const RELAYED: [&str; 11] = [
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "x-forwarded-proto",
        "via",
        "cf-connecting-ip",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-envoy-external-address",
    ];
    if RELAYED.iter().any(|name| h.contains_key(*name)) {
        return true;
    }
    // A browser's request from any page but the gateway's own (another port on
    // localhost is `same-site`): a simple cross-origin POST needs no preflight.
    if h.get("sec-fetch-site")
        .is_some_and(|v| !matches!(v.as_bytes(), b"same-origin" | b"none"))
    {
        return true;
    }
    let host = match h.get(header::HOST).map(|v| v.to_str()) {
        None => None,
        Some(Ok(host)) if is_loopback_host(host) => Some(host),
        Some(_) => return true,
    };
    // Older browsers send no Sec-Fetch-Site, but a cross-origin request carries an
    // Origin that is not this host.
    match (h.get(header::ORIGIN).map(|v| v.to_str()), host) {
        (None, _) => false,
        (Some(Ok(origin)), Some(host)) => {
            let authority = origin.split_once("://").map_or("", |(_, a)| a);
            !authority.eq_ignore_ascii_case(host)
        }
        _ => true,
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| is_loopback(&SocketAddr::new(ip, 0)))
}

/// An IPv4-mapped IPv6 loopback (`::ffff:127.0.0.1`, a dual-stack listener) counts too.
fn is_loopback(peer: &SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Equal, in time that does not depend on where they differ (nor on the token's
/// length: both sides are hashed to 32 bytes first).
fn same_secret(sent: &[u8], token: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(sent), Sha256::digest(token));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn unauthorized() -> Response<Body> {
    let mut r = error_response(
        &ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Unauthorized.",
        )
        .with_code("unauthorized"),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!same_secret(b"", b"0123456789abcdef"));
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn relayed_or_foreign_requests_are_not_local() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            relayed_or_foreign(&h)
        };
        assert!(!with(&[]));
        assert!(!with(&[("host", "127.0.0.1:8080")]));
        assert!(!with(&[("host", "localhost:8080")]));
        assert!(!with(&[("host", "[::1]:8080")]));
        assert!(!with(&[
            ("host", "localhost"),
            ("sec-fetch-site", "same-origin")
        ]));
        assert!(with(&[("host", "attacker.example:8080")]));
        assert!(with(&[("host", "127.0.0.1.nip.io")]));
        assert!(with(&[
            ("host", "localhost"),
            ("x-forwarded-for", "203.0.113.9")
        ]));
        assert!(with(&[
            ("host", "localhost"),
            ("forwarded", "for=203.0.113.9")
        ]));
        assert!(with(&[("host", "localhost"), ("x-real-ip", "203.0.113.9")]));
        assert!(with(&[
            ("host", "localhost"),
            ("sec-fetch-site", "cross-site")
        ]));
        assert!(with(&[
            ("host", "localhost:8080"),
            ("sec-fetch-site", "same-site")
        ]));
        assert!(!with(&[
            ("host", "localhost:8080"),
            ("sec-fetch-site", "none")
        ]));
        assert!(with(&[("host", "localhost"), ("via", "1.1 proxy")]));
        assert!(with(&[
            ("host", "localhost"),
            ("cf-connecting-ip", "203.0.113.9")
        ]));
        assert!(!with(&[
            ("host", "localhost:8080"),
            ("origin", "http://localhost:8080")
        ]));
        assert!(with(&[
            ("host", "localhost:8080"),
            ("origin", "http://localhost:3000")
        ]));
        assert!(with(&[("host", "localhost:8080"), ("origin", "null")]));
    }

    #[test]
    fn loopback_is_the_socket_address() {
        for (addr, local) in [
            ("127.0.0.1:1", true),
            ("127.10.0.1:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("192.0.2.2:1", false),
            ("[::ffff:10.0.0.1]:1", false),
            ("[fd00::2]:1", false),
        ] {
            assert_eq!(is_loopback(&addr.parse().unwrap()), local, "{addr}");
        }
    }
}
