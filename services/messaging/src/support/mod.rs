//! The online customer-service desk, in its own room: messaging's core knows it only
//! through one hook ([`crate::domain::SupportViews`], implemented by [`views::Views`]).
//!
//! - [`model`]: a consultation's record and states, and what a storage step found;
//! - [`desk`]: the rules: who may open, accept, transfer and close what, and when;
//! - [`routing`]: handing queued consultations to available agents, driven by events,
//!   and telling waiting customers their place;
//! - [`views`]: how a consultation looks to each person in it;
//! - [`agents`]: where the desk learns which agents can take consultations
//!   ([`agents::AgentDirectory`]; the presence service in production).
//!
//! Storage is [`crate::store::DeskStore`], implemented by both engines next to their
//! conversations.

pub mod agents;
pub mod desk;
pub mod model;
pub mod routing;
pub mod views;

pub use desk::Desk;
