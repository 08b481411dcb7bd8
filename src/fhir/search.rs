//! Search parameters: the one table of what can be searched (also what the
//! CapabilityStatement lists), extraction of index entries from a resource,
//! and parsing of search requests into storage queries.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde_json::{Map, Value};

use super::outcome::Issue;
use crate::store::fhir::{Clause, DatePrefix, IndexEntries, StringMatch};

/// The type of a search parameter (FHIR `SearchParamType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    Reference,
    Date,
    String,
}

impl ParamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::Reference => "reference",
            ParamKind::Date => "date",
            ParamKind::String => "string",
        }
    }
}

/// One search parameter of one resource type.
#[derive(Debug)]
pub struct SearchParam {
    pub resource: &'static str,
    pub name: &'static str,
    pub kind: ParamKind,
    /// Element paths from the resource root; `x[x]` is a choice element.
    pub paths: &'static [&'static str],
    /// For references: only references to these types count (empty: any).
    pub targets: &'static [&'static str],
    pub documentation: &'static str,
}

use ParamKind::{Date as D, Reference as R, String as S, Token as T};

macro_rules! params {
    ($( $res:literal $name:literal $kind:ident [$($path:literal),*] [$($target:literal),*] $doc:literal; )*) => {
        &[$( SearchParam { resource: $res, name: $name, kind: $kind, paths: &[$($path),*], targets: &[$($target),*], documentation: $doc } ),*]
    };
}

