//! `--output json`: what the non-interactive commands print for scripts, one JSON object
//! per command on stdout (errors stay text on stderr, with the exit code saying which:
//! 1 a refusal or failure, 2 the session ended). Field names are the contract's, in
//! snake_case; times are RFC 3339 in UTC; users carry their username next to their id.

use serde_json::{Value, json};
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::messaging::v1 as pb;

use super::Names;

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub(crate) enum Format {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per command.
    Json,
}

/// Prints `value` as one line of JSON.
pub(crate) fn print(value: Value) {
    println!("{value}");
}

fn time(at: Option<&prost_types::Timestamp>) -> Value {
    at.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
    })
    .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
    .unwrap_or(Value::Null)
}

fn role(r: i32) -> String {
    auth_pb::Role::try_from(r)
        .map(|r| r.as_str_name().trim_start_matches("ROLE_").to_lowercase())
        .unwrap_or_else(|_| r.to_string())
}

/// A user.
pub(crate) fn user(u: &auth_pb::User) -> Value {
    json!({
        "id": u.id,
        "username": u.username,
        "display_name": u.display_name,
        "role": role(u.role),
    })
}

fn person(id: &str, names: &Names) -> Value {
    json!({ "id": id, "username": names.get(id) })
}

/// A message.
pub(crate) fn message(m: &pb::Message, names: &Names) -> Value {
    json!({
        "conversation_id": m.conversation_id,
        "seq": m.seq,
        "sender": person(&m.sender_id, names),
        "body": m.body,
        "metadata": m.metadata,
        "sent_at": time(m.sent_at.as_ref()),
        "client_msg_id": m.client_msg_id,
    })
}

/// A consultation.
pub(crate) fn consultation(c: &pb::Consultation, names: &Names) -> Value {
    let state = pb::ConsultationState::try_from(c.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CONSULTATION_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| c.state.to_string());
    json!({
        "id": c.id,
        "topic": c.topic,
        "state": state,
        "queue_position": c.queue_position,
        "customer": person(&c.customer_id, names),
        "agent": if c.agent_id.is_empty() { Value::Null } else { person(&c.agent_id, names) },
        "opened_at": time(c.opened_at.as_ref()),
        "assigned_at": time(c.assigned_at.as_ref()),
        "closed_at": time(c.closed_at.as_ref()),
        "resolution": c.resolution,
    })
}

/// A conversation.
pub(crate) fn conversation(c: &pb::Conversation, names: &Names) -> Value {
    let kind = pb::ConversationKind::try_from(c.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("CONVERSATION_KIND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| c.kind.to_string());
    json!({
        "id": c.id,
        "kind": kind,
        "title": c.title,
        "members": c.member_ids.iter().map(|m| person(m, names)).collect::<Vec<_>>(),
        "member_count": c.member_count,
        "last_seq": c.last_seq,
        "read_seq": c.read_seq,
        "unread_count": c.unread_count,
        "read_only": c.read_only,
        "consultation": c.consultation.as_ref().map(|k| consultation(k, names)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_people_and_times() {
        let mut names = Names::default();
        names.insert("u1", "alice");
        let m = pb::Message {
            conversation_id: "c1".into(),
            seq: 3,
            sender_id: "u1".into(),
            body: "hi".into(),
            sent_at: Some(prost_types::Timestamp {
                seconds: 1_764_547_200,
                nanos: 5_000_000,
            }),
            ..Default::default()
        };
        let v = message(&m, &names);
        assert_eq!(v["sender"]["username"], "alice");
        assert_eq!(v["sent_at"], "2025-12-01T00:00:00.005Z");
        assert_eq!(v["seq"], 3);
        let c = pb::Consultation {
            id: "k".into(),
            state: pb::ConsultationState::Queued as i32,
            queue_position: 2,
            customer_id: "u1".into(),
            ..Default::default()
        };
        let v = consultation(&c, &names);
        assert_eq!(v["state"], "queued");
        assert_eq!(v["agent"], Value::Null);
        assert_eq!(v["customer"]["username"], "alice");
        assert_eq!(time(None), Value::Null);
    }
}
