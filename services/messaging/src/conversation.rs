//! Conversations: kinds, members, and the rules for creating and changing them.

use switchboard_proto::messaging::v1 as pb;

use crate::error::{Error, Result};

/// Largest group (members, owner included) unless `MESSAGING_MAX_GROUP_MEMBERS` says
/// otherwise.
pub const DEFAULT_MAX_GROUP_MEMBERS: usize = 10_000;
/// Longest group title in characters.
pub const MAX_TITLE_CHARS: usize = 128;

/// What kind of conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Two people.
    Direct,
    /// A titled group with an owner.
    Group,
    /// A support consultation.
    Support,
}

impl Kind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Group => "group",
            Kind::Support => "support",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Kind::Direct),
            "group" => Some(Kind::Group),
            "support" => Some(Kind::Support),
            _ => None,
        }
    }

    /// Wire value.
    pub fn to_proto(self) -> i32 {
        match self {
            Kind::Direct => pb::ConversationKind::Direct as i32,
            Kind::Group => pb::ConversationKind::Group as i32,
            Kind::Support => pb::ConversationKind::Support as i32,
        }
    }
}

/// A member and when they joined (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// User id.
    pub user_id: String,
    /// Joined at, Unix milliseconds.
    pub joined_at_ms: u64,
}

/// A stored conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    /// Id (UUIDv7).
    pub id: String,
    /// Kind.
    pub kind: Kind,
    /// Title (groups, support topics).
    pub title: String,
    /// Owner (groups).
    pub owner_id: String,
    /// Created at, Unix milliseconds.
    pub created_at_ms: u64,
    /// Identifies this incarnation of the history (changes if Redis lost it).
    pub epoch: String,
    /// Closed for sending.
    pub read_only: bool,
    /// Members, oldest first.
    pub members: Vec<Member>,
}

impl ConversationRecord {
    /// Whether `user_id` is a member.
    pub fn is_member(&self, user_id: &str) -> bool {
        self.members.iter().any(|m| m.user_id == user_id)
    }
}

/// A validated CreateConversation request.
#[derive(Debug, Clone)]
pub struct NewConversation {
    /// Direct or group.
    pub kind: Kind,
    /// Group title.
    pub title: String,
    /// Every member, the creator first, no duplicates.
    pub members: Vec<String>,
}

