//! Accounts: the validated input types (username, password, display name) and the
//! stored user record.

use switchboard_common::token::Role;

use crate::error::Error;

/// A valid username: 3 to 32 of `a-z 0-9 _ . -`, case-folded to lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Folds case and checks the rules; the error names the field and the rule.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let folded = raw.trim().to_lowercase();
        let len = folded.chars().count();
        if !(3..=32).contains(&len) {
            return Err(Error::invalid(
                "username",
                format!("username must be 3 to 32 characters, got {len}"),
            ));
        }
        if let Some(bad) = folded
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-'))
        {
            return Err(Error::invalid(
                "username",
                format!("username may contain only a-z, 0-9, '_', '.' and '-', not {bad:?}"),
            ));
        }
        Ok(Self(folded))
    }

    /// The folded username.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password that meets the length rule (8 to 128 characters).
pub struct Password(String);

impl Password {
    /// Checks the length; the error never contains the password.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let len = raw.chars().count();
        if len < 8 {
            return Err(Error::invalid(
                "password",
                format!("password must be at least 8 characters, got {len}"),
            ));
        }
        if len > 128 {
            return Err(Error::invalid(
                "password",
                format!("password must be at most 128 characters, got {len}"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The password bytes, for hashing only.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A display name: up to 64 characters without control characters; empty means the username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    /// Checks the rules, falling back to `username` when empty.
    pub fn parse(raw: &str, username: &Username) -> Result<Self, Error> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(Self(username.as_str().to_owned()));
        }
        let len = trimmed.chars().count();
        if len > 64 {
            return Err(Error::invalid(
                "display_name",
                format!("display_name must be at most 64 characters, got {len}"),
            ));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(Error::invalid(
                "display_name",
                "display_name must not contain control characters",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// UUIDv7.
    pub id: String,
    /// Folded username.
    pub username: String,
    /// Display name.
    pub display_name: String,
    /// Role.
    pub role: Role,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_common::status::Invalid;

    #[test]
    fn usernames_are_folded_and_checked() {
        assert_eq!(
            Username::parse("  Alice_1 ").expect("valid").as_str(),
            "alice_1"
        );
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        let err = Username::parse("al ice").expect_err("space");
        assert!(err.to_string().contains("' '"), "{err}");
        assert!(Username::parse("älice").is_err());
    }

    #[test]
    fn passwords_are_counted_in_characters() {
        assert!(Password::parse("1234567").is_err());
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse(&"é".repeat(128)).is_ok());
        assert!(Password::parse(&"x".repeat(129)).is_err());
        assert!(!format!("{:?}", Password::parse("secret-pass").expect("ok")).contains("secret"));
    }

    #[test]
    fn display_names_default_to_the_username() {
        let u = Username::parse("bob").expect("valid");
        assert_eq!(DisplayName::parse("", &u).expect("ok").as_str(), "bob");
        assert!(DisplayName::parse("a\u{7}b", &u).is_err());
        assert!(DisplayName::parse(&"x".repeat(65), &u).is_err());
    }

    proptest::proptest! {
        /// Any text as username, password or display name: a value or INVALID_ARGUMENT
        /// naming the field, never a panic, and the message never holds the password.
        #[test]
        fn account_fields_parse_or_name_the_field(raw in ".{0,200}") {
            match Username::parse(&raw) {
                Ok(u) => proptest::prop_assert!((3..=32).contains(&u.as_str().chars().count())),
                Err(Error::InvalidArgument(Invalid { field, .. })) => proptest::prop_assert_eq!(field, "username"),
                Err(e) => proptest::prop_assert!(false, "username: {e:?}"),
            }
            match Password::parse(&raw) {
                Ok(_) => {}
                Err(Error::InvalidArgument(Invalid { field, message })) => {
                    proptest::prop_assert_eq!(field, "password");
                    proptest::prop_assert!(raw.len() < 4 || !message.contains(&raw));
                }
                Err(e) => proptest::prop_assert!(false, "password: {e:?}"),
            }
            let name = Username::parse("someone").expect("valid");
            match DisplayName::parse(&raw, &name) {
                Ok(d) => proptest::prop_assert!(d.as_str().chars().count() <= 64),
                Err(Error::InvalidArgument(Invalid { field, .. })) => proptest::prop_assert_eq!(field, "display_name"),
                Err(e) => proptest::prop_assert!(false, "display name: {e:?}"),
            }
        }
    }
}
