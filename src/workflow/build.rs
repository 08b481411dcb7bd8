//! The resources the workflow creates from scratch, built with fhir-sdk's
//! typed builders (its R4B model: these resources' elements are the same in
//! R4 4.0.1, and the FHIR layer validates every one against R4 before it is
//! stored). Resources the workflow only amends (an adopted Task, a
//! referrer's manifest) stay JSON, so nothing the sender wrote is lost.

use fhir_sdk::r4b::codes::{DocumentReferenceStatus, EventStatus, TaskIntent, TaskStatus};
use fhir_sdk::r4b::resources::{
    Communication, CommunicationPayload, CommunicationPayloadContent, DocumentReference,
    DocumentReferenceContent, DocumentReferenceContext, Task,
};
use fhir_sdk::r4b::types::{Attachment, CodeableConcept, Coding, Reference};
use fhir_sdk::{Base64Binary, BuilderError, DateTime, Instant};
use serde_json::Value;

use super::engine::instant_text;
use super::records::WorkflowError;

fn defect(resource_type: &str) -> impl Fn(BuilderError) -> WorkflowError + '_ {
    move |e| WorkflowError::Defect {
        resource_type: resource_type.to_owned(),
        findings: e.to_string(),
    }
}

fn to_json<T: serde::Serialize>(resource_type: &str, resource: &T) -> Result<Value, WorkflowError> {
    serde_json::to_value(resource).map_err(|e| WorkflowError::Defect {
        resource_type: resource_type.to_owned(),
        findings: e.to_string(),
    })
}

/// Write the times at `pointers` as the workflow writes every timestamp
/// ([`instant_text`]: always milliseconds). fhir-sdk leaves the fraction
/// out at a whole second, and a Task whose `authoredOn` and `lastModified`
/// differ in precision fails inv-1 (FHIRPath compares them as unequal
/// precisions).
fn with_times(mut value: Value, pointers: &[&str], ms: i64) -> Value {
    for pointer in pointers {
        if let Some(slot) = value.pointer_mut(pointer) {
            *slot = Value::String(instant_text(ms));
        }
    }
    value
}

fn reference(target: &str) -> Result<Reference, BuilderError> {
    Reference::builder().reference(target.to_owned()).build()
}

fn coding(system: &str, code: &str, display: Option<&str>) -> Result<Coding, BuilderError> {
    let builder = Coding::builder()
        .system(system.to_owned())
        .code(code.to_owned());
    match display {
        Some(display) => builder.display(display.to_owned()).build(),
        None => builder.build(),
    }
}

fn text(text: &str) -> Result<CodeableConcept, BuilderError> {
    CodeableConcept::builder().text(text.to_owned()).build()
}

fn instant(ms: i64) -> Instant {
    let nanos = i128::from(ms) * 1_000_000;
    Instant(
        fhir_sdk::time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .unwrap_or(fhir_sdk::time::OffsetDateTime::UNIX_EPOCH),
    )
}

fn order() -> TaskIntent {
    TaskIntent::_Custom("order".to_owned())
}

/// A new case Task for a referral (the workflow then writes the case into
/// it).
pub fn case_task(
    request: &str,
    subject: Option<&str>,
    requester: Option<&str>,
    now_ms: i64,
) -> Result<Value, WorkflowError> {
    let fail = defect("Task");
    let mut task = Task::builder()
        .status(TaskStatus::Received)
        .intent(order())
        .code(
            CodeableConcept::builder()
                .coding(vec![Some(
                    coding("http://hl7.org/fhir/CodeSystem/task-code", "fulfill", None)
                        .map_err(&fail)?,
                )])
                .build()
                .map_err(&fail)?,
        )
        .focus(reference(request).map_err(&fail)?)
        .authored_on(DateTime::DateTime(instant(now_ms)))
        .build()
        .map_err(&fail)?;
    if let Some(subject) = subject {
        task.r#for = Some(reference(subject).map_err(&fail)?);
    }
    if let Some(requester) = requester {
        task.requester = Some(reference(requester).map_err(&fail)?);
    }
    Ok(with_times(
        to_json("Task", &task)?,
        &["/authoredOn"],
        now_ms,
    ))
}

/// The child Task of a follow-up question.
pub fn follow_up_task(
    case: &str,
    question: &str,
    patient: Option<&str>,
    requester: Option<&str>,
    owner: &str,
    now_ms: i64,
) -> Result<Value, WorkflowError> {
    let fail = defect("Task");
    let mut task = Task::builder()
        .status(TaskStatus::InProgress)
        .intent(order())
        .code(text("Follow-up question").map_err(&fail)?)
        .business_status(text("question received").map_err(&fail)?)
        .part_of(vec![Some(reference(case).map_err(&fail)?)])
        .focus(reference(question).map_err(&fail)?)
        .owner(reference(owner).map_err(&fail)?)
        .authored_on(DateTime::DateTime(instant(now_ms)))
        .last_modified(DateTime::DateTime(instant(now_ms)))
        .build()
        .map_err(&fail)?;
    if let Some(patient) = patient {
        task.r#for = Some(reference(patient).map_err(&fail)?);
    }
    if let Some(requester) = requester {
        task.requester = Some(reference(requester).map_err(&fail)?);
    }
    Ok(with_times(
        to_json("Task", &task)?,
        &["/authoredOn", "/lastModified"],
        now_ms,
    ))
}

