//! The protobuf codec of every Switchboard service and client: tonic-prost's, with
//! 256-byte initial buffers instead of 8 KiB, and undecodable bytes answered
//! INVALID_ARGUMENT (the sender's fault) instead of tonic-prost's INTERNAL.
//!
//! Each open stream keeps one encode and one decode buffer for its whole life; with tens
//! of thousands of mostly idle `Connect` streams per instance the default 16 KiB per stream
//! dominated memory. 256 bytes hold a typical frame (a message with a short body is about
//! 150); buffers grow on demand for larger ones and for frames that queue up and leave
//! in one write.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// Initial size of a stream's encode and decode buffers.
pub const BUFFER_BYTES: usize = 256;
/// Encoded bytes after which a streaming response yields to the transport (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// tonic-prost's codec with small initial buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

/// Start of the message of every status for bytes that do not decode; servers recognise
/// their own decode failures by it.
pub const UNDECODABLE: &str = "message does not decode as ";

/// Decodes `U`; bytes that are not a `U` are INVALID_ARGUMENT, naming the type.
#[derive(Debug, Clone, Copy)]
pub struct CheckedDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let name = std::any::type_name::<U>();
            let name = name.rsplit("::").next().unwrap_or(name);
            Status::invalid_argument(format!("{UNDECODABLE}{name}: {e}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
    }
}
