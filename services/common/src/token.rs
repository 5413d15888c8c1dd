//! Access tokens: the claims auth signs and the [`Verifier`] every service uses to check
//! them locally.
//!
//! Tokens are JWTs signed with Ed25519 (`alg: EdDSA`), with the signing key named by the
//! `kid` header. The verifier keeps the public keys fetched from `AuthService.GetJwks`
//! (through a [`KeySource`]) and fetches again when it meets an unknown `kid`, at most
//! once per [`REFETCH_INTERVAL`] so forged `kid`s cannot turn into a fetch storm. While
//! the last fetch failed, a token with an unknown `kid` is answered UNAVAILABLE
//! (`KeysUnavailable`, retry), never UNAUTHENTICATED: the token may be valid, and a client
//! told it is not would log its user out during an auth or Redis outage.
//! Revoked sessions (logout, refresh re-use) are refused through the shared
//! [`RevocationList`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::bus::BoxFuture;
use crate::revocation::RevocationList;
use crate::status::{Reason, Refusal};

/// Issuer written into and required from every access token.
pub const ISSUER: &str = "switchboard";

/// Smallest time between two key fetches caused by unknown `kid`s.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// Clock skew tolerated on `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// What a user may do. Mirrors `switchboard.auth.v1.Role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A member of the public.
    Customer,
    /// A support agent.
    Agent,
    /// An administrator.
    Admin,
    /// A website visitor without an account: consultations only.
    Guest,
}

impl Role {
    /// The lower-case name used in tokens and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Guest => "guest",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "customer" => Some(Role::Customer),
            "agent" => Some(Role::Agent),
            "admin" => Some(Role::Admin),
            "guest" => Some(Role::Guest),
            _ => None,
        }
    }

    /// The wire value.
    pub fn to_proto(self) -> i32 {
        use switchboard_proto::auth::v1::Role as P;
        match self {
            Role::Customer => P::Customer as i32,
            Role::Agent => P::Agent as i32,
            Role::Admin => P::Admin as i32,
            Role::Guest => P::Guest as i32,
        }
    }

    /// From the wire value; `None` for UNSPECIFIED and unknown numbers.
    pub fn from_proto(value: i32) -> Option<Self> {
        use switchboard_proto::auth::v1::Role as P;
        match P::try_from(value).ok()? {
            P::Customer => Some(Role::Customer),
            P::Agent => Some(Role::Agent),
            P::Admin => Some(Role::Admin),
            P::Guest => Some(Role::Guest),
            P::Unspecified => None,
        }
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// The user's role when the token was issued.
    pub role: Role,
    /// Session id.
    pub sid: String,
    /// Issued at (seconds since the Unix epoch).
    pub iat: u64,
    /// Expires at (seconds since the Unix epoch).
    pub exp: u64,
    /// Always [`ISSUER`].
    pub iss: String,
}

/// The verified caller, put into every authenticated request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub user_id: String,
    /// Role from the token.
    pub role: Role,
    /// Session id.
    pub session_id: String,
    /// When the token expires (seconds since the Unix epoch).
    pub expires_at: u64,
}

/// A public key as published by `GetJwks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Key id.
    pub kid: String,
    /// The 32-byte Ed25519 public key, base64url without padding.
    pub x: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `authorization` metadata.
    #[error("missing authorization metadata: send 'authorization: Bearer <access token>'")]
    Missing,
    /// The metadata is not `Bearer <token>`.
    #[error("authorization metadata must be 'Bearer <access token>'")]
    NotBearer,
    /// Not a well-formed JWT.
    #[error("access token is malformed")]
    Malformed,
    /// Any algorithm but EdDSA (including `none`).
    #[error("access token algorithm must be EdDSA")]
    Algorithm,
    /// No `kid`, or a `kid` auth does not know.
    #[error("access token was signed by an unknown key")]
    UnknownKey,
    /// Signature or claims do not check out.
    #[error("access token signature or claims are invalid")]
    Invalid,
    /// Past `exp`.
    #[error("access token has expired; refresh it")]
    Expired,
    /// The session was logged out or revoked.
    #[error("session has been revoked; log in again")]
    Revoked,
    /// Auth could not be asked for its keys: the token may well be valid.
    #[error("cannot fetch token keys from the auth service; retry shortly")]
    KeysUnavailable,
    /// More than one `authorization` header: which one counts would be a guess.
    #[error("send exactly one authorization header, got {0}")]
    ManyHeaders(usize),
}

