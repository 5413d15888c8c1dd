//! Who exists: before member ids are stored (CreateConversation, AddMembers), messaging
//! asks the user directory which of them belong to nobody, in batches, not one call per id.
//!
//! The directory is auth (`AuthService.GetUsers`), asked on behalf of the caller with the
//! caller's own `authorization` value, so it works with or without `SERVICE_TOKEN`.

use std::time::Duration;

use switchboard_common::bus::BoxFuture;
use switchboard_common::rpc::Traced;
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

use crate::error::{Dependency, Error, Result};

/// Most ids in one directory call (auth's GetUsers limit).
pub const BATCH: usize = 500;

/// The `authorization` value of the call being served, forwarded to the directory.
#[derive(Clone, Default)]
pub struct Credential(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

/// Answers which user ids exist.
pub trait UserDirectory: Send + Sync + 'static {
    /// The ids among `ids` that belong to no user (at most [`BATCH`] ids per call).
    fn missing<'a>(
        &'a self,
        ids: &'a [String],
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Vec<String>>>;
}

/// The first of `ids` that belongs to no user, with its index, asking `directory` in
/// batches of [`BATCH`].
pub async fn first_unknown(
    directory: &dyn UserDirectory,
    ids: &[String],
    credential: &Credential,
) -> Result<Option<(usize, String)>> {
    for (n, batch) in ids.chunks(BATCH).enumerate() {
        let missing = directory.missing(batch, credential).await?;
        let missing: std::collections::HashSet<&str> = missing.iter().map(String::as_str).collect();
        if let Some(i) = batch.iter().position(|id| missing.contains(id.as_str())) {
            return Ok(Some((n * BATCH + i, batch[i].clone())));
        }
    }
    Ok(None)
}

/// Auth as the directory, over gRPC.
#[derive(Clone)]
pub struct AuthDirectory {
    client: AuthServiceClient<Traced<Channel>>,
}

impl AuthDirectory {
    /// A lazily connected client of the auth service at `url`.
    pub fn new(url: &str) -> Result<Self> {
        let channel = switchboard_common::rpc::lazy_channel(url, Some(Duration::from_secs(5)))
            .map_err(|e| Error::Internal(format!("auth url {url}: {e}")))?;
        Ok(Self {
            client: AuthServiceClient::new(Traced::new(channel, &[])),
        })
    }
}

impl UserDirectory for AuthDirectory {
    fn missing<'a>(
        &'a self,
        ids: &'a [String],
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let mut req = tonic::Request::new(auth_pb::GetUsersRequest {
                user_ids: ids.to_vec(),
                usernames: Vec::new(),
            });
            if let Some(value) = &credential.0 {
                req.metadata_mut().insert("authorization", value.clone());
            }
            let reply =
                self.client
                    .clone()
                    .get_users(req)
                    .await
                    .map_err(|s| Error::Unavailable {
                        dependency: Dependency::Auth,
                        cause: format!("auth GetUsers: {:?}: {}", s.code(), s.message()),
                    })?;
            Ok(reply.into_inner().missing_ids)
        })
    }
}

/// What unit tests of the rules stand on.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Every user exists.
    pub(crate) struct Everyone;

    impl UserDirectory for Everyone {
        fn missing<'a>(
            &'a self,
            _: &'a [String],
            _: &'a Credential,
        ) -> BoxFuture<'a, Result<Vec<String>>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed set of users: the directory of unit tests.
    #[derive(Default)]
    struct KnownUsers(std::collections::HashSet<String>);

    impl UserDirectory for KnownUsers {
        fn missing<'a>(
            &'a self,
            ids: &'a [String],
            _: &'a Credential,
        ) -> BoxFuture<'a, Result<Vec<String>>> {
            let missing = ids
                .iter()
                .filter(|id| !self.0.contains(*id))
                .cloned()
                .collect();
            Box::pin(async move { Ok(missing) })
        }
    }

    #[tokio::test]
    async fn the_first_unknown_id_is_found_across_batches() {
        let ids: Vec<String> = (0..1200).map(|i| format!("u{i}")).collect();
        let mut known = KnownUsers::default();
        known.0.extend(ids.iter().cloned());
        let none = first_unknown(&known, &ids, &Credential::default())
            .await
            .expect("ok");
        assert_eq!(none, None);
        known.0.remove("u777");
        known.0.remove("u1100");
        let found = first_unknown(&known, &ids, &Credential::default())
            .await
            .expect("ok");
        assert_eq!(found, Some((777, "u777".to_owned())));
    }
}
