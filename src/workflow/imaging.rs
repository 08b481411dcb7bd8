//! What the DICOM index knows about one received study, in the shape the
//! case's `ImagingStudy` needs. Read from the index only (no file opened).

use serde_json::{json, Value};

use super::records::WorkflowError;
use crate::ids::{PartnerId, Uid};
use crate::store::query::{attribute_by_keyword, Condition, Level, Locate, Matcher, Search};
use crate::store::MetadataStore;

/// One instance of a received study.
#[derive(Debug, Clone)]
pub struct InstanceSummary {
    pub uid: String,
    pub sop_class: String,
    pub number: Option<u32>,
}

/// One series of a received study.
#[derive(Debug, Clone)]
pub struct SeriesSummary {
    pub uid: String,
    pub modality: Option<String>,
    pub number: Option<u32>,
    pub instances: Vec<InstanceSummary>,
}

/// A received study, as indexed for one partner.
#[derive(Debug, Clone)]
pub struct StudySummary {
    pub partner: PartnerId,
    pub uid: String,
    pub accession: Option<String>,
    pub patient_id: Option<String>,
    pub issuer_of_patient_id: Option<String>,
    pub started: Option<String>,
    pub series: Vec<SeriesSummary>,
    /// When the last instance arrived, ms since the epoch.
    pub last_received_ms: i64,
}

impl StudySummary {
    /// The study `uid` of `partner`, if anything of it is indexed.
    pub async fn load(
        index: &dyn MetadataStore,
        partner: &PartnerId,
        uid: &Uid,
    ) -> Result<Option<StudySummary>, WorkflowError> {
        let store = |e: crate::store::MetaError| WorkflowError::Store(e.to_string());
        let study_uid = attribute_by_keyword("StudyInstanceUID")
            .ok_or_else(|| WorkflowError::Store("index table lacks StudyInstanceUID".into()))?;
        let search = Search {
            level: Level::Instance,
            partners: vec![partner.clone()],
            conditions: vec![Condition {
                attribute: study_uid,
                matcher: Matcher::Exact(uid.as_str().to_owned()),
            }],
            limit: u32::MAX,
            offset: 0,
        };
        let columns: Vec<&str> = search.columns().map(|a| a.keyword).collect();
        let rows = index.search(&search).await.map_err(store)?;
        if rows.is_empty() {
            return Ok(None);
        }
        let col = |row: &crate::store::query::SearchRow, keyword: &str| -> Option<String> {
            let i = columns.iter().position(|k| *k == keyword)?;
            row.values
                .get(i)
                .cloned()
                .flatten()
                .filter(|v| !v.is_empty())
        };
        let first = &rows[0];
        let mut summary = StudySummary {
            partner: partner.clone(),
            uid: uid.as_str().to_owned(),
            accession: col(first, "AccessionNumber"),
            patient_id: col(first, "PatientID"),
            issuer_of_patient_id: col(first, "IssuerOfPatientID"),
            started: started(col(first, "StudyDate")),
            series: Vec::new(),
            last_received_ms: 0,
        };
        for row in &rows {
            let Some(series_uid) = col(row, "SeriesInstanceUID") else {
                continue;
            };
            let instance = InstanceSummary {
                uid: col(row, "SOPInstanceUID").unwrap_or_default(),
                sop_class: col(row, "SOPClassUID").unwrap_or_default(),
                number: col(row, "InstanceNumber").and_then(|n| n.trim().parse().ok()),
            };
            match summary.series.iter_mut().find(|s| s.uid == series_uid) {
                Some(series) => series.instances.push(instance),
                None => summary.series.push(SeriesSummary {
                    uid: series_uid,
                    modality: col(row, "Modality"),
                    number: col(row, "SeriesNumber").and_then(|n| n.trim().parse().ok()),
                    instances: vec![instance],
                }),
            }
        }
        let stored = index
            .locate(&Locate {
                partners: vec![partner.clone()],
                study_uid: uid.clone(),
                series_uid: None,
                sop_instance_uid: None,
            })
            .await
            .map_err(store)?;
        summary.last_received_ms = stored.iter().map(|i| i.received_at_ms).max().unwrap_or(0);
        Ok(Some(summary))
    }

    pub fn instance_count(&self) -> usize {
        self.series.iter().map(|s| s.instances.len()).sum()
    }

    /// `ImagingStudy.identifier` of the Study Instance UID.
    pub fn uid_identifier(&self) -> Value {
        json!({"system": "urn:dicom:uid", "value": format!("urn:oid:{}", self.uid)})
    }

    /// Write what arrived into an `ImagingStudy` (a referrer's manifest or
    /// our own), keeping its other elements.
    pub fn write_into(&self, study: &mut Value, endpoint: &str) {
        let Some(obj) = study.as_object_mut() else {
            return;
        };
        let mut identifiers: Vec<Value> = obj
            .get("identifier")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let uid_id = self.uid_identifier();
        if !identifiers
            .iter()
            .any(|i| i.get("value") == uid_id.get("value"))
        {
            identifiers.insert(0, uid_id);
        }
        if let Some(accession) = &self.accession {
            let known = identifiers
                .iter()
                .any(|i| i.get("value").and_then(Value::as_str) == Some(accession));
            if !known {
                identifiers.push(json!({
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": accession,
                }));
            }
        }
        obj.insert("identifier".into(), Value::Array(identifiers));
        obj.insert("status".into(), json!("available"));
        let mut modalities: Vec<&str> = self
            .series
            .iter()
            .filter_map(|s| s.modality.as_deref())
            .collect();
        modalities.sort_unstable();
        modalities.dedup();
        if !modalities.is_empty() {
            obj.insert(
                "modality".into(),
                Value::Array(modalities.iter().map(|m| dcm_coding(m)).collect()),
            );
        }
        if let Some(started) = &self.started {
            obj.insert("started".into(), json!(started));
        }
        obj.insert("endpoint".into(), json!([{ "reference": endpoint }]));
        obj.insert("numberOfSeries".into(), json!(self.series.len()));
        obj.insert("numberOfInstances".into(), json!(self.instance_count()));
        let series: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                let mut out = json!({
                    "uid": s.uid,
                    "modality": dcm_coding(s.modality.as_deref().unwrap_or("OT")),
                    "numberOfInstances": s.instances.len(),
                    "endpoint": [{ "reference": endpoint }],
                    "instance": s.instances.iter().map(|i| {
                        let mut inst = json!({
                            "uid": i.uid,
                            "sopClass": {"system": "urn:ietf:rfc:3986", "code": format!("urn:oid:{}", i.sop_class)},
                        });
                        if let Some(n) = i.number {
                            inst["number"] = json!(n);
                        }
                        inst
                    }).collect::<Vec<_>>(),
                });
                if let Some(n) = s.number {
                    out["number"] = json!(n);
                }
                out
            })
            .collect();
        obj.insert("series".into(), Value::Array(series));
    }
}

fn dcm_coding(code: &str) -> Value {
    json!({"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code})
}

/// StudyDate as a FHIR date. (StudyTime is left out: a dateTime with a
/// time needs a zone, and DICOM's local zone is unknown here.)
fn started(date: Option<String>) -> Option<String> {
    let date = date?;
    let date = date.trim();
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let day = format!("{}-{}-{}", &date[..4], &date[4..6], &date[6..]);
    chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d").ok()?;
    Some(day)
}