impl TokenError {
    /// The refusal sent for this error.
    pub fn refusal(&self) -> Refusal {
        let reason = match self {
            TokenError::KeysUnavailable => Reason::AuthUnavailable,
            TokenError::Expired => Reason::TokenExpired,
            TokenError::Revoked => Reason::SessionRevoked,
            _ => Reason::Unauthenticated,
        };
        Refusal::new(reason, self.to_string())
    }
}

impl From<TokenError> for tonic::Status {
    fn from(e: TokenError) -> Self {
        e.refusal().to_status()
    }
}

/// Where the verifier gets public keys from.
pub trait KeySource: Send + Sync + 'static {
    /// Every key currently valid.
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, String>>;
}

/// Fetches keys from `AuthService.GetJwks` over gRPC.
#[derive(Clone)]
pub struct GrpcKeySource {
    client: switchboard_proto::auth::v1::auth_service_client::AuthServiceClient<
        crate::rpc::Traced<tonic::transport::Channel>,
    >,
}

impl GrpcKeySource {
    /// A key source for the auth service at `channel` (connect lazily); each fetch is a
    /// client span in the trace of the call that needed the keys.
    pub fn new(channel: tonic::transport::Channel) -> Self {
        Self {
            client: switchboard_proto::auth::v1::auth_service_client::AuthServiceClient::new(
                crate::rpc::Traced::new(channel, &[]),
            ),
        }
    }
}

impl KeySource for GrpcKeySource {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, String>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let mut request = tonic::Request::new(switchboard_proto::auth::v1::GetJwksRequest {});
            request.set_timeout(Duration::from_secs(3));
            let keys = client
                .get_jwks(request)
                .await
                .map_err(|s| s.to_string())?
                .into_inner()
                .keys;
            Ok(keys
                .into_iter()
                .map(|k| PublicKey { kid: k.kid, x: k.x })
                .collect())
        })
    }
}

/// Checks access tokens locally.
pub struct Verifier {
    keys: RwLock<HashMap<String, DecodingKey>>,
    source: Arc<dyn KeySource>,
    /// When keys were last fetched and whether that fetch succeeded.
    last_fetch: tokio::sync::Mutex<Option<(Instant, bool)>>,
    revocations: Arc<RevocationList>,
    validation: Validation,
}

pub use crate::clock::now_secs;

