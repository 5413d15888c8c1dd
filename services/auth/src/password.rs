//! Password hashing with argon2id, off the async runtime and with bounded concurrency.
//!
//! Hashing is deliberately slow (tens of milliseconds, ~19 MiB each). Running it on the
//! async workers would stall every other call of the instance during a login flood, so
//! each hash runs on tokio's blocking pool, at most `concurrency` at once; callers wait
//! for a slot, and beyond `queue` waiters they are turned away with RESOURCE_EXHAUSTED.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;

use crate::account::Password;
use crate::config::Argon2Cost;
use crate::error::{Error, Result};

/// Hashes and verifies passwords.
pub struct Hasher {
    argon: Arc<Argon2<'static>>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
    /// A hash of a random password, verified against when the user does not exist so
    /// that unknown users take as long as wrong passwords.
    decoy: String,
}

impl Hasher {
    /// A hasher with the given cost, `concurrency` parallel hashes and `queue` waiters.
    pub fn new(cost: Argon2Cost, concurrency: usize, queue: usize) -> Result<Self> {
        let params = argon2::Params::new(cost.memory_kib, cost.iterations, 1, None)
            .map_err(|e| Error::Internal(format!("argon2 parameters: {e}")))?;
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let decoy = argon
            .hash_password(uuid::Uuid::now_v7().as_bytes())
            .map_err(|e| Error::Internal(format!("argon2: {e}")))?
            .to_string();
        Ok(Self {
            argon: Arc::new(argon),
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            waiting: AtomicUsize::new(0),
            queue,
            decoy,
        })
    }

    /// The PHC string of `password`.
    pub async fn hash(&self, password: Password) -> Result<String> {
        let argon = self.argon.clone();
        self.run(move || {
            argon
                .hash_password(password.expose())
                .map(|h| h.to_string())
                .map_err(|e| Error::Internal(format!("argon2: {e}")))
        })
        .await
    }

    /// Whether `password` matches `hash`; with no hash (unknown user) the decoy is
    /// checked and the answer is `false`, taking the same time.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool> {
        let argon = self.argon.clone();
        let known = hash.is_some();
        let hash = hash.unwrap_or(&self.decoy).to_owned();
        let password = password.to_owned();
        let ok = self
            .run(move || {
                Ok(argon
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok())
            })
            .await?;
        Ok(known && ok)
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&self.waiting);
        if waiting >= self.queue {
            return Err(Error::RateLimited {
                message: "too many logins in progress on this instance; retry shortly".into(),
                retry_after: Duration::from_millis(500),
            });
        }
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Internal("hasher closed".into()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| Error::Internal(format!("hashing task: {e}")))?
    }
}

struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        let h = Hasher::new(
            Argon2Cost {
                memory_kib: 1024,
                iterations: 1,
            },
            2,
            16,
        )
        .expect("hasher");
        let hash = h
            .hash(Password::parse("correct horse").expect("ok"))
            .await
            .expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            h.verify("correct horse", Some(&hash))
                .await
                .expect("verify")
        );
        assert!(!h.verify("wrong horse!", Some(&hash)).await.expect("verify"));
        assert!(!h.verify("correct horse", None).await.expect("verify"));
    }

    #[tokio::test]
    async fn a_full_queue_turns_callers_away() {
        let h = Hasher::new(
            Argon2Cost {
                memory_kib: 1024,
                iterations: 1,
            },
            1,
            0,
        )
        .expect("hasher");
        assert!(matches!(
            h.verify("whatever1", None).await,
            Err(Error::RateLimited { .. })
        ));
    }
}
