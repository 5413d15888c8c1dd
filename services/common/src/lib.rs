//! Plumbing every Switchboard service shares, so each service crate holds only its own
//! domain: configuration ([`config`]), logging and traces ([`telemetry`]), the gRPC server
//! with health, reflection, compression, limits, TLS and authentication ([`server`]),
//! RPC spans and trace propagation ([`rpc`]), metrics on `/metrics` ([`metrics`]),
//! graceful shutdown ([`shutdown`]), local verification of access tokens ([`token`]),
//! session revocations ([`revocation`]) and the pub/sub bus that carries them between
//! instances ([`bus`]), all set up per process by [`backend`].

pub mod backend;
pub mod bus;
pub mod clock;
pub mod config;
pub mod id;
pub mod limits;
pub mod metrics;
pub mod redis_conn;
pub mod revocation;
pub mod rpc;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod token;

pub use switchboard_proto as proto;