/// Every search parameter besides `_id` and `_lastUpdated` (which all types
/// have).
pub static PARAMS: &[SearchParam] = params![
    "Patient" "identifier" T ["identifier"] [] "A patient identifier (system|value)";
    "Patient" "name" S ["name"] [] "Any part of a name (starts with, case-insensitive)";
    "Patient" "family" S ["name.family"] [] "Family name";
    "Patient" "given" S ["name.given"] [] "Given name";
    "Patient" "birthdate" D ["birthDate"] [] "Date of birth";
    "Patient" "gender" T ["gender"] [] "Administrative gender";
    "Patient" "active" T ["active"] [] "Whether the record is active";
    "Patient" "organization" R ["managingOrganization"] ["Organization"] "Managing organization";
    "Practitioner" "identifier" T ["identifier"] [] "A practitioner identifier";
    "Practitioner" "name" S ["name"] [] "Any part of a name";
    "Practitioner" "family" S ["name.family"] [] "Family name";
    "Practitioner" "given" S ["name.given"] [] "Given name";
    "Practitioner" "active" T ["active"] [] "Whether the record is active";
    "PractitionerRole" "identifier" T ["identifier"] [] "A role identifier";
    "PractitionerRole" "practitioner" R ["practitioner"] ["Practitioner"] "The practitioner";
    "PractitionerRole" "organization" R ["organization"] ["Organization"] "The organization";
    "PractitionerRole" "role" T ["code"] [] "The role";
    "PractitionerRole" "specialty" T ["specialty"] [] "The specialty";
    "PractitionerRole" "active" T ["active"] [] "Whether the role is active";
    "Organization" "identifier" T ["identifier"] [] "An organization identifier";
    "Organization" "name" S ["name", "alias"] [] "Name or alias";
    "Organization" "active" T ["active"] [] "Whether the record is active";
    "Organization" "type" T ["type"] [] "Kind of organization";
    "Organization" "partof" R ["partOf"] ["Organization"] "Parent organization";
    "Endpoint" "identifier" T ["identifier"] [] "An endpoint identifier";
    "Endpoint" "status" T ["status"] [] "Endpoint status";
    "Endpoint" "name" S ["name"] [] "Endpoint name";
    "Endpoint" "organization" R ["managingOrganization"] ["Organization"] "Managing organization";
    "Endpoint" "connection-type" T ["connectionType"] [] "Protocol";
    "ServiceRequest" "identifier" T ["identifier"] [] "A request identifier (accession number, placer id)";
    "ServiceRequest" "patient" R ["subject"] ["Patient"] "The patient (subject, if a Patient)";
    "ServiceRequest" "subject" R ["subject"] [] "The subject";
    "ServiceRequest" "status" T ["status"] [] "Request status";
    "ServiceRequest" "intent" T ["intent"] [] "Request intent";
    "ServiceRequest" "priority" T ["priority"] [] "Request priority";
    "ServiceRequest" "based-on" R ["basedOn"] [] "What the request fulfils";
    "ServiceRequest" "code" T ["code"] [] "What is requested";
    "ServiceRequest" "category" T ["category"] [] "Classification of the request";
    "ServiceRequest" "authored" D ["authoredOn"] [] "When the request was authored";
    "ServiceRequest" "occurrence" D ["occurrence[x]"] [] "When the service should occur";
    "ServiceRequest" "requester" R ["requester"] [] "Who made the request";
    "ServiceRequest" "performer" R ["performer"] [] "Requested performer";
    "ServiceRequest" "encounter" R ["encounter"] ["Encounter"] "Encounter of the request";
    "Task" "identifier" T ["identifier"] [] "A task identifier";
    "Task" "patient" R ["for"] ["Patient"] "The patient the task is for";
    "Task" "subject" R ["for"] [] "What the task is for";
    "Task" "status" T ["status"] [] "Task status";
    "Task" "business-status" T ["businessStatus"] [] "Business status (the case's step)";
    "Task" "intent" T ["intent"] [] "Task intent";
    "Task" "priority" T ["priority"] [] "Task priority";
    "Task" "code" T ["code"] [] "Task type";
    "Task" "based-on" R ["basedOn"] [] "What the task fulfils";
    "Task" "focus" R ["focus"] [] "What the task acts on";
    "Task" "part-of" R ["partOf"] ["Task"] "Parent task";
    "Task" "owner" R ["owner"] [] "Who is responsible";
    "Task" "requester" R ["requester"] [] "Who asked for the task";
    "Task" "authored-on" D ["authoredOn"] [] "When the task was created";
    "Task" "modified" D ["lastModified"] [] "When the task last changed";
    "Task" "group-identifier" T ["groupIdentifier"] [] "Group identifier";
    "DocumentReference" "identifier" T ["masterIdentifier", "identifier"] [] "Document identifier";
    "DocumentReference" "patient" R ["subject"] ["Patient"] "The patient";
    "DocumentReference" "subject" R ["subject"] [] "The subject";
    "DocumentReference" "status" T ["status"] [] "Reference status";
    "DocumentReference" "type" T ["type"] [] "Kind of document (LOINC)";
    "DocumentReference" "category" T ["category"] [] "Document category";
    "DocumentReference" "date" D ["date"] [] "When the reference was created";
    "DocumentReference" "period" D ["context.period"] [] "Time of service documented";
    "DocumentReference" "author" R ["author"] [] "Who wrote the document";
    "DocumentReference" "related" R ["context.related"] [] "Related resources";
    "DocumentReference" "encounter" R ["context.encounter"] [] "Encounter";
    "DocumentReference" "relatesto" R ["relatesTo.target"] ["DocumentReference"] "Related document";
    "DocumentReference" "contenttype" T ["content.attachment.contentType"] [] "MIME type of the content";
    "DocumentReference" "format" T ["content.format"] [] "Format of the content";
    "List" "identifier" T ["identifier"] [] "A list identifier";
    "List" "patient" R ["subject"] ["Patient"] "The patient";
    "List" "subject" R ["subject"] [] "The subject";
    "List" "status" T ["status"] [] "List status";
    "List" "code" T ["code"] [] "What the list is";
    "List" "date" D ["date"] [] "When the list was prepared";
    "List" "source" R ["source"] [] "Who made the list";
    "List" "item" R ["entry.item"] [] "Items in the list";
    "List" "title" S ["title"] [] "List title";
    "DiagnosticReport" "identifier" T ["identifier"] [] "A report identifier";
    "DiagnosticReport" "patient" R ["subject"] ["Patient"] "The patient";
    "DiagnosticReport" "subject" R ["subject"] [] "The subject";
    "DiagnosticReport" "status" T ["status"] [] "Report status";
    "DiagnosticReport" "based-on" R ["basedOn"] [] "The request the report answers";
    "DiagnosticReport" "code" T ["code"] [] "Kind of report";
    "DiagnosticReport" "category" T ["category"] [] "Service category";
    "DiagnosticReport" "date" D ["effective[x]"] [] "Clinically relevant time";
    "DiagnosticReport" "issued" D ["issued"] [] "When the report was released";
    "DiagnosticReport" "performer" R ["performer"] [] "Who is responsible";
    "DiagnosticReport" "result" R ["result"] ["Observation"] "Observations";
    "DiagnosticReport" "encounter" R ["encounter"] [] "Encounter";
    "DiagnosticReport" "conclusion" T ["conclusionCode"] [] "Coded conclusion";
    "Consent" "identifier" T ["identifier"] [] "A consent identifier";
    "Consent" "patient" R ["patient"] ["Patient"] "Who the consent applies to";
    "Consent" "status" T ["status"] [] "Consent status";
    "Consent" "scope" T ["scope"] [] "Which of the four areas";
    "Consent" "category" T ["category"] [] "Kind of consent";
    "Consent" "date" D ["dateTime"] [] "When the consent was given";
    "Consent" "period" D ["provision.period"] [] "Time the rules apply";
    "Consent" "organization" R ["organization"] ["Organization"] "Custodian";
    "Consent" "consentor" R ["performer"] [] "Who is agreeing";
    "Consent" "actor" R ["provision.actor.reference"] [] "Who the rule is for";
    "Consent" "purpose" T ["provision.purpose"] [] "Context of activities covered";
    "Consent" "action" T ["provision.action"] [] "Actions controlled";
    "Consent" "data" R ["provision.data.reference"] [] "Data controlled";
    "Consent" "source-reference" R ["source[x]"] [] "Source document";
    "ImagingStudy" "identifier" T ["identifier"] [] "Study identifiers (Study Instance UID, accession)";
    "ImagingStudy" "patient" R ["subject"] ["Patient"] "The patient";
    "ImagingStudy" "subject" R ["subject"] [] "The subject";
    "ImagingStudy" "status" T ["status"] [] "Study status";
    "ImagingStudy" "started" D ["started"] [] "When the study started";
    "ImagingStudy" "modality" T ["series.modality"] [] "Modality of a series";
    "ImagingStudy" "series" T ["series.uid"] [] "Series Instance UID";
    "ImagingStudy" "basedon" R ["basedOn"] [] "The request";
    "ImagingStudy" "referrer" R ["referrer"] [] "Referring physician";
    "ImagingStudy" "endpoint" R ["endpoint", "series.endpoint"] ["Endpoint"] "Where to retrieve it";
    "Communication" "identifier" T ["identifier"] [] "A communication identifier";
    "Communication" "patient" R ["subject"] ["Patient"] "The patient";
    "Communication" "subject" R ["subject"] [] "The subject";
    "Communication" "status" T ["status"] [] "Communication status";
    "Communication" "based-on" R ["basedOn"] [] "Request fulfilled";
    "Communication" "part-of" R ["partOf"] [] "Part of";
    "Communication" "category" T ["category"] [] "Message category";
    "Communication" "sent" D ["sent"] [] "When sent";
    "Communication" "received" D ["received"] [] "When received";
    "Communication" "recipient" R ["recipient"] [] "Recipient";
    "Communication" "sender" R ["sender"] [] "Sender";
    "Subscription" "status" T ["status"] [] "Subscription status";
    "Subscription" "type" T ["channel.type"] [] "Channel type";
    "Subscription" "url" T ["channel.endpoint"] [] "Where notifications go";
    "Subscription" "criteria" S ["criteria"] [] "Search criteria";
    "AuditEvent" "date" D ["recorded"] [] "When the event was recorded";
    "AuditEvent" "type" T ["type"] [] "Event type";
    "AuditEvent" "subtype" T ["subtype"] [] "Event subtype";
    "AuditEvent" "action" T ["action"] [] "Action";
    "AuditEvent" "outcome" T ["outcome"] [] "Outcome";
    "AuditEvent" "agent" R ["agent.who"] [] "Who took part";
    "AuditEvent" "entity" R ["entity.what"] [] "What was involved";
    "AuditEvent" "patient" R ["entity.what", "agent.who"] ["Patient"] "Patient involved";
    "AuditEvent" "source" R ["source.observer"] [] "Who reported the event";
];

