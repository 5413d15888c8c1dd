//! Ids from the wire: the one shape every Switchboard id has, checked at the edge, and a
//! safe way to quote untrusted text in a status message.
//!
//! Every id Switchboard issues (users, sessions, conversations, consultations, messages)
//! is a UUID in its canonical lower-case hyphenated form, 36 characters. An id of any other
//! shape cannot name anything, so it is refused with INVALID_ARGUMENT before it reaches a
//! store, a Redis key name or a status message: a crafted id (`x}:meta`, 20 KB of text)
//! can neither address another key nor make the answer itself too large.

use crate::status::Invalid;

/// Length of an id in canonical form.
pub const ID_LEN: usize = 36;

/// Most characters of untrusted text a status message quotes.
pub const QUOTE_CHARS: usize = 40;

/// Whether `value` is a UUID in canonical lower-case hyphenated form.
pub fn is_id(value: &str) -> bool {
    value.len() == ID_LEN
        && value.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

/// Checks that `field` holds an id; an empty value is "required".
pub fn check(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, format!("{field} is required")));
    }
    if is_id(value) {
        return Ok(());
    }
    Err(Invalid::new(
        field,
        format!(
            "{field} must be an id as Switchboard issues them (a lower-case UUID such as \
             0190d6a2-8c5e-7d3a-9f41-6b2e8a1c0d57), got {}",
            quote(value)
        ),
    ))
}

/// Checks every id of a repeated field, naming the first bad one by its index.
pub fn check_all(field: &str, values: &[String]) -> Result<(), Invalid> {
    match values.iter().position(|v| !is_id(v)) {
        None => Ok(()),
        Some(i) => check(&format!("{field}[{i}]"), &values[i]),
    }
}

/// `ids` without repeats, in the order first given (linear time: a list's work stays
/// bounded by its length).
pub fn distinct<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let ids = ids.into_iter();
    let mut seen = std::collections::HashSet::with_capacity(ids.size_hint().0);
    ids.filter(|id| seen.insert(*id))
        .map(str::to_owned)
        .collect()
}

/// Untrusted text as a status message may show it: at most [`QUOTE_CHARS`] characters in
/// single quotes, control characters escaped, and the full length when it was cut.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(QUOTE_CHARS + 16);
    out.push('\'');
    for c in value.chars().take(QUOTE_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    if value.chars().nth(QUOTE_CHARS).is_some() {
        out.push_str(&format!("… ({} bytes)", value.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids_are_ids() {
        let id = uuid::Uuid::now_v7().to_string();
        assert!(is_id(&id));
        assert!(!is_id(&id.to_uppercase()), "upper case");
        assert!(!is_id(&format!("{{{id}}}")), "braced");
        assert!(!is_id(&uuid::Uuid::now_v7().simple().to_string()), "simple");
        assert!(!is_id("x}:meta"));
        assert!(!is_id(""));
        assert!(check("conversation_id", &id).is_ok());
        let e = check("conversation_id", "").expect_err("empty");
        assert_eq!(e.message, "conversation_id is required");
    }

    #[test]
    fn quotes_are_short_and_say_how_long_the_text_was() {
        let long = "a".repeat(20_000);
        let q = quote(&long);
        assert!(q.len() < 80, "{q}");
        assert!(q.ends_with("(20000 bytes)"), "{q}");
        assert_eq!(quote("abc"), "'abc'");
        assert_eq!(quote("a\nb"), "'a\\nb'");
        let e = check_all("member_ids", &[uuid::Uuid::now_v7().to_string(), long])
            .expect_err("second is bad");
        assert_eq!(e.field, "member_ids[1]");
        assert!(e.message.len() < 250, "{}", e.message);
    }

    proptest::proptest! {
        /// Any text: checking never panics, accepts exactly the canonical form, and the
        /// refusal stays short whatever was sent.
        #[test]
        fn any_text_is_checked_and_quoted_short(value in ".{0,300}") {
            let checked = check("f", &value);
            proptest::prop_assert_eq!(checked.is_ok(), uuid::Uuid::try_parse(&value)
                .map(|u| u.hyphenated().to_string() == value)
                .unwrap_or(false));
            if let Err(e) = checked {
                proptest::prop_assert!(e.message.len() < 250 + 4 * QUOTE_CHARS);
            }
            proptest::prop_assert!(quote(&value).chars().count() <= QUOTE_CHARS * 4 + 24);
        }

        /// Any UUID in canonical form is an id.
        #[test]
        fn every_canonical_uuid_is_an_id(bytes in proptest::array::uniform16(0u8..)) {
            let id = uuid::Uuid::from_bytes(bytes).to_string();
            proptest::prop_assert!(is_id(&id));
        }
    }
}
