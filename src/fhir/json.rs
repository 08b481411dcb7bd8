//! FHIR JSON parsing. serde_json keeps the last of two equal keys silently;
//! FHIR JSON does not allow a property twice, and keeping one of them would
//! store something other than what was sent. So a body is also walked by
//! [`NoDuplicates`], which refuses a repeated key with its place.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Deserializes any JSON and fails on an object with a repeated key.
struct NoDuplicates;

impl<'de> Deserialize<'de> for NoDuplicates {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoDuplicatesVisitor)
    }
}

struct NoDuplicatesVisitor;

impl<'de> Visitor<'de> for NoDuplicatesVisitor {
    type Value = NoDuplicates;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoDuplicates, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "property \"{key}\" appears twice in one object (FHIR JSON allows each once)"
                )));
            }
            map.next_value::<NoDuplicates>()?;
        }
        Ok(NoDuplicates)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoDuplicates, A::Error> {
        while seq.next_element::<NoDuplicates>()?.is_some() {}
        Ok(NoDuplicates)
    }

    fn visit_bool<E>(self, _: bool) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
    fn visit_unit<E>(self) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates)
    }
}

/// Parse a FHIR JSON body: numbers keep their lexical form
/// (`arbitrary_precision`), and a repeated key is an error.
pub fn parse(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    let value = serde_json::from_slice(body)?;
    serde_json::from_slice::<NoDuplicates>(body)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(parse(br#"{"a": 1.50, "b": [{"c": 1}, {"c": 2}]}"#).is_ok());
        assert_eq!(parse(br#"{"x": 1.50}"#).unwrap()["x"].to_string(), "1.50");
        for bad in [
            &br#"{"resourceType": "Patient", "resourceType": "Task"}"#[..],
            br#"{"name": [{"family": "A", "family": "B"}]}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains("appears twice"), "{e}");
        }
    }
}
