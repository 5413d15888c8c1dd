//! Signing keys and access tokens.
//!
//! An instance signs with one Ed25519 key: the configured one, or one it makes at start.
//! The key id (`kid`) is derived from the public key, so instances sharing a key file
//! agree on it. Each instance publishes its public key in the store with an expiry past
//! the lifetime of the last token it could have signed; `GetJwks` lists every published
//! key, so tokens from any instance (or a restarted one) verify everywhere until they expire.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::Digest;
use switchboard_common::token::{Claims, ISSUER, PublicKey, Role};

use crate::error::{Error, Result};

/// The key this instance signs with.
pub struct Keyring {
    encoding: EncodingKey,
    public: PublicKey,
    access_ttl_secs: u64,
}

impl Keyring {
    /// A fresh random key.
    pub fn generate(access_ttl_secs: u64) -> Result<Self> {
        Self::from_signing_key(SigningKey::generate(&mut rand_core::OsRng), access_ttl_secs)
    }

    /// The key in a PKCS#8 PEM file (`openssl genpkey -algorithm ed25519`).
    pub fn from_pem(pem: &str, access_ttl_secs: u64) -> Result<Self> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|e| {
            Error::invalid(
                "AUTH_SIGNING_KEY_FILE",
                format!("not a PKCS#8 PEM Ed25519 private key: {e}"),
            )
        })?;
        Self::from_signing_key(key, access_ttl_secs)
    }

    fn from_signing_key(key: SigningKey, access_ttl_secs: u64) -> Result<Self> {
        let der = key
            .to_pkcs8_der()
            .map_err(|e| Error::Internal(format!("pkcs8: {e}")))?;
        let public_bytes = key.verifying_key().to_bytes();
        let digest = sha2::Sha256::digest(public_bytes);
        let kid = URL_SAFE_NO_PAD.encode(&digest[..12]);
        Ok(Self {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public: PublicKey {
                kid,
                x: URL_SAFE_NO_PAD.encode(public_bytes),
            },
            access_ttl_secs,
        })
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Access token lifetime in seconds.
    pub fn access_ttl_secs(&self) -> u64 {
        self.access_ttl_secs
    }

    /// Signs an access token; returns it with its expiry (Unix seconds).
    pub fn issue(
        &self,
        user_id: &str,
        role: Role,
        session_id: &str,
        now: u64,
    ) -> Result<(String, u64)> {
        let exp = now + self.access_ttl_secs;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.public.kid.clone());
        let claims = Claims {
            sub: user_id.to_owned(),
            role,
            sid: session_id.to_owned(),
            iat: now,
            exp,
            iss: ISSUER.to_owned(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("signing: {e}")))?;
        Ok((token, exp))
    }
}

/// A new PKCS#8 PEM Ed25519 private key (for `switchboard-auth --generate-key` and tests).
pub fn generate_pem() -> Result<String> {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    key.to_pkcs8_pem(Default::default())
        .map(|p| p.to_string())
        .map_err(|e| Error::Internal(format!("pkcs8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_kid_and_tokens_carry_it() {
        let pem = generate_pem().expect("pem");
        let a = Keyring::from_pem(&pem, 900).expect("a");
        let b = Keyring::from_pem(&pem, 900).expect("b");
        assert_eq!(a.public(), b.public());
        let (token, exp) = a.issue("u", Role::Customer, "s", 1000).expect("issue");
        assert_eq!(exp, 1900);
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(a.public().kid.as_str()));
        assert!(Keyring::from_pem("not a key", 900).is_err());
    }
}