/// The parameters of one resource type.
pub fn params_of(resource: &str) -> impl Iterator<Item = &'static SearchParam> + '_ {
    PARAMS.iter().filter(move |p| p.resource == resource)
}

pub fn param(resource: &str, name: &str) -> Option<&'static SearchParam> {
    params_of(resource).find(|p| p.name == name)
}

/// The index key of a parameter: `Task.status`.
pub fn key(p: &SearchParam) -> String {
    format!("{}.{}", p.resource, p.name)
}

/// Values at `path` (dotted, `x[x]` for a choice) below `node`, arrays
/// flattened; with the choice type when the last step is a choice.
fn values_at<'v>(node: &'v Value, path: &str, out: &mut Vec<(&'v Value, Option<&'v str>)>) {
    let (step, rest) = match path.split_once('.') {
        Some((s, r)) => (s, Some(r)),
        None => (path, None),
    };
    let Some(obj) = node.as_object() else {
        return;
    };
    let mut found: Vec<(&'v Value, Option<&'v str>)> = Vec::new();
    if let Some(base) = step.strip_suffix("[x]") {
        for (k, v) in obj {
            if let Some(ty) = k.strip_prefix(base) {
                if ty.starts_with(|c: char| c.is_ascii_uppercase()) {
                    found.push((v, Some(ty)));
                }
            }
        }
    } else if let Some(v) = obj.get(step) {
        found.push((v, None));
    }
    for (v, ty) in found {
        let items: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for item in items {
            match rest {
                Some(rest) => values_at(item, rest, out),
                None => out.push((item, ty)),
            }
        }
    }
}