/// A completed Communication from the service.
pub struct Message<'a> {
    pub category: CodeableConcept,
    pub subject: Option<&'a str>,
    pub about: Vec<String>,
    pub recipients: Vec<String>,
    pub sender: &'a str,
    pub text: &'a str,
}

/// The category of a notification (communication-category).
pub fn notification_category() -> Result<CodeableConcept, WorkflowError> {
    let fail = defect("Communication");
    CodeableConcept::builder()
        .coding(vec![Some(
            coding(
                "http://terminology.hl7.org/CodeSystem/communication-category",
                "notification",
                None,
            )
            .map_err(&fail)?,
        )])
        .build()
        .map_err(&fail)
}

/// A category given as text only.
pub fn text_category(label: &str) -> Result<CodeableConcept, WorkflowError> {
    text(label).map_err(defect("Communication"))
}

pub fn communication(message: Message<'_>, now_ms: i64) -> Result<Value, WorkflowError> {
    let fail = defect("Communication");
    let references = |list: &[String]| -> Result<Vec<Option<Reference>>, WorkflowError> {
        list.iter()
            .map(|r| reference(r).map(Some).map_err(&fail))
            .collect()
    };
    let mut built = Communication::builder()
        .status(EventStatus::Completed)
        .category(vec![Some(message.category)])
        .about(references(&message.about)?)
        .recipient(references(&message.recipients)?)
        .sender(reference(message.sender).map_err(&fail)?)
        .sent(DateTime::DateTime(instant(now_ms)))
        .payload(vec![Some(
            CommunicationPayload::builder()
                .content(CommunicationPayloadContent::String(message.text.to_owned()))
                .build()
                .map_err(&fail)?,
        )])
        .build()
        .map_err(&fail)?;
    if let Some(subject) = message.subject {
        built.subject = Some(reference(subject).map_err(&fail)?);
    }
    Ok(with_times(
        to_json("Communication", &built)?,
        &["/sent"],
        now_ms,
    ))
}

/// The DocumentReference that files the approved opinion's PDF.
pub fn opinion_document(
    pdf: &[u8],
    patient: Option<&str>,
    related: &[String],
    custodian: &str,
    now_ms: i64,
) -> Result<Value, WorkflowError> {
    let fail = defect("DocumentReference");
    let attachment = Attachment::builder()
        .content_type("application/pdf".to_owned())
        .data(Base64Binary(pdf.to_vec()))
        .title("Second opinion".to_owned())
        .creation(DateTime::DateTime(instant(now_ms)))
        .build()
        .map_err(&fail)?;
    let kind = CodeableConcept::builder()
        .coding(vec![Some(
            coding("http://loinc.org", "11488-4", Some("Consult note")).map_err(&fail)?,
        )])
        .text("Second opinion".to_owned())
        .build()
        .map_err(&fail)?;
    let context = DocumentReferenceContext::builder()
        .related(
            related
                .iter()
                .map(|r| reference(r).map(Some))
                .collect::<Result<Vec<_>, _>>()
                .map_err(&fail)?,
        )
        .build()
        .map_err(&fail)?;
    let mut document = DocumentReference::builder()
        .status(DocumentReferenceStatus::Current)
        .r#type(kind)
        .date(instant(now_ms))
        .custodian(reference(custodian).map_err(&fail)?)
        .content(vec![Some(
            DocumentReferenceContent::builder()
                .attachment(attachment)
                .build()
                .map_err(&fail)?,
        )])
        .context(context)
        .build()
        .map_err(&fail)?;
    if let Some(patient) = patient {
        document.subject = Some(reference(patient).map_err(&fail)?);
    }
    Ok(with_times(
        to_json("DocumentReference", &document)?,
        &["/date", "/content/0/attachment/creation"],
        now_ms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_resources_carry_their_type_and_leave_out_what_is_empty() {
        let task = case_task(
            "ServiceRequest/1",
            Some("Patient/2"),
            None,
            1_795_000_000_000,
        )
        .unwrap();
        assert_eq!(task["resourceType"], "Task");
        assert_eq!(task["intent"], "order");
        assert_eq!(task["status"], "received");
        assert_eq!(task["focus"]["reference"], "ServiceRequest/1");
        assert_eq!(task["for"]["reference"], "Patient/2");
        assert!(task.get("requester").is_none());
        assert!(task["authoredOn"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-18T"));
        // Times read exactly as the workflow's own timestamps (Task inv-1
        // compares authoredOn with lastModified written as instant_text).
        for ms in [1_795_000_000_000, 1_795_000_000_410, 1_795_000_000_413] {
            let task = case_task("ServiceRequest/1", None, None, ms).unwrap();
            assert_eq!(task["authoredOn"], instant_text(ms), "{ms}");
        }

        let doc = opinion_document(
            b"%PDF-1.7",
            None,
            &["ServiceRequest/1".into()],
            "Organization/konsil",
            0,
        )
        .unwrap();
        assert_eq!(doc["content"][0]["attachment"]["data"], "JVBERi0xLjc=");
        assert_eq!(
            doc["context"]["related"][0]["reference"],
            "ServiceRequest/1"
        );
        assert!(doc.get("subject").is_none());
    }
}
