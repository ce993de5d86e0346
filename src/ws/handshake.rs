//! The `/ws` handshake: every refusal happens here, as a plain HTTP answer before the upgrade.
//!
//! Order of checks: draining (503), a well-formed upgrade request (400: HTTP/1.1 or later,
//! `Upgrade` and `Connection` headers, a `Sec-WebSocket-Key` of 16 bytes in base64), a
//! WebSocket version this server speaks (426, naming version 13), Origin (403), token (401),
//! connections of this user (429), connections from this address (429), connection limit
//! (503). The token may come from `Authorization: Bearer`, from the `bearer.<jwt>`
//! subprotocol, or from `?token=`; it is never logged.

use std::sync::Arc;

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::protocol::SUBPROTOCOL;
use super::{session, Hub};
use crate::quota::{Admission, Quota};

/// A refused upgrade: status, bounded reason (for metrics) and the short body.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, format!("{}\n", self.reason)).into_response();
        if self.status == StatusCode::UPGRADE_REQUIRED {
            // RFC 6455 4.4: name the version spoken. RFC 9110 15.5.22 and 7.8: a 426 names the
            // protocol in `Upgrade`, which `Connection` must list.
            let headers = response.headers_mut();
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static(WEBSOCKET_VERSION),
            );
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        response
    }
}

/// The only version of the WebSocket protocol there is (RFC 6455 4.1).
const WEBSOCKET_VERSION: &str = "13";

fn refuse(status: StatusCode, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

pub async fn upgrade(State(hub): State<Arc<Hub>>, mut req: Request) -> Response {
    let accepted = match check(&hub, req.version(), req.headers(), req.uri().query()) {
        Ok(a) => a,
        Err(refusal) => return refused(&hub, refusal),
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let admission = match admit(&hub, &accepted.identity, peer, req.headers()) {
        Ok(a) => a,
        Err(refusal) => return refused(&hub, refusal),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let identity = accepted.identity;
    let resume = query_flag(req.uri().query(), "resume");
    let session_hub = hub.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return warn!(error = %e, "upgrade failed"),
        };
        // The session owns the TCP stream itself: it does its own framing (see wire.rs).
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            return warn!("upgraded connection is not a TCP stream");
        };
        let stream = parts.io.into_inner();
        // A task of its own, so what the upgrade needed is freed rather than kept in the
        // session's state for the connection's whole life.
        tokio::spawn(session::run(
            session_hub,
            stream,
            parts.read_buf,
            identity,
            admission,
            resume,
        ));
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accepted.accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if accepted.roomcast_protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    response
}

fn refused(hub: &Hub, refusal: Refusal) -> Response {
    hub.metrics
        .handshake_failures
        .with_label_values(&[refusal.reason])
        .inc();
    debug!(reason = refusal.reason, "upgrade refused");
    refusal.into_response()
}

/// Takes this connection's share of the per-user and per-address limits and of the
/// connection limit.
fn admit(
    hub: &Hub,
    identity: &crate::auth::Identity,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
) -> Result<Admission, Refusal> {
    let user = hub.users.take(identity.key()).ok_or(refuse(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections_for_user",
    ))?;
    let address = match peer {
        Some(peer) => hub
            .addresses
            .take(hub.proxies.client_address(peer, headers))
            .ok_or(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections_for_address",
            ))?,
        None => Quota::unlimited(),
    };
    let permit = hub
        .limit
        .clone()
        .try_acquire_owned()
        .map_err(|_| refuse(StatusCode::SERVICE_UNAVAILABLE, "too_many_connections"))?;
    Ok(Admission::new(permit, user, address))
}

struct Accepted {
    identity: crate::auth::Identity,
    accept_key: String,
    roomcast_protocol: bool,
}

fn check(
    hub: &Hub,
    version: Version,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Accepted, Refusal> {
    if hub.is_draining() {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "draining"));
    }
    let key = upgrade_key(version, headers)?;
    check_origin(&hub.config.server.allowed_origins, headers)?;
    let protocols = offered_protocols(headers);
    let token = bearer_header(headers)
        .or_else(|| {
            protocols
                .iter()
                .find_map(|p| p.strip_prefix("bearer."))
                .map(String::from)
        })
        .or_else(|| query_token(query))
        .unwrap_or_default();
    let identity = hub
        .auth
        .authenticate(&token)
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, e.reason()))?;
    Ok(Accepted {
        identity,
        accept_key: accept_key(key.as_bytes()),
        roomcast_protocol: protocols.iter().any(|p| p == SUBPROTOCOL),
    })
}

/// The client's `Sec-WebSocket-Key`, once the request is known to be a WebSocket upgrade
/// this server can answer.
fn upgrade_key(version: Version, headers: &HeaderMap) -> Result<&str, Refusal> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    let bad = || refuse(StatusCode::BAD_REQUEST, "not_a_websocket_upgrade");
    // RFC 6455 4.1 wants HTTP/1.1 at least; HTTP/1.0 has no upgrade, so a 101 to it would
    // upgrade nothing.
    if version < Version::HTTP_11 {
        return Err(bad());
    }
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err(bad());
    }
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        None => return Err(bad()),
        Some(v) if v.as_bytes() != WEBSOCKET_VERSION.as_bytes() => {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported_websocket_version",
            ));
        }
        Some(_) => {}
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|key| is_websocket_key(key))
        .ok_or_else(bad)
}

