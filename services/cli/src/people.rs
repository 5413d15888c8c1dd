//! People by name: the services speak in user ids, people in usernames. [`Names`] turns
//! ids into usernames for display (looked up once each, in batches), and [`resolve`]
//! turns what someone typed (a username, or an id) into ids.

use std::collections::HashMap;

use anyhow::bail;
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::messaging::v1 as pb;

use super::{Client, Session, authed, clock, status_message};

/// Most users asked of auth in one call (its limit).
const PER_CALL: usize = 500;

/// User ids → usernames.
#[derive(Default)]
pub(crate) struct Names(HashMap<String, String>);

impl Names {
    /// Looks up the usernames of `ids` not known yet (best effort: unknown stay ids).
    pub(crate) async fn learn(&mut self, client: &Client, s: &Session, ids: &[String]) {
        let mut wanted: Vec<String> = ids
            .iter()
            .filter(|id| !id.is_empty() && !self.0.contains_key(*id))
            .cloned()
            .collect();
        wanted.sort();
        wanted.dedup();
        for chunk in wanted.chunks(PER_CALL) {
            let found = async {
                let req = authed(
                    auth_pb::GetUsersRequest {
                        user_ids: chunk.to_vec(),
                        usernames: Vec::new(),
                    },
                    &s.access_token,
                )
                .ok()?;
                Some(client.auth().ok()?.get_users(req).await.ok()?.into_inner())
            }
            .await;
            for id in chunk {
                let name = found
                    .as_ref()
                    .and_then(|f| f.users.iter().find(|u| &u.id == id))
                    .map(|u| u.username.clone())
                    .unwrap_or_else(|| id.clone());
                self.0.insert(id.clone(), name);
            }
        }
    }

    /// Records that `id` is `username`.
    #[cfg(test)]
    pub(crate) fn insert(&mut self, id: &str, username: &str) {
        self.0.insert(id.to_owned(), username.to_owned());
    }

    /// The username of `id` if known, else the id.
    pub(crate) fn get<'a>(&'a self, id: &'a str) -> &'a str {
        self.0.get(id).map(String::as_str).unwrap_or(id)
    }

    /// `user_id`'s username (the id itself if auth cannot say).
    pub(crate) async fn name(&mut self, client: &Client, s: &Session, user_id: &str) -> String {
        self.learn(client, s, std::slice::from_ref(&user_id.to_owned()))
            .await;
        self.get(user_id).to_owned()
    }

    /// `[#seq time] sender: body`.
    pub(crate) async fn line(&mut self, client: &Client, s: &Session, m: &pb::Message) -> String {
        let sender = self.name(client, s, &m.sender_id).await;
        format!(
            "[#{} {}] {sender}: {}",
            m.seq,
            clock(m.sent_at.as_ref()),
            m.body
        )
    }
}

/// Whether `s` is written like a user id (a UUID) rather than a username.
fn looks_like_id(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok()
}

/// The user ids of `who` (usernames or ids), in order; an error naming every unknown name.
pub(crate) async fn resolve(
    client: &Client,
    s: &Session,
    who: &[String],
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = who.iter().filter(|w| !looks_like_id(w)).cloned().collect();
    if names.is_empty() {
        return Ok(who.to_vec());
    }
    if names.len() > PER_CALL {
        bail!("at most {PER_CALL} usernames at once");
    }
    let found = client
        .auth()?
        .get_users(authed(
            auth_pb::GetUsersRequest {
                user_ids: Vec::new(),
                usernames: names.clone(),
            },
            &s.access_token,
        )?)
        .await
        .map_err(status_message)?
        .into_inner();
    if !found.missing_usernames.is_empty() {
        bail!("no user named {}", found.missing_usernames.join(", "));
    }
    let by_name: HashMap<String, String> = found
        .users
        .into_iter()
        .map(|u| (u.username, u.id))
        .collect();
    who.iter()
        .map(|w| {
            if looks_like_id(w) {
                return Ok(w.clone());
            }
            let folded = w.trim().to_lowercase();
            by_name
                .get(&folded)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no user named {w}"))
        })
        .collect()
}