/// Index entries of a resource for every parameter of its type.
pub fn extract(resource_type: &str, resource: &Value) -> IndexEntries {
    let mut ix = IndexEntries::default();
    for p in params_of(resource_type) {
        let key = key(p);
        let mut values = Vec::new();
        for path in p.paths {
            values_at(resource, path, &mut values);
        }
        for (v, choice) in values {
            match p.kind {
                T => tokens_of(v, &key, &mut ix.tokens),
                R => {
                    if let Some(target) = v
                        .get("reference")
                        .and_then(Value::as_str)
                        .and_then(normalise_reference)
                    {
                        let type_ok = p.targets.is_empty()
                            || p.targets
                                .iter()
                                .any(|t| target.starts_with(&format!("{t}/")));
                        if type_ok {
                            ix.references.push((key.clone(), target));
                        }
                    }
                }
                D => {
                    let range = match (v, choice) {
                        (Value::String(s), _) => date_range(s),
                        (Value::Object(o), None | Some("Period")) => period_range(o),
                        _ => None,
                    };
                    if let Some((low, high)) = range {
                        ix.dates.push((key.clone(), low, high));
                    }
                }
                S => strings_of(v, &key, &mut ix.strings),
            }
        }
    }
    ix
}

fn tokens_of(v: &Value, key: &str, out: &mut Vec<(String, String, String)>) {
    let mut push = |system: Option<&Value>, code: Option<&Value>| {
        if let Some(code) = code.and_then(Value::as_str) {
            let system = system.and_then(Value::as_str).unwrap_or("");
            out.push((key.to_owned(), system.to_owned(), code.to_owned()));
        }
    };
    match v {
        Value::String(_) => push(None, Some(v)),
        Value::Bool(b) => out.push((key.to_owned(), String::new(), b.to_string())),
        Value::Object(o) => {
            if let Some(codings) = o.get("coding").and_then(Value::as_array) {
                for c in codings {
                    push(c.get("system"), c.get("code"));
                }
            } else if o.contains_key("value") {
                // Identifier, ContactPoint.
                push(o.get("system"), o.get("value"));
            } else {
                // Coding.
                push(o.get("system"), o.get("code"));
            }
        }
        _ => {}
    }
}