/// RFC 6455 4.1: a nonce of 16 bytes in base64, which is 22 characters of the alphabet and
/// `==`.
fn is_websocket_key(key: &str) -> bool {
    let key = key.as_bytes();
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24 && key[..22].iter().all(base64) && &key[22..] == b"=="
}

fn check_origin(allowed: &[String], headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Not a browser: origins only guard against other sites' pages.
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if allowed.is_empty() || allowed.iter().any(|a| a == "*" || a == origin) {
        Ok(())
    } else {
        Err(refuse(StatusCode::FORBIDDEN, "origin_not_allowed"))
    }
}

fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn bearer_header(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// RFC 6455 4.2.2: the key with the protocol's GUID, hashed with SHA-1, in base64.
fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = Sha1::new().chain_update(key).chain_update(GUID).finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .map(percent_decoded)
}

/// A query value with its `%XX` escapes decoded, as a URL-encoding client sends it; an escape
/// that is not two hex digits, or bytes that are not UTF-8, stay as they came.
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex
            .filter(|_| bytes[i] == b'%')
            .map(|h| u8::from_str_radix(h, 16))
        {
            Some(Ok(byte)) => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_string())
}

/// True when the query has `name` with no value, `1` or `true`.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.unwrap_or("").split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        key == name && matches!(value, "" | "1" | "true")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn token_sources() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def"),
        );
        assert_eq!(bearer_header(&h).as_deref(), Some("abc.def"));
        assert_eq!(
            query_token(Some("x=1&token=t.o.k")).as_deref(),
            Some("t.o.k")
        );
        assert_eq!(query_token(Some("x=1")), None);
        assert_eq!(
            query_token(Some("token=a%2Eb%2ec%3D&x")).as_deref(),
            Some("a.b.c=")
        );
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%4"), "%zz%4");
        assert_eq!(percent_decoded("%FF"), "%FF", "not UTF-8: as it came");
        assert!(query_flag(Some("token=a&resume=1"), "resume"));
        assert!(query_flag(Some("resume"), "resume"));
        assert!(!query_flag(Some("resume=0"), "resume"));
        assert!(!query_flag(None, "resume"));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("roomcast.v1, bearer.a.b.c"),
        );
        assert_eq!(offered_protocols(&h), ["roomcast.v1", "bearer.a.b.c"]);
    }

    fn upgrade_request(version: &'static str, key: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static(version),
        );
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static(key));
        h
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn not_an_upgrade() -> Refusal {
        refuse(StatusCode::BAD_REQUEST, "not_a_websocket_upgrade")
    }

    #[test]
    fn an_upgrade_is_http_1_1_or_later() {
        let h = upgrade_request("13", KEY);
        assert_eq!(upgrade_key(Version::HTTP_11, &h), Ok(KEY));
        for old in [Version::HTTP_10, Version::HTTP_09] {
            assert_eq!(upgrade_key(old, &h), Err(not_an_upgrade()), "{old:?}");
        }
    }

    #[test]
    fn another_websocket_version_is_told_which_one_is_spoken() {
        for version in ["8", "12", "14", "13, 8", ""] {
            let h = upgrade_request(version, KEY);
            assert_eq!(
                upgrade_key(Version::HTTP_11, &h),
                Err(refuse(
                    StatusCode::UPGRADE_REQUIRED,
                    "unsupported_websocket_version"
                )),
                "{version:?}"
            );
        }
        let mut h = upgrade_request("13", KEY);
        h.remove(header::SEC_WEBSOCKET_VERSION);
        assert_eq!(upgrade_key(Version::HTTP_11, &h), Err(not_an_upgrade()));

        let answer = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_websocket_version",
        )
        .into_response();
        assert_eq!(answer.status(), StatusCode::UPGRADE_REQUIRED);
        let headers = answer.headers();
        assert_eq!(headers[header::SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
        let other = refuse(StatusCode::BAD_REQUEST, "not_a_websocket_upgrade").into_response();
        assert!(!other.headers().contains_key(header::SEC_WEBSOCKET_VERSION));
    }

    #[test]
    fn the_key_is_16_bytes_in_base64() {
        for good in [KEY, "AAAAAAAAAAAAAAAAAAAAAA==", "+/+/+/+/+/+/+/+/+/+/+w=="] {
            assert_eq!(
                upgrade_key(Version::HTTP_11, &upgrade_request("13", good)),
                Ok(good)
            );
        }
        let bad = [
            "x",
            "",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ===",
            // 15 and 17 bytes.
            "AAAAAAAAAAAAAAAAAAAA",
            "AAAAAAAAAAAAAAAAAAAAAAA=",
            "dGhlIHNhbXBsZSBub25jZ!==",
            "dGhlIHNhbXBsZSBub25j-_==",
            "dGhlIHNhbXBsZSBub25jZQ==dGhl",
        ];
        for key in bad {
            assert_eq!(
                upgrade_key(Version::HTTP_11, &upgrade_request("13", key)),
                Err(not_an_upgrade()),
                "{key:?}"
            );
        }
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(check_origin(&["https://app".into()], &h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil"));
        assert!(check_origin(&[], &h).is_ok());
        assert_eq!(
            check_origin(&["https://app".into()], &h)
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
    }
}
