//! The desk's records: a consultation and its states, and what a storage step found.

/// Where a consultation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsultationState {
    /// Waiting for an agent.
    Queued,
    /// An agent has it.
    Assigned,
    /// Done; the conversation is read-only.
    Closed,
}

impl ConsultationState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Closed => "closed",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "assigned" => Some(Self::Assigned),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// A stored consultation; its id is its SUPPORT conversation's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsultationRecord {
    /// Id (= conversation id).
    pub id: String,
    /// The customer who opened it.
    pub customer_id: String,
    /// The assigned agent; empty while queued.
    pub agent_id: String,
    /// What it is about.
    pub topic: String,
    /// Where it is.
    pub state: ConsultationState,
    /// Opened at, Unix ms.
    pub opened_at_ms: u64,
    /// Last assigned at, Unix ms (0: never).
    pub assigned_at_ms: u64,
    /// Closed at, Unix ms (0: open).
    pub closed_at_ms: u64,
    /// Resolution given at close.
    pub resolution: String,
    /// Note of the last transfer, for the agent.
    pub transfer_note: String,
}

/// What a state change found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Done; the agent it went to, where there is one.
    Done(String),
    /// No such consultation.
    NotFound,
    /// The consultation is in this state, which does not allow the change.
    WrongState(ConsultationState),
    /// Another agent holds it now (it moved since the caller looked).
    Moved(String),
}

/// Result of one routing attempt for the head of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// This consultation went to this agent.
    Assigned {
        /// Consultation id.
        id: String,
        /// Agent id.
        agent_id: String,
    },
    /// Nothing is queued.
    Empty,
    /// No candidate has room.
    NoAgent,
}
