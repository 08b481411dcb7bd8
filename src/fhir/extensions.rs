//! Konsil's extension definitions (`profiles/konsil/StructureDefinition-*`
//! of type Extension), applied by the validator wherever an extension with
//! one of their URLs appears, as a FHIR validator applies any extension
//! definition it can resolve: where it may sit (its context), what value it
//! takes, and, for a complex extension, which parts (nested extensions)
//! it has, how many of each and what each part's value is. Extensions with
//! other URLs are checked structurally only (ext-1).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::definitions::Max;

/// The extension definitions, as committed.
const DEFINITIONS: &[&str] = &[
    include_str!("../../profiles/konsil/StructureDefinition-announced-instances.json"),
    include_str!("../../profiles/konsil/StructureDefinition-opinion-section.json"),
];

/// What an extension's (or a part's) value must be.
#[derive(Debug)]
struct ValueRule {
    required: bool,
    /// FHIR type codes (`unsignedInt`, `CodeableConcept`).
    types: Vec<String>,
    /// A required binding to one of our value sets.
    binding: Option<String>,
}

/// One part of a complex extension (a nested extension with a relative URL).
#[derive(Debug)]
struct Part {
    name: String,
    min: u32,
    max: Max,
    value: ValueRule,
}

/// One compiled extension definition.
#[derive(Debug)]
pub struct ExtensionDefinition {
    pub url: String,
    title: String,
    /// Element paths it may sit on (`DiagnosticReport`).
    contexts: Vec<String>,
    /// How many times it may appear on one element.
    max: Max,
    /// A simple extension's value; `None` for a complex one.
    value: Option<ValueRule>,
    /// A complex extension's parts; nested extensions other than these are
    /// refused.
    parts: Vec<Part>,
}

/// One finding: IssueType code, FHIRPath, what is wrong.
pub type ExtensionFinding = (&'static str, String, String);

/// The definition of `url`, if it is one of ours.
pub fn find(url: &str) -> Option<&'static ExtensionDefinition> {
    static ALL: OnceLock<HashMap<String, ExtensionDefinition>> = OnceLock::new();
    ALL.get_or_init(|| {
        super::profiles::by_url(DEFINITIONS, compile, |d| &d.url, "an extension definition")
    })
    .get(url)
}

fn compile(text: &str) -> Option<ExtensionDefinition> {
    let sd: Value = serde_json::from_str(text).ok()?;
    if sd["type"] != "Extension" {
        return None;
    }
    let elements = sd["snapshot"]["element"].as_array()?;
    let by_id = |id: &str| elements.iter().find(|e| e["id"] == id);
    let max_of = |e: &Value| match e["max"].as_str() {
        Some("*") | None => Some(Max::Unbounded),
        Some(n) => n.parse().ok().map(Max::Count),
    };
    let value_rule = |id: &str| -> Option<Option<ValueRule>> {
        let e = by_id(id)?;
        if max_of(e)? == Max::Count(0) {
            return Some(None);
        }
        Some(Some(ValueRule {
            required: e["min"].as_u64().unwrap_or(0) >= 1,
            types: e["type"]
                .as_array()?
                .iter()
                .filter_map(|t| t["code"].as_str().map(str::to_owned))
                .collect(),
            binding: (e["binding"]["strength"] == "required")
                .then(|| e["binding"]["valueSet"].as_str())
                .flatten()
                .map(|u| u.split('|').next().unwrap_or(u).to_owned()),
        }))
    };
    let mut parts = Vec::new();
    for e in elements {
        let Some(name) = e["sliceName"].as_str() else {
            continue;
        };
        if e["path"] != "Extension.extension" {
            continue;
        }
        parts.push(Part {
            name: name.to_owned(),
            min: e["min"].as_u64().unwrap_or(0) as u32,
            max: max_of(e)?,
            value: value_rule(&format!("Extension.extension:{name}.value[x]"))??,
        });
    }
    Some(ExtensionDefinition {
        url: sd["url"].as_str()?.to_owned(),
        title: sd["title"].as_str().or(sd["name"].as_str())?.to_owned(),
        contexts: sd["context"]
            .as_array()?
            .iter()
            .filter(|c| c["type"] == "element")
            .filter_map(|c| c["expression"].as_str().map(str::to_owned))
            .collect(),
        value: value_rule("Extension.value[x]")?,
        max: max_of(by_id("Extension")?)?,
        parts,
    })
}

