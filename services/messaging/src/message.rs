//! Messages: validated send input and the framing of what crosses Redis.
//!
//! A published payload is `1` (format version), a kind byte, then:
//! - `M<seq>\n<envelope>` for a stored message (the seq is written by the send script,
//!   which is the only place that knows it);
//! - `E\n<envelope>` for ephemeral events (receipts, typing, conversation events).
//!
//! The envelope is a protobuf [`Envelope`]: the message or event, plus the W3C trace
//! context of the sender so deliveries on other instances can join the send's trace.

use std::collections::HashMap;

use switchboard_proto::messaging::v1 as pb;

use crate::error::{Error, Result};

/// Largest body in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most metadata entries.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Largest total metadata size (keys + values) in bytes.
pub const MAX_METADATA_BYTES: usize = 1024;
/// Longest idempotency key.
pub const MAX_CLIENT_MSG_ID: usize = 64;

/// Whether `c` may appear in a `client_msg_id`: the URL-safe characters (`A-Z a-z 0-9 - _
/// . ~`), which hold UUIDs, ULIDs and base64url, and nothing with a meaning in a Redis key.
pub fn is_client_msg_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')
}

/// Checks an idempotency key: 1 to [`MAX_CLIENT_MSG_ID`] characters of
/// [`is_client_msg_id_char`].
pub fn check_client_msg_id(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_CLIENT_MSG_ID {
        return Err(Error::invalid(
            "client_msg_id",
            format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} characters, got {}",
                key.len()
            ),
        ));
    }
    if let Some(bad) = key.chars().find(|c| !is_client_msg_id_char(*c)) {
        return Err(Error::invalid(
            "client_msg_id",
            format!(
                "client_msg_id may contain only A-Z, a-z, 0-9, '-', '_', '.' and '~', not {bad:?}"
            ),
        ));
    }
    Ok(())
}

/// Format version written as the first byte of every payload.
pub const FORMAT_VERSION: u8 = b'1';

/// What crosses Redis besides the seq.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// W3C trace context (`traceparent`, `tracestate`) of the originating call.
    #[prost(map = "string, string", tag = "1")]
    pub trace: HashMap<String, String>,
    /// A stored message (its seq travels in the frame header).
    #[prost(message, optional, tag = "2")]
    pub message: Option<pb::Message>,
    /// A read receipt.
    #[prost(message, optional, tag = "3")]
    pub receipt: Option<pb::Receipt>,
    /// A typing notice.
    #[prost(message, optional, tag = "4")]
    pub typing: Option<pb::TypingEvent>,
    /// A conversation event.
    #[prost(message, optional, tag = "5")]
    pub event: Option<pb::ConversationEvent>,
}

/// A decoded payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A stored message with its seq.
    Message(u64, Envelope),
    /// Anything ephemeral.
    Event(Envelope),
}

/// Encodes an ephemeral event payload, carrying the current span's trace context unless
/// the envelope has one.
pub fn encode_event(mut envelope: Envelope) -> Vec<u8> {
    if envelope.trace.is_empty() {
        envelope.trace = switchboard_common::rpc::trace_map();
    }
    let mut out = vec![FORMAT_VERSION, b'E', b'\n'];
    prost::Message::encode(&envelope, &mut out).unwrap_or_default();
    out
}

/// The header the send script prepends for message number `seq` (what the memory engine
/// writes too).
pub fn message_header(seq: u64) -> Vec<u8> {
    format!("{}M{seq}\n", FORMAT_VERSION as char).into_bytes()
}

/// Decodes a payload; `None` for unknown versions or garbage (logged by the caller).
pub fn decode(payload: &[u8]) -> Option<Frame> {
    let (&version, rest) = payload.split_first()?;
    if version != FORMAT_VERSION {
        return None;
    }
    let (&kind, rest) = rest.split_first()?;
    let newline = rest.iter().position(|b| *b == b'\n')?;
    let (head, body) = (&rest[..newline], &rest[newline + 1..]);
    let envelope: Envelope = prost::Message::decode(body).ok()?;
    match kind {
        b'M' => {
            let seq = std::str::from_utf8(head).ok()?.parse().ok()?;
            Some(Frame::Message(seq, envelope))
        }
        b'E' if head.is_empty() => Some(Frame::Event(envelope)),
        _ => None,
    }
}

/// A validated send.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Conversation id.
    pub conversation_id: String,
    /// Idempotency key.
    pub client_msg_id: String,
    /// Body text.
    pub body: String,
    /// Metadata.
    pub metadata: HashMap<String, String>,
}

