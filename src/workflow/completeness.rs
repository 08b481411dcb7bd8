//! Records completeness: which record kinds a case of a specialty needs, and
//! which of them the submitted records satisfy. The rules are data
//! (`profiles/completeness-rules.json`); this module only applies them.
//! Consent is checked apart (see [`super::case::ConsentState`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

const RULES: &str = include_str!("../../profiles/completeness-rules.json");

/// A coding a record kind is recognised by.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Coding {
    pub system: String,
    pub code: String,
}

/// How one kind of record is recognised.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordKind {
    pub title: String,
    /// Satisfied by a DICOM study linked to the case (and complete).
    #[serde(default)]
    pub dicom_study: bool,
    /// Satisfied by a DocumentReference with one of these type codings...
    #[serde(default)]
    pub document_type: Vec<Coding>,
    /// ...or one of these category codings.
    #[serde(default)]
    pub document_category: Vec<Coding>,
    /// The document must be dated within this many months of now.
    pub within_months: Option<u32>,
}

/// What counts as a consent permitting the second opinion.
#[derive(Debug, Deserialize)]
pub struct ConsentRule {
    /// `Consent.provision.purpose` codings that permit it (when the
    /// provision names purposes at all).
    pub purposes: Vec<Coding>,
}

/// The rules file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rules {
    pub version: String,
    pub consent: ConsentRule,
    pub record_kinds: BTreeMap<String, RecordKind>,
    pub specialties: BTreeMap<String, Vec<String>>,
}

/// Why the rules file cannot be used (a defect of the repository).
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("profiles/completeness-rules.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "profiles/completeness-rules.json: specialty {specialty} needs unknown record kind {kind}"
    )]
    UnknownKind { specialty: String, kind: String },
}

impl Rules {
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        let rules: Rules = serde_json::from_str(text)?;
        for (specialty, kinds) in &rules.specialties {
            for kind in kinds {
                if !rules.record_kinds.contains_key(kind) {
                    return Err(RulesError::UnknownKind {
                        specialty: specialty.clone(),
                        kind: kind.clone(),
                    });
                }
            }
        }
        Ok(rules)
    }

    /// The rules in `profiles/`, parsed once.
    pub fn shipped() -> Result<&'static Rules, &'static RulesError> {
        static RULES_ONCE: OnceLock<Result<Rules, RulesError>> = OnceLock::new();
        RULES_ONCE.get_or_init(|| Rules::parse(RULES)).as_ref()
    }

    /// The record kinds a specialty requires; `None` for an unknown
    /// specialty.
    pub fn required(&self, specialty: &str) -> Option<&[String]> {
        self.specialties.get(specialty).map(Vec::as_slice)
    }
}

/// A submitted document, as completeness sees it.
#[derive(Debug, Clone, Default)]
pub struct Document {
    pub types: Vec<Coding>,
    pub categories: Vec<Coding>,
    /// When its clinical content dates from (`context.period`, else the
    /// content's creation, else `DocumentReference.date`), ms since epoch.
    pub date_ms: Option<i64>,
}

/// What a case has so far.
#[derive(Debug, Clone, Default)]
pub struct Submitted {
    pub documents: Vec<Document>,
    /// DICOM studies linked to the case whose imaging counts as complete.
    pub complete_studies: usize,
}

/// Average month, for "within N months".
const MONTH_MS: i64 = 30 * 86_400_000 + 10 * 3_600_000 + 30 * 60_000;

fn recognises(kind: &RecordKind, submitted: &Submitted, now_ms: i64) -> bool {
    if kind.dicom_study && submitted.complete_studies > 0 {
        return true;
    }
    submitted.documents.iter().any(|doc| {
        let coded = doc.types.iter().any(|c| kind.document_type.contains(c))
            || doc
                .categories
                .iter()
                .any(|c| kind.document_category.contains(c));
        let recent = match kind.within_months {
            None => true,
            Some(months) => doc
                .date_ms
                .is_some_and(|d| d >= now_ms - i64::from(months) * MONTH_MS),
        };
        coded && recent
    })
}

/// The required kinds not yet satisfied, in the order the rules list them.
/// An unknown specialty is `Err` with the specialty, so the caller can say
/// so rather than guess.
pub fn missing<'r>(
    rules: &'r Rules,
    specialty: &str,
    submitted: &Submitted,
    now_ms: i64,
) -> Result<Vec<&'r str>, String> {
    let required = rules
        .required(specialty)
        .ok_or_else(|| specialty.to_owned())?;
    Ok(required
        .iter()
        .filter(|kind| {
            rules
                .record_kinds
                .get(kind.as_str())
                .is_some_and(|k| !recognises(k, submitted, now_ms))
        })
        .map(String::as_str)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000_000; // 2026-11-18

    fn loinc(code: &str) -> Coding {
        Coding {
            system: "http://loinc.org".into(),
            code: code.into(),
        }
    }

    fn doc(code: &str, days_ago: i64) -> Document {
        Document {
            types: vec![loinc(code)],
            categories: vec![],
            date_ms: Some(NOW - days_ago * 86_400_000),
        }
    }

    #[test]
    fn the_shipped_rules_parse_and_every_specialty_of_the_profile_has_rules() {
        let rules = Rules::shipped().expect("rules");
        let specialties: serde_json::Value = serde_json::from_str(include_str!(
            "../../profiles/konsil/CodeSystem-specialty.json"
        ))
        .unwrap();
        for concept in specialties["concept"].as_array().unwrap() {
            let code = concept["code"].as_str().unwrap();
            assert!(
                rules.required(code).is_some(),
                "no completeness rules for {code}"
            );
        }
    }

    #[test]
    fn oncology_needs_each_kind_until_it_arrives() {
        let rules = Rules::shipped().expect("rules");
        let mut submitted = Submitted::default();
        assert_eq!(
            missing(rules, "oncology", &submitted, NOW).unwrap(),
            vec![
                "imaging",
                "pathology-report",
                "clinical-notes",
                "labs",
                "medication-list"
            ]
        );
        submitted.documents.push(doc("11526-1", 400)); // pathology, any age
        submitted.documents.push(doc("11506-3", 400)); // progress note, too old
        submitted.documents.push(Document {
            categories: vec![loinc("26436-6")],
            ..Document::default()
        }); // labs by category
        assert_eq!(
            missing(rules, "oncology", &submitted, NOW).unwrap(),
            vec!["imaging", "clinical-notes", "medication-list"]
        );
        submitted.documents.push(doc("11488-4", 30)); // recent consult note
        submitted.documents.push(doc("10160-0", 2));
        submitted.complete_studies = 1;
        assert_eq!(
            missing(rules, "oncology", &submitted, NOW).unwrap(),
            Vec::<&str>::new()
        );
        // The radiology report is not the images.
        let report_only = Submitted {
            documents: vec![doc("18748-4", 1)],
            complete_studies: 0,
        };
        assert!(missing(rules, "radiology", &report_only, NOW)
            .unwrap()
            .contains(&"imaging"));
        assert_eq!(
            missing(rules, "astrology", &report_only, NOW),
            Err("astrology".into())
        );
    }

    #[test]
    fn rules_naming_an_unknown_kind_are_refused() {
        let bad = r#"{"version": "x", "consent": {"purposes": []}, "recordKinds": {}, "specialties": {"oncology": ["imaging"]}}"#;
        assert!(matches!(
            Rules::parse(bad),
            Err(RulesError::UnknownKind { .. })
        ));
    }
}
