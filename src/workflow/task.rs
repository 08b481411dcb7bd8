//! The case's public face: reading a [`Case`] from its FHIR `Task` and
//! writing it back (`status`, `businessStatus`, `statusReason`, the missing
//! records in `input`, `owner`, `lastModified`). The codes are Konsil's code
//! systems in `profiles/konsil/`.

use serde_json::{json, Map, Value};

use super::case::{Case, Hold, Stage};
use super::completeness::Rules;
use super::records::{codes, has_coding, items, reference_of};

pub const CASE_STAGE: &str = "http://konsil.dev/fhir/CodeSystem/case-stage";
pub const CASE_HOLD: &str = "http://konsil.dev/fhir/CodeSystem/case-hold";
pub const CASE_INPUT: &str = "http://konsil.dev/fhir/CodeSystem/case-input";
pub const RECORD_KIND: &str = "http://konsil.dev/fhir/CodeSystem/record-kind";

/// `Task.input.type` code of a record the case still needs.
pub const MISSING_RECORD: &str = "missing-record";
/// The record kind that stands for the patient's consent.
pub const CONSENT_KIND: &str = "consent";
/// The record kind that stands for a referral whose specialty has no rules.
pub const SPECIALTY_KIND: &str = "specialty-rules";

const CONSENT_PREFIX: &str = "on hold: consent: ";

