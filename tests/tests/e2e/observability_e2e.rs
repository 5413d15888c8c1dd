//! Observability end to end, with the built binaries as separate processes (each its own
//! tracer and metrics registry, as in production), one real Redis and a real OTLP receiver:
//! one trace from a send to every delivery across instances, client/server span pairs
//! between services, a dead collector, `/metrics`, and the SIGTERM drain.

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use switchboard_proto::messaging::v1::support_service_client::SupportServiceClient;
use switchboard_tests::auth::{authed, first_admin, register_and_login};
use switchboard_tests::instance::{ChildService, SERVICE_TOKEN};
use switchboard_tests::messaging::{Connection, create_group, send};
use switchboard_tests::otlp::{Received, Receiver};
use switchboard_tests::redis::RedisServer;
use switchboard_tests::scrape::{scrape, value};

const MESSAGING: &str = "switchboard-messaging";
const BODY: &str = "the body must never reach a span 5c1e";
const PASSWORD: &str = "right password";

fn spawn(binary: &str, env: &[(&str, String)], otel: Option<&Receiver>) -> ChildService {
    let mut env = env.to_vec();
    if let Some(r) = otel {
        env.extend(r.env());
    }
    ChildService::spawn(binary, &env).unwrap_or_else(|e| panic!("{binary}: {e:#}"))
}

/// Whether `ancestor` is `span` or one of its ancestors among `spans`.
fn descends(spans: &[Received], span: &Received, ancestor: &Received) -> bool {
    let mut at = span.clone();
    for _ in 0..32 {
        if at.span_id() == ancestor.span_id() {
            return true;
        }
        match spans.iter().find(|s| s.span_id() == at.parent_id()) {
            Some(parent) => at = parent.clone(),
            None => return false,
        }
    }
    false
}