impl Verifier {
    /// A verifier with keys from `source` and revocations from `revocations`.
    pub fn new(source: Arc<dyn KeySource>, revocations: Arc<RevocationList>) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        Self {
            keys: RwLock::new(HashMap::new()),
            source,
            last_fetch: tokio::sync::Mutex::new(None),
            revocations,
            validation,
        }
    }

    /// The revocation list this verifier consults.
    pub fn revocations(&self) -> &Arc<RevocationList> {
        &self.revocations
    }

    /// Verifies the `authorization` metadata of a request: exactly one entry.
    pub async fn verify_headers(&self, headers: &http::HeaderMap) -> Result<Caller, TokenError> {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let first = values.next();
        let more = values.count();
        if more > 0 {
            return Err(TokenError::ManyHeaders(more + 1));
        }
        self.verify_header(first.map(http::HeaderValue::as_bytes))
            .await
    }

    /// Verifies the value of an `authorization` metadata entry.
    pub async fn verify_header(&self, value: Option<&[u8]>) -> Result<Caller, TokenError> {
        let value = value.ok_or(TokenError::Missing)?;
        let value = std::str::from_utf8(value).map_err(|_| TokenError::NotBearer)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::NotBearer)?;
        self.verify(token).await
    }

    /// Verifies a bare token.
    pub async fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refetch().await?;
                self.key(&kid).ok_or(TokenError::UnknownKey)?
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => TokenError::Malformed,
                _ => TokenError::Invalid,
            }
        })?;
        let claims = data.claims;
        if self.revocations.is_revoked(&claims.sid, now_secs()) {
            return Err(TokenError::Revoked);
        }
        Ok(Caller {
            user_id: claims.sub,
            role: claims.role,
            session_id: claims.sid,
            expires_at: claims.exp,
        })
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// Fetches the key set again, unless that happened less than [`REFETCH_INTERVAL`] ago;
    /// then the outcome of that fetch stands (a failure stays `KeysUnavailable`).
    async fn refetch(&self) -> Result<(), TokenError> {
        let mut last = self.last_fetch.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < REFETCH_INTERVAL
        {
            return if ok {
                Ok(())
            } else {
                Err(TokenError::KeysUnavailable)
            };
        }
        let fetched = self.source.fetch().await;
        *last = Some((Instant::now(), fetched.is_ok()));
        let fetched = fetched.map_err(|e| {
            tracing::warn!(error = %e, "fetching token keys failed");
            TokenError::KeysUnavailable
        })?;
        let mut keys = HashMap::new();
        for k in fetched {
            match decoding_key(&k.x) {
                Some(key) => {
                    keys.insert(k.kid, key);
                }
                None => tracing::warn!(kid = %k.kid, "ignoring malformed public key from auth"),
            }
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }
}

