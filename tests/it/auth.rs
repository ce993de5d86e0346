//! Handshake refusals: every bad token gets 401 before the upgrade; origins get 403.

use jsonwebtoken::{encode, EncodingKey, Header};
use roomcast::auth::{now_secs, Claims};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

fn claims(sub: &str, exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        exp,
        ..Claims::default()
    }
}

async fn refused(server: &Server, token: &str) -> (u16, String) {
    match Client::connect(&server.ws_url(), token).await {
        Ok(_) => panic!("token accepted: {token}"),
        Err(refusal) => refusal,
    }
}

#[tokio::test]
async fn bad_tokens_get_401_before_the_upgrade() {
    let topic = unique("auth");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;

    let expired = token_with(claims("1", now_secs() - 3600));
    assert_eq!(
        refused(&server, &expired).await,
        (401, "expired_token".into())
    );

    let forged = jsonwebtoken::encode(
        &Header::default(),
        &claims("1", now_secs() + 600),
        &EncodingKey::from_secret(b"not-the-server-secret-at-all"),
    )
    .unwrap();
    assert_eq!(
        refused(&server, &forged).await,
        (401, "bad_signature".into())
    );

    let hs512 = encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims("1", now_secs() + 600),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        refused(&server, &hs512).await,
        (401, "wrong_algorithm".into())
    );

    // "alg": "none" with no signature.
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"1","exp":{}}}"#, now_secs() + 600))
    );
    assert_eq!(
        refused(&server, &none).await,
        (401, "wrong_algorithm".into())
    );

    assert_eq!(
        refused(&server, "garbage").await,
        (401, "malformed_token".into())
    );

    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().remove("Sec-WebSocket-Protocol");
    match Client::connect_request(req).await {
        Err(refusal) => assert_eq!(refusal, (401, "missing_token".into())),
        Ok(_) => panic!("accepted without a token"),
    }
    let failures = server
        .metric("roomcast_handshake_failures_total{reason=\"expired_token\"}")
        .await;
    assert_eq!(failures, 1.0);
}

fn b64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn the_token_is_accepted_from_header_subprotocol_and_query() {
    let topic = unique("sources");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let t = token("src", &[]);

    let c = server.connect(&t).await;
    assert_eq!(c.welcome["user"], "src");
    assert_eq!(c.welcome["protocol"], 1);

    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    let c = Client::connect_request(req)
        .await
        .expect("bearer header accepted");
    assert_eq!(c.welcome["user"], "src");

    let url = format!("{}?token={t}", server.ws_url());
    let req = url.into_client_request().unwrap();
    let c = Client::connect_request(req)
        .await
        .expect("query token accepted");
    assert_eq!(c.welcome["user"], "src");
}

#[tokio::test]
async fn a_disallowed_origin_gets_403() {
    let topic = unique("origin");
    create_topic(&topic, 1).await;
    let env = [("ROOMCAST_ALLOWED_ORIGINS", "https://app.example")];
    let server = Server::start_with(&task_route(&topic), "", &env).await;
    let t = token("o", &[]);
    let request = |origin: &str| {
        let mut req = server.ws_url().into_client_request().unwrap();
        let h = req.headers_mut();
        h.insert("Origin", origin.parse().unwrap());
        h.insert(
            "Sec-WebSocket-Protocol",
            format!("roomcast.v1, bearer.{t}").parse().unwrap(),
        );
        req
    };
    match Client::connect_request(request("https://evil.example")).await {
        Err(refusal) => assert_eq!(refusal, (403, "origin_not_allowed".into())),
        Ok(_) => panic!("foreign origin accepted"),
    }
    let c = Client::connect_request(request("https://app.example")).await;
    assert_eq!(c.expect("allowed origin").welcome["user"], "o");
}

/// Public-key algorithms: the server holds only the public key; the algorithm is pinned, so
/// an HS256 token signed with the public key's bytes (the classic confusion attack) fails.
async fn public_key_mode(algorithm: jsonwebtoken::Algorithm, name: &str) {
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys");
    let public = keys.join(format!("{name}-public.pem"));
    let private = std::fs::read(keys.join(format!("{name}-private.pem"))).unwrap();
    let topic = unique(name);
    create_topic(&topic, 1).await;
    let alg = format!("{algorithm:?}");
    let env = [
        ("ROOMCAST_JWT_ALGORITHM", alg.as_str()),
        ("ROOMCAST_JWT_PUBLIC_KEY_FILE", public.to_str().unwrap()),
    ];
    let server = Server::start_with(&task_route(&topic), "", &env).await;
    let key = match algorithm {
        jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(&private).unwrap(),
        _ => EncodingKey::from_rsa_pem(&private).unwrap(),
    };
    let good = encode(
        &Header::new(algorithm),
        &claims("pk", now_secs() + 600),
        &key,
    )
    .unwrap();
    let c = server.connect(&good).await;
    assert_eq!(c.welcome["user"], "pk");

    let public_bytes = std::fs::read(&public).unwrap();
    let confused = encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("pk", now_secs() + 600),
        &EncodingKey::from_secret(&public_bytes),
    )
    .unwrap();
    assert_eq!(
        refused(&server, &confused).await,
        (401, "wrong_algorithm".into())
    );
}

#[tokio::test]
async fn es256_tokens_are_verified_with_the_public_key() {
    public_key_mode(jsonwebtoken::Algorithm::ES256, "es256").await;
}

#[tokio::test]
async fn rs256_tokens_are_verified_with_the_public_key() {
    public_key_mode(jsonwebtoken::Algorithm::RS256, "rs256").await;
}

#[tokio::test]
async fn the_token_command_mints_a_token_the_server_accepts() {
    let topic = unique("mint");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let minted = run_ok(
        &[
            "token",
            "--sub",
            "minted",
            "--rooms",
            "task:*,feature:**",
            "--ttl",
            "60",
        ],
        &[("ROOMCAST_JWT_SECRET", SECRET)],
    );
    let mut c = server.connect(minted.trim()).await;
    assert_eq!(c.welcome["user"], "minted");
    c.join(&["task:1", "feature:users:entity:user"]).await;
}

/// `roomcast token --perms` carries permissions, which the server's `auth.perms` turns into
/// rooms; a room no permission maps to stays refused.
#[tokio::test]
async fn the_token_command_carries_permissions() {
    let topic = unique("mintperms");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let minted = run_ok(
        &[
            "token",
            "--sub",
            "perms",
            "--perms",
            "users:read",
            "--ttl",
            "60",
        ],
        &[("ROOMCAST_JWT_SECRET", SECRET)],
    );
    let mut c = server.connect(minted.trim()).await;
    c.join(&["feature:users"]).await;
    let (errors, _) = c
        .subscribe(serde_json::json!({ "rooms": ["feature:billing"] }))
        .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["code"], "forbidden");
}
