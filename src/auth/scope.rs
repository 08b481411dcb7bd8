//! SMART on FHIR scopes of system clients (SMART App Launch 2.x, "Scopes
//! for requesting clinical data"): `system/<Type|*>.<cruds>` and the v1
//! forms `.read`, `.write`, `.*`. Only the `system/` context exists for
//! backend services; granular scopes (`?param=value`) are not granted.

use std::collections::BTreeMap;
use std::fmt;

/// One SMART v2 permission letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    const ALL: [Permission; 5] = [
        Permission::Create,
        Permission::Read,
        Permission::Update,
        Permission::Delete,
        Permission::Search,
    ];

    fn bit(self) -> u8 {
        match self {
            Permission::Create => 1,
            Permission::Read => 2,
            Permission::Update => 4,
            Permission::Delete => 8,
            Permission::Search => 16,
        }
    }

    fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }
}

/// A set of permission letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Perms(u8);

impl Perms {
    fn has(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// `cruds` in that order (SMART requires it), or the v1 words.
    fn parse(text: &str) -> Option<Perms> {
        match text {
            "read" => return Some(Perms(2 | 16)),
            "write" => return Some(Perms(1 | 4 | 8)),
            "*" => return Some(Perms(31)),
            _ => {}
        }
        let mut bits = 0u8;
        let mut last = 0usize;
        for c in text.chars() {
            let at = Permission::ALL.iter().position(|p| p.letter() == c)?;
            if bits != 0 && at <= last {
                return None;
            }
            bits |= Permission::ALL[at].bit();
            last = at;
        }
        (bits != 0).then_some(Perms(bits))
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in Permission::ALL {
            if self.has(p) {
                write!(f, "{}", p.letter())?;
            }
        }
        Ok(())
    }
}

/// Granted or grantable system scopes: resource type (or `*`) to letters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(BTreeMap<String, Perms>);

/// A scope string we do not grant, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope '{scope}': {reason}")]
pub struct ScopeError {
    pub scope: String,
    pub reason: &'static str,
}

impl Scopes {
    /// Every permission on every type (the development identity).
    pub fn everything() -> Scopes {
        Scopes(BTreeMap::from([("*".to_owned(), Perms(31))]))
    }

    /// Parse one scope. `openid`, `fhirUser`, `launch…` and `offline_access`
    /// have no meaning for a backend service and are refused like any other
    /// unknown scope.
    pub fn parse_one(scope: &str) -> Result<(String, u8), ScopeError> {
        let err = |reason| ScopeError {
            scope: scope.to_owned(),
            reason,
        };
        let rest = scope
            .strip_prefix("system/")
            .ok_or_else(|| err("only system/ scopes are granted to backend services"))?;
        if rest.contains('?') {
            return Err(err("granular scopes (with ?) are not supported"));
        }
        let (resource, perms) = rest
            .rsplit_once('.')
            .ok_or_else(|| err("expected system/<Type>.<cruds>"))?;
        let valid_type = resource == "*"
            || (resource
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_uppercase())
                && resource.chars().all(|c| c.is_ascii_alphanumeric()));
        if !valid_type {
            return Err(err("expected a resource type or *"));
        }
        let perms = Perms::parse(perms).ok_or_else(|| {
            err("permissions are letters of 'cruds' in that order, or read / write / *")
        })?;
        Ok((resource.to_owned(), perms.0))
    }

    /// Parse a space- or list-separated set of scopes, all of which must be
    /// valid.
    pub fn parse<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Result<Scopes, ScopeError> {
        let mut out = Scopes::default();
        for scope in scopes {
            let (resource, bits) = Self::parse_one(scope)?;
            out.add(&resource, Perms(bits));
        }
        Ok(out)
    }

    fn add(&mut self, resource: &str, perms: Perms) {
        if perms.0 == 0 {
            return;
        }
        let entry = self.0.entry(resource.to_owned()).or_default();
        entry.0 |= perms.0;
    }

    /// Whether `permission` on `resource_type` is granted (`None`: on every
    /// type at once, as a system-level history needs).
    pub fn allows(&self, resource_type: Option<&str>, permission: Permission) -> bool {
        let wildcard = self.0.get("*").is_some_and(|p| p.has(permission));
        wildcard
            || resource_type
                .and_then(|t| self.0.get(t))
                .is_some_and(|p| p.has(permission))
    }

    /// What of `requested` falls within `allowed` (the client's registered
    /// scopes): SMART lets a server grant less than asked.
    pub fn within(&self, allowed: &Scopes) -> Scopes {
        let mut out = Scopes::default();
        for (resource, asked) in &self.0 {
            for (limit, perms) in &allowed.0 {
                let bits = asked.0 & perms.0;
                if resource == limit || limit == "*" {
                    out.add(resource, Perms(bits));
                } else if resource == "*" {
                    out.add(limit, Perms(bits));
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Scopes {
    /// Space-separated SMART v2 scopes, as the token response's `scope`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (resource, perms) in &self.0 {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "system/{resource}.{perms}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(text: &str) -> Scopes {
        Scopes::parse(text.split_whitespace()).unwrap()
    }

    #[test]
    fn parses_v2_and_v1_forms() {
        let s = scopes("system/ServiceRequest.cru system/DiagnosticReport.rs system/Binary.read");
        assert!(s.allows(Some("ServiceRequest"), Permission::Create));
        assert!(s.allows(Some("ServiceRequest"), Permission::Update));
        assert!(!s.allows(Some("ServiceRequest"), Permission::Delete));
        assert!(!s.allows(Some("ServiceRequest"), Permission::Search));
        assert!(s.allows(Some("DiagnosticReport"), Permission::Search));
        assert!(!s.allows(Some("DiagnosticReport"), Permission::Create));
        assert!(s.allows(Some("Binary"), Permission::Read));
        assert!(s.allows(Some("Binary"), Permission::Search));
        assert!(!s.allows(Some("Patient"), Permission::Read));
        assert!(!s.allows(None, Permission::Read));
        assert_eq!(
            s.to_string(),
            "system/Binary.rs system/DiagnosticReport.rs system/ServiceRequest.cru"
        );
    }

    #[test]
    fn refuses_what_it_cannot_grant() {
        for bad in [
            "patient/Observation.rs",
            "user/*.cruds",
            "system/Observation.rs?category=laboratory",
            "system/Observation.sr",
            "system/Observation.x",
            "system/Observation.",
            "system/observation.rs",
            "openid",
            "system/Observation",
        ] {
            assert!(Scopes::parse([bad]).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn grants_the_intersection() {
        let allowed = scopes("system/ServiceRequest.cru system/DiagnosticReport.rs");
        assert_eq!(
            scopes("system/*.cruds").within(&allowed).to_string(),
            "system/DiagnosticReport.rs system/ServiceRequest.cru"
        );
        assert_eq!(
            scopes("system/ServiceRequest.cruds system/Patient.r")
                .within(&allowed)
                .to_string(),
            "system/ServiceRequest.cru"
        );
        assert!(scopes("system/Patient.r").within(&allowed).is_empty());
        let everything = Scopes::everything();
        assert_eq!(
            scopes("system/Task.rs").within(&everything).to_string(),
            "system/Task.rs"
        );
        assert!(everything.allows(None, Permission::Delete));
    }
}