/// The case a Task carries, if it is a case Task.
pub fn case_of(task: &Value) -> Option<Case> {
    let stage = Stage::from_code(codes(task.get("businessStatus"), CASE_STAGE).next()?)?;
    let on_hold = task.get("status").and_then(Value::as_str) == Some("on-hold");
    let hold = if on_hold {
        let reason = task.get("statusReason");
        match codes(reason, CASE_HOLD).next() {
            Some("consent") => {
                let text = reason
                    .and_then(|r| r.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                Some(Hold::Consent(
                    text.strip_prefix(CONSENT_PREFIX).unwrap_or(text).to_owned(),
                ))
            }
            _ => Some(Hold::Stale),
        }
    } else {
        None
    };
    let missing = items(Some(task), "input")
        .filter(|i| is_missing_input(i))
        .filter_map(|i| codes(i.get("valueCodeableConcept"), RECORD_KIND).next())
        .map(str::to_owned)
        .collect();
    let specialist = matches!(
        stage,
        Stage::UnderReview | Stage::AwaitingApproval | Stage::Delivered | Stage::Closed
    )
    .then(|| reference_of(task.get("owner")).map(str::to_owned))
    .flatten();
    Some(Case {
        stage,
        hold,
        missing,
        specialist,
    })
}

fn is_missing_input(input: &Value) -> bool {
    codes(input.get("type"), CASE_INPUT).any(|c| c == MISSING_RECORD)
}

/// Title of a record kind for people.
pub fn kind_title(rules: &Rules, kind: &str) -> String {
    match kind {
        CONSENT_KIND => "Active consent permitting disclosure for a second opinion".to_owned(),
        SPECIALTY_KIND => "A specialty the service has completeness rules for".to_owned(),
        other => rules
            .record_kinds
            .get(other)
            .map_or_else(|| other.to_owned(), |k| k.title.clone()),
    }
}

/// Write `case` into `task`. `service` is the reference of the service's
/// own Organization (the owner until a specialist is assigned).
pub fn write_case(task: &mut Value, case: &Case, rules: &Rules, service: &str, now: &str) {
    let Some(obj) = task.as_object_mut() else {
        return;
    };
    obj.insert("status".into(), json!(case.task_status()));
    obj.insert(
        "businessStatus".into(),
        json!({
            "coding": [{
                "system": CASE_STAGE,
                "code": case.stage.business_status(),
                "display": case.stage.display(),
            }],
            "text": case.stage.display(),
        }),
    );
    match case.status_reason() {
        Some(text) => {
            let mut reason = Map::new();
            if let Some(hold) = &case.hold {
                let (code, display) = match hold {
                    Hold::Consent(_) => ("consent", "Consent does not permit"),
                    Hold::Stale => ("stale", "Records missing too long"),
                };
                reason.insert(
                    "coding".into(),
                    json!([{"system": CASE_HOLD, "code": code, "display": display}]),
                );
            }
            reason.insert("text".into(), json!(text));
            obj.insert("statusReason".into(), Value::Object(reason));
        }
        None => {
            obj.shift_remove("statusReason");
        }
    }
    let mut inputs: Vec<Value> = obj
        .get("input")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter(|i| !is_missing_input(i))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for kind in &case.missing {
        let title = kind_title(rules, kind);
        inputs.push(json!({
            "type": {"coding": [{"system": CASE_INPUT, "code": MISSING_RECORD, "display": "Missing record"}]},
            "valueCodeableConcept": {
                "coding": [{"system": RECORD_KIND, "code": kind}],
                "text": title,
            },
        }));
    }
    if inputs.is_empty() {
        obj.shift_remove("input");
    } else {
        obj.insert("input".into(), Value::Array(inputs));
    }
    let owner = case.specialist.as_deref().unwrap_or(service);
    obj.insert("owner".into(), json!({ "reference": owner }));
    obj.insert("lastModified".into(), json!(now));
}

/// Whether the Task has an output of this `case-input` type.
pub fn has_output(task: &Value, code: &str) -> bool {
    items(Some(task), "output").any(|o| has_coding(o.get("type"), CASE_INPUT, code))
}

/// The `Task` elements only the workflow may change; a client's update that
/// changes any of them is refused (a withdrawal or a decline aside).
pub fn workflow_owned(task: &Value) -> Value {
    let inputs: Vec<&Value> = items(Some(task), "input")
        .filter(|i| is_missing_input(i))
        .collect();
    json!({
        "status": task.get("status"),
        "businessStatus": task.get("businessStatus"),
        "statusReason": task.get("statusReason"),
        "owner": task.get("owner"),
        "focus": task.get("focus"),
        "for": task.get("for"),
        "partOf": task.get("partOf"),
        "output": task.get("output"),
        "input": inputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_survives_the_round_trip_through_its_task() {
        let rules = Rules::shipped().expect("rules");
        let cases = [
            Case::new(),
            Case {
                stage: Stage::AwaitingRecords,
                hold: None,
                missing: vec!["imaging".into(), CONSENT_KIND.into()],
                specialist: None,
            },
            Case {
                stage: Stage::AwaitingRecords,
                hold: Some(Hold::Stale),
                missing: vec!["labs".into()],
                specialist: None,
            },
            Case {
                stage: Stage::UnderReview,
                hold: Some(Hold::Consent("Consent/9 was revoked".into())),
                missing: vec![],
                specialist: Some("PractitionerRole/onc-1".into()),
            },
            Case {
                stage: Stage::Delivered,
                hold: None,
                missing: vec![],
                specialist: Some("PractitionerRole/onc-1".into()),
            },
        ];
        for case in cases {
            let mut task = json!({
                "resourceType": "Task", "status": "requested", "intent": "order",
                "input": [{"type": {"text": "theirs"}, "valueString": "kept"}],
            });
            write_case(
                &mut task,
                &case,
                rules,
                "Organization/konsil",
                "2026-11-24T10:00:00Z",
            );
            assert_eq!(case_of(&task).as_ref(), Some(&case), "{task}");
            // The sender's own inputs stay.
            assert!(task["input"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["valueString"] == "kept"));
            let owner = task["owner"]["reference"].as_str().unwrap();
            assert_eq!(
                owner,
                case.specialist.as_deref().unwrap_or("Organization/konsil")
            );
        }
    }

    fn concepts(text: &str) -> Vec<String> {
        let cs: Value = serde_json::from_str(text).unwrap();
        cs["concept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn every_code_the_workflow_writes_is_in_the_shipped_code_systems() {
        let stages = concepts(include_str!(
            "../../profiles/konsil/CodeSystem-case-stage.json"
        ));
        for stage in Stage::ALL {
            assert!(stages.contains(&stage.business_status().to_owned()));
        }
        let kinds = concepts(include_str!(
            "../../profiles/konsil/CodeSystem-record-kind.json"
        ));
        let rules = Rules::shipped().expect("rules");
        for kind in rules
            .record_kinds
            .keys()
            .map(String::as_str)
            .chain([CONSENT_KIND, SPECIALTY_KIND])
        {
            assert!(kinds.contains(&kind.to_owned()), "{kind}");
        }
        let inputs = concepts(include_str!(
            "../../profiles/konsil/CodeSystem-case-input.json"
        ));
        for code in [
            MISSING_RECORD,
            "opinion",
            "patient-notified",
            "records-discarded",
        ] {
            assert!(inputs.contains(&code.to_owned()), "{code}");
        }
        let holds = concepts(include_str!(
            "../../profiles/konsil/CodeSystem-case-hold.json"
        ));
        assert_eq!(holds, ["consent", "stale"]);
    }

    #[test]
    fn a_task_without_a_case_stage_is_no_case() {
        assert_eq!(
            case_of(&json!({"resourceType": "Task", "status": "requested"})),
            None
        );
        assert_eq!(
            case_of(
                &json!({"businessStatus": {"coding": [{"system": CASE_STAGE, "code": "nonsense"}]}})
            ),
            None
        );
    }
}
