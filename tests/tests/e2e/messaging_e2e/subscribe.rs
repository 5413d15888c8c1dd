//! `Subscribe`, the server-streaming twin of `Connect` that browsers can open (gRPC-Web),
//! with sends, typing and reads as unary calls: the same guarantees as `Connect`, tested
//! the same way (resume on the other instance, a slow reader, bad input, token expiry),
//! part of it over gRPC-Web on HTTP/1.1 as a browser sends it.

use switchboard_tests::bad_field;
use switchboard_tests::messaging::from;

use super::*;

/// Reads `stream` until its Recovered frame of `conversation`: the seqs replayed before
/// it, and the Recovered frame.
async fn replay(stream: &mut Connection, conversation: &str) -> (Vec<u64>, pb::Recovered) {
    let mut seqs = Vec::new();
    loop {
        match stream.next(Duration::from_secs(10)).await.expect("frame") {
            Some(Out::Message(m)) if m.conversation_id == conversation => seqs.push(m.seq),
            Some(Out::Recovered(r)) if r.conversation_id == conversation => return (seqs, r),
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
}

/// The next `n` message seqs of `stream`.
async fn seqs(stream: &mut Connection, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(
            stream
                .until(Duration::from_secs(10), |f| match f {
                    Out::Message(m) => Some(m.seq),
                    _ => None,
                })
                .await
                .expect("message"),
        );
    }
    out
}

#[tokio::test]
async fn subscribe_over_grpc_web_resumes_on_the_other_instance_with_exactly_the_missing_messages() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    let users = cluster.users("webresume", 2).await;
    let (alice, bob) = (&users[0], &users[1]);
    let mut m1 = messaging_client(&cluster.stack.messaging[1]);
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &alice.token,
        "webresume",
        std::slice::from_ref(&bob.id),
    )
    .await
    .expect("group");

    let mut first = Connection::subscribed_web(
        cluster.stack.messaging[0].addr,
        &bob.token,
        vec![from(&group.id, 0)],
    )
    .await
    .expect("subscribe over gRPC-Web");
    let subscribed = first
        .until(Duration::from_secs(10), |f| match f {
            Out::Subscribed(s) => Some(s),
            _ => None,
        })
        .await
        .expect("subscribed");
    assert!(!subscribed.epoch.is_empty());
    let (replayed, _) = replay(&mut first, &group.id).await;
    assert!(replayed.is_empty());
    for k in 0..5 {
        send(&mut m1, &alice.token, &group.id, &format!("e{k}"), "early")
            .await
            .expect("send");
    }
    assert_eq!(seqs(&mut first, 5).await, [1, 2, 3, 4, 5]);
    drop(first);

    for k in 0..200 {
        send(
            &mut m1,
            &alice.token,
            &group.id,
            &format!("o{k}"),
            "offline",
        )
        .await
        .expect("send");
    }
    let mut again = Connection::subscribed_web(
        cluster.stack.messaging[1].addr,
        &bob.token,
        vec![pb::Subscribe {
            epoch: subscribed.epoch.clone(),
            ..from(&group.id, 5)
        }],
    )
    .await
    .expect("resume elsewhere");
    let (replayed, recovered) = replay(&mut again, &group.id).await;
    assert_eq!(replayed, (6..=205).collect::<Vec<u64>>());
    assert_eq!((recovered.from_seq, recovered.to_seq), (6, 205));
    let mut m0 = messaging_client(&cluster.stack.messaging[0]);
    for k in 0..3 {
        send(&mut m0, &alice.token, &group.id, &format!("l{k}"), "late")
            .await
            .expect("send");
    }
    assert_eq!(seqs(&mut again, 3).await, [206, 207, 208]);
}