impl ExtensionDefinition {
    /// Check `extension`, found at `path` on an element whose definition
    /// path is `context` (`DiagnosticReport`, `ImagingStudy.series`), as a
    /// modifier extension or not. `in_value_set(url, value)` says whether a
    /// code, Coding or CodeableConcept is in a value set.
    pub fn check(
        &self,
        extension: &Map<String, Value>,
        path: &str,
        context: &str,
        modifier: bool,
        in_value_set: &dyn Fn(&str, &Value) -> bool,
    ) -> Vec<ExtensionFinding> {
        let mut found = Vec::new();
        let about = format!("the extension '{}' ({})", self.title, self.url);
        if modifier {
            found.push((
                "structure",
                path.to_owned(),
                format!("{about} is not a modifier extension: send it in 'extension'"),
            ));
        }
        if !self.contexts.is_empty() && !self.contexts.iter().any(|c| c == context) {
            found.push((
                "structure",
                path.to_owned(),
                format!(
                    "{about} belongs on {}, not on {context}",
                    self.contexts.join(" or ")
                ),
            ));
        }
        check_value(
            self.value.as_ref(),
            extension,
            path,
            &about,
            in_value_set,
            &mut found,
        );
        let nested = extension
            .get("extension")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut counts = vec![0u32; self.parts.len()];
        for (i, item) in nested.iter().enumerate() {
            let Some(item) = item.as_object() else {
                continue;
            };
            let at = format!("{path}.extension[{i}]");
            let url = item.get("url").and_then(Value::as_str).unwrap_or("");
            match self.parts.iter().position(|p| p.name == url) {
                Some(n) => {
                    counts[n] += 1;
                    let part = &self.parts[n];
                    let about = format!("part '{}' of {about}", part.name);
                    check_value(
                        Some(&part.value),
                        item,
                        &at,
                        &about,
                        in_value_set,
                        &mut found,
                    );
                }
                None => {
                    let known: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
                    let allowed = if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    };
                    found.push((
                        "structure",
                        at,
                        format!("'{url}' is not a part of {about} (its parts: {allowed})"),
                    ));
                }
            }
        }
        for (part, count) in self.parts.iter().zip(counts) {
            if count < part.min {
                found.push((
                    "required",
                    format!("{path}.extension"),
                    format!("part '{}' of {about} is required", part.name),
                ));
            }
            if let Max::Count(max) = part.max {
                if count > max {
                    found.push((
                        "structure",
                        format!("{path}.extension"),
                        format!(
                            "part '{}' of {about} is allowed at most {max} time(s)",
                            part.name
                        ),
                    ));
                }
            }
        }
        found
    }
}

/// How often each of our extensions appears among one element's
/// `extension` items (at `path`), against its definition's maximum.
pub fn check_counts(items: &[Value], path: &str) -> Vec<ExtensionFinding> {
    let mut counts: Vec<(&ExtensionDefinition, u32)> = Vec::new();
    for url in items
        .iter()
        .filter_map(|e| e.get("url").and_then(Value::as_str))
    {
        let Some(definition) = find(url) else {
            continue;
        };
        match counts.iter_mut().find(|(d, _)| d.url == definition.url) {
            Some((_, n)) => *n += 1,
            None => counts.push((definition, 1)),
        }
    }
    counts
        .into_iter()
        .filter_map(|(d, n)| match d.max {
            Max::Count(max) if n > max => Some((
                "structure",
                path.to_owned(),
                format!(
                    "the extension '{}' ({}) appears {n} times here; it is allowed at most {max} time(s)",
                    d.title, d.url
                ),
            )),
            _ => None,
        })
        .collect()
}

/// An extension's (or part's) `value[x]` against `rule` (`None`: it takes
/// no value).
fn check_value(
    rule: Option<&ValueRule>,
    extension: &Map<String, Value>,
    path: &str,
    about: &str,
    in_value_set: &dyn Fn(&str, &Value) -> bool,
    found: &mut Vec<ExtensionFinding>,
) {
    let value = extension
        .iter()
        .find_map(|(k, v)| k.strip_prefix("value").map(|t| (t, v)));
    match (rule, value) {
        (None, Some((ty, _))) => found.push((
            "structure",
            format!("{path}.value"),
            format!("{about} takes no value{ty}: its content is in its parts"),
        )),
        (None, None) => {}
        (Some(rule), None) => {
            if rule.required {
                found.push((
                    "required",
                    format!("{path}.value"),
                    format!("{about} needs a value ({})", value_keys(rule)),
                ));
            }
        }
        (Some(rule), Some((ty, v))) => {
            let expected = rule.types.iter().any(|t| upper_first(t) == ty);
            if !expected {
                found.push((
                    "structure",
                    format!("{path}.value"),
                    format!("{about} takes {}, not value{ty}", value_keys(rule)),
                ));
            } else if let Some(vs) = &rule.binding {
                if !in_value_set(vs, v) {
                    found.push((
                        "code-invalid",
                        format!("{path}.value"),
                        format!("{about}: the value must be a code of the value set {vs}"),
                    ));
                }
            }
        }
    }
}

/// `valueUnsignedInt or valueString`.
fn value_keys(rule: &ValueRule) -> String {
    rule.types
        .iter()
        .map(|t| format!("value{}", upper_first(t)))
        .collect::<Vec<_>>()
        .join(" or ")
}

