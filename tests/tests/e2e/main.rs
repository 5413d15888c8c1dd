//! Every end-to-end suite in one test binary: one link of the ~380 crates instead of one
//! per suite. Each module is an area; run one with `cargo test -p switchboard-tests --test
//! e2e <module>::`, e.g. `hardening::`.
//!
//! All of them use real parts (private `redis-server` processes on free loopback ports, real
//! services on port 0, real gRPC) and stop what they start; see the crate docs of
//! `switchboard_tests` for the harness.

mod auth_e2e;
mod auth_process;
mod auth_store_contract;
mod auth_transport;
mod browser;
mod cli;
mod deploy;
mod desk_e2e;
mod grpc_web;
mod hardening;
mod messaging_e2e;
mod messaging_process;
mod messaging_recovery;
mod messaging_store_contract;
mod observability_e2e;
mod outside_clients;
mod presence_e2e;
mod presence_store_contract;
mod redis_batch;
mod revocation_contract;
mod server_process;
mod verifier_remote;
