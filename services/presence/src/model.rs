//! Presence in plain Rust: device sessions, their states, and how a user's presence is
//! aggregated from them (online if any session is; the most available state wins; last
//! seen kept when the last session ends).

use switchboard_proto::presence::v1 as pb;

/// A device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Reachable.
    Available,
    /// Away from the device.
    Away,
    /// Not to be disturbed.
    Busy,
}

impl State {
    /// From the wire; `None` for UNSPECIFIED, OFFLINE and unknown numbers.
    pub fn from_proto(v: i32) -> Option<Self> {
        match pb::PresenceState::try_from(v).ok()? {
            pb::PresenceState::Available => Some(State::Available),
            pb::PresenceState::Away => Some(State::Away),
            pb::PresenceState::Busy => Some(State::Busy),
            _ => None,
        }
    }

    /// To the wire.
    pub fn to_proto(self) -> i32 {
        match self {
            State::Available => pb::PresenceState::Available as i32,
            State::Away => pb::PresenceState::Away as i32,
            State::Busy => pb::PresenceState::Busy as i32,
        }
    }

    /// How available: higher wins when sessions disagree (AVAILABLE over BUSY over AWAY).
    fn rank(self) -> u8 {
        match self {
            State::Available => 3,
            State::Busy => 2,
            State::Away => 1,
        }
    }
}

/// One live device session, as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Session {
    /// Session id.
    #[prost(string, tag = "1")]
    pub session_id: String,
    /// Wire value of the state.
    #[prost(int32, tag = "2")]
    pub state: i32,
    /// Custom status text.
    #[prost(string, tag = "3")]
    pub custom_text: String,
    /// Device label.
    #[prost(string, tag = "4")]
    pub device: String,
    /// Wire value of the user's role.
    #[prost(int32, tag = "5")]
    pub role: i32,
    /// When it started, Unix ms.
    #[prost(uint64, tag = "6")]
    pub started_at_ms: u64,
}

/// A change as published on a user's channel: the new presence and its version, so
/// watchers can drop updates that arrive out of order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Change {
    /// Increases with every change of the user.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// The presence after the change.
    #[prost(message, optional, tag = "2")]
    pub presence: Option<pb::UserPresence>,
}

/// Longest custom text in characters.
pub const MAX_CUSTOM_TEXT: usize = 128;
/// Longest device label in characters.
pub const MAX_DEVICE: usize = 64;

/// A user's presence from their live sessions; `role` is the user's last known role
/// (reported while offline too).
pub fn aggregate(
    user_id: &str,
    sessions: &[Session],
    last_seen_ms: Option<u64>,
    role: i32,
    now_ms: u64,
) -> pb::UserPresence {
    let best = sessions
        .iter()
        .filter_map(|s| State::from_proto(s.state).map(|st| (st, s)))
        .max_by_key(|(st, s)| (st.rank(), s.started_at_ms));
    let last_seen = if sessions.is_empty() {
        last_seen_ms
    } else {
        Some(now_ms)
    };
    pb::UserPresence {
        user_id: user_id.to_owned(),
        state: best
            .map(|(st, _)| st.to_proto())
            .unwrap_or(pb::PresenceState::Offline as i32),
        custom_text: best.map(|(_, s)| s.custom_text.clone()).unwrap_or_default(),
        last_seen: last_seen.map(|ms| prost_types::Timestamp {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        session_count: sessions.len() as u32,
        role: sessions.first().map(|s| s.role).unwrap_or(role),
    }
}

use switchboard_proto::prost_types;

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, state: State, started: u64) -> Session {
        Session {
            session_id: id.into(),
            state: state.to_proto(),
            started_at_ms: started,
            ..Default::default()
        }
    }

    #[test]
    fn the_most_available_session_wins_and_offline_keeps_last_seen() {
        let p = aggregate(
            "u",
            &[
                s("a", State::Away, 1),
                s("b", State::Available, 2),
                s("c", State::Busy, 3),
            ],
            None,
            0,
            50,
        );
        assert_eq!(p.state, pb::PresenceState::Available as i32);
        assert_eq!(p.session_count, 3);
        assert_eq!(p.last_seen.map(|t| t.seconds), Some(0));
        let p = aggregate(
            "u",
            &[s("a", State::Away, 1), s("c", State::Busy, 3)],
            None,
            0,
            50,
        );
        assert_eq!(p.state, pb::PresenceState::Busy as i32);
        let off = aggregate("u", &[], Some(7_000), 2, 50_000);
        assert_eq!(off.role, 2, "the role is kept while offline");
        assert_eq!(off.state, pb::PresenceState::Offline as i32);
        assert_eq!(off.last_seen.map(|t| t.seconds), Some(7));
        assert_eq!(aggregate("u", &[], None, 0, 1).last_seen, None);
        assert_eq!(State::from_proto(pb::PresenceState::Offline as i32), None);
        assert_eq!(State::from_proto(99), None);
    }
}