fn is_rpc(s: &Received, service: &str, method: &str, kind: SpanKind) -> bool {
    s.attr("rpc.service").is_some_and(|v| v.ends_with(service))
        && s.attr("rpc.method").as_deref() == Some(method)
        && s.kind() == kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_joins_the_send_the_publish_and_every_delivery() {
    let redis = RedisServer::spawn().expect("redis");
    let otlp = Receiver::start().await.expect("otlp receiver");
    let auth = spawn(
        "switchboard-auth",
        &[("REDIS_URL", redis.url())],
        Some(&otlp),
    );
    let messaging_env = [
        ("REDIS_URL", redis.url()),
        ("AUTH_URL", format!("http://{}", auth.addr)),
    ];
    let a = spawn("switchboard-messaging", &messaging_env, Some(&otlp));
    let b = spawn("switchboard-messaging", &messaging_env, Some(&otlp));

    let mut users = AuthServiceClient::new(auth.channel());
    let alice = register_and_login(&mut users, "otel_alice")
        .await
        .expect("alice");
    let bob = register_and_login(&mut users, "otel_bob")
        .await
        .expect("bob");
    let carol = register_and_login(&mut users, "otel_carol")
        .await
        .expect("carol");
    let id = |t: &str| {
        let claims = t.split('.').nth(1).expect("jwt");
        let json =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
                .expect("claims");
        serde_json::from_slice::<serde_json::Value>(&json).expect("json")["sub"]
            .as_str()
            .expect("sub")
            .to_owned()
    };
    let mut on_a = MessagingServiceClient::new(a.channel());
    let group = create_group(
        &mut on_a,
        &alice.access_token,
        "traced",
        &[id(&bob.access_token), id(&carol.access_token)],
    )
    .await
    .expect("group");

    // Bob listens on B, Carol on A.
    let mut bob_stream = Connection::open(b.channel(), &bob.access_token)
        .await
        .expect("bob stream");
    bob_stream.subscribe(&group.id, 0).await.expect("subscribe");
    bob_stream
        .recovered(&group.id)
        .await
        .expect("bob subscribed");
    let mut carol_stream = Connection::open(a.channel(), &carol.access_token)
        .await
        .expect("carol stream");
    carol_stream
        .subscribe(&group.id, 0)
        .await
        .expect("subscribe");
    carol_stream
        .recovered(&group.id)
        .await
        .expect("carol subscribed");

    let sent = send(&mut on_a, &alice.access_token, &group.id, "m1", BODY)
        .await
        .expect("send");
    for stream in [&mut bob_stream, &mut carol_stream] {
        let got = stream
            .until(Duration::from_secs(10), |f| match f {
                Out::Message(m) if m.seq == sent.seq => Some(m),
                _ => None,
            })
            .await
            .expect("delivered");
        assert_eq!(got.body, BODY);
    }

    // The send's server span, its publish child, and a deliver child of the publish on
    // each instance (B for Bob, A for Carol), all in one trace.
    let seq = sent.seq.to_string();
    let found = otlp
        .wait_for(Duration::from_secs(20), |spans| {
            let send = spans.iter().find(|s| {
                s.service == MESSAGING
                    && is_rpc(s, "MessagingService", "SendMessage", SpanKind::Server)
            })?;
            let publish = spans.iter().find(|s| {
                s.span.name == "publish"
                    && descends(spans, s, send)
                    && s.attr("switchboard.seq").as_deref() == Some(&seq)
            })?;
            let delivers: Vec<&Received> = spans
                .iter()
                .filter(|s| s.span.name == "deliver" && s.parent_id() == publish.span_id())
                .collect();
            (delivers.len() >= 2).then(|| {
                (
                    send.clone(),
                    publish.clone(),
                    delivers.into_iter().cloned().collect::<Vec<_>>(),
                )
            })
        })
        .await;
    let Some((send_span, publish, delivers)) = found else {
        panic!(
            "no complete send trace; spans received:\n{:#?}",
            otlp.spans()
                .iter()
                .map(|s| (&s.service, &s.span.name, s.attr("rpc.method")))
                .collect::<Vec<_>>()
        );
    };
    let trace = send_span.trace_id();
    assert_eq!(send_span.attr("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(send_span.attr("rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(publish.trace_id(), trace);
    assert_eq!(publish.kind(), SpanKind::Producer);
    assert_eq!(
        publish.instance, send_span.instance,
        "publish runs where the send was received"
    );
    assert_eq!(
        delivers.len(),
        2,
        "one deliver span per instance with subscribers"
    );
    let mut instances: Vec<&str> = delivers.iter().map(|d| d.instance.as_str()).collect();
    instances.sort();
    instances.dedup();
    assert_eq!(
        instances.len(),
        2,
        "deliveries on both instances: {delivers:#?}"
    );
    for d in &delivers {
        assert_eq!(d.trace_id(), trace);
        assert_eq!(d.service, MESSAGING);
        assert_eq!(d.kind(), SpanKind::Consumer);
        assert_eq!(
            d.attr("switchboard.conversation_id").as_deref(),
            Some(group.id.as_str())
        );
        assert_eq!(d.attr("switchboard.seq").as_deref(), Some(seq.as_str()));
        assert_eq!(
            d.attr("switchboard.local_subscribers").as_deref(),
            Some("1")
        );
    }

    // Token keys: messaging fetched auth's keys inside a call, as a client span whose
    // server span on auth is its child.
    let pair = otlp
        .wait_for(Duration::from_secs(20), |spans| {
            let client = spans.iter().find(|s| {
                s.service == MESSAGING && is_rpc(s, "AuthService", "GetJwks", SpanKind::Client)
            })?;
            let server = spans.iter().find(|s| {
                s.service == "switchboard-auth"
                    && is_rpc(s, "AuthService", "GetJwks", SpanKind::Server)
                    && s.parent_id() == client.span_id()
            })?;
            Some((client.clone(), server.clone()))
        })
        .await;
    let (client, server) =
        pair.expect("a GetJwks client span on messaging with auth's server span as its child");
    assert_eq!(client.trace_id(), server.trace_id());
    assert!(
        !client.parent_id().is_empty(),
        "the key fetch belongs to the call that needed the keys"
    );
    let spans = otlp.spans();
    let caller = spans.iter().find(|s| {
        s.service == MESSAGING && s.kind() == SpanKind::Server && descends(&spans, &client, s)
    });
    assert!(
        caller.is_some(),
        "the key fetch is not inside a messaging call's span"
    );

    // Nothing secret in any span: bodies, passwords, tokens.
    for s in otlp.spans() {
        for text in s.texts() {
            for secret in [BODY, PASSWORD, &alice.access_token, &alice.refresh_token] {
                assert!(
                    !text.contains(secret),
                    "span {} carries a secret: {text}",
                    s.span.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desk_routing_calls_presence_inside_the_consultation_trace() {
    let redis = RedisServer::spawn().expect("redis");
    let otlp = Receiver::start().await.expect("otlp receiver");
    let auth = spawn(
        "switchboard-auth",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_ADMIN_USERNAME", "otel_admin".into()),
            ("AUTH_ADMIN_PASSWORD", "otel admin password".into()),
        ],
        None,
    );
    let common = [
        ("REDIS_URL", redis.url()),
        ("AUTH_URL", format!("http://{}", auth.addr)),
        ("SERVICE_TOKEN", SERVICE_TOKEN.into()),
    ];
    let presence = spawn("switchboard-presence", &common, Some(&otlp));
    let mut env = common.to_vec();
    env.push(("PRESENCE_URL", format!("http://{}", presence.addr)));
    let messaging = spawn("switchboard-messaging", &env, Some(&otlp));

    let users = AuthServiceClient::new(auth.channel());
    let _admin = first_admin(&users, "otel_admin", "otel admin password").await;
    let customer = register_and_login(&mut users.clone(), "otel_customer")
        .await
        .expect("customer");
    let mut desk = SupportServiceClient::new(messaging.channel());
    desk.open_consultation(authed(
        pb::OpenConsultationRequest {
            topic: "traced".into(),
            first_message: "hello".into(),
        },
        &customer.access_token,
    ))
    .await
    .expect("open");

    let found = otlp
        .wait_for(Duration::from_secs(20), |spans| {
            let open = spans.iter().find(|s| {
                s.service == MESSAGING
                    && is_rpc(s, "SupportService", "OpenConsultation", SpanKind::Server)
            })?;
            let client = spans.iter().find(|s| {
                s.service == MESSAGING
                    && descends(spans, s, open)
                    && is_rpc(s, "PresenceService", "ListOnline", SpanKind::Client)
            })?;
            let server = spans.iter().find(|s| {
                s.service == "switchboard-presence"
                    && is_rpc(s, "PresenceService", "ListOnline", SpanKind::Server)
                    && s.parent_id() == client.span_id()
            })?;
            Some((open.clone(), client.clone(), server.clone()))
        })
        .await;
    let (open, client, server) = found.unwrap_or_else(|| {
        panic!(
            "no OpenConsultation → ListOnline client → presence server chain; spans:\n{:#?}",
            otlp.spans()
                .iter()
                .map(|s| (&s.service, &s.span.name, s.parent_id()))
                .collect::<Vec<_>>()
        )
    });
    assert_eq!(server.trace_id(), open.trace_id());
    assert_eq!(client.attr("rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(server.attr("rpc.grpc.status_code").as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_blocks_nothing_and_dropped_spans_are_counted() {
    let dead = switchboard_tests::free_port().expect("port");
    let auth = spawn(
        "switchboard-auth",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{dead}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
        None,
    );
    let metrics = auth.metrics_addr.expect("metrics address");
    let mut users = AuthServiceClient::new(auth.channel());
    for i in 0..5 {
        // Bounded so a blocked request fails the test instead of hanging it.
        tokio::time::timeout(
            Duration::from_secs(20),
            register_and_login(&mut users, &format!("nocollector{i}")),
        )
        .await
        .expect("a request blocked on the dead collector")
        .expect("requests succeed without a collector");
    }
    let dropped = switchboard_tests::eventually(Duration::from_secs(20), || async {
        let s = scrape(metrics).await.ok()?;
        let v = value(&s, "switchboard_otel_spans_dropped_total", &[]);
        (v > 0.0).then_some(v)
    })
    .await;
    assert!(
        dropped.is_some(),
        "dropped spans were never counted; output:\n{}",
        auth.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn("switchboard-auth", &[("REDIS_URL", redis.url())], None);
    let messaging = spawn(
        "switchboard-messaging",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
        ],
        None,
    );
    let (auth_metrics, msg_metrics) = (
        auth.metrics_addr.expect("auth metrics"),
        messaging.metrics_addr.expect("messaging metrics"),
    );
    let before = scrape(auth_metrics).await.expect("auth /metrics parses");
    let login = |r: &str| ("result", r.to_owned());
    let logins = |s: &prometheus_parse::Scrape, r: &str| {
        let (k, v) = login(r);
        value(s, "switchboard_logins_total", &[(k, &v)])
    };
    assert_eq!(logins(&before, "success"), 0.0);

    let mut users = AuthServiceClient::new(auth.channel());
    let alice = register_and_login(&mut users, "metrics_alice")
        .await
        .expect("alice");
    let bob = register_and_login(&mut users, "metrics_bob")
        .await
        .expect("bob");
    let wrong = switchboard_tests::auth::login(&mut users, "metrics_bob", "wrong password").await;
    assert_eq!(
        wrong.expect_err("wrong password").code(),
        tonic::Code::Unauthenticated
    );

    let after = scrape(auth_metrics).await.expect("auth /metrics parses");
    assert_eq!(logins(&after, "success"), 2.0);
    assert_eq!(logins(&after, "failure"), 1.0);
    assert_eq!(
        value(
            &after,
            "switchboard_grpc_requests_total",
            &[("method", "Login"), ("code", "UNAUTHENTICATED")]
        ),
        1.0
    );
    assert_eq!(value(&after, "switchboard_redis_errors_total", &[]), 0.0);

    let mut client = MessagingServiceClient::new(messaging.channel());
    let bob_id = {
        let me = users
            .who_am_i(authed(
                switchboard_proto::auth::v1::WhoAmIRequest {},
                &bob.access_token,
            ))
            .await
            .expect("whoami")
            .into_inner()
            .user
            .unwrap_or_default();
        me.id
    };
    let group = create_group(&mut client, &alice.access_token, "metered", &[bob_id])
        .await
        .expect("group");
    let mut stream = Connection::open(messaging.channel(), &bob.access_token)
        .await
        .expect("stream");
    stream.subscribe(&group.id, 0).await.expect("subscribe");
    stream.recovered(&group.id).await.expect("subscribed");
    let open = scrape(msg_metrics)
        .await
        .expect("messaging /metrics parses");
    assert_eq!(
        value(
            &open,
            "switchboard_streams_active",
            &[("method", "Connect")]
        ),
        1.0
    );
    for i in 0..3 {
        send(
            &mut client,
            &alice.access_token,
            &group.id,
            &format!("k{i}"),
            "hi",
        )
        .await
        .expect("send");
        stream
            .until(Duration::from_secs(10), |f| {
                matches!(f, Out::Message(_)).then_some(())
            })
            .await
            .expect("delivered");
    }
    let sent = scrape(msg_metrics)
        .await
        .expect("messaging /metrics parses");
    assert_eq!(
        value(&sent, "switchboard_messages_published_total", &[]),
        3.0
    );
    assert_eq!(
        value(&sent, "switchboard_messages_delivered_total", &[]),
        3.0
    );
    assert_eq!(
        value(
            &sent,
            "switchboard_grpc_requests_total",
            &[("method", "SendMessage"), ("code", "OK")]
        ),
        3.0
    );
    let latency = sent
        .samples
        .iter()
        .find(|s| s.metric == "switchboard_delivery_latency_seconds")
        .expect("delivery latency histogram");
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(total, 3.0, "three deliveries in the histogram: {buckets:?}");
        }
        other => panic!("delivery latency is not a histogram: {other:?}"),
    }
    for metric in [
        "switchboard_messages_published_total",
        "switchboard_streams_active",
    ] {
        assert!(sent.docs.contains_key(metric), "{metric} has no HELP text");
    }
    drop(stream);
    let closed = switchboard_tests::eventually(Duration::from_secs(10), || async {
        let s = scrape(msg_metrics).await.ok()?;
        (value(&s, "switchboard_streams_active", &[("method", "Connect")]) == 0.0).then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "the closed stream is still counted as active"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_not_serving_first_then_streams_end_with_a_reconnect_hint() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let redis = RedisServer::spawn().expect("redis");
    let otlp = Receiver::start().await.expect("otlp receiver");
    let auth = spawn("switchboard-auth", &[("REDIS_URL", redis.url())], None);
    let grace = Duration::from_secs(5);
    let mut messaging = spawn(
        "switchboard-messaging",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_URL", format!("http://{}", auth.addr)),
            ("SHUTDOWN_GRACE_SECS", grace.as_secs().to_string()),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", otlp.addr),
            ),
            // Far beyond the test: only the flush at exit can deliver the spans.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000".into()),
        ],
        None,
    );
    let mut users = AuthServiceClient::new(auth.channel());
    let alice = register_and_login(&mut users, "drain_alice")
        .await
        .expect("alice");
    let mut stream = Connection::open(messaging.channel(), &alice.access_token)
        .await
        .expect("stream");
    stream
        .send(pb::connect_request::Frame::Ping(pb::Ping { nonce: 7 }))
        .await
        .expect("ping");
    stream
        .until(Duration::from_secs(10), |f| {
            matches!(f, Out::Pong(_)).then_some(())
        })
        .await
        .expect("stream is up");

    let mut health = HealthClient::new(messaging.channel());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = watch.message().await.expect("health").expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let not_serving = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), watch.message()).await {
                Ok(Ok(Some(m))) if m.status == ServingStatus::NotServing as i32 => {
                    return Some(Instant::now());
                }
                Ok(Ok(Some(_))) => continue,
                _ => return None,
            }
        }
    });

    let signalled = Instant::now();
    messaging.signal_term().expect("SIGTERM");
    let status = stream.ended(Duration::from_secs(10)).await;
    let ended = Instant::now();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("reconnect"),
        "no reconnect hint: {}",
        status.message()
    );
    let not_serving = not_serving
        .await
        .expect("health task")
        .expect("health never reported NOT_SERVING");
    assert!(
        not_serving <= ended,
        "the stream ended before health said NOT_SERVING"
    );

    let exit = tokio::task::spawn_blocking(move || {
        let exit = messaging.wait_exit(grace);
        (exit, messaging.output())
    })
    .await
    .expect("wait");
    match exit {
        (Ok(code), _) => assert!(code.success(), "drain exit status {code:?}"),
        (Err(e), output) => panic!("{e:#}\n{output}"),
    }
    assert!(signalled.elapsed() <= grace + Duration::from_secs(1));
    // Spans were flushed on the way out: the ping frame's span arrived.
    let spans = otlp.spans();
    assert!(
        spans.iter().any(|s| s.span.name == "Connect ping"),
        "spans were not flushed at exit: {:?}",
        spans.iter().map(|s| &s.span.name).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_trace_and_span_of_their_call() {
    let otlp = Receiver::start().await.expect("otlp receiver");
    let auth = spawn(
        "switchboard-auth",
        &[("LOG_FORMAT", "json".into())],
        Some(&otlp),
    );
    let mut users = AuthServiceClient::new(auth.channel());
    register_and_login(&mut users, "json_logger")
        .await
        .expect("login");
    let line = switchboard_tests::eventually(Duration::from_secs(10), || {
        let output = auth.output();
        async move {
            output
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "logged in")
        }
    })
    .await
    .unwrap_or_else(|| panic!("no JSON 'logged in' line:\n{}", auth.output()));
    let trace_id = line["trace_id"].as_str().expect("trace_id").to_owned();
    let span_id = line["span_id"].as_str().expect("span_id").to_owned();
    assert_eq!(trace_id.len(), 32, "{line}");
    assert_eq!(span_id.len(), 16, "{line}");
    let login = otlp
        .wait_for(Duration::from_secs(20), |spans| {
            spans
                .iter()
                .find(|s| {
                    is_rpc(s, "AuthService", "Login", SpanKind::Server) && s.trace_id() == trace_id
                })
                .cloned()
        })
        .await;
    assert!(
        login.is_some(),
        "the log line's trace_id {trace_id} is not the Login call's trace"
    );
    assert!(
        otlp.spans().iter().any(|s| s.span_id() == span_id),
        "the log line's span_id {span_id} was never exported"
    );
}
