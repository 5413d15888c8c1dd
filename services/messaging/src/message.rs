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
        if conversation_id.is_empty() {
            return Err(Error::InvalidArgument("conversation_id is required".into()));
        }
        let id_len = client_msg_id.chars().count();
        if id_len == 0 || id_len > MAX_CLIENT_MSG_ID {
            return Err(Error::InvalidArgument(format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} characters, got {id_len}"
            )));
        }
        if body.is_empty() {
            return Err(Error::InvalidArgument("body must not be empty".into()));
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(Error::BodyTooLarge(body.len()));
        }
        if metadata.len() > MAX_METADATA_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "metadata has {} entries; at most {MAX_METADATA_ENTRIES}",
                metadata.len()
            )));
        }
        let meta_bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta_bytes > MAX_METADATA_BYTES {
            return Err(Error::InvalidArgument(format!(
                "metadata is {meta_bytes} bytes; at most {MAX_METADATA_BYTES}"
            )));
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
        let ok = |body: &str| Draft::parse("c".into(), "k".into(), body.into(), HashMap::new());
        assert!(ok("hello").is_ok());
        assert!(matches!(ok(""), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            ok(&"x".repeat(MAX_BODY_BYTES + 1)),
            Err(Error::BodyTooLarge(_))
        ));
        assert!(ok(&"x".repeat(MAX_BODY_BYTES)).is_ok());
        let long_key = Draft::parse("c".into(), "k".repeat(65), "b".into(), HashMap::new());
        assert!(matches!(long_key, Err(Error::InvalidArgument(m)) if m.contains("client_msg_id")));
    }
}
