//! The protobuf codec of every Switchboard service and client: tonic-prost's, with
//! 1 KiB initial buffers instead of 8 KiB.
//!
//! Each open stream keeps one encode and one decode buffer for its whole life; with tens
//! of thousands of mostly idle `Connect` streams per instance the default 16 KiB per stream
//! dominated memory. Buffers still grow on demand for larger messages.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
pub const BUFFER_BYTES: usize = 1024;
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
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
