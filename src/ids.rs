//! Domain identifiers whose constructors validate what comes off the wire.
//!
//! A value of these types has been checked once, at the edge; code further in
//! can use it (in SQL, in logs, in object keys) without re-checking.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A DICOM UID that breaks PS3.5 §9.1.
    #[error("invalid UID ({reason}): {value:?}")]
    Uid { value: String, reason: &'static str },
    /// An AE title that breaks PS3.5 (1–16 characters, no backslash or control characters).
    #[error("invalid AE title {value:?}: {reason}")]
    AeTitle { value: String, reason: &'static str },
    /// A partner id that is not a lowercase slug.
    #[error("invalid partner id {value:?}: use 1-64 characters of a-z, 0-9, '-' and '_'")]
    PartnerId { value: String },
}

/// A DICOM Unique Identifier (PS3.5 §9.1): digits and dots, at most 64
/// characters, components without leading zeros.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(String);

impl Uid {
    /// Validate a UID as it comes from the wire. Trailing NUL or space padding
    /// (the even-length padding of UI values) is removed first.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let value = raw.trim_end_matches(['\0', ' ']);
        let fail = |reason| {
            Err(IdError::Uid {
                value: value.chars().take(80).collect(),
                reason,
            })
        };
        if value.is_empty() {
            return fail("empty");
        }
        if value.len() > 64 {
            return fail("longer than 64 characters");
        }
        for component in value.split('.') {
            if component.is_empty() {
                return fail("empty component");
            }
            if !component.bytes().all(|b| b.is_ascii_digit()) {
                return fail("only digits and '.' are allowed");
            }
            if component.len() > 1 && component.starts_with('0') {
                return fail("component with a leading zero");
            }
        }
        Ok(Uid(value.to_owned()))
    }

    /// The UID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DICOM Application Entity title (PS3.5 Table 6.2-1, VR AE).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AeTitle(String);

impl AeTitle {
    /// Validate an AE title. Leading and trailing spaces are not significant.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let value = raw.trim_matches([' ', '\0']);
        let fail = |reason| {
            Err(IdError::AeTitle {
                value: value.chars().take(32).collect(),
                reason,
            })
        };
        if value.is_empty() {
            return fail("empty");
        }
        if value.len() > 16 {
            return fail("longer than 16 characters");
        }
        if value
            .chars()
            .any(|c| c == '\\' || c.is_control() || !c.is_ascii())
        {
            return fail("backslash, control or non-ASCII character");
        }
        Ok(AeTitle(value.to_owned()))
    }

    /// The AE title without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The stable id of a referring organisation, recorded on everything it sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartnerId(String);

impl PartnerId {
    /// Validate a partner id: a slug safe for URLs, SQL and object keys.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(PartnerId(raw.to_owned()))
        } else {
            Err(IdError::PartnerId {
                value: raw.chars().take(80).collect(),
            })
        }
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PartnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One transfer of instances into Konsil: a DICOM association, a STOW-RS
/// request or a `konsil import` run. Its instances' audit record is stored
/// when it ends, and the index notes what it stored until then (see
/// [`crate::audit`]). Random, so the ids of a server and of an import
/// running next to it on the same store never collide; never 0, which the
/// index uses for "not known".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(i64);

impl TransferId {
    pub fn new() -> TransferId {
        loop {
            let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
            // 63 bits: SQLite integers are signed.
            let id = (high >> 1) as i64;
            if id != 0 {
                return TransferId(id);
            }
        }
    }

    /// The id as the index stores it (0 is "not known").
    pub fn from_stored(value: i64) -> Option<TransferId> {
        (value != 0).then_some(TransferId(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl Default for TransferId {
    fn default() -> Self {
        TransferId::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_rules() {
        let ok = [
            "1.2.840.10008.1.2",
            "1.2.0.3",
            "0",
            "1.2.840.10008.1.2.4.50\0",
        ];
        for raw in ok {
            assert!(Uid::parse(raw).is_ok(), "{raw} should be valid");
        }
        assert_eq!(Uid::parse("1.2.3\0").unwrap().as_str(), "1.2.3");
        let bad = [
            ("", "empty"),
            ("1..2", "empty component"),
            ("1.2.", "empty component"),
            ("1.02.3", "component with a leading zero"),
            ("1.2.a", "only digits and '.' are allowed"),
            ("../../etc/passwd", "empty component"),
            ("1.2/3", "only digits and '.' are allowed"),
        ];
        for (raw, reason) in bad {
            match Uid::parse(raw) {
                Err(IdError::Uid { reason: r, .. }) => assert_eq!(r, reason, "{raw}"),
                other => panic!("{raw}: expected an error, got {other:?}"),
            }
        }
        let long = format!("1.{}", "2".repeat(63));
        assert!(Uid::parse(&long).is_err());
    }

    #[test]
    fn ae_title_rules() {
        assert_eq!(
            AeTitle::parse(" STMARY_PACS ").unwrap().as_str(),
            "STMARY_PACS"
        );
        assert!(AeTitle::parse("").is_err());
        assert!(AeTitle::parse("A\\B").is_err());
        assert!(AeTitle::parse("ABCDEFGHIJKLMNOPQ").is_err());
    }

    #[test]
    fn partner_id_rules() {
        assert!(PartnerId::parse("st-mary").is_ok());
        assert!(PartnerId::parse("St Mary").is_err());
        assert!(PartnerId::parse("../x").is_err());
        assert!(PartnerId::parse("").is_err());
    }
}