#[tokio::test]
async fn subscribe_carries_typing_receipts_and_new_conversations_from_the_other_instance() {
    let cluster = Cluster::start(MessagingOptions::default()).await;
    let users = cluster.users("subev", 3).await;
    let (alice, bob, outsider) = (&users[0], &users[1], &users[2]);
    let mut m1 = messaging_client(&cluster.stack.messaging[1]);
    let group = create_group(
        &mut m1,
        &alice.token,
        "subev",
        std::slice::from_ref(&bob.id),
    )
    .await
    .expect("group");
    send(&mut m1, &alice.token, &group.id, "first", "hello")
        .await
        .expect("send");
    let mut bobs = Connection::subscribed(
        cluster.stack.messaging[0].channel(),
        &bob.token,
        vec![pb::Subscribe {
            all_conversations: true,
            positions: [(group.id.clone(), 0)].into(),
            ..Default::default()
        }],
    )
    .await
    .expect("subscribe to all");
    let (replayed, _) = replay(&mut bobs, &group.id).await;
    assert_eq!(replayed, [1]);

    // Typing and reading are unary calls, here on the other instance.
    m1.send_typing(authed(
        pb::SendTypingRequest {
            conversation_id: group.id.clone(),
        },
        &alice.token,
    ))
    .await
    .expect("typing");
    let typing = bobs
        .until(Duration::from_secs(5), |f| match f {
            Out::Typing(t) => Some(t),
            _ => None,
        })
        .await
        .expect("typing event");
    assert_eq!(
        (typing.user_id.as_str(), typing.conversation_id.as_str()),
        (alice.id.as_str(), group.id.as_str())
    );
    m1.mark_read(authed(
        pb::MarkReadRequest {
            conversation_id: group.id.clone(),
            seq: 1,
        },
        &alice.token,
    ))
    .await
    .expect("read");
    let receipt = bobs
        .until(Duration::from_secs(5), |f| match f {
            Out::Receipt(r) => Some(r),
            _ => None,
        })
        .await
        .expect("receipt");
    assert_eq!(
        (receipt.user_id.as_str(), receipt.read_seq),
        (alice.id.as_str(), 1)
    );

    // A conversation created later is announced and followed.
    let later = create_group(
        &mut m1,
        &alice.token,
        "later",
        std::slice::from_ref(&bob.id),
    )
    .await
    .expect("later group");
    let event = bobs
        .until(Duration::from_secs(5), |f| match f {
            Out::ConversationEvent(e) => Some(e),
            _ => None,
        })
        .await
        .expect("event");
    assert_eq!(event.kind, pb::ConversationEventKind::Created as i32);
    let _ = bobs.recovered(&later.id).await.expect("followed");
    send(&mut m1, &alice.token, &later.id, "l1", "in the new one")
        .await
        .expect("send");
    let message = bobs
        .until(Duration::from_secs(5), |f| match f {
            Out::Message(m) => Some(m),
            _ => None,
        })
        .await
        .expect("message of the new conversation");
    assert_eq!(
        (message.conversation_id.as_str(), message.seq),
        (later.id.as_str(), 1)
    );

    // SendTyping's refusals are the Typing frame's, as statuses.
    let e = m1
        .send_typing(authed(
            pb::SendTypingRequest {
                conversation_id: group.id.clone(),
            },
            &outsider.token,
        ))
        .await
        .expect_err("outsider types");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("NOT_A_MEMBER"));
    let e = m1
        .send_typing(authed(
            pb::SendTypingRequest {
                conversation_id: "../../etc".into(),
            },
            &alice.token,
        ))
        .await
        .expect_err("crafted id");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(bad_field(&e).as_deref(), Some("conversation_id"));
    let mut refused = None;
    for _ in 0..5 {
        if let Err(e) = m1
            .send_typing(authed(
                pb::SendTypingRequest {
                    conversation_id: group.id.clone(),
                },
                &alice.token,
            ))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("typing too often is refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("RATE_LIMITED"));
}

#[tokio::test]
async fn a_slow_subscribe_reader_is_cut_off_without_slowing_others_and_resumes_without_loss() {
    // More than the transport buffers hold (see the Connect twin): 400 × 16 KiB.
    const N: u64 = 400;
    let cluster = Cluster::start(MessagingOptions {
        outbound_queue: 16,
        ..MessagingOptions::default()
    })
    .await;
    let users = cluster.users("subslow", 3).await;
    let group = create_group(
        &mut messaging_client(&cluster.stack.messaging[0]),
        &users[0].token,
        "subslow",
        &ids(&users[1..]),
    )
    .await
    .expect("group");
    let mut slow = Connection::subscribed(
        cluster.stack.messaging[0].channel(),
        &users[1].token,
        vec![from(&group.id, 0)],
    )
    .await
    .expect("slow");
    let _ = slow.recovered(&group.id).await.expect("slow recovered");
    let mut fast = Connection::subscribed_web(
        cluster.stack.messaging[0].addr,
        &users[2].token,
        vec![from(&group.id, 0)],
    )
    .await
    .expect("fast");
    let _ = fast.recovered(&group.id).await.expect("fast recovered");

    let body = "x".repeat(16 * 1024);
    let (group_id, token) = (group.id.clone(), users[0].token.clone());
    let mut sender = messaging_client(&cluster.stack.messaging[1]);
    let sending = tokio::spawn(async move {
        for k in 0..N {
            send(&mut sender, &token, &group_id, &format!("s{k}"), &body)
                .await
                .expect("send");
        }
    });
    assert_eq!(
        seqs(&mut fast, N as usize).await,
        (1..=N).collect::<Vec<_>>()
    );
    sending.await.expect("sender");

    let last = cut_off(&mut slow, N).await;
    let mut resumed = Connection::subscribed_web(
        cluster.stack.messaging[1].addr,
        &users[1].token,
        vec![from(&group.id, last)],
    )
    .await
    .expect("resume");
    let (rest, _) = replay(&mut resumed, &group.id).await;
    assert_eq!(rest, (last + 1..=N).collect::<Vec<_>>());
}

#[tokio::test]
async fn subscribe_refuses_bad_requests_precisely_and_ends_when_the_token_expires() {
    let cluster = Cluster::start(MessagingOptions {
        stream_keepalive: Duration::from_secs(1),
        ..MessagingOptions::default()
    })
    .await;
    let users = cluster.users("subbad", 3).await;
    let (owner, member, outsider) = (&users[0], &users[1], &users[2]);
    let mut m0 = messaging_client(&cluster.stack.messaging[0]);
    let group = create_group(
        &mut m0,
        &owner.token,
        "subbad",
        std::slice::from_ref(&member.id),
    )
    .await
    .expect("group");
    let channel = cluster.stack.messaging[0].channel();

    let refused = |subs: Vec<pb::Subscribe>, token: String| {
        let channel = channel.clone();
        async move {
            match Connection::subscribed(channel, &token, subs).await {
                Ok(_) => panic!("accepted"),
                Err(e) => e,
            }
        }
    };
    let e = refused(vec![], member.token.clone()).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(bad_field(&e).as_deref(), Some("subscriptions"));
    assert!(e.message().contains("1 to 100"), "{}", e.message());
    let e = refused(vec![from(&group.id, 0); 101], member.token.clone()).await;
    assert_eq!(bad_field(&e).as_deref(), Some("subscriptions"));
    let e = refused(
        vec![from(&group.id, 0), from(&"9".repeat(10_000), 0)],
        member.token.clone(),
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        bad_field(&e).as_deref(),
        Some("subscriptions[1].conversation_id")
    );
    assert!(
        e.message().len() < 300,
        "the crafted id is not echoed whole"
    );
    let e = refused(
        vec![pb::Subscribe {
            all_conversations: true,
            ..from(&group.id, 0)
        }],
        member.token.clone(),
    )
    .await;
    assert_eq!(
        bad_field(&e).as_deref(),
        Some("subscriptions[0].conversation_id")
    );
    let e = refused(vec![from(&group.id, 0)], "not-a-token".into()).await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A subscription the caller may not read is refused on the stream; the others hold.
    let mut mixed =
        Connection::subscribed(channel.clone(), &outsider.token, vec![from(&group.id, 0)])
            .await
            .expect("stream opens");
    let refusal = mixed
        .until(Duration::from_secs(5), |f| match f {
            Out::Error(e) => Some(e),
            _ => None,
        })
        .await
        .expect("frame error");
    assert_eq!(refusal.code, Code::PermissionDenied as i32);
    assert_eq!(refusal.reason, "NOT_A_MEMBER");
    assert_eq!(refusal.conversation_id, group.id);
    // The keep-alive comes while nothing else does.
    let pong = mixed
        .until(Duration::from_secs(5), |f| match f {
            Out::Pong(p) => Some(p),
            _ => None,
        })
        .await
        .expect("keep-alive");
    assert_eq!(pong.nonce, 0);

    // No RefreshToken frame here: the stream ends at the token's expiry, and the client
    // opens a new one with a fresh token from its positions.
    let short = cluster.token_expiring(member, "sub-short", now_secs() + 2);
    let mut expiring = Connection::subscribed(channel.clone(), &short, vec![from(&group.id, 0)])
        .await
        .expect("subscribe");
    let status = expiring.ended(Duration::from_secs(8)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("TOKEN_EXPIRED"));
    // And a Subscribe stream takes no client frames.
    assert!(
        expiring
            .send(In::Ping(pb::Ping { nonce: 1 }))
            .await
            .is_err()
    );
}
