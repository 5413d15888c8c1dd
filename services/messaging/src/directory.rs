//! Who may be a member: before member ids are stored (CreateConversation, AddMembers),
//! messaging asks the user directory which of them belong to nobody or to a guest (who
//! takes part only in its own consultations), in batches, not one call per id.
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

/// Why an id cannot be a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// It belongs to no user.
    Missing,
    /// It belongs to a guest.
    Guest,
}

/// Answers which user ids may be members.
pub trait UserDirectory: Send + Sync + 'static {
    /// The ids among `ids` that may not be members, and why (at most [`BATCH`] ids per
    /// call).
    fn unfit<'a>(
        &'a self,
        ids: &'a [String],
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Vec<(String, Unfit)>>>;
}

/// The first of `ids` that may not be a member, with its index and why, asking
/// `directory` in batches of [`BATCH`].
pub async fn first_unfit(
    directory: &dyn UserDirectory,
    ids: &[String],
    credential: &Credential,
) -> Result<Option<(usize, String, Unfit)>> {
    for (n, batch) in ids.chunks(BATCH).enumerate() {
        let unfit: std::collections::HashMap<String, Unfit> = directory
            .unfit(batch, credential)
            .await?
            .into_iter()
            .collect();
        if let Some((i, why)) = batch
            .iter()
            .enumerate()
            .find_map(|(i, id)| unfit.get(id).map(|why| (i, *why)))
        {
            return Ok(Some((n * BATCH + i, batch[i].clone(), why)));
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
    fn unfit<'a>(
        &'a self,
        ids: &'a [String],
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Vec<(String, Unfit)>>> {
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
            let reply = reply.into_inner();
            let guests = reply
                .users
                .into_iter()
                .filter(|u| u.role == auth_pb::Role::Guest as i32)
                .map(|u| (u.id, Unfit::Guest));
            Ok(reply
                .missing_ids
                .into_iter()
                .map(|id| (id, Unfit::Missing))
                .chain(guests)
                .collect())
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
        fn unfit<'a>(
            &'a self,
            _: &'a [String],
            _: &'a Credential,
        ) -> BoxFuture<'a, Result<Vec<(String, Unfit)>>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed set of users and guests: the directory of unit tests.
    #[derive(Default)]
    struct KnownUsers {
        users: std::collections::HashSet<String>,
        guests: std::collections::HashSet<String>,
    }

    impl UserDirectory for KnownUsers {
        fn unfit<'a>(
            &'a self,
            ids: &'a [String],
            _: &'a Credential,
        ) -> BoxFuture<'a, Result<Vec<(String, Unfit)>>> {
            let unfit = ids
                .iter()
                .filter_map(|id| {
                    if self.guests.contains(id) {
                        Some((id.clone(), Unfit::Guest))
                    } else if !self.users.contains(id) {
                        Some((id.clone(), Unfit::Missing))
                    } else {
                        None
                    }
                })
                .collect();
            Box::pin(async move { Ok(unfit) })
        }
    }

    #[tokio::test]
    async fn the_first_unfit_id_is_found_across_batches() {
        let ids: Vec<String> = (0..1200).map(|i| format!("u{i}")).collect();
        let mut known = KnownUsers::default();
        known.users.extend(ids.iter().cloned());
        let none = first_unfit(&known, &ids, &Credential::default())
            .await
            .expect("ok");
        assert_eq!(none, None);
        known.users.remove("u777");
        known.users.remove("u1100");
        let found = first_unfit(&known, &ids, &Credential::default())
            .await
            .expect("ok");
        assert_eq!(found, Some((777, "u777".to_owned(), Unfit::Missing)));
        known.guests.insert("u600".into());
        let found = first_unfit(&known, &ids, &Credential::default())
            .await
            .expect("ok");
        assert_eq!(found, Some((600, "u600".to_owned(), Unfit::Guest)));
    }
}