impl Draft {
    /// Checks every field; errors name the field and the limit.
    pub fn parse(
        conversation_id: String,
        client_msg_id: String,
        body: String,
        metadata: HashMap<String, String>,
    ) -> Result<Self> {
        switchboard_common::id::check("conversation_id", &conversation_id)?;
        check_client_msg_id(&client_msg_id)?;
        if body.is_empty() {
            return Err(Error::invalid("body", "body must not be empty"));
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(Error::BodyTooLarge(body.len()));
        }
        if metadata.len() > MAX_METADATA_ENTRIES {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "metadata has {} entries; at most {MAX_METADATA_ENTRIES}",
                    metadata.len()
                ),
            ));
        }
        let meta_bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta_bytes > MAX_METADATA_BYTES {
            return Err(Error::invalid(
                "metadata",
                format!("metadata is {meta_bytes} bytes; at most {MAX_METADATA_BYTES}"),
            ));
        }
        Ok(Self {
            conversation_id,
            client_msg_id,
            body,
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_common::status::Invalid;

    #[test]
    fn frames_round_trip() {
        let env = Envelope {
            message: Some(pb::Message {
                id: "m".into(),
                body: "hi".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut payload = message_header(42);
        prost::Message::encode(&env, &mut payload).expect("encode");
        assert_eq!(decode(&payload), Some(Frame::Message(42, env.clone())));
        assert_eq!(decode(&encode_event(env.clone())), Some(Frame::Event(env)));
        assert_eq!(decode(b"2M1\n"), None, "unknown version");
        assert_eq!(decode(b"1Mx\n"), None, "bad seq");
        assert_eq!(decode(b""), None);
    }

    #[test]
    fn drafts_are_checked() {
        let c = uuid::Uuid::now_v7().to_string();
        let ok = |body: &str| Draft::parse(c.clone(), "k".into(), body.into(), HashMap::new());
        assert!(ok("hello").is_ok());
        assert!(matches!(ok(""), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            ok(&"x".repeat(MAX_BODY_BYTES + 1)),
            Err(Error::BodyTooLarge(_))
        ));
        assert!(ok(&"x".repeat(MAX_BODY_BYTES)).is_ok());
        let long_key = Draft::parse(c.clone(), "k".repeat(65), "b".into(), HashMap::new());
        assert!(
            matches!(long_key, Err(Error::InvalidArgument(Invalid { field, .. })) if field == "client_msg_id")
        );
        let crafted = Draft::parse(c.clone(), "k}:meta".into(), "b".into(), HashMap::new());
        assert!(
            matches!(crafted, Err(Error::InvalidArgument(Invalid { field, .. })) if field == "client_msg_id")
        );
        let bad_conversation =
            Draft::parse("x}:meta".into(), "k".into(), "b".into(), HashMap::new());
        assert!(
            matches!(bad_conversation, Err(Error::InvalidArgument(Invalid { field, .. })) if field == "conversation_id")
        );
        assert!(
            Draft::parse(
                c,
                uuid::Uuid::now_v7().to_string(),
                "b".into(),
                HashMap::new()
            )
            .is_ok()
        );
    }

    proptest::proptest! {
        /// Any send input: a draft or INVALID_ARGUMENT naming a field, never a panic; an
        /// accepted draft has a key of the documented charset.
        #[test]
        fn drafts_parse_or_name_the_field(
            conversation in proptest::prop_oneof![
                proptest::strategy::Just(uuid::Uuid::now_v7().to_string()),
                ".{0,60}",
            ],
            key in ".{0,80}",
            body in "(?s).{0,64}",
            meta in proptest::collection::hash_map(".{0,40}", ".{0,80}", 0..20),
        ) {
            match Draft::parse(conversation, key, body, meta) {
                Ok(d) => proptest::prop_assert!(d.client_msg_id.chars().all(is_client_msg_id_char)),
                Err(Error::InvalidArgument(Invalid { field, .. })) => proptest::prop_assert!(
                    ["conversation_id", "client_msg_id", "body", "metadata"].contains(&field.as_str()),
                    "{field}"
                ),
                Err(Error::BodyTooLarge(_)) => {}
                Err(e) => proptest::prop_assert!(false, "{e:?}"),
            }
        }

        /// Any bytes from Redis decode to a frame or to nothing, never a panic.
        #[test]
        fn any_payload_decodes_or_is_dropped(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode(&payload);
            let mut framed = message_header(7);
            framed.extend_from_slice(&payload);
            let _ = decode(&framed);
        }
    }
}