fn strings_of(v: &Value, key: &str, out: &mut Vec<(String, String, String)>) {
    let mut push = |s: &str| out.push((key.to_owned(), normalise_text(s), s.to_owned()));
    match v {
        Value::String(s) => push(s),
        Value::Object(o) => {
            // HumanName and Address: every textual part.
            for part in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "state",
                "postalCode",
                "country",
            ] {
                match o.get(part) {
                    Some(Value::String(s)) => push(s),
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).for_each(&mut push),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Lower case, for case-insensitive string search.
pub fn normalise_text(s: &str) -> String {
    s.to_lowercase()
}

/// The stored form of a reference: `Type/id` for a local one (version
/// dropped), the URL otherwise; `None` for contained references.
pub fn normalise_reference(reference: &str) -> Option<String> {
    if reference.starts_with('#') || reference.is_empty() {
        return None;
    }
    let plain = match reference.find("/_history/") {
        Some(at) => &reference[..at],
        None => reference,
    };
    Some(plain.to_owned())
}

/// The range a FHIR date, dateTime or instant covers, in ms since the epoch,
/// both ends inclusive. Without a time zone, UTC.
pub fn date_range(s: &str) -> Option<(i64, i64)> {
    let ymd = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    let start_of = |date: NaiveDate| {
        date.and_hms_opt(0, 0, 0)
            .map(|t| Utc.from_utc_datetime(&t).timestamp_millis())
    };
    if !s.is_ascii() {
        return None;
    }
    let bytes = s.as_bytes();
    match s.len() {
        4 => {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let y: i32 = s.parse().ok()?;
            Some((start_of(ymd(y, 1, 1)?)?, start_of(ymd(y + 1, 1, 1)?)? - 1))
        }
        7 if bytes[4] == b'-' => {
            let y: i32 = s[..4].parse().ok()?;
            let m: u32 = s[5..].parse().ok()?;
            let first = ymd(y, m, 1)?;
            let next = if m == 12 {
                ymd(y + 1, 1, 1)?
            } else {
                ymd(y, m + 1, 1)?
            };
            Some((start_of(first)?, start_of(next)? - 1))
        }
        10 => {
            let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            let low = start_of(date)?;
            Some((low, low + 86_400_000 - 1))
        }
        _ => {
            // A time of day: to the second (or finer), with or without zone.
            if bytes.get(10) != Some(&b'T') {
                return None;
            }
            let time = &s[10..];
            let with_zone = if s.ends_with('Z') || time.contains(['+', '-']) {
                s.to_owned()
            } else {
                format!("{s}Z")
            };
            let with_seconds = if with_zone.as_bytes().get(16) == Some(&b':') {
                with_zone
            } else {
                // hh:mm without seconds (allowed in search values).
                format!("{}:00{}", with_zone.get(..16)?, with_zone.get(16..)?)
            };
            let t = DateTime::parse_from_rfc3339(&with_seconds).ok()?;
            let ms = t.timestamp_millis();
            // To the second: the range is that second; finer: that instant.
            let width = if s.contains('.') { 0 } else { 999 };
            Some((ms, ms + width))
        }
    }
}

fn period_range(o: &Map<String, Value>) -> Option<(i64, i64)> {
    let start = o.get("start").and_then(Value::as_str).and_then(date_range);
    let end = o.get("end").and_then(Value::as_str).and_then(date_range);
    match (start, end) {
        (None, None) => None,
        (s, e) => Some((s.map_or(i64::MIN, |s| s.0), e.map_or(i64::MAX, |e| e.1))),
    }
}

/// A parsed search: storage clauses plus what goes back into the `self`
/// link (the parameters that were used) and warnings for ignored ones.
#[derive(Debug, Default)]
pub struct ParsedSearch {
    pub clauses: Vec<Clause>,
    /// (name, value) of the parameters applied, for the self link.
    pub applied: Vec<(String, String)>,
    pub ignored: Vec<Issue>,
}

/// Parse one search parameter (not a result parameter such as `_count`).
/// `Err` carries an issue for an unusable value; `Ok(None)` an unknown
/// parameter.
pub fn parse_param(resource: &str, raw_name: &str, value: &str) -> Result<Option<Clause>, Issue> {
    let (name, modifier) = match raw_name.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (raw_name, None),
    };
    let bad = |why: String| {
        Issue::error(
            "value",
            format!("search parameter {raw_name}={value}: {why}"),
        )
        .at(format!("{resource}.{name}"))
    };
    let values: Vec<&str> = split_values(value);
    if values.is_empty() {
        return Err(bad("empty value".into()));
    }
    if name == "_id" {
        return Ok(Some(Clause::Ids(
            values.iter().map(|v| (*v).to_owned()).collect(),
        )));
    }
    if name == "_lastUpdated" {
        let ranges = values
            .iter()
            .map(|v| {
                date_value(v).ok_or_else(|| {
                    bad("not a date (prefix and YYYY[-MM[-DD[Thh:mm[:ss][zone]]]])".into())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Some(Clause::LastUpdated(ranges)));
    }
    let Some(p) = param(resource, name) else {
        return Ok(None);
    };
    let key = key(p);
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad(":missing takes true or false".into())),
        };
        return Ok(Some(Clause::Missing {
            param: key,
            missing,
        }));
    }
    Ok(Some(match p.kind {
        T => {
            if modifier.is_some() {
                return Err(bad(format!(
                    "modifier :{} is not supported on token parameters",
                    modifier.unwrap_or("")
                )));
            }
            Clause::Token {
                param: key,
                values: values
                    .iter()
                    .map(|v| match v.split_once('|') {
                        Some((system, code)) => (
                            Some(system.to_owned()),
                            Some(code.to_owned()).filter(|c| !c.is_empty()),
                        ),
                        None => (None, Some((*v).to_owned())),
                    })
                    .collect(),
            }
        }
        R => {
            let targets = values
                .iter()
                .map(|v| {
                    let v = normalise_reference(v).unwrap_or_default();
                    if v.contains('/') {
                        v
                    } else if let Some(t) = modifier {
                        format!("{t}/{v}")
                    } else if let [only] = p.targets {
                        format!("{only}/{v}")
                    } else {
                        v
                    }
                })
                .collect::<Vec<_>>();
            // An id alone matches a reference to any type with that id.
            let mut expanded = Vec::new();
            for t in targets {
                if t.contains('/') {
                    expanded.push(t);
                } else {
                    for r in super::rest::SUPPORTED {
                        expanded.push(format!("{r}/{t}"));
                    }
                }
            }
            Clause::Reference {
                param: key,
                targets: expanded,
            }
        }
        D => Clause::Date {
            param: key,
            values: values
                .iter()
                .map(|v| {
                    date_value(v).ok_or_else(|| {
                        bad("not a date (prefix and YYYY[-MM[-DD[Thh:mm[:ss][zone]]]])".into())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        },
        S => Clause::String {
            param: key,
            mode: match modifier {
                None => StringMatch::Prefix,
                Some("exact") => StringMatch::Exact,
                Some("contains") => StringMatch::Contains,
                Some(m) => {
                    return Err(bad(format!(
                        "modifier :{m} is not supported on string parameters"
                    )))
                }
            },
            // `:exact` compares the text as written, the others lower-cased.
            values: values
                .iter()
                .map(|v| {
                    if modifier == Some("exact") {
                        (*v).to_owned()
                    } else {
                        normalise_text(v)
                    }
                })
                .collect(),
        },
    }))
}

/// Comma-separated values (OR), with `\,` as a literal comma.
fn split_values(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = value.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b',' && (i == 0 || bytes[i - 1] != b'\\') {
            out.push(&value[start..i]);
            start = i + 1;
        }
    }
    out.push(&value[start..]);
    out.into_iter().filter(|v| !v.is_empty()).collect()
}

fn date_value(v: &str) -> Option<(DatePrefix, i64, i64)> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (DatePrefix::Eq, &v[2..]),
        Some("ne") => (DatePrefix::Ne, &v[2..]),
        Some("gt") => (DatePrefix::Gt, &v[2..]),
        Some("lt") => (DatePrefix::Lt, &v[2..]),
        Some("ge") => (DatePrefix::Ge, &v[2..]),
        Some("le") => (DatePrefix::Le, &v[2..]),
        Some("sa") => (DatePrefix::Sa, &v[2..]),
        Some("eb") => (DatePrefix::Eb, &v[2..]),
        Some("ap") => (DatePrefix::Ap, &v[2..]),
        _ => (DatePrefix::Eq, v),
    };
    let (low, high) = date_range(rest)?;
    Some((prefix, low, high))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn date_ranges_follow_precision() {
        let (l, h) = date_range("2024").unwrap();
        assert_eq!(h - l + 1, 366 * 86_400_000);
        let (l, h) = date_range("2024-02").unwrap();
        assert_eq!(h - l + 1, 29 * 86_400_000);
        let (l, h) = date_range("2024-02-29T10:00:00+01:00").unwrap();
        assert_eq!(h - l, 999);
        assert_eq!(l, date_range("2024-02-29T09:00:00Z").unwrap().0);
        assert_eq!(date_range("2024-02-29T09:00").unwrap().0, l);
        assert!(date_range("2024-13").is_none());
        for bad in [
            "nonsense",
            "2024-01-01Tx",
            "2024-01-01T1",
            "+202",
            "2024-01-01T10:00:00+0",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
        ] {
            assert!(date_range(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn extracts_index_entries() {
        let sr = json!({
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "subject": {"reference": "Patient/p1/_history/2"},
            "identifier": [{"system": "urn:acc", "value": "A1"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "1-1"}]},
            "authoredOn": "2024-01-02",
            "occurrencePeriod": {"start": "2024-01-03"}
        });
        let ix = extract("ServiceRequest", &sr);
        assert!(ix
            .references
            .contains(&("ServiceRequest.patient".into(), "Patient/p1".into())));
        assert!(ix.tokens.contains(&(
            "ServiceRequest.identifier".into(),
            "urn:acc".into(),
            "A1".into()
        )));
        assert!(ix
            .tokens
            .contains(&("ServiceRequest.status".into(), "".into(), "active".into())));
        assert!(ix.tokens.contains(&(
            "ServiceRequest.code".into(),
            "http://loinc.org".into(),
            "1-1".into()
        )));
        assert_eq!(ix.dates.len(), 2);
        let occurrence = ix
            .dates
            .iter()
            .find(|d| d.0 == "ServiceRequest.occurrence")
            .unwrap();
        assert_eq!(occurrence.2, i64::MAX);
    }
}
