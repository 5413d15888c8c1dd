//! A `ConnectResponse` encoded once, for the messaging fan-out.
//!
//! A live message goes to every local stream subscribed to its conversation, as the same
//! bytes. The fan-out encodes it once into an [`EncodedConnectResponse`]; each stream gets a
//! clone, which is a reference-count bump, and tonic's encoder copies those bytes into the
//! stream's buffer as they are (see [`prost::Message::encode_raw`] below), so compression
//! and framing work as for any message. The messaging servers in
//! [`crate::messaging::v1::servers`] use this type as `Connect`'s response; clients decode
//! the same bytes as an ordinary [`ConnectResponse`].
//!
//! Why a type rather than a codec: tonic picks the codec per service, and the response
//! type of `Connect` is what has to change; implementing [`prost::Message`] keeps
//! tonic-prost's encoder (buffers, compression, size limits) untouched.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::messaging::v1::ConnectResponse;
use crate::messaging::v1::connect_response::Frame;

/// The protobuf encoding of a [`ConnectResponse`], shared by reference count.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncodedConnectResponse(Bytes);

impl EncodedConnectResponse {
    /// Encodes `frame` (one allocation, of exactly its size).
    pub fn new(frame: Frame) -> Self {
        Self::of(&ConnectResponse { frame: Some(frame) })
    }

    /// Encodes `response`.
    pub fn of(response: &ConnectResponse) -> Self {
        Self(Bytes::from(response.encode_to_vec()))
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Decodes it back (tests and diagnostics; the servers never need to).
    pub fn decode_response(&self) -> Result<ConnectResponse, DecodeError> {
        ConnectResponse::decode(self.0.clone())
    }
}

impl std::fmt::Debug for EncodedConnectResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decode_response() {
            Ok(r) => f.debug_tuple("EncodedConnectResponse").field(&r).finish(),
            Err(_) => write!(
                f,
                "EncodedConnectResponse({} undecodable bytes)",
                self.0.len()
            ),
        }
    }
}

impl Message for EncodedConnectResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// Merging a field means what it means for a `ConnectResponse`: decode, merge, encode.
    /// Only a decoder of this type would call it, and no server decodes its own responses.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut response = self.decode_response()?;
        response.merge_field(tag, wire_type, buf, ctx)?;
        *self = Self::of(&response);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::v1::{Message as Msg, Pong};

    fn sample() -> ConnectResponse {
        ConnectResponse {
            frame: Some(Frame::Message(Msg {
                conversation_id: "c".into(),
                seq: u64::MAX,
                body: "x".repeat(300),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn encodes_to_the_same_bytes_as_the_response() {
        let response = sample();
        let encoded = EncodedConnectResponse::of(&response);
        assert_eq!(encoded.encode_to_vec(), response.encode_to_vec());
        assert_eq!(encoded.encoded_len(), response.encoded_len());
        // Length-delimited too, as tonic never does but a nested use would.
        assert_eq!(
            encoded.encode_length_delimited_to_vec(),
            response.encode_length_delimited_to_vec()
        );
        assert_eq!(
            ConnectResponse::decode(&encoded.encode_to_vec()[..]),
            Ok(response)
        );
    }

    #[test]
    fn decodes_and_merges_like_the_response() {
        let response = sample();
        let decoded = EncodedConnectResponse::decode(&response.encode_to_vec()[..]);
        assert_eq!(decoded.map(|d| d.decode_response()), Ok(Ok(response)));
        // A later field of the same oneof replaces the earlier one, as protobuf merges.
        let mut both = sample().encode_to_vec();
        let pong = ConnectResponse {
            frame: Some(Frame::Pong(Pong { nonce: 7 })),
        };
        both.extend(pong.encode_to_vec());
        let merged = EncodedConnectResponse::decode(&both[..]).and_then(|d| d.decode_response());
        assert_eq!(merged, Ok(pong));
    }

    #[test]
    fn clones_share_the_bytes() {
        let a = EncodedConnectResponse::of(&sample());
        let b = a.clone();
        assert_eq!(a.bytes().as_ptr(), b.bytes().as_ptr());
    }
}
