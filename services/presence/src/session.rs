//! A device session's life, as plain rules over the store: opened online, kept alive while
//! its stream is open, changed by `SetState`, and ended in one of three ways:
//!
//! - **goodbye** (the client half-closed its stream): offline at once;
//! - **lost** (the stream broke: network, client gone, instance shutdown): *damped*, the
//!   session stays for the reconnect grace and then expires (any instance's sweep removes
//!   it), so a device back within the grace never looks offline to watchers;
//! - **refused** (bad input, revoked session): offline at once.
//!
//! A crashed instance ends nothing: its sessions are no longer refreshed and expire after
//! the TTL. Time is passed in (Unix ms), so the rules are tested without waiting. The
//! gRPC adapter ([`crate::grpc`]) only moves frames to and from these calls.

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::presence::v1 as pb;

use crate::error::{Error, Result};
use crate::model::{MAX_CUSTOM_TEXT, MAX_DEVICE, Session, State};
use crate::store::PresenceStore;

/// How a device stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed its side.
    Goodbye,
    /// The stream broke.
    Lost,
    /// The server refused the stream (bad input, revoked session).
    Refused,
}

/// What the end of a stream does to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Removed now: watchers see the device go.
    Drop,
    /// Kept until this instant (Unix ms), then expired by the sweep.
    LingerUntil(u64),
}

/// The rule: only a lost stream lingers, and only with a grace.
pub fn fate(ending: Ending, grace: Duration, now_ms: u64) -> Fate {
    match ending {
        Ending::Lost if !grace.is_zero() => {
            Fate::LingerUntil(now_ms.saturating_add(grace.as_millis() as u64))
        }
        _ => Fate::Drop,
    }
}

/// Applies a `SetState` frame to `session`; nothing changes if it is invalid.
pub fn apply(session: &mut Session, set: pb::SetState) -> Result<()> {
    let state = State::from_proto(set.state).ok_or_else(|| {
        Error::invalid(
            "state",
            format!("state must be AVAILABLE, AWAY or BUSY, got {}", set.state),
        )
    })?;
    if set.custom_text.chars().count() > MAX_CUSTOM_TEXT {
        return Err(Error::invalid(
            "custom_text",
            format!("custom_text must be at most {MAX_CUSTOM_TEXT} characters"),
        ));
    }
    if set.device_name.chars().count() > MAX_DEVICE {
        return Err(Error::invalid(
            "device_name",
            format!("device_name must be at most {MAX_DEVICE} characters"),
        ));
    }
    session.state = state.to_proto();
    session.custom_text = set.custom_text;
    if !set.device_name.is_empty() {
        session.device = set.device_name;
    }
    Ok(())
}

/// One device session of one user.
pub struct DeviceSession<S> {
    store: Arc<S>,
    user_id: String,
    session: Session,
    ttl: Duration,
    grace: Duration,
}

impl<S: PresenceStore> DeviceSession<S> {
    /// Opens a session for `user_id` with `role` (a wire value), AVAILABLE, at `now_ms`;
    /// the user's presence after it.
    pub async fn open(
        store: Arc<S>,
        user_id: &str,
        role: i32,
        ttl: Duration,
        grace: Duration,
        now_ms: u64,
    ) -> Result<(Self, pb::UserPresence)> {
        Self::open_in(store, user_id, role, None, ttl, grace, now_ms).await
    }

    /// [`open`](Self::open), in the state `initial` sets (AVAILABLE where it leaves the
    /// state unset); nothing is stored if it is invalid. Watchers see one change.
    pub async fn open_in(
        store: Arc<S>,
        user_id: &str,
        role: i32,
        initial: Option<pb::SetState>,
        ttl: Duration,
        grace: Duration,
        now_ms: u64,
    ) -> Result<(Self, pb::UserPresence)> {
        let mut session = Session {
            session_id: uuid::Uuid::now_v7().to_string(),
            state: State::Available.to_proto(),
            role,
            started_at_ms: now_ms,
            ..Default::default()
        };
        if let Some(mut set) = initial {
            if set.state == pb::PresenceState::Unspecified as i32 {
                set.state = State::Available.to_proto();
            }
            apply(&mut session, set)?;
        }
        let me = Self {
            store,
            user_id: user_id.to_owned(),
            session,
            ttl,
            grace,
        };
        let presence = me.put(now_ms).await?;
        Ok((me, presence))
    }

