//! Konsil's own profiles (`profiles/konsil/`, StructureDefinitions with
//! snapshots built by `conformance/fhir/build_profiles.mjs`), applied on top
//! of the core validation where a resource claims them in `meta.profile` and
//! by `$validate`.
//!
//! What a profile adds over its base is taken from its snapshot: tighter
//! cardinality, `pattern[x]` / `fixed[x]` values, required bindings to our
//! value sets, narrower reference targets, and new invariants (FHIRPath).
//! Slicing is not supported (our profiles use invariants instead).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use super::definitions::{Constraint, Definitions, Max};
use super::invariants;
use super::outcome::Issue;
use super::validate::InvariantCheck;

/// The profiles, as committed.
const PROFILES: &[&str] = &[
    include_str!("../../profiles/konsil/StructureDefinition-konsil-referral.json"),
    include_str!("../../profiles/konsil/StructureDefinition-konsil-opinion.json"),
];

/// The value sets our profiles bind (with their expansions).
pub const VALUE_SETS: &[&str] = &[
    include_str!("../../profiles/konsil/ValueSet-specialty.json"),
    include_str!("../../profiles/konsil/ValueSet-opinion-section.json"),
];

const CORE: &str = "http://hl7.org/fhir/StructureDefinition/";

/// What one element of a profile requires beyond its base.
#[derive(Debug)]
struct Rule {
    /// Steps below the resource (`["subject", "reference"]`); the last may be
    /// a choice (`value[x]`).
    steps: Vec<String>,
    min: u32,
    max: Max,
    pattern: Option<Value>,
    fixed: Option<Value>,
    /// Required binding to a value set of ours.
    binding: Option<String>,
    /// Allowed reference target types, when narrower than the base's.
    targets: Vec<String>,
    /// Invariants the base does not have.
    constraints: Vec<Constraint>,
}

/// One compiled profile.
#[derive(Debug)]
pub struct Profile {
    pub url: String,
    pub title: String,
    pub resource_type: String,
    rules: Vec<Rule>,
}

/// All profiles by canonical URL.
pub fn all() -> &'static HashMap<String, Profile> {
    static ALL: OnceLock<HashMap<String, Profile>> = OnceLock::new();
    ALL.get_or_init(|| by_url(PROFILES, compile, |p| &p.url, "a profile"))
}

/// Committed definitions compiled, by canonical URL. One that does not
/// compile is logged and left out (a repository file: the unit tests load
/// every one).
pub(super) fn by_url<T>(
    texts: &[&str],
    compile: fn(&str) -> Option<T>,
    url: fn(&T) -> &String,
    what: &str,
) -> HashMap<String, T> {
    texts
        .iter()
        .filter_map(|text| match compile(text) {
            Some(d) => Some((url(&d).clone(), d)),
            None => {
                tracing::error!("{what} in profiles/konsil cannot be compiled");
                None
            }
        })
        .collect()
}

