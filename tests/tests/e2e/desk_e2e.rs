//! The support desk end to end: auth, two presence and two messaging instances on one real
//! Redis (and, for the `_on_a_redis_cluster` twins, on a Redis Cluster of three masters and
//! three replicas), real gRPC. Routing asks presence over gRPC with the service token.

use std::collections::HashMap;
use std::time::Duration;

use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use switchboard_proto::messaging::v1::support_service_client::SupportServiceClient;
use switchboard_proto::presence::v1 as presence_pb;
use switchboard_tests::auth::{Person, authed};
use switchboard_tests::instance::{AuthOptions, MessagingOptions, spawn_messaging};
use switchboard_tests::messaging::Connection;
use switchboard_tests::presence::connect;
use switchboard_tests::stack::{Stack, StackOptions};
use tonic::Code;
use tonic::transport::Channel;

/// Auth with an admin, two presence and two messaging instances on one Redis.
async fn desk() -> Stack {
    desk_on(false).await
}

/// [`desk`] on one Redis or a Redis Cluster.
async fn desk_on(redis_cluster: bool) -> Stack {
    Stack::start(StackOptions {
        cluster: redis_cluster,
        auth: AuthOptions {
            admin: Some(("deskadmin".into(), "admin password".into())),
            ..AuthOptions::default()
        },
        presence: 2,
        messaging: 2,
        ..StackOptions::default()
    })
    .await
}

/// The desk's admin.
fn admin(desk: &Stack) -> &Person {
    desk.admin.as_ref().expect("the stack has an admin")
}

async fn open(
    mut c: SupportServiceClient<Channel>,
    who: &Person,
    topic: &str,
) -> Result<pb::OpenConsultationResponse, tonic::Status> {
    Ok(c.open_consultation(authed(
        pb::OpenConsultationRequest {
            topic: topic.into(),
            first_message: format!("hello, {topic}"),
        },
        &who.token,
    ))
    .await?
    .into_inner())
}

async fn consultation(
    mut c: MessagingServiceClient<Channel>,
    who: &Person,
    id: &str,
) -> pb::Consultation {
    c.get_conversation(authed(
        pb::GetConversationRequest {
            conversation_id: id.into(),
        },
        &who.token,
    ))
    .await
    .unwrap_or_else(|e| panic!("get {id}: {e}"))
    .into_inner()
    .conversation
    .and_then(|c| c.consultation)
    .unwrap_or_else(|| panic!("{id} has no consultation"))
}

/// Waits until `who` sees consultation `id` assigned; returns it.
async fn assigned(c: MessagingServiceClient<Channel>, who: &Person, id: &str) -> pb::Consultation {
    switchboard_tests::eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let got = consultation(c, who, id).await;
            (got.state == pb::ConsultationState::Assigned as i32).then_some(got)
        }
    })
    .await
    .unwrap_or_else(|| panic!("consultation {id} was never assigned"))
}

/// Consultation ids in ConsultationAssigned events on `stream`, read for `window`.
async fn assignments(stream: &mut Connection, window: Duration) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return seen;
        }
        match stream.next(left).await {
            Ok(Some(Out::ConversationEvent(e)))
                if e.kind == pb::ConversationEventKind::ConsultationAssigned as i32 =>
            {
                let c = e
                    .conversation
                    .and_then(|c| c.consultation)
                    .unwrap_or_default();
                seen.push((c.id, c.agent_id));
            }
            Ok(Some(_)) => {}
            _ => return seen,
        }
    }
}

/// Subscribes `stream` to all the caller's conversations and returns once the stream is
/// registered for the caller's events (a ping has come back after the subscribe).
async fn subscribe_all(stream: &mut Connection) {
    stream
        .send(pb::connect_request::Frame::Subscribe(pb::Subscribe {
            all_conversations: true,
            ..Default::default()
        }))
        .await
        .expect("subscribe all");
    stream
        .send(pb::connect_request::Frame::Ping(pb::Ping { nonce: 7 }))
        .await
        .expect("ping");
    stream
        .until(Duration::from_secs(5), |f| match f {
            Out::Pong(p) if p.nonce == 7 => Some(()),
            _ => None,
        })
        .await
        .expect("pong after the subscribe");
}

