//! The auth rules in plain Rust: registration, login with failure limits, guest sessions
//! (limited per address) and their upgrade to an account, refresh-token rotation with
//! theft detection, logout, profiles and roles. Knows nothing of gRPC.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::RngCore;
use sha2::Digest;
use switchboard_common::bus::BoxFuture;
use switchboard_common::revocation::RevocationStore;
use switchboard_common::token::{Caller, KeySource, LEEWAY_SECS, PublicKey, Role, now_secs};

use crate::account::{DisplayName, Password, UserRecord, Username};
use crate::config::LoginLimits;
use crate::error::{Error, Result};
use crate::password::Hasher;
use crate::signing::Keyring;
use crate::store::{AuthStore, NewSession, Rotation, Upgrade};

/// How often an instance re-publishes its public key.
pub const KEY_REPUBLISH: Duration = Duration::from_secs(60);

/// Most ids GetUsers takes at once.
pub const MAX_USERS_PER_CALL: usize = 500;

/// A session's token pair.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Signed access token.
    pub access_token: String,
    /// Its expiry, Unix seconds.
    pub access_expires_at: u64,
    /// `<session id>.<secret>`.
    pub refresh_token: String,
    /// Session expiry without refresh, Unix seconds.
    pub refresh_expires_at: u64,
    /// Session id.
    pub session_id: String,
}

/// What [`Auth::users`] found.
#[derive(Debug, Default)]
pub struct Users {
    /// Each user once.
    pub users: Vec<UserRecord>,
    /// Asked-for ids that belong to nobody.
    pub missing_ids: Vec<String>,
    /// Asked-for usernames (as given) that belong to nobody.
    pub missing_usernames: Vec<String>,
}