    /// The session's id.
    pub fn id(&self) -> &str {
        &self.session.session_id
    }

    /// How often the stream's holder should [`refresh`](Self::refresh): a third of the TTL.
    pub fn refresh_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn put(&self, now_ms: u64) -> Result<pb::UserPresence> {
        let expires = now_ms.saturating_add(self.ttl.as_millis() as u64);
        Ok(self
            .store
            .put_session(&self.user_id, &self.session, expires, now_ms)
            .await?)
    }

    /// Keeps the session alive for another TTL from `now_ms` (the stream is still open).
    pub async fn refresh(&self, now_ms: u64) -> Result<()> {
        let key = [crate::store::Live {
            user_id: self.user_id.clone(),
            session_id: self.session.session_id.clone(),
            role: self.session.role,
        }];
        let expires = now_ms.saturating_add(self.ttl.as_millis() as u64);
        Ok(self.store.touch(&key, expires).await?)
    }

    /// A `SetState`: the user's presence after it, or why it was refused (the session
    /// keeps its state then).
    pub async fn set(&mut self, set: pb::SetState, now_ms: u64) -> Result<pb::UserPresence> {
        let mut next = self.session.clone();
        apply(&mut next, set)?;
        self.session = next;
        self.put(now_ms).await
    }

    /// Ends the stream's hold on the session, by the [`fate`] rule.
    pub async fn end(self, ending: Ending, now_ms: u64) -> Result<Fate> {
        let fate = fate(ending, self.grace, now_ms);
        match fate {
            Fate::LingerUntil(until) => {
                let key = [crate::store::Live {
                    user_id: self.user_id.clone(),
                    session_id: self.session.session_id.clone(),
                    role: self.session.role,
                }];
                self.store.touch(&key, until).await?;
            }
            Fate::Drop => {
                self.store
                    .drop_session(&self.user_id, &self.session.session_id, now_ms)
                    .await?;
            }
        }
        Ok(fate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use switchboard_common::bus::MemoryBus;
    use switchboard_common::status::Invalid;

    const TTL: Duration = Duration::from_secs(30);
    const GRACE: Duration = Duration::from_secs(5);
    const T0: u64 = 1_000_000;

    fn state_of(p: &pb::UserPresence) -> pb::PresenceState {
        pb::PresenceState::try_from(p.state).unwrap_or(pb::PresenceState::Unspecified)
    }

    async fn presence(store: &MemoryStore, user: &str, now: u64) -> pb::PresenceState {
        let rows = store.get(&[user.to_owned()], now).await.expect("get");
        rows.first()
            .map(|(_, p)| state_of(p))
            .unwrap_or(pb::PresenceState::Offline)
    }

    fn set(state: pb::PresenceState) -> pb::SetState {
        pb::SetState {
            state: state as i32,
            custom_text: String::new(),
            device_name: String::new(),
        }
    }

    #[test]
    fn only_a_lost_stream_lingers_and_only_with_a_grace() {
        assert_eq!(fate(Ending::Goodbye, GRACE, T0), Fate::Drop);
        assert_eq!(fate(Ending::Refused, GRACE, T0), Fate::Drop);
        assert_eq!(fate(Ending::Lost, GRACE, T0), Fate::LingerUntil(T0 + 5_000));
        assert_eq!(fate(Ending::Lost, Duration::ZERO, T0), Fate::Drop);
        assert_eq!(
            fate(Ending::Lost, GRACE, u64::MAX),
            Fate::LingerUntil(u64::MAX),
            "no overflow at the end of time"
        );
    }

    #[tokio::test]
    async fn a_lost_device_stays_online_for_the_grace_then_the_sweep_takes_it() {
        let store = Arc::new(MemoryStore::new(MemoryBus::new()));
        let (s, p) = DeviceSession::open(store.clone(), "u1", 1, TTL, GRACE, T0)
            .await
            .expect("open");
        assert_eq!(state_of(&p), pb::PresenceState::Available);
        assert_eq!(
            s.end(Ending::Lost, T0 + 1_000).await.expect("end"),
            Fate::LingerUntil(T0 + 6_000)
        );
        assert_eq!(
            presence(&store, "u1", T0 + 5_999).await,
            pb::PresenceState::Available,
            "offline before the grace ended"
        );
        store.sweep(T0 + 6_001, 100).await.expect("sweep");
        assert_eq!(
            presence(&store, "u1", T0 + 6_001).await,
            pb::PresenceState::Offline
        );
    }

    #[tokio::test]
    async fn a_goodbye_is_offline_at_once_and_a_second_device_keeps_the_user_online() {
        let store = Arc::new(MemoryStore::new(MemoryBus::new()));
        let (phone, _) = DeviceSession::open(store.clone(), "u1", 1, TTL, GRACE, T0)
            .await
            .expect("phone");
        let (mut laptop, _) = DeviceSession::open(store.clone(), "u1", 1, TTL, GRACE, T0)
            .await
            .expect("laptop");
        let p = laptop
            .set(set(pb::PresenceState::Busy), T0 + 10)
            .await
            .expect("busy");
        // Aggregated over devices: the most available one wins.
        assert_eq!(state_of(&p), pb::PresenceState::Available);
        assert_eq!(
            phone.end(Ending::Goodbye, T0 + 20).await.expect("bye"),
            Fate::Drop
        );
        assert_eq!(
            presence(&store, "u1", T0 + 20).await,
            pb::PresenceState::Busy
        );
        laptop.end(Ending::Refused, T0 + 30).await.expect("refused");
        assert_eq!(
            presence(&store, "u1", T0 + 30).await,
            pb::PresenceState::Offline
        );
    }

    #[tokio::test]
    async fn an_open_stream_keeps_its_session_past_the_ttl_and_a_crash_lets_it_expire() {
        let store = Arc::new(MemoryStore::new(MemoryBus::new()));
        let (s, _) = DeviceSession::open(store.clone(), "u1", 1, TTL, GRACE, T0)
            .await
            .expect("open");
        assert_eq!(s.refresh_every(), Duration::from_secs(10));
        // The holder refreshes every third of the TTL: still there long after one TTL.
        for k in 1..=9 {
            s.refresh(T0 + k * 10_000).await.expect("refresh");
            store.sweep(T0 + k * 10_000 + 1, 100).await.expect("sweep");
        }
        assert_eq!(
            presence(&store, "u1", T0 + 90_001).await,
            pb::PresenceState::Available
        );
        // The instance dies (nobody ends or refreshes it): gone one TTL after the last refresh.
        drop(s);
        store.sweep(T0 + 90_000 + 29_999, 100).await.expect("sweep");
        assert_eq!(
            presence(&store, "u1", T0 + 119_999).await,
            pb::PresenceState::Available
        );
        store.sweep(T0 + 120_001, 100).await.expect("sweep");
        assert_eq!(
            presence(&store, "u1", T0 + 120_001).await,
            pb::PresenceState::Offline
        );
    }

    #[tokio::test]
    async fn a_refused_set_state_changes_nothing() {
        let store = Arc::new(MemoryStore::new(MemoryBus::new()));
        let (mut s, _) = DeviceSession::open(store.clone(), "u1", 1, TTL, GRACE, T0)
            .await
            .expect("open");
        let away = s.set(set(pb::PresenceState::Away), T0).await.expect("away");
        assert_eq!(state_of(&away), pb::PresenceState::Away);
        for bad in [
            pb::SetState {
                state: 99,
                ..set(pb::PresenceState::Busy)
            },
            pb::SetState {
                custom_text: "x".repeat(MAX_CUSTOM_TEXT + 1),
                ..set(pb::PresenceState::Busy)
            },
            pb::SetState {
                device_name: "d".repeat(MAX_DEVICE + 1),
                ..set(pb::PresenceState::Busy)
            },
            set(pb::PresenceState::Offline),
        ] {
            assert!(s.set(bad, T0 + 1).await.is_err());
        }
        assert_eq!(
            presence(&store, "u1", T0 + 2).await,
            pb::PresenceState::Away
        );
    }

    proptest::proptest! {
        /// Any SetState frame: applied or INVALID_ARGUMENT naming the field.
        #[test]
        fn set_state_frames_apply_or_name_the_field(
            state in -3i32..8,
            text in ".{0,200}",
            device in ".{0,100}",
        ) {
            let mut session = Session::default();
            let set = pb::SetState { state, custom_text: text, device_name: device };
            match apply(&mut session, set) {
                Ok(()) => proptest::prop_assert!(State::from_proto(session.state).is_some()),
                Err(Error::InvalidArgument(Invalid { field, .. })) => proptest::prop_assert!(
                    ["state", "custom_text", "device_name"].contains(&field.as_str())
                ),
                Err(e) => proptest::prop_assert!(false, "{e:?}"),
            }
        }
    }
}