#[tokio::test]
async fn six_customers_two_agents_balanced_once_each_and_presence_steers_routing() {
    six_customers_two_agents_balanced_once_each_and_presence_steers_routing_on(false).await;
}

#[tokio::test]
async fn six_customers_two_agents_balanced_once_each_and_presence_steers_routing_on_a_redis_cluster()
 {
    six_customers_two_agents_balanced_once_each_and_presence_steers_routing_on(true).await;
}

async fn six_customers_two_agents_balanced_once_each_and_presence_steers_routing_on(
    redis_cluster: bool,
) {
    let desk = desk_on(redis_cluster).await;
    let agents = [
        desk.person("agent_ann", auth_pb::Role::Agent).await,
        desk.person("agent_ben", auth_pb::Role::Agent).await,
    ];
    let mut customers = Vec::new();
    for i in 0..8 {
        customers.push(
            desk.person(&format!("customer{i}"), auth_pb::Role::Customer)
                .await,
        );
    }
    // Each agent is online on a different presence instance and listens on a different
    // messaging instance.
    let _ann_device = connect(desk.presence[0].channel(), &agents[0].token).await;
    let mut ben_device = connect(desk.presence[1].channel(), &agents[1].token).await;
    let mut streams = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let mut s = Connection::open(desk.messaging[i].channel(), &a.token)
            .await
            .expect("agent stream");
        subscribe_all(&mut s).await;
        streams.push(s);
    }

    // Six customers open at once, across both messaging instances.
    let opened = futures::future::join_all(
        customers[..6]
            .iter()
            .enumerate()
            .map(|(i, c)| open(desk.support(i), c, "order"))
            .collect::<Vec<_>>(),
    )
    .await;
    let ids: Vec<String> = opened
        .into_iter()
        .map(|r| {
            let r = r.expect("open");
            let c = r.consultation.expect("consultation");
            assert_ne!(c.state, pb::ConsultationState::Closed as i32);
            let conversation = r.conversation.expect("conversation");
            assert_eq!(conversation.kind, pb::ConversationKind::Support as i32);
            assert_eq!(conversation.id, c.id);
            c.id
        })
        .collect();
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let c = assigned(desk.chat(i + 1), &customers[i], id).await;
        *per_agent.entry(c.agent_id).or_default() += 1;
    }
    assert_eq!(
        per_agent.get(&agents[0].id).copied(),
        Some(3),
        "balanced: {per_agent:?}"
    );
    assert_eq!(
        per_agent.get(&agents[1].id).copied(),
        Some(3),
        "balanced: {per_agent:?}"
    );
    // Exactly one assignment event per consultation, to the agent that has it.
    let mut events = assignments(&mut streams[0], Duration::from_secs(1)).await;
    events.extend(assignments(&mut streams[1], Duration::from_millis(500)).await);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &events {
        *count.entry(id.as_str()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(count.get(id.as_str()), Some(&1), "{id}: {events:?}");
    }

    // The agent is a member: customer and agent talk over the messaging stream.
    let who = ids
        .iter()
        .position(|id| events.iter().any(|(e, a)| e == id && *a == agents[0].id))
        .expect("ann has one");
    let conversation = ids[who].clone();
    let customer_stream = Connection::open(desk.messaging[1].channel(), &customers[who].token)
        .await
        .expect("customer stream");
    customer_stream
        .subscribe(&conversation, 0)
        .await
        .expect("subscribe");
    let mut customer_stream = customer_stream;
    customer_stream
        .recovered(&conversation)
        .await
        .expect("recovered");
    let sent = switchboard_tests::messaging::send(
        &mut desk.chat(0),
        &customers[who].token,
        &conversation,
        "m2",
        "my order is late",
    )
    .await
    .expect("customer sends");
    let body = streams[0]
        .until(Duration::from_secs(5), |f| match f {
            Out::Message(m) if m.conversation_id == conversation && m.seq == sent.seq => {
                Some(m.body)
            }
            _ => None,
        })
        .await
        .expect("the agent receives it");
    assert_eq!(body, "my order is late");

    // Ben goes AWAY: new consultations go to Ann only.
    ben_device.set(presence_pb::PresenceState::Away, "").await;
    ben_device.echoed(presence_pb::PresenceState::Away).await;
    let seventh = open(desk.support(1), &customers[6], "refund")
        .await
        .expect("open")
        .consultation
        .expect("consultation");
    let seventh = assigned(desk.chat(0), &customers[6], &seventh.id).await;
    assert_eq!(seventh.agent_id, agents[0].id, "an AWAY agent gets none");
}