fn compile(text: &str) -> Option<Profile> {
    let sd: Value = serde_json::from_str(text).ok()?;
    let resource_type = sd["type"].as_str()?.to_owned();
    let base = Definitions::core().resource(&resource_type)?;
    let base_by_path: HashMap<&str, &super::definitions::Element> =
        base.elements.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut rules = Vec::new();
    for e in sd["snapshot"]["element"].as_array()? {
        if e.get("sliceName").is_some() {
            continue;
        }
        let path = e["path"].as_str()?;
        let base_el = base_by_path.get(path);
        let base_keys: Vec<&str> = base_el
            .map(|b| b.constraints.iter().map(|c| c.key.as_str()).collect())
            .unwrap_or_default();
        let constraints: Vec<Constraint> = e["constraint"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["severity"] == "error")
            .filter(|c| {
                c["key"].as_str().is_some_and(|k| {
                    !base_keys.contains(&k) && !k.starts_with("ele-") && !k.starts_with("dom-")
                })
            })
            .filter_map(|c| {
                Some(Constraint {
                    key: c["key"].as_str()?.to_owned(),
                    human: c["human"].as_str().unwrap_or("").to_owned(),
                    expression: c["expression"].as_str()?.to_owned(),
                })
            })
            .collect();
        let min = e["min"].as_u64().unwrap_or(0) as u32;
        let max = match e["max"].as_str() {
            Some("*") | None => Max::Unbounded,
            Some(n) => Max::Count(n.parse().ok()?),
        };
        let (pattern, fixed) = e.as_object()?.iter().fold((None, None), |(p, f), (k, v)| {
            if k.starts_with("pattern") {
                (Some(v.clone()), f)
            } else if k.starts_with("fixed") {
                (p, Some(v.clone()))
            } else {
                (p, f)
            }
        });
        let binding = (e["binding"]["strength"] == "required")
            .then(|| e["binding"]["valueSet"].as_str())
            .flatten()
            .map(|u| u.split('|').next().unwrap_or(u).to_owned())
            .filter(|u| base_el.and_then(|b| b.required_binding.as_deref()) != Some(u.as_str()));
        let targets: Vec<String> = e["type"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["targetProfile"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| {
                p.as_str()
                    .and_then(|p| p.strip_prefix(CORE))
                    .map(str::to_owned)
            })
            // Reference(Any) narrows nothing.
            .filter(|t| t != "Resource")
            .collect();
        let base_targets: Vec<String> = base_el
            .map(|b| b.types.iter().flat_map(|t| t.targets.clone()).collect())
            .unwrap_or_default();
        let narrower =
            !targets.is_empty() && (base_targets.is_empty() || targets.len() < base_targets.len());
        let (base_min, base_max) = base_el.map_or((0, Max::Unbounded), |b| (b.min, b.max));
        let tighter_max = match (max, base_max) {
            (Max::Count(m), Max::Count(b)) => m < b,
            (Max::Count(_), Max::Unbounded) => true,
            _ => false,
        };
        let steps: Vec<String> = path.split('.').skip(1).map(str::to_owned).collect();
        if min > base_min
            || tighter_max
            || pattern.is_some()
            || fixed.is_some()
            || binding.is_some()
            || narrower
            || !constraints.is_empty()
        {
            rules.push(Rule {
                steps,
                min: if min > base_min { min } else { 0 },
                max: if tighter_max { max } else { Max::Unbounded },
                pattern,
                fixed,
                binding,
                targets: if narrower { targets } else { Vec::new() },
                constraints,
            });
        }
    }
    Some(Profile {
        url: sd["url"].as_str()?.to_owned(),
        title: sd["title"].as_str().or(sd["name"].as_str())?.to_owned(),
        resource_type,
        rules,
    })
}

/// A place in the resource: the value, its FHIRPath and JSON pointer.
struct Node<'v> {
    value: &'v Value,
    path: String,
    pointer: String,
}

/// The values of `step` (a child name, or `name[x]`) under each of
/// `parents`, one list per parent.
fn children<'v>(parents: &[Node<'v>], step: &str) -> Vec<(usize, Vec<Node<'v>>)> {
    let choice = step.strip_suffix("[x]");
    let name = choice.unwrap_or(step);
    parents
        .iter()
        .enumerate()
        .map(|(i, parent)| {
            let mut found = Vec::new();
            if let Some(obj) = parent.value.as_object() {
                for (key, value) in obj {
                    let matches = match choice {
                        Some(base) => key
                            .strip_prefix(base)
                            .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase())),
                        None => key == step,
                    };
                    if !matches {
                        continue;
                    }
                    match value {
                        Value::Array(items) => {
                            for (n, item) in items.iter().enumerate() {
                                found.push(Node {
                                    value: item,
                                    path: format!("{}.{name}[{n}]", parent.path),
                                    pointer: format!("{}/{key}/{n}", parent.pointer),
                                });
                            }
                        }
                        other => found.push(Node {
                            value: other,
                            path: format!("{}.{name}", parent.path),
                            pointer: format!("{}/{key}", parent.pointer),
                        }),
                    }
                }
            }
            (i, found)
        })
        .collect()
}

/// Whether `value` carries everything `pattern` has (FHIR pattern[x]).
fn matches_pattern(value: &Value, pattern: &Value) -> bool {
    match (value, pattern) {
        (Value::Object(v), Value::Object(p)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| matches_pattern(vv, pv))),
        (Value::Array(v), Value::Array(p)) => p
            .iter()
            .all(|pv| v.iter().any(|vv| matches_pattern(vv, pv))),
        (v, p) => v == p,
    }
}