fn upper_first(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECTION: &str = "http://konsil.dev/fhir/StructureDefinition/opinion-section";
    const ANNOUNCED: &str = "http://konsil.dev/fhir/StructureDefinition/announced-instances";

    fn kinds(url: &str, value: &Value) -> bool {
        url == "http://konsil.dev/fhir/ValueSet/opinion-section"
            && value
                .as_str()
                .is_some_and(|c| ["diagnosis-agreement", "recommendations"].contains(&c))
    }

    fn check(url: &str, extension: Value, context: &str) -> Vec<ExtensionFinding> {
        find(url).expect("compiled").check(
            extension.as_object().unwrap(),
            "X.extension[0]",
            context,
            false,
            &kinds,
        )
    }

    #[test]
    fn every_committed_definition_compiles() {
        for text in DEFINITIONS {
            assert!(compile(text).is_some(), "{}", &text[..200]);
        }
    }

    #[test]
    fn a_simple_extension_takes_its_one_value_type_on_its_context() {
        let good = json!({"url": ANNOUNCED, "valueUnsignedInt": 3});
        assert_eq!(check(ANNOUNCED, good.clone(), "ImagingStudy"), vec![]);
        let wrong_place = check(ANNOUNCED, good, "DiagnosticReport");
        assert_eq!(wrong_place.len(), 1, "{wrong_place:?}");
        assert!(wrong_place[0].2.contains("belongs on ImagingStudy"));
        let wrong_type = check(
            ANNOUNCED,
            json!({"url": ANNOUNCED, "valueString": "3"}),
            "ImagingStudy",
        );
        assert_eq!(
            wrong_type,
            vec![(
                "structure",
                "X.extension[0].value".to_owned(),
                format!(
                    "the extension 'Instances the referrer announced' ({ANNOUNCED}) takes valueUnsignedInt, not valueString"
                )
            )]
        );
        let nested = check(
            ANNOUNCED,
            json!({"url": ANNOUNCED, "extension": [{"url": "n", "valueInteger": 1}]}),
            "ImagingStudy",
        );
        let paths: Vec<&str> = nested.iter().map(|f| f.1.as_str()).collect();
        assert_eq!(
            paths,
            ["X.extension[0].value", "X.extension[0].extension[0]"]
        );
    }

    #[test]
    fn an_extension_appears_at_most_as_often_as_its_definition_allows() {
        let announced = json!({"url": ANNOUNCED, "valueUnsignedInt": 3});
        let section =
            json!({"url": SECTION, "extension": [{"url": "kind", "valueCode": "recommendations"}]});
        let other = json!({"url": "http://example.org/x", "valueString": "y"});
        let once = [
            announced.clone(),
            section.clone(),
            section.clone(),
            other.clone(),
            other,
        ];
        assert_eq!(check_counts(&once, "ImagingStudy.extension"), vec![]);
        let twice = [announced.clone(), announced];
        let found = check_counts(&twice, "ImagingStudy.extension");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1, "ImagingStudy.extension");
        assert!(found[0].2.contains("at most 1 time"), "{found:?}");
    }

    #[test]
    fn a_complex_extension_has_its_parts_each_with_its_value() {
        let part = |url: &str, key: &str, value: Value| json!({"url": url, key: value});
        let section = |parts: Vec<Value>| json!({"url": SECTION, "extension": parts});
        let good = section(vec![
            part("kind", "valueCode", json!("recommendations")),
            part("text", "valueString", json!("PET-CT first.")),
        ]);
        assert_eq!(check(SECTION, good, "DiagnosticReport"), vec![]);
        let cases = [
            (
                "no kind",
                section(vec![part("text", "valueString", json!("t"))]),
                ("required", "X.extension[0].extension"),
            ),
            (
                "a kind outside the value set",
                section(vec![part("kind", "valueCode", json!("astrology"))]),
                ("code-invalid", "X.extension[0].extension[0].value"),
            ),
            (
                "text as a code",
                section(vec![
                    part("kind", "valueCode", json!("recommendations")),
                    part("text", "valueCode", json!("t")),
                ]),
                ("structure", "X.extension[0].extension[1].value"),
            ),
            (
                "an unknown part",
                section(vec![
                    part("kind", "valueCode", json!("recommendations")),
                    part("mood", "valueString", json!("t")),
                ]),
                ("structure", "X.extension[0].extension[1]"),
            ),
            (
                "two kinds",
                section(vec![
                    part("kind", "valueCode", json!("recommendations")),
                    part("kind", "valueCode", json!("diagnosis-agreement")),
                ]),
                ("structure", "X.extension[0].extension"),
            ),
            (
                "a value of its own",
                json!({"url": SECTION, "valueString": "x",
                    "extension": [part("kind", "valueCode", json!("recommendations"))]}),
                ("structure", "X.extension[0].value"),
            ),
        ];
        for (what, extension, (code, at)) in cases {
            let found = check(SECTION, extension, "DiagnosticReport");
            assert_eq!(found.len(), 1, "{what}: {found:?}");
            assert_eq!(found[0].0, code, "{what}");
            assert_eq!(found[0].1, at, "{what}");
        }
    }
}