#[tokio::test]
async fn queued_until_an_agent_comes_online_then_transfer_close_and_refusals() {
    queued_until_an_agent_comes_online_then_transfer_close_and_refusals_on(false).await;
}

#[tokio::test]
async fn queued_until_an_agent_comes_online_then_transfer_close_and_refusals_on_a_redis_cluster() {
    queued_until_an_agent_comes_online_then_transfer_close_and_refusals_on(true).await;
}

async fn queued_until_an_agent_comes_online_then_transfer_close_and_refusals_on(
    redis_cluster: bool,
) {
    let desk = desk_on(redis_cluster).await;
    let carol = desk.person("carol", auth_pb::Role::Customer).await;
    let dave = desk.person("dave", auth_pb::Role::Customer).await;
    let eve = desk.person("agent_eve", auth_pb::Role::Agent).await;
    let fay = desk.person("agent_fay", auth_pb::Role::Agent).await;

    // Bad input and role refusals first.
    let e = open(desk.support(0), &eve, "help")
        .await
        .expect_err("agent opens");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("only customers"), "{}", e.message());
    let e = open(desk.support(0), &carol, "  ")
        .await
        .expect_err("no topic");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("topic"), "{}", e.message());
    let e = desk
        .support(0)
        .open_consultation(authed(
            pb::OpenConsultationRequest {
                topic: "t".into(),
                first_message: String::new(),
            },
            &carol.token,
        ))
        .await
        .expect_err("no first message");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("first_message"), "{}", e.message());
    let e = desk
        .support(0)
        .list_queue(authed(pb::ListQueueRequest { limit: 0 }, &carol.token))
        .await
        .expect_err("customer lists the queue");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = desk
        .support(0)
        .list_queue(authed(pb::ListQueueRequest { limit: 201 }, &eve.token))
        .await
        .expect_err("limit");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // No agent is online: the consultation waits, first in the queue.
    let mut carol_stream = Connection::open(desk.messaging[0].channel(), &carol.token)
        .await
        .expect("carol stream");
    subscribe_all(&mut carol_stream).await;
    let opened = open(desk.support(0), &carol, "broken login")
        .await
        .expect("open");
    let waiting = opened.consultation.expect("consultation");
    assert_eq!(waiting.state, pb::ConsultationState::Queued as i32);
    assert_eq!(waiting.queue_position, 1);
    let id = waiting.id.clone();
    let queue = desk
        .support(1)
        .list_queue(authed(pb::ListQueueRequest { limit: 10 }, &eve.token))
        .await
        .expect("queue")
        .into_inner()
        .consultations;
    assert_eq!(
        queue.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    let e = desk
        .support(1)
        .accept_consultation(authed(
            pb::AcceptConsultationRequest {
                consultation_id: id.clone(),
            },
            &dave.token,
        ))
        .await
        .expect_err("customer accepts");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Eve comes online on the other instances: the waiting consultation is hers.
    let mut eve_device = connect(desk.presence[1].channel(), &eve.token).await;
    let got = assigned(desk.chat(1), &carol, &id).await;
    assert_eq!(got.agent_id, eve.id);
    let event = carol_stream
        .until(Duration::from_secs(5), |f| match f {
            Out::ConversationEvent(e)
                if e.kind == pb::ConversationEventKind::ConsultationAssigned as i32 =>
            {
                Some(e)
            }
            _ => None,
        })
        .await
        .expect("the customer hears of the assignment");
    assert_eq!(event.user_ids, std::slice::from_ref(&eve.id));

    // Transfer: refusals, then Eve hands it to Fay with a note for her only.
    let transfer = |who: &Person, to: &str| {
        let mut c = desk.support(0);
        let req = authed(
            pb::TransferConsultationRequest {
                consultation_id: id.clone(),
                to_agent_id: to.into(),
                note: "VIP customer".into(),
            },
            &who.token,
        );
        async move { c.transfer_consultation(req).await }
    };
    let e = transfer(&carol, &fay.id)
        .await
        .expect_err("customer transfers");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = transfer(&eve, &fay.id).await.expect_err("fay is offline");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = transfer(&eve, &dave.id).await.expect_err("not an agent");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let fay_device = connect(desk.presence[0].channel(), &fay.token).await;
    fay_device.set(presence_pb::PresenceState::Busy, "").await;
    let e = transfer(&fay, &fay.id)
        .await
        .expect_err("fay is not its agent");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let moved = transfer(&eve, &fay.id)
        .await
        .expect("transfer")
        .into_inner()
        .consultation
        .expect("consultation");
    assert_eq!(moved.agent_id, fay.id);
    assert_eq!(moved.transfer_note, "VIP customer");
    assert_eq!(
        consultation(desk.chat(1), &carol, &id).await.transfer_note,
        "",
        "the note is for agents"
    );
    let members = desk
        .chat(1)
        .get_conversation(authed(
            pb::GetConversationRequest {
                conversation_id: id.clone(),
            },
            &fay.token,
        ))
        .await
        .expect("fay is a member")
        .into_inner()
        .conversation
        .expect("conversation")
        .member_ids;
    assert!(
        members.contains(&fay.id) && !members.contains(&eve.id),
        "{members:?}"
    );

    // Close: not by another customer; then by Carol; read-only afterwards.
    let close = |who: &Person| {
        let mut c = desk.support(1);
        let req = authed(
            pb::CloseConsultationRequest {
                consultation_id: id.clone(),
                resolution: "password reset".into(),
            },
            &who.token,
        );
        async move { c.close_consultation(req).await }
    };
    let e = close(&dave).await.expect_err("someone else's");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = close(&eve).await.expect_err("no longer eve's");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let closed = close(&carol)
        .await
        .expect("close")
        .into_inner()
        .consultation
        .expect("consultation");
    assert_eq!(closed.state, pb::ConsultationState::Closed as i32);
    assert_eq!(closed.resolution, "password reset");
    let e = close(&fay).await.expect_err("closed twice");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = switchboard_tests::messaging::send(&mut desk.chat(0), &fay.token, &id, "late", "hi")
        .await
        .expect_err("read-only");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        switchboard_common::status::reason_of(&e).as_deref(),
        Some("CONVERSATION_CLOSED")
    );
    let e = desk
        .support(0)
        .accept_consultation(authed(
            pb::AcceptConsultationRequest {
                consultation_id: id.clone(),
            },
            &eve.token,
        ))
        .await
        .expect_err("closed");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = desk
        .support(0)
        .accept_consultation(authed(
            pb::AcceptConsultationRequest {
                consultation_id: uuid::Uuid::now_v7().to_string(),
            },
            &eve.token,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = desk
        .support(0)
        .accept_consultation(authed(
            pb::AcceptConsultationRequest {
                consultation_id: "nope".into(),
            },
            &eve.token,
        ))
        .await
        .expect_err("malformed");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Nobody is available (Eve AWAY, Fay gone): an agent accepts by hand from the queue.
    fay_device.close().await;
    eve_device.set(presence_pb::PresenceState::Away, "").await;
    eve_device.echoed(presence_pb::PresenceState::Away).await;
    let waiting = open(desk.support(1), &dave, "invoice")
        .await
        .expect("open")
        .consultation
        .expect("consultation");
    assert_eq!(
        waiting.state,
        pb::ConsultationState::Queued as i32,
        "{waiting:?}"
    );
    let accept = |who: &Person| {
        let mut c = desk.support(0);
        let req = authed(
            pb::AcceptConsultationRequest {
                consultation_id: waiting.id.clone(),
            },
            &who.token,
        );
        async move { c.accept_consultation(req).await }
    };
    let taken = accept(&eve)
        .await
        .expect("accept")
        .into_inner()
        .consultation
        .expect("consultation");
    assert_eq!(taken.state, pb::ConsultationState::Assigned as i32);
    assert_eq!(taken.agent_id, eve.id);
    let e = accept(&eve).await.expect_err("taken");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let queue = desk
        .support(1)
        .list_queue(authed(pb::ListQueueRequest { limit: 10 }, &eve.token))
        .await
        .expect("queue")
        .into_inner()
        .consultations;
    assert!(queue.is_empty(), "{queue:?}");
}

#[tokio::test]
async fn a_consultation_queued_on_an_instance_that_is_gone_is_routed_by_another() {
    a_consultation_queued_on_an_instance_that_is_gone_is_routed_by_another_on(false).await;
}

#[tokio::test]
async fn a_consultation_queued_on_an_instance_that_is_gone_is_routed_by_another_on_a_redis_cluster()
{
    a_consultation_queued_on_an_instance_that_is_gone_is_routed_by_another_on(true).await;
}

async fn a_consultation_queued_on_an_instance_that_is_gone_is_routed_by_another_on(
    redis_cluster: bool,
) {
    let mut desk = desk_on(redis_cluster).await;
    let gus = desk.person("gus", auth_pb::Role::Customer).await;
    let hal = desk.person("agent_hal", auth_pb::Role::Agent).await;
    let waiting = open(desk.support(0), &gus, "lost parcel")
        .await
        .expect("open")
        .consultation
        .expect("consultation");
    assert_eq!(waiting.state, pb::ConsultationState::Queued as i32);
    // The instance that took it goes away; the queue lives in Redis.
    desk.messaging.remove(0).stop().await.expect("stopped");
    let _hal_device = connect(desk.presence[0].channel(), &hal.token).await;
    let got = assigned(desk.chat(0), &gus, &waiting.id).await;
    assert_eq!(got.agent_id, hal.id);
}

/// The consultation of the next QUEUE_MOVED event on `stream`.
async fn queue_moved(stream: &mut Connection) -> pb::Consultation {
    stream
        .until(Duration::from_secs(5), |f| match f {
            Out::ConversationEvent(e)
                if e.kind == pb::ConversationEventKind::ConsultationQueueMoved as i32 =>
            {
                e.conversation.and_then(|c| c.consultation)
            }
            _ => None,
        })
        .await
        .expect("a queue-moved event")
}

#[tokio::test]
async fn waiting_customers_hear_their_place_in_the_queue_as_it_moves() {
    let desk = desk().await;
    let customers = [
        desk.person("qfirst", auth_pb::Role::Customer).await,
        desk.person("qsecond", auth_pb::Role::Customer).await,
        desk.person("qthird", auth_pb::Role::Customer).await,
    ];
    // Nobody answers yet: all three wait, in order.
    let mut ids = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let opened = open(desk.support(i), c, &format!("wait {i}"))
            .await
            .expect("open");
        let k = opened.consultation.expect("consultation");
        assert_eq!(k.queue_position, i as u32 + 1);
        ids.push(k.id);
    }
    // The third customer listens on the other instance than the one the changes happen on.
    let mut third =
        Connection::following(desk.messaging[1].channel(), &customers[2].token, &ids[2])
            .await
            .expect("third listens");
    // The first customer gives up: the others move up.
    desk.support(0)
        .close_consultation(authed(
            pb::CloseConsultationRequest {
                consultation_id: ids[0].clone(),
                resolution: "never mind".into(),
            },
            &customers[0].token,
        ))
        .await
        .expect("close while queued");
    let k = queue_moved(&mut third).await;
    assert_eq!((k.id.as_str(), k.queue_position), (ids[2].as_str(), 2));

    // An agent takes the next one: the third is first in line now.
    let agent = desk.person("qagent", auth_pb::Role::Agent).await;
    desk.support(0)
        .accept_consultation(authed(
            pb::AcceptConsultationRequest {
                consultation_id: ids[1].clone(),
            },
            &agent.token,
        ))
        .await
        .expect("accept");
    let k = queue_moved(&mut third).await;
    assert_eq!(k.queue_position, 1);
    assert_eq!(k.state, pb::ConsultationState::Queued as i32);
    assert_eq!(
        consultation(desk.chat(1), &customers[2], &ids[2])
            .await
            .queue_position,
        1
    );
}

