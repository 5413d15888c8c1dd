//! gRPC-Web on the same port as native gRPC: a call framed as a browser's gRPC-Web client
//! frames it, over HTTP/1.1, gets the message and the status in trailers inside the body;
//! CORS answers only the origins in CORS_ALLOWED_ORIGINS; and the JavaScript clients
//! generated from proto/ (buf.gen.yaml) and the typed SDK over them (web/sdk) call real
//! servers with connect-web's gRPC-Web transport, in Node.

use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use prost::Message;
use switchboard_proto::auth::v1 as pb;
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_tests::instance::{AuthOptions, InProcess, spawn_auth};
use switchboard_tests::stack::{Stack, StackOptions};

const ALLOWED: &str = "http://shop.example:8080";

async fn auth() -> InProcess {
    spawn_auth(
        None,
        AuthOptions {
            cors_allowed_origins: vec![ALLOWED.into()],
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth")
}

/// One HTTP/1.1 request to `server`: its status, headers and whole body.
async fn http1(
    server: &InProcess,
    request: http::Request<Full<Bytes>>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    let driver = tokio::spawn(connection);
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("answered in time")
        .expect("a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    driver.abort();
    (parts.status, parts.headers, body)
}

/// A gRPC-Web POST of `message` to `path`, from `origin` if any, with `token` if any.
fn grpc_web(
    path: &str,
    message: &impl Message,
    origin: Option<&str>,
    token: Option<&str>,
) -> http::Request<Full<Bytes>> {
    let payload = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    let mut request = http::Request::post(path)
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    if let Some(origin) = origin {
        request = request.header(http::header::ORIGIN, origin);
    }
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    request.body(Full::new(Bytes::from(body))).expect("request")
}

/// [`grpc_web`] sent to `server` over HTTP/1.1, without a token.
async fn call(
    server: &InProcess,
    path: &str,
    message: &impl Message,
    origin: Option<&str>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    http1(server, grpc_web(path, message, origin, None)).await
}

/// Header `name` of `headers` as text, lower-cased; empty when missing.
fn header(headers: &http::HeaderMap, name: http::header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// The data frames' bytes and the trailers of a gRPC-Web response body.
fn frames(mut body: Bytes) -> (Vec<Bytes>, String) {
    let (mut data, mut trailers) = (Vec::new(), String::new());
    while body.remaining() >= 5 {
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        assert!(body.remaining() >= len, "a frame cut short");
        let frame = body.split_to(len);
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(&frame));
        } else {
            data.push(frame);
        }
    }
    assert_eq!(body.remaining(), 0, "bytes after the last frame");
    (data, trailers)
}

#[tokio::test]
async fn a_grpc_web_call_over_http1_gets_its_message_and_status() {
    let server = auth().await;
    let (status, headers, body) = call(
        &server,
        "/switchboard.auth.v1.AuthService/GetJwks",
        &pb::GetJwksRequest {},
        None,
    )
    .await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(
        headers[http::header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|c| c.starts_with("application/grpc-web")),
        "{headers:?}"
    );
    let (data, trailers) = frames(body);
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");
    let keys = pb::GetJwksResponse::decode(data.first().cloned().expect("a message"))
        .expect("GetJwksResponse");
    assert!(!keys.keys.is_empty(), "the signing key is published");

    // A call that needs a token says so, as native gRPC does. A refusal before any
    // message is "trailers-only": its status comes in the headers.
    let (status, headers, body) = call(
        &server,
        "/switchboard.auth.v1.AuthService/WhoAmI",
        &pb::WhoAmIRequest {},
        None,
    )
    .await;
    assert_eq!(status, http::StatusCode::OK);
    let (data, trailers) = frames(body);
    assert!(data.is_empty());
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(|c| format!("grpc-status:{c}"))
        .unwrap_or(trailers);
    assert!(
        code.contains("grpc-status:16"),
        "UNAUTHENTICATED: {code:?} {headers:?}"
    );
    assert!(
        headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| !m.is_empty()),
        "a message a person can act on: {headers:?}"
    );
    // Native gRPC still works on the same port.
    let mut native =
        switchboard_proto::auth::v1::auth_service_client::AuthServiceClient::new(server.channel());
    assert!(
        !native
            .get_jwks(pb::GetJwksRequest {})
            .await
            .expect("native gRPC")
            .into_inner()
            .keys
            .is_empty()
    );
}

#[tokio::test]
async fn cors_answers_only_the_allowed_origins() {
    let server = auth().await;
    let preflight = |origin: &str| {
        http::Request::options("/switchboard.auth.v1.AuthService/GetJwks")
            .header(http::header::HOST, "localhost")
            .header(http::header::ORIGIN, origin)
            .header(http::header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                http::header::ACCESS_CONTROL_REQUEST_HEADERS,
                "content-type,x-grpc-web,authorization",
            )
            .body(Full::new(Bytes::new()))
            .expect("preflight")
    };
    let (status, headers, _) = http1(&server, preflight(ALLOWED)).await;
    assert!(status.is_success(), "{status}");
    assert_eq!(
        header(&headers, http::header::ACCESS_CONTROL_ALLOW_ORIGIN),
        ALLOWED
    );
    let allowed_headers = header(&headers, http::header::ACCESS_CONTROL_ALLOW_HEADERS);
    for h in ["content-type", "x-grpc-web", "authorization"] {
        assert!(allowed_headers.contains(h), "{h}: {allowed_headers}");
    }
    let (_, headers, _) = http1(&server, preflight("http://evil.example")).await;
    assert!(
        headers
            .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none(),
        "another origin is not allowed: {headers:?}"
    );

    // The call itself from the allowed page: the page may read the gRPC status.
    let (_, headers, body) = call(
        &server,
        "/switchboard.auth.v1.AuthService/GetJwks",
        &pb::GetJwksRequest {},
        Some(ALLOWED),
    )
    .await;
    assert_eq!(
        header(&headers, http::header::ACCESS_CONTROL_ALLOW_ORIGIN),
        ALLOWED
    );
    let exposed = header(&headers, http::header::ACCESS_CONTROL_EXPOSE_HEADERS);
    assert!(exposed.contains("grpc-status"), "{exposed}");
    assert!(frames(body).1.contains("grpc-status:0"));

    // Without any allowed origin (the default), no page is answered.
    let closed = spawn_auth(None, AuthOptions::default())
        .await
        .expect("auth");
    let (_, headers, _) = http1(&closed, preflight(ALLOWED)).await;
    assert!(
        headers
            .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none()
    );
}

/// `buf generate` (buf.gen.yaml: protoc-gen-es into web/gen), then `node --test
/// web/sdk/test/` against a real auth: the generated client reads the keys, and its errors
/// carry the gRPC code and the server's message.
#[tokio::test]
async fn the_web_sdk_and_the_generated_clients_call_real_servers_over_grpc_web() {
    let root = switchboard_tests::deploy::repo_root();
    let web = root.join("web");
    // The generated clients, the SDK type-checked (strict) and built, as `npm test` does.
    if let Err(e) = switchboard_tests::web::build() {
        panic!("{e}");
    }

    // A whole desk: auth, presence and two messaging instances, and an agent.
    let stack = Stack::start(StackOptions {
        auth: AuthOptions {
            admin: Some(("webadmin".into(), "admin password".into())),
            ..AuthOptions::default()
        },
        presence: 1,
        messaging: 2,
        ..StackOptions::default()
    })
    .await;
    let agent = stack.person("agent_web", auth_pb::Role::Agent).await;
    let url = |addr: std::net::SocketAddr| format!("http://{addr}");
    let described = serde_json::json!({
        "auth": url(stack.auth[0].addr),
        "presence": url(stack.presence[0].addr),
        "messaging": stack.messaging.iter().map(|m| url(m.addr)).collect::<Vec<_>>(),
        "agent": { "username": agent.name, "password": "right password" },
    })
    .to_string();
    let auth_url = url(stack.auth[0].addr);
    let (passed, report) = tool(
        std::path::Path::new("node"),
        &[
            "--test",
            "--test-timeout=60000",
            "--test-force-exit",
            "sdk/test/",
        ],
        &web,
        &[
            ("SWITCHBOARD_AUTH_URL", &auth_url),
            ("SWITCHBOARD_STACK", &described),
        ],
    )
    .await;
    assert!(passed, "node --test failed:\n{report}");
    // The generated clients (3), the SDK's unit tests (6) and the SDK on the stack (1),
    // none of them skipped.
    assert!(report.contains("# pass 10"), "ten tests passed:\n{report}");
    assert!(report.contains("# skipped 0"), "nothing skipped:\n{report}");
}

/// Runs `program args` in `dir` with only PATH, HOME and `vars` set, within two minutes;
/// whether it succeeded, and everything it printed.
async fn tool(
    program: &std::path::Path,
    args: &[&str],
    dir: &std::path::Path,
    vars: &[(&str, &str)],
) -> (bool, String) {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .kill_on_drop(true);
    for (name, value) in vars {
        command.env(name, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{} ran over two minutes", program.display()))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}
