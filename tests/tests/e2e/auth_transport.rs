//! Transport behaviour every server shares, checked on auth: TLS, compression, the
//! request size limit, and a login flood that must not starve other calls.

use std::time::Duration;

use futures::StreamExt;

use switchboard_proto::auth::v1 as pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{AuthOptions, auth_client, spawn_auth};
use switchboard_tests::redis::RedisServer;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[tokio::test]
async fn tls_server_serves_tls_clients_and_refuses_plaintext() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert_pem = cert.cert.pem();
    let key_pem = cert.signing_key.serialize_pem();
    let options = AuthOptions {
        tls: Some((cert_pem.clone().into_bytes(), key_pem.into_bytes())),
        ..AuthOptions::default()
    };
    let auth = spawn_auth(None, options).await.expect("auth");

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", auth.addr))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("TLS connect");
    let mut client = AuthServiceClient::new(channel);
    let keys = client
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("call over TLS")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);

    let plain = auth_client(&auth).get_jwks(pb::GetJwksRequest {}).await;
    // The server drops the plaintext connection during the handshake; the client reports a
    // transport failure (tonic calls it UNAVAILABLE or UNKNOWN depending on timing).
    let err = plain.expect_err("plaintext client was served by a TLS server");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown)
            && err.message().contains("transport error"),
        "{err:?}"
    );
}

#[tokio::test]
async fn accepted_connections_have_tcp_nodelay() {
    // The very function every server's accept loop runs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut incoming = Box::pin(switchboard_common::server::incoming(listener, None));
    let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("accepted in time")
        .expect("a connection")
        .expect("accepted");
    assert!(
        accepted.get_ref().nodelay().expect("read TCP_NODELAY"),
        "Nagle's algorithm is on for accepted connections"
    );
}

#[tokio::test]
async fn gzip_and_zstd_requests_are_accepted_and_responses_compressed_when_asked() {
    let auth = spawn_auth(None, AuthOptions::default())
        .await
        .expect("auth");
    for (i, encoding) in [CompressionEncoding::Gzip, CompressionEncoding::Zstd]
        .into_iter()
        .enumerate()
    {
        let mut client = auth_client(&auth)
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let name = format!("zipper{i}");
        client
            .register(pb::RegisterRequest {
                username: name.clone(),
                password: "right password".into(),
                display_name: "x".repeat(60),
            })
            .await
            .expect("compressed register");
        let response = client
            .login(pb::LoginRequest {
                username: name,
                password: "right password".into(),
            })
            .await
            .expect("compressed login");
        let used = response
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let expected = match encoding {
            CompressionEncoding::Gzip => "gzip",
            _ => "zstd",
        };
        assert_eq!(
            used.as_deref(),
            Some(expected),
            "response not compressed with {expected}"
        );
    }
}

#[tokio::test]
async fn oversize_requests_get_resource_exhausted_and_the_connection_survives() {
    let auth = spawn_auth(
        None,
        AuthOptions {
            max_message_bytes: 64 * 1024,
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    let mut client = auth_client(&auth);
    let huge = pb::RegisterRequest {
        username: "big".into(),
        password: "right password".into(),
        display_name: "x".repeat(100_000),
    };
    let err = client
        .register(huge.clone())
        .await
        .expect_err("oversize accepted");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("65536"),
        "message should name the limit: {}",
        err.message()
    );

    // Compressed below the limit but larger once decompressed: refused the same way.
    let mut gz = auth_client(&auth).send_compressed(CompressionEncoding::Gzip);
    let err = gz
        .register(huge)
        .await
        .expect_err("decompression bomb accepted");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // The same connection still serves normal calls.
    client
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("connection still usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_does_not_starve_other_calls() {
    let redis = RedisServer::spawn().expect("redis");
    // Production hashing cost, and limits high enough that every guess is really hashed.
    let options = AuthOptions {
        cheap_hashing: false,
        per_user: 1_000_000,
        per_peer: 1_000_000,
        ..AuthOptions::default()
    };
    let auth = spawn_auth(Some(&redis), options).await.expect("auth");
    let mut client = auth_client(&auth);
    let token = register_and_login(&mut client, "victim")
        .await
        .expect("register and login")
        .access_token;

    const FLOOD: usize = 300;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        // One connection each, as an attacker would open.
        let mut c = auth_client(&auth);
        flood.spawn(async move {
            c.login(pb::LoginRequest {
                username: "victim".into(),
                password: format!("guess {i}"),
            })
            .await
            .map(|_| ())
        });
    }
    // Meanwhile, WhoAmI keeps answering (a liveness check with a generous deadline).
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let mut req = authed(pb::WhoAmIRequest {}, &token);
        req.set_timeout(Duration::from_secs(5));
        client
            .who_am_i(req)
            .await
            .expect("WhoAmI starved by the login flood");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut still_running = 0;
    let started = std::time::Instant::now();
    while let Some(result) = tokio::time::timeout(Duration::from_secs(120), flood.join_next())
        .await
        .expect("flood finishes")
    {
        match result.expect("task") {
            Ok(()) => panic!("a wrong password was accepted"),
            // Refused, limited, or ended by the server's unary time limit: never served.
            Err(s) => assert!(
                matches!(
                    s.code(),
                    Code::Unauthenticated | Code::ResourceExhausted | Code::DeadlineExceeded
                ),
                "flood answered {s:?}"
            ),
        }
        still_running += 1;
    }
    assert_eq!(still_running, FLOOD);
    eprintln!(
        "flood of {FLOOD} wrong passwords drained {:?} after the WhoAmI checks",
        started.elapsed()
    );
}