#[tokio::test]
async fn a_consultation_opens_with_its_first_message_or_not_at_all() {
    let desk = desk().await;
    // An instance with a send burst of one: a customer's second open exceeds it.
    let strict = spawn_messaging(
        Some(desk.redis.one()),
        desk.auth[0].addr,
        MessagingOptions {
            presence: Some(desk.presence[0].addr),
            send_rate: 0.001,
            send_burst: 1.0,
            ..MessagingOptions::default()
        },
    )
    .await
    .expect("strict messaging");
    let dora = desk.person("dora", auth_pb::Role::Customer).await;
    let first = open(SupportServiceClient::new(strict.channel()), &dora, "first")
        .await
        .expect("first open");
    let refused = open(SupportServiceClient::new(strict.channel()), &dora, "second")
        .await
        .expect_err("over the send limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Nothing of the refused one was stored: one consultation, and one in the queue.
    let listed = MessagingServiceClient::new(strict.channel())
        .list_conversations(authed(pb::ListConversationsRequest::default(), &dora.token))
        .await
        .expect("list")
        .into_inner()
        .conversations;
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [first.consultation.expect("consultation").id.as_str()]
    );
    let queue = desk
        .support(0)
        .list_queue(authed(
            pb::ListQueueRequest { limit: 0 },
            &admin(&desk).token,
        ))
        .await
        .expect("queue")
        .into_inner()
        .consultations;
    assert_eq!(
        queue.iter().filter(|c| c.customer_id == dora.id).count(),
        1,
        "{queue:?}"
    );
}