/// Auth's rules over a store.
pub struct Auth<S> {
    store: Arc<S>,
    hasher: Hasher,
    keyring: Keyring,
    revocations: Arc<dyn RevocationStore>,
    limits: LoginLimits,
    refresh_ttl: Duration,
    guest_ttl: Duration,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn token_hash(secret: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What starts the secret of a guest session's refresh tokens: a character base64url
/// never has, so a guest's session keeps its own lifetime at every refresh.
const GUEST_SECRET: char = '~';

/// What starts every guest's username; Register refuses it.
pub const GUEST_PREFIX: &str = "guest-";

/// Splits `<session id>.<secret>`; `None` unless the session id is a UUID.
fn split_refresh(token: &str) -> Option<(&str, &str)> {
    let (sid, secret) = token.trim().split_once('.')?;
    (uuid::Uuid::try_parse(sid).is_ok() && !secret.is_empty()).then_some((sid, secret))
}

impl<S: AuthStore> Auth<S> {
    /// Auth over `store`, signing with `keyring`.
    pub fn new(
        store: Arc<S>,
        hasher: Hasher,
        keyring: Keyring,
        revocations: Arc<dyn RevocationStore>,
        limits: LoginLimits,
        refresh_ttl: Duration,
        guest_ttl: Duration,
    ) -> Self {
        Self {
            store,
            hasher,
            keyring,
            revocations,
            limits,
            refresh_ttl,
            guest_ttl,
        }
    }

    /// Counts one attempt of `what` from `peer` against `limit` per window; refuses
    /// (naming `setting`) once over it.
    async fn count_peer(
        &self,
        what: &str,
        peer: Option<IpAddr>,
        limit: Option<u64>,
        refusal: &str,
    ) -> Result<()> {
        if let (Some(limit), Some(ip)) = (limit, peer) {
            let counts = self
                .store
                .hit(&[format!("{what}:{ip}")], self.limits.window)
                .await?;
            if let Some((n, ttl)) = counts.first().copied()
                && n > limit
            {
                return Err(rate_limited(refusal, ttl));
            }
        }
        Ok(())
    }

    /// What Register and UpgradeGuest check first: the attempt counted against the
    /// address's registration limit, then a username no guest could have, and a password.
    async fn new_account(
        &self,
        username: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<(Username, Password)> {
        self.count_peer(
            "register",
            peer,
            self.limits.registrations_per_peer,
            "too many registrations from this address (AUTH_REGISTRATIONS_PER_PEER)",
        )
        .await?;
        let username = Username::parse(username)?;
        if username.as_str().starts_with(GUEST_PREFIX) {
            return Err(Error::invalid(
                "username",
                format!("usernames starting with {GUEST_PREFIX:?} are reserved for guests"),
            ));
        }
        Ok((username, Password::parse(password)?))
    }

    /// Starts a session for a new GUEST user (a website visitor without an account),
    /// counted against the address's guest limit before any work.
    pub async fn start_guest(
        &self,
        display_name: &str,
        peer: Option<IpAddr>,
    ) -> Result<(Tokens, UserRecord)> {
        self.count_peer(
            "guest",
            peer,
            self.limits.guests_per_peer,
            "too many guest sessions from this address (AUTH_GUESTS_PER_PEER)",
        )
        .await?;
        let mut tag = [0u8; 8];
        rand_core::OsRng.fill_bytes(&mut tag);
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let username = Username::parse(&format!("{GUEST_PREFIX}{hex}"))?;
        let display = if display_name.trim().is_empty() {
            "Guest".to_owned()
        } else {
            DisplayName::parse(display_name, &username)?
                .as_str()
                .to_owned()
        };
        let user = UserRecord {
            id: uuid::Uuid::now_v7().to_string(),
            username: username.as_str().to_owned(),
            display_name: display,
            role: Role::Guest,
            // No password: a guest cannot log in (login checks the role first).
            password_hash: String::new(),
            created_at_ms: unix_ms(),
        };
        if !self.store.create_user(&user).await? {
            return Err(Error::Internal("a random guest name was taken".into()));
        }
        let tokens = self.start_session(&user, true).await?;
        Ok((tokens, user))
    }

    /// The guest `caller` becomes a CUSTOMER account under the same id; a new session of
    /// it, the guest's session ended everywhere.
    pub async fn upgrade_guest(
        &self,
        caller: &Caller,
        username: &str,
        password: &str,
        display_name: &str,
        peer: Option<IpAddr>,
    ) -> Result<(Tokens, UserRecord)> {
        if caller.role != Role::Guest {
            return Err(Error::FailedPrecondition(format!(
                "only a guest session upgrades to an account; this one is a {}'s, which has an account already",
                caller.role.as_str()
            )));
        }
        let (name, password) = self.new_account(username, password, peer).await?;
        let guest = self
            .store
            .users_by_id(std::slice::from_ref(&caller.user_id))
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| Error::UserNotFound(caller.user_id.clone()))?;
        let display = match display_name.trim() {
            "" if guest.display_name != "Guest" => guest.display_name.clone(),
            given => DisplayName::parse(given, &name)?.as_str().to_owned(),
        };
        if self.store.user_by_name(name.as_str()).await?.is_some() {
            return Err(Error::UsernameTaken(name.as_str().to_owned()));
        }
        let account = UserRecord {
            id: guest.id.clone(),
            username: name.as_str().to_owned(),
            display_name: display,
            role: Role::Customer,
            password_hash: self.hasher.hash(password).await?,
            created_at_ms: guest.created_at_ms,
        };
        match self.store.upgrade_guest(&account, &guest.username).await? {
            Upgrade::Done => {}
            Upgrade::NameTaken => return Err(Error::UsernameTaken(account.username)),
            Upgrade::NotAGuest => {
                return Err(Error::FailedPrecondition(
                    "this guest has become an account already".into(),
                ));
            }
        }
        self.store.revoke_session(&caller.session_id).await?;
        self.announce_revocation(&caller.session_id).await?;
        let tokens = self.start_session(&account, false).await?;
        Ok((tokens, account))
    }

    /// A new session of `user` and its first token pair.
    async fn start_session(&self, user: &UserRecord, guest: bool) -> Result<Tokens> {
        let session_id = uuid::Uuid::now_v7().to_string();
        let secret = if guest {
            format!("{GUEST_SECRET}{}", new_secret())
        } else {
            new_secret()
        };
        let ttl = self.session_ttl(guest);
        self.store
            .create_session(&NewSession {
                id: session_id.clone(),
                user_id: user.id.clone(),
                refresh_hash: token_hash(&secret),
                ttl,
            })
            .await?;
        self.tokens(user, session_id, &secret, ttl)
    }

    fn session_ttl(&self, guest: bool) -> Duration {
        if guest {
            self.guest_ttl
        } else {
            self.refresh_ttl
        }
    }

    /// Creates a CUSTOMER account; every attempt counts against the address's
    /// registration limit, before any work.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        display_name: &str,
        peer: Option<IpAddr>,
    ) -> Result<UserRecord> {
        let (username, password) = self.new_account(username, password, peer).await?;
        let display_name = DisplayName::parse(display_name, &username)?;
        self.create(username, password, display_name, Role::Customer)
            .await
    }

    async fn create(
        &self,
        username: Username,
        password: Password,
        display: DisplayName,
        role: Role,
    ) -> Result<UserRecord> {
        // Cheap check first so a taken name does not cost a hash; the store decides.
        if self.store.user_by_name(username.as_str()).await?.is_some() {
            return Err(Error::UsernameTaken(username.as_str().to_owned()));
        }
        let user = UserRecord {
            id: uuid::Uuid::now_v7().to_string(),
            username: username.as_str().to_owned(),
            display_name: display.as_str().to_owned(),
            role,
            password_hash: self.hasher.hash(password).await?,
            created_at_ms: unix_ms(),
        };
        if !self.store.create_user(&user).await? {
            return Err(Error::UsernameTaken(user.username));
        }
        Ok(user)
    }

    /// Makes sure the configured first admin exists and is an admin.
    ///
    /// An existing account of that name is promoted only if its password is the configured
    /// one; otherwise [`Error::AdminNameTaken`] (auth refuses to start), so registering the
    /// name first never earns anyone admin.
    pub async fn ensure_admin(&self, username: &str, password: &str) -> Result<()> {
        let name = Username::parse(username)?;
        let existing = self.store.user_by_name(name.as_str()).await?;
        let user = match existing {
            Some(u) => u,
            None => {
                let display = DisplayName::parse("", &name)?;
                match self
                    .create(
                        name.clone(),
                        Password::parse(password)?,
                        display,
                        Role::Admin,
                    )
                    .await
                {
                    Ok(u) => u,
                    // Another instance created it at the same moment.
                    Err(Error::UsernameTaken(_)) => {
                        self.store
                            .user_by_name(name.as_str())
                            .await?
                            .ok_or_else(|| Error::Internal("admin vanished".into()))?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if user.role != Role::Admin {
            let configured = self
                .hasher
                .verify(password, Some(user.password_hash.as_str()))
                .await?;
            if !configured {
                return Err(Error::AdminNameTaken(user.username));
            }
            self.store.set_role(&user.id, Role::Admin).await?;
        }
        Ok(())
    }

    /// Checks credentials and starts a session.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<(Tokens, UserRecord)> {
        let username = Username::parse(username)?;
        if password.is_empty() {
            return Err(Error::invalid("password", "password is required"));
        }
        // Attempts are counted before the password is checked, so a burst of concurrent
        // guesses cannot slip past the limit; a successful login takes its count back.
        let user_key = format!("user:{}", username.as_str());
        let peer_key = peer.map(|ip| format!("peer:{ip}"));
        let mut keys = vec![user_key.clone()];
        keys.extend(peer_key.clone());
        let counts = self.store.hit(&keys, self.limits.window).await?;
        if let Some((n, ttl)) = counts.first().copied()
            && n > self.limits.per_user
        {
            return Err(rate_limited(
                "too many failed logins for this username",
                ttl,
            ));
        }
        if let Some((n, ttl)) = counts.get(1).copied()
            && n > self.limits.per_peer
        {
            return Err(rate_limited(
                "too many failed logins from this address",
                ttl,
            ));
        }
        // A guest has no password: it is checked against the decoy, as an unknown name.
        let user = self
            .store
            .user_by_name(username.as_str())
            .await?
            .filter(|u| u.role != Role::Guest);
        let ok = self
            .hasher
            .verify(password, user.as_ref().map(|u| u.password_hash.as_str()))
            .await?;
        let user = match user {
            Some(u) if ok => u,
            _ => return Err(Error::BadCredentials),
        };
        self.store.forget(&user_key).await?;
        if let Some(k) = &peer_key {
            self.store.release(k).await?;
        }
        let tokens = self.start_session(&user, false).await?;
        Ok((tokens, user))
    }

    fn tokens(
        &self,
        user: &UserRecord,
        session_id: String,
        secret: &str,
        ttl: Duration,
    ) -> Result<Tokens> {
        let now = now_secs();
        let (access_token, access_expires_at) =
            self.keyring.issue(&user.id, user.role, &session_id, now)?;
        Ok(Tokens {
            access_token,
            access_expires_at,
            refresh_token: format!("{session_id}.{secret}"),
            refresh_expires_at: now + ttl.as_secs(),
            session_id,
        })
    }

    /// Exchanges a refresh token for a new pair; re-use of a spent one revokes the session.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens> {
        if refresh_token.trim().is_empty() {
            return Err(Error::invalid("refresh_token", "refresh_token is required"));
        }
        let (sid, secret) = split_refresh(refresh_token).ok_or(Error::BadRefreshToken)?;
        // The mark is covered by the hash: changing it makes the token unknown.
        let guest = secret.starts_with(GUEST_SECRET);
        let next = if guest {
            format!("{GUEST_SECRET}{}", new_secret())
        } else {
            new_secret()
        };
        let ttl = self.session_ttl(guest);
        match self
            .store
            .rotate_refresh(sid, &token_hash(secret), &token_hash(&next), ttl)
            .await?
        {
            Rotation::Rotated(user_id) => {
                let user = self
                    .store
                    .users_by_id(std::slice::from_ref(&user_id))
                    .await?
                    .pop()
                    .flatten()
                    .ok_or(Error::BadRefreshToken)?;
                self.tokens(&user, sid.to_owned(), &next, ttl)
            }
            Rotation::Reused => {
                tracing::warn!(session_id = sid, "refresh token re-used; session revoked");
                self.announce_revocation(sid).await?;
                Err(Error::RefreshReused)
            }
            Rotation::Revoked | Rotation::Unknown => Err(Error::BadRefreshToken),
        }
    }

    /// Ends the caller's session everywhere.
    pub async fn logout(&self, caller: &Caller) -> Result<()> {
        self.store.revoke_session(&caller.session_id).await?;
        self.announce_revocation(&caller.session_id).await
    }

    async fn announce_revocation(&self, session_id: &str) -> Result<()> {
        // Tokens of the session may have been issued up to now; they expire by this time.
        let until = now_secs() + self.keyring.access_ttl_secs() + LEEWAY_SECS;
        self.revocations
            .revoke(session_id, until)
            .await
            .map_err(|e| Error::Unavailable(e.into()))
    }

    /// Every public key whose tokens may still be valid.
    pub async fn jwks(&self) -> Result<Vec<PublicKey>> {
        let mut keys = self.store.keys(now_secs()).await?;
        if !keys.iter().any(|k| k.kid == self.keyring.public().kid) {
            keys.push(self.keyring.public().clone());
        }
        Ok(keys)
    }

    /// Publishes this instance's public key (call every [`KEY_REPUBLISH`]).
    pub async fn publish_key(&self) -> Result<()> {
        let until =
            now_secs() + self.keyring.access_ttl_secs() + 3 * KEY_REPUBLISH.as_secs() + LEEWAY_SECS;
        Ok(self.store.put_key(self.keyring.public(), until).await?)
    }

    /// The caller's account.
    pub async fn whoami(&self, caller: &Caller) -> Result<UserRecord> {
        self.store
            .users_by_id(std::slice::from_ref(&caller.user_id))
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| Error::UserNotFound(caller.user_id.clone()))
    }

    /// Profiles by id and by username, each user once (by id first, in the order asked),
    /// and what matched nobody.
    pub async fn users(&self, ids: &[String], usernames: &[String]) -> Result<Users> {
        if ids.len() + usernames.len() > MAX_USERS_PER_CALL {
            return Err(Error::invalid(
                "user_ids",
                format!(
                    "asked for {} ids and {} usernames; at most {MAX_USERS_PER_CALL} in all per call",
                    ids.len(),
                    usernames.len()
                ),
            ));
        }
        switchboard_common::id::check_all("user_ids", ids)?;
        let unique = switchboard_common::id::distinct(ids.iter().map(String::as_str));
        let found = self.store.users_by_id(&unique).await?;
        let mut out = Users::default();
        for (id, user) in unique.into_iter().zip(found) {
            match user {
                Some(u) => out.users.push(u),
                None => out.missing_ids.push(id),
            }
        }
        // A name no account could have is simply missing (nothing to look up).
        let folded: Vec<Option<String>> = usernames
            .iter()
            .map(|raw| Username::parse(raw).ok().map(|n| n.as_str().to_owned()))
            .collect();
        let mut valid: Vec<String> = folded.iter().flatten().cloned().collect();
        valid.sort();
        valid.dedup();
        let found = self.store.users_by_name(&valid).await?;
        let by_name: std::collections::HashMap<&str, &UserRecord> = valid
            .iter()
            .zip(&found)
            .filter_map(|(n, u)| u.as_ref().map(|u| (n.as_str(), u)))
            .collect();
        for (raw, name) in usernames.iter().zip(&folded) {
            match name.as_deref().and_then(|n| by_name.get(n)) {
                Some(u) if !out.users.iter().any(|o| o.id == u.id) => out.users.push((*u).clone()),
                Some(_) => {}
                None => out.missing_usernames.push(raw.clone()),
            }
        }
        Ok(out)
    }

    /// Admins only: sets a user's role.
    pub async fn set_role(
        &self,
        caller: &Caller,
        user_id: &str,
        role: Option<Role>,
    ) -> Result<UserRecord> {
        if caller.role != Role::Admin {
            return Err(Error::PermissionDenied(
                "only admins may change roles".into(),
            ));
        }
        let role = role
            .filter(|r| *r != Role::Guest)
            .ok_or_else(|| Error::invalid("role", "role must be CUSTOMER, AGENT or ADMIN"))?;
        switchboard_common::id::check("user_id", user_id)?;
        if user_id == caller.user_id {
            return Err(Error::FailedPrecondition(
                "admins cannot change their own role; ask another admin".into(),
            ));
        }
        let target = self
            .store
            .users_by_id(&[user_id.to_owned()])
            .await?
            .pop()
            .flatten();
        if target.is_some_and(|u| u.role == Role::Guest) {
            return Err(Error::FailedPrecondition(
                "a guest has no account and keeps the GUEST role".into(),
            ));
        }
        self.store
            .set_role(user_id, role)
            .await?
            .ok_or_else(|| Error::UserNotFound(user_id.to_owned()))
    }
}

fn rate_limited(what: &str, retry_ms: u64) -> Error {
    let secs = retry_ms.div_ceil(1000).max(1);
    Error::RateLimited {
        message: format!("{what}; retry in {secs} s"),
        retry_after: Duration::from_millis(retry_ms.max(1)),
    }
}

/// The verifier's key source inside auth itself: the store, no gRPC round trip.
pub struct StoreKeys<S>(pub Arc<Auth<S>>);

impl<S: AuthStore> KeySource for StoreKeys<S> {
    fn fetch(&self) -> BoxFuture<'_, std::result::Result<Vec<PublicKey>, String>> {
        Box::pin(async move { self.0.jwks().await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_split_only_with_a_uuid_session() {
        let sid = uuid::Uuid::now_v7().to_string();
        assert_eq!(
            split_refresh(&format!("{sid}.abc")),
            Some((sid.as_str(), "abc"))
        );
        assert_eq!(split_refresh("{x}.abc"), None);
        assert_eq!(split_refresh(&format!("{sid}.")), None);
        assert_eq!(split_refresh("garbage"), None);
    }
}