/// Check `resource` against `profile`: every finding, errors first.
pub async fn check(profile: &Profile, resource: &Value) -> Vec<Issue> {
    let mut issues = Vec::new();
    let resource_type = resource["resourceType"].as_str().unwrap_or("");
    if resource_type != profile.resource_type {
        issues.push(
            Issue::error(
                "invalid",
                format!(
                    "profile {} is for {}, not {resource_type}",
                    profile.url, profile.resource_type
                ),
            )
            .at(resource_type.to_owned()),
        );
        return issues;
    }
    let by = format!("by profile '{}' ({})", profile.title, profile.url);
    let mut checks = Vec::new();
    for rule in &profile.rules {
        let mut level = vec![Node {
            value: resource,
            path: resource_type.to_owned(),
            pointer: String::new(),
        }];
        let Some((last, above)) = rule.steps.split_last() else {
            // The resource itself: its invariants.
            checks.push(InvariantCheck {
                resource: String::new(),
                pointer: String::new(),
                path: resource_type.to_owned(),
                type_name: None,
                constraints: rule.constraints.iter().collect(),
            });
            continue;
        };
        for step in above {
            level = children(&level, step)
                .into_iter()
                .flat_map(|(_, c)| c)
                .collect();
        }
        let shown = last.trim_end_matches("[x]");
        for (parent, found) in children(&level, last) {
            let at = format!("{}.{shown}", level[parent].path);
            if (found.len() as u32) < rule.min {
                issues.push(
                    Issue::error("required", format!("{shown} is required {by}")).at(at.clone()),
                );
            }
            if let Max::Count(max) = rule.max {
                if found.len() as u32 > max {
                    issues.push(
                        Issue::error(
                            "structure",
                            format!("{shown} allows at most {max} value(s) {by}"),
                        )
                        .at(at.clone()),
                    );
                }
            }
            for node in &found {
                if let Some(pattern) = &rule.pattern {
                    if !matches_pattern(node.value, pattern) {
                        issues.push(
                            Issue::error("value", format!("{shown} must match {pattern} {by}"))
                                .at(node.path.clone()),
                        );
                    }
                }
                if let Some(fixed) = &rule.fixed {
                    if node.value != fixed {
                        issues.push(
                            Issue::error("value", format!("{shown} must be exactly {fixed} {by}"))
                                .at(node.path.clone()),
                        );
                    }
                }
                if let Some(vs) = &rule.binding {
                    if !super::validate::in_value_set(Definitions::core(), vs, node.value) {
                        issues.push(
                            Issue::error(
                                "code-invalid",
                                format!("{shown} must be a code of the value set {vs} {by}"),
                            )
                            .at(node.path.clone()),
                        );
                    }
                }
                if !rule.targets.is_empty() {
                    let target = node
                        .value
                        .get("reference")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let ok = target.starts_with('#')
                        || target.starts_with("urn:")
                        || rule.targets.iter().any(|t| {
                            target.starts_with(&format!("{t}/"))
                                || target.contains(&format!("/{t}/"))
                        });
                    if !target.is_empty() && !ok {
                        issues.push(
                            Issue::error(
                                "value",
                                format!("{shown} must refer to {} {by}", rule.targets.join(" or ")),
                            )
                            .at(format!("{}.reference", node.path)),
                        );
                    }
                }
                if !rule.constraints.is_empty() {
                    checks.push(InvariantCheck {
                        resource: String::new(),
                        pointer: node.pointer.clone(),
                        path: node.path.clone(),
                        type_name: None,
                        constraints: rule.constraints.iter().collect(),
                    });
                }
            }
        }
    }
    for mut issue in invariants::evaluate(resource, &checks).await {
        issue.diagnostics = format!("{} {by}", issue.diagnostics);
        issues.push(issue);
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn referral() -> Value {
        json!({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "category": [{"coding": [{"system": "http://konsil.dev/fhir/CodeSystem/referral-type", "code": "second-opinion"}]}],
            "code": {"coding": [{"system": "http://konsil.dev/fhir/CodeSystem/specialty", "code": "oncology"}]},
            "subject": {"reference": "Patient/p"}, "requester": {"reference": "Organization/o"},
            "reasonCode": [{"text": "second look at staging"}]})
    }

    /// One defect: what it is, how to make it, where it is reported.
    type Case = (&'static str, Box<dyn Fn(&mut Value)>, &'static str);

    /// Each defect made in a fresh `base()` is the profile's one finding,
    /// reported at its element.
    async fn each_reported_once_where_it_is(
        profile: &Profile,
        base: fn() -> Value,
        cases: Vec<Case>,
    ) {
        for (what, change, expression) in cases {
            let mut r = base();
            change(&mut r);
            let issues = check(profile, &r).await;
            assert_eq!(issues.len(), 1, "{what}: {issues:#?}");
            assert_eq!(issues[0].expression.as_deref(), Some(expression), "{what}");
        }
    }

    #[tokio::test]
    async fn the_referral_profile_checks_what_it_adds() {
        let profile = &all()["http://konsil.dev/fhir/StructureDefinition/konsil-referral"];
        assert_eq!(check(profile, &referral()).await, vec![]);
        let cases: Vec<Case> = vec![
            (
                "no requester",
                Box::new(|r| {
                    r.as_object_mut().unwrap().remove("requester");
                }),
                "ServiceRequest.requester",
            ),
            (
                "specialty outside the value set",
                Box::new(|r| r["code"]["coding"][0]["code"] = json!("astrology")),
                "ServiceRequest.code",
            ),
            (
                "subject not a Patient",
                Box::new(|r| r["subject"]["reference"] = json!("Group/g")),
                "ServiceRequest.subject.reference",
            ),
            (
                "intent not order",
                Box::new(|r| r["intent"] = json!("plan")),
                "ServiceRequest.intent",
            ),
            (
                "no second-opinion category",
                Box::new(|r| r["category"][0]["coding"][0]["code"] = json!("other")),
                "ServiceRequest",
            ),
            (
                "no reason",
                Box::new(|r| {
                    r.as_object_mut().unwrap().remove("reasonCode");
                }),
                "ServiceRequest",
            ),
        ];
        each_reported_once_where_it_is(profile, referral, cases).await;
    }

    fn opinion() -> Value {
        let section = |kind: &str| {
            json!({"url": "http://konsil.dev/fhir/StructureDefinition/opinion-section",
            "extension": [{"url": "kind", "valueCode": kind}, {"url": "text", "valueString": "..."}]})
        };
        json!({"resourceType": "DiagnosticReport", "status": "preliminary",
            "extension": [section("diagnosis-agreement"), section("recommendations")],
            "basedOn": [{"reference": "ServiceRequest/r"}],
            "code": {"text": "Oncology second opinion"},
            "subject": {"reference": "Patient/p"},
            "resultsInterpreter": [{"reference": "PractitionerRole/s"}],
            "conclusion": "We agree."})
    }

    #[tokio::test]
    async fn the_opinion_profile_checks_what_it_adds() {
        let profile = &all()["http://konsil.dev/fhir/StructureDefinition/konsil-opinion"];
        assert_eq!(check(profile, &opinion()).await, vec![]);
        let mut empty_draft = opinion();
        for key in ["conclusion", "extension"] {
            empty_draft.as_object_mut().unwrap().remove(key);
        }
        empty_draft["status"] = json!("registered");
        assert_eq!(
            check(profile, &empty_draft).await,
            vec![],
            "a registered draft may be empty"
        );
        let cases: Vec<Case> = vec![
            (
                "no specialist",
                Box::new(|r| {
                    r.as_object_mut().unwrap().remove("resultsInterpreter");
                }),
                "DiagnosticReport.resultsInterpreter",
            ),
            (
                "no referral",
                Box::new(|r| {
                    r.as_object_mut().unwrap().remove("basedOn");
                }),
                "DiagnosticReport.basedOn",
            ),
            (
                "based on a CarePlan",
                Box::new(|r| r["basedOn"][0]["reference"] = json!("CarePlan/c")),
                "DiagnosticReport.basedOn[0].reference",
            ),
            (
                "about a Group",
                Box::new(|r| r["subject"]["reference"] = json!("Group/g")),
                "DiagnosticReport.subject.reference",
            ),
            (
                "preliminary and says nothing",
                Box::new(|r| {
                    for key in ["conclusion", "extension"] {
                        r.as_object_mut().unwrap().remove(key);
                    }
                }),
                "DiagnosticReport",
            ),
            (
                "a section twice",
                Box::new(|r| {
                    let first = r["extension"][0].clone();
                    r["extension"].as_array_mut().unwrap().push(first);
                }),
                "DiagnosticReport",
            ),
        ];
        each_reported_once_where_it_is(profile, opinion, cases).await;
    }
}