#[tokio::test]
async fn a_guest_talks_in_its_own_consultation_only_and_keeps_it_as_an_account() {
    let desk = desk().await;
    let agent = desk.person("agent_gus", auth_pb::Role::Agent).await;
    let carl = desk.person("carl", auth_pb::Role::Customer).await;
    let visitor = switchboard_tests::auth::guest(&desk.accounts(0), "Visitor")
        .await
        .expect("guest session");
    let _agent_device = connect(desk.presence[0].channel(), &agent.token).await;

    // As a widget does: open, then follow the consultation on a Subscribe stream.
    let opened = open(desk.support(1), &visitor, "where is my parcel")
        .await
        .expect("a guest opens a consultation");
    let conversation = opened.conversation.expect("conversation");
    let got = assigned(desk.chat(0), &visitor, &conversation.id).await;
    assert_eq!(got.agent_id, agent.id);
    let mut stream = Connection::subscribed(
        desk.messaging[0].channel(),
        &visitor.token,
        vec![switchboard_tests::messaging::from(&conversation.id, 0)],
    )
    .await
    .expect("subscribe");
    let _ = stream.recovered(&conversation.id).await.expect("history");
    switchboard_tests::messaging::send(
        &mut desk.chat(1),
        &agent.token,
        &conversation.id,
        "a1",
        "on its way",
    )
    .await
    .expect("agent answers");
    let answer = stream
        .until(Duration::from_secs(5), |f| match f {
            Out::Message(m) => Some(m),
            _ => None,
        })
        .await
        .expect("the guest hears the answer");
    assert_eq!(
        (answer.seq, answer.sender_id.as_str()),
        (2, agent.id.as_str())
    );
    switchboard_tests::messaging::send(
        &mut desk.chat(1),
        &visitor.token,
        &conversation.id,
        "g1",
        "thanks",
    )
    .await
    .expect("the guest talks in its own consultation");

    // Nothing else: no conversations of its own, and nobody puts it in one.
    let e = desk
        .chat(0)
        .create_conversation(authed(
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Direct as i32,
                title: String::new(),
                member_ids: vec![agent.id.clone()],
            },
            &visitor.token,
        ))
        .await
        .expect_err("a guest starts a direct conversation");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("guests"), "{}", e.message());
    for (kind, title, members, field) in [
        (
            pb::ConversationKind::Direct,
            "",
            vec![visitor.id.clone()],
            "member_ids[0]",
        ),
        (
            pb::ConversationKind::Group,
            "with a guest",
            vec![agent.id.clone(), visitor.id.clone()],
            "member_ids[1]",
        ),
    ] {
        let e = desk
            .chat(1)
            .create_conversation(authed(
                pb::CreateConversationRequest {
                    kind: kind as i32,
                    title: title.into(),
                    member_ids: members,
                },
                &carl.token,
            ))
            .await
            .expect_err("a guest put in a conversation");
        assert_eq!(e.code(), Code::InvalidArgument, "{kind:?}: {e:?}");
        assert_eq!(
            switchboard_tests::bad_field(&e).as_deref(),
            Some(field),
            "{kind:?}"
        );
        assert!(e.message().contains("guest"), "{}", e.message());
    }

    // The guest becomes an account under the same id, so the consultation and its
    // history are its own still. Its guest session is over: the
    // stream ends and the old token is refused.
    let mut accounts = desk.accounts(0);
    let e = accounts
        .upgrade_guest(authed(
            auth_pb::UpgradeGuestRequest {
                username: "visitor_vera".into(),
                password: "right password".into(),
                display_name: String::new(),
            },
            &carl.token,
        ))
        .await
        .expect_err("a customer upgrades");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = accounts
        .upgrade_guest(authed(
            auth_pb::UpgradeGuestRequest {
                username: "carl".into(),
                password: "right password".into(),
                display_name: String::new(),
            },
            &visitor.token,
        ))
        .await
        .expect_err("a taken name");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let upgraded = accounts
        .upgrade_guest(authed(
            auth_pb::UpgradeGuestRequest {
                username: "Visitor_Vera".into(),
                password: "right password".into(),
                display_name: String::new(),
            },
            &visitor.token,
        ))
        .await
        .expect("upgrade")
        .into_inner();
    let account = upgraded.user.expect("user");
    assert_eq!(account.id, visitor.id);
    assert_eq!(account.role, auth_pb::Role::Customer as i32);
    assert_eq!(
        (account.username.as_str(), account.display_name.as_str()),
        ("visitor_vera", "Visitor"),
        "the name the guest gave stays"
    );
    let ended = stream.ended(Duration::from_secs(5)).await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let vera = switchboard_tests::auth::login(&mut accounts, "visitor_vera", "right password")
        .await
        .expect("the account logs in");
    let history = desk
        .chat(1)
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: conversation.id.clone(),
                after_seq: Some(0),
                ..Default::default()
            },
            &vera.access_token,
        ))
        .await
        .expect("its history")
        .into_inner()
        .messages;
    assert_eq!(
        history.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["hello, where is my parcel", "on its way", "thanks"]
    );
    let e = switchboard_tests::eventually(Duration::from_secs(2), || {
        let mut chat = desk.chat(0);
        let token = visitor.token.clone();
        async move {
            chat.list_conversations(authed(pb::ListConversationsRequest::default(), &token))
                .await
                .err()
        }
    })
    .await
    .expect("the guest token is refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}