impl NewConversation {
    /// Checks the request of `creator` for a group of at most `max_members` (owner
    /// included). Sizes are checked before anything else, and the rest is linear in the
    /// number of ids, so the work is bounded by the limits.
    pub fn parse(
        creator: &str,
        kind: i32,
        title: &str,
        member_ids: &[String],
        max_members: usize,
    ) -> Result<Self> {
        let kind = match pb::ConversationKind::try_from(kind) {
            Ok(pb::ConversationKind::Direct) => Kind::Direct,
            Ok(pb::ConversationKind::Group) => Kind::Group,
            Ok(pb::ConversationKind::Support) => {
                return Err(Error::invalid(
                    "kind",
                    "kind SUPPORT is created by SupportService.OpenConsultation, not here",
                ));
            }
            _ => return Err(Error::invalid("kind", "kind must be DIRECT or GROUP")),
        };
        let most = match kind {
            Kind::Direct => 1,
            _ => max_members.saturating_sub(1),
        };
        if member_ids.len() > most {
            return Err(Error::invalid(
                "member_ids",
                match kind {
                    Kind::Direct => format!(
                        "a DIRECT conversation needs exactly one other member in member_ids, got {} ids",
                        member_ids.len()
                    ),
                    _ => format!(
                        "member_ids holds {} ids; a group has at most {max_members} members (MESSAGING_MAX_GROUP_MEMBERS), so at most {most} besides you",
                        member_ids.len()
                    ),
                },
            ));
        }
        switchboard_common::id::check_all("member_ids", member_ids)?;
        let members = unique(creator, member_ids);
        match kind {
            Kind::Direct => {
                if !title.is_empty() {
                    return Err(Error::invalid(
                        "title",
                        "title must be empty for DIRECT conversations",
                    ));
                }
                if members.len() != 2 {
                    return Err(Error::invalid(
                        "member_ids",
                        "a DIRECT conversation needs exactly one other member in member_ids",
                    ));
                }
            }
            _ => {
                let len = title.trim().chars().count();
                if len == 0 || len > MAX_TITLE_CHARS {
                    return Err(Error::invalid(
                        "title",
                        format!(
                            "title must be 1 to {MAX_TITLE_CHARS} characters for a GROUP, got {len}"
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            kind,
            title: title.trim().to_owned(),
            members,
        })
    }
}

/// `first` and then `others`, each id once, in the order first given (linear time).
pub fn unique(first: &str, others: &[String]) -> Vec<String> {
    switchboard_common::id::distinct(
        std::iter::once(first).chain(others.iter().map(String::as_str)),
    )
}

/// The key that makes the same pair always get the same direct conversation.
pub fn direct_key(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}|{b}")
    } else {
        format!("{b}|{a}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use switchboard_common::status::Invalid;

    /// The group size the tests use (small, so the property test stays fast).
    const MAX: usize = 1000;

    fn id() -> String {
        uuid::Uuid::now_v7().to_string()
    }

    #[test]
    fn direct_needs_exactly_one_other() {
        let d = pb::ConversationKind::Direct as i32;
        let (a, b, c) = (id(), id(), id());
        assert!(NewConversation::parse(&a, d, "", std::slice::from_ref(&b), MAX).is_ok());
        assert!(
            NewConversation::parse(&a, d, "", std::slice::from_ref(&a), MAX).is_err(),
            "self-only"
        );
        assert!(NewConversation::parse(&a, d, "", &[b.clone(), c], MAX).is_err());
        assert!(NewConversation::parse(&a, d, "t", std::slice::from_ref(&b), MAX).is_err());
        assert_eq!(direct_key(&b, &a), direct_key(&a, &b));
    }

    #[test]
    fn groups_need_a_title_and_dedupe_members() {
        let g = pb::ConversationKind::Group as i32;
        let (a, b) = (id(), id());
        let c = NewConversation::parse(&a, g, " Team ", &[b.clone(), b.clone(), a.clone()], MAX)
            .expect("ok");
        assert_eq!(c.members, [a.clone(), b]);
        assert_eq!(c.title, "Team");
        assert!(NewConversation::parse(&a, g, "", &[], MAX).is_err());
        assert!(NewConversation::parse(&a, 0, "x", &[], MAX).is_err());
        assert!(
            NewConversation::parse(&a, pb::ConversationKind::Support as i32, "x", &[], MAX)
                .is_err()
        );
    }

    #[test]
    fn sizes_are_checked_before_ids_are_looked_at() {
        let g = pb::ConversationKind::Group as i32;
        let a = id();
        // 30k copies of one id would dedupe to two members; the raw count is refused first.
        let flood = vec![id(); 30_000];
        let e = NewConversation::parse(&a, g, "t", &flood, MAX).expect_err("too many");
        assert!(
            matches!(&e, Error::InvalidArgument(Invalid { field, message }) if field == "member_ids" && message.contains("30000")),
            "{e:?}"
        );
        let ok = vec![id(); MAX - 1];
        assert!(NewConversation::parse(&a, g, "t", &ok, MAX).is_ok());
        let e = NewConversation::parse(&a, g, "t", &["x}:meta".to_owned()], MAX)
            .expect_err("not an id");
        assert!(
            matches!(&e, Error::InvalidArgument(Invalid { field, .. }) if field == "member_ids[0]"),
            "{e:?}"
        );
    }

    proptest::proptest! {
        /// Any member list: a conversation or INVALID_ARGUMENT, never a panic; members are
        /// unique, the creator first, and never more than the limit.
        #[test]
        fn member_lists_parse_or_are_refused(
            kind in -2i32..5,
            title in ".{0,140}",
            ids in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d57".to_owned()),
                    proptest::strategy::Just("0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d58".to_owned()),
                    ".{0,40}",
                ],
                0..1200,
            ),
        ) {
            let creator = "0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d50";
            match NewConversation::parse(creator, kind, &title, &ids, MAX) {
                Ok(c) => {
                    proptest::prop_assert_eq!(c.members[0].as_str(), creator);
                    let unique: HashSet<&String> = c.members.iter().collect();
                    proptest::prop_assert_eq!(unique.len(), c.members.len());
                    proptest::prop_assert!(c.members.len() <= MAX);
                }
                Err(Error::InvalidArgument(_)) => {}
                Err(e) => proptest::prop_assert!(false, "{e:?}"),
            }
        }
    }
}