/// A decoding key from a base64url Ed25519 public key, if it is exactly 32 bytes.
///
/// The length is checked here because jsonwebtoken slices the key to 32 bytes without
/// checking and would panic on a shorter one.
pub fn decoding_key(x: &str) -> Option<DecodingKey> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .ok()?;
    (bytes.len() == 32).then(|| DecodingKey::from_ed_der(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use jsonwebtoken::{EncodingKey, Header};

    struct Fixed(Vec<PublicKey>);
    impl KeySource for Fixed {
        fn fetch(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, String>> {
            let keys = self.0.clone();
            Box::pin(async move { Ok(keys) })
        }
    }

    fn keypair(kid: &str) -> (EncodingKey, PublicKey) {
        let signing = SigningKey::generate(&mut rand_core::OsRng);
        let der = signing.to_pkcs8_der().expect("pkcs8");
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(signing.verifying_key().as_bytes());
        (
            EncodingKey::from_ed_der(der.as_bytes()),
            PublicKey { kid: kid.into(), x },
        )
    }

    fn token(key: &EncodingKey, kid: &str, exp: u64, sid: &str) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let claims = Claims {
            sub: "u1".into(),
            role: Role::Agent,
            sid: sid.into(),
            iat: now_secs(),
            exp,
            iss: ISSUER.into(),
        };
        jsonwebtoken::encode(&header, &claims, key).expect("encode")
    }

    fn verifier(keys: Vec<PublicKey>) -> Verifier {
        Verifier::new(Arc::new(Fixed(keys)), Arc::new(RevocationList::default()))
    }

    #[tokio::test]
    async fn accepts_a_good_token_and_refuses_the_bad_ones() {
        let (good, public) = keypair("k1");
        let (other, _) = keypair("k1");
        let v = verifier(vec![public]);
        let caller = v
            .verify(&token(&good, "k1", now_secs() + 60, "s1"))
            .await
            .expect("valid");
        assert_eq!(caller.user_id, "u1");
        assert_eq!(caller.role, Role::Agent);
        assert_eq!(
            v.verify(&token(&other, "k1", now_secs() + 60, "s1")).await,
            Err(TokenError::Invalid)
        );
        assert_eq!(
            v.verify(&token(&good, "k9", now_secs() + 60, "s1")).await,
            Err(TokenError::UnknownKey)
        );
        assert_eq!(
            v.verify(&token(&good, "k1", now_secs() - 60, "s1")).await,
            Err(TokenError::Expired)
        );
        assert_eq!(v.verify("garbage").await, Err(TokenError::Malformed));
        v.revocations().insert("s2", now_secs() + 60);
        assert_eq!(
            v.verify(&token(&good, "k1", now_secs() + 60, "s2")).await,
            Err(TokenError::Revoked)
        );
    }

    #[tokio::test]
    async fn refuses_alg_none_and_header_problems() {
        let (_, public) = keypair("k1");
        let v = verifier(vec![public]);
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
            b64(
                r#"{"sub":"u1","role":"admin","sid":"s","iat":1,"exp":99999999999,"iss":"switchboard"}"#
            )
        );
        assert_eq!(v.verify(&none).await, Err(TokenError::Malformed));
        let hs = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"HS256","kid":"k1"}"#),
            b64("{}")
        );
        assert_eq!(v.verify(&hs).await, Err(TokenError::Algorithm));
        assert_eq!(v.verify_header(None).await, Err(TokenError::Missing));
        assert_eq!(
            v.verify_header(Some(b"Basic abc")).await,
            Err(TokenError::NotBearer)
        );
        assert_eq!(
            v.verify_header(Some(b"Bearer ")).await,
            Err(TokenError::NotBearer)
        );
    }

    /// Fails until `ok` is set, then serves `keys`.
    struct Flaky {
        ok: std::sync::atomic::AtomicBool,
        keys: Vec<PublicKey>,
    }
    impl KeySource for Flaky {
        fn fetch(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, String>> {
            let ok = self.ok.load(std::sync::atomic::Ordering::SeqCst);
            let keys = self.keys.clone();
            Box::pin(async move {
                if ok {
                    Ok(keys)
                } else {
                    Err("auth is down".into())
                }
            })
        }
    }

    #[tokio::test]
    async fn a_failed_key_fetch_stays_unavailable_until_one_succeeds() {
        let (good, public) = keypair("k1");
        let source = Arc::new(Flaky {
            ok: false.into(),
            keys: vec![public],
        });
        let v = Verifier::new(source.clone(), Arc::new(RevocationList::default()));
        let t = token(&good, "k1", now_secs() + 60, "s1");
        // The second call falls within REFETCH_INTERVAL of the failed fetch.
        for _ in 0..2 {
            assert_eq!(v.verify(&t).await, Err(TokenError::KeysUnavailable));
        }
        source.ok.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(REFETCH_INTERVAL).await;
        assert!(v.verify(&t).await.is_ok(), "keys arrive once auth is back");
        assert_eq!(
            v.verify(&token(&good, "k9", now_secs() + 60, "s1")).await,
            Err(TokenError::UnknownKey),
            "after a good fetch an unknown kid is a bad token"
        );
    }

    #[tokio::test]
    async fn two_authorization_headers_are_refused() {
        let (good, public) = keypair("k1");
        let v = verifier(vec![public]);
        let value: http::HeaderValue =
            format!("Bearer {}", token(&good, "k1", now_secs() + 60, "s1"))
                .parse()
                .expect("ascii");
        let mut headers = http::HeaderMap::new();
        headers.append(http::header::AUTHORIZATION, value.clone());
        assert!(v.verify_headers(&headers).await.is_ok());
        headers.append(http::header::AUTHORIZATION, value);
        assert_eq!(
            v.verify_headers(&headers).await,
            Err(TokenError::ManyHeaders(2))
        );
    }

    #[test]
    fn short_public_keys_are_rejected_not_sliced() {
        assert!(decoding_key("AAAA").is_none());
    }
}
