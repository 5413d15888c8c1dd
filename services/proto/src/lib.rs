//! The Switchboard contract as Rust types: messages, clients and servers generated from
//! `proto/` by tonic, plus the encoded descriptor set that servers publish through gRPC
//! reflection. Every service and client depends on this crate and nothing else for the wire
//! format; it re-exports `tonic` and `prost` so versions never drift.
#![allow(missing_docs, clippy::all)]

pub mod codec;
pub mod encoded;

pub use prost;
pub use prost_types;
pub use tonic;

/// Encoded `FileDescriptorSet` of every Switchboard `.proto` (and its imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));

/// `switchboard.auth.v1`: accounts, sessions, tokens.
pub mod auth {
    /// Version 1 of the auth contract.
    pub mod v1 {
        tonic::include_proto!("switchboard.auth.v1");
    }
}

/// `switchboard.presence.v1`: who is online.
pub mod presence {
    /// Version 1 of the presence contract.
    pub mod v1 {
        tonic::include_proto!("switchboard.presence.v1");
    }
}

/// `switchboard.messaging.v1`: conversations, messages, the desk.
pub mod messaging {
    /// Version 1 of the messaging contract.
    pub mod v1 {
        tonic::include_proto!("switchboard.messaging.v1");

        /// The servers of `MessagingService` and `SupportService`. Generated from the same
        /// `.proto`, but `Connect` answers [`crate::encoded::EncodedConnectResponse`], frames
        /// encoded once and shared by every stream they go to.
        pub mod servers {
            include!(concat!(
                env!("OUT_DIR"),
                "/servers/switchboard.messaging.v1.rs"
            ));
        }
    }
}

/// `switchboard.errors.v1`: the reasons every refusal carries in its `ErrorInfo`.
pub mod errors {
    /// Version 1 of the error model.
    pub mod v1 {
        tonic::include_proto!("switchboard.errors.v1");
    }
}
