//! QIDO-RS (PS3.18 10.6): searches answered from the index alone, never by
//! opening a stored object.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::dataset::{self, text_element};
use super::media;
use super::{base_url, path_uid, reply, WebError};
use crate::app::App;
use crate::auth::{Caller, CallerError};
use crate::ids::Uid;
use crate::store::query::{
    attribute_by_keyword, attribute_by_tag, Attribute, Condition, Level, Matcher, Search,
};

// One handler per level; the path parameters (`study`, `series`) narrow
// the search when the route has them.

pub async fn studies(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    reply(search(&app, caller, &headers, query, Level::Study, &path).await)
}

pub async fn series(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    reply(search(&app, caller, &headers, query, Level::Series, &path).await)
}

pub async fn instances(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    reply(search(&app, caller, &headers, query, Level::Instance, &path).await)
}

/// A parsed QIDO query string.
#[derive(Debug, Default)]
struct Parsed {
    conditions: Vec<Condition>,
    /// Attributes to return beyond the defaults.
    include: Vec<&'static Attribute>,
    include_all: bool,
    limit: Option<u32>,
    offset: u32,
    /// Matching keys we cannot match on, ignored (and said so).
    ignored: Vec<String>,
}

async fn search(
    app: &Arc<App>,
    caller: Result<Caller, CallerError>,
    headers: &HeaderMap,
    query: Option<String>,
    level: Level,
    path: &HashMap<String, String>,
) -> Result<Response, WebError> {
    let caller = caller?;
    media::dataset_format(headers, false)?;
    let mut parsed = parse_query(query.as_deref().unwrap_or(""), level)?;
    let in_path = [
        ("study", "StudyInstanceUID"),
        ("series", "SeriesInstanceUID"),
    ];
    for (param, keyword) in in_path {
        let Some(raw) = path.get(param) else {
            continue;
        };
        let uid = path_uid(keyword, raw)?;
        let attribute = attribute_by_keyword(keyword)
            .ok_or_else(|| WebError::Internal(format!("{keyword} missing from the index table")))?;
        parsed.conditions.push(Condition {
            attribute,
            matcher: Matcher::Exact(uid.as_str().to_owned()),
        });
    }
    let max = app.config.dicomweb.max_results;
    let limit = parsed.limit.unwrap_or(max).min(max);
    let mut conditions = parsed.conditions.clone();
    let mut partners = crate::auth::policy::visible_partners(&caller, &app.config);
    // A case-restricted specialist finds the studies of the assigned cases.
    if let Some(cases) = caller.case_scope() {
        match crate::store::query::attribute_by_keyword("StudyInstanceUID") {
            Some(attribute) if !cases.studies.is_empty() => conditions.push(Condition {
                attribute,
                matcher: Matcher::AnyOf(cases.studies.iter().cloned().collect()),
            }),
            _ => partners.clear(),
        }
    }
    let search = Search {
        level,
        partners,
        conditions,
        // One more than asked, to know whether the answer is truncated.
        limit: limit.saturating_add(1),
        offset: parsed.offset,
    };
    let mut rows = app.index.search(&search).await?;
    let truncated = rows.len() > limit as usize;
    rows.truncate(limit as usize);

    let base = base_url(app, headers);
    let columns: Vec<&'static Attribute> = search.columns().collect();
    let wanted = |a: &Attribute| {
        parsed.include_all
            || a.default
            || parsed.include.iter().any(|i| i.tag == a.tag)
            || parsed.conditions.iter().any(|c| c.attribute.tag == a.tag)
    };
    let mut answers = Vec::with_capacity(rows.len());
    for row in rows {
        let mut obj = InMemDicomObject::new_empty();
        let mut study = None;
        let mut series = None;
        let mut instance = None;
        for (attribute, value) in columns.iter().zip(&row.values) {
            match attribute.keyword {
                "StudyInstanceUID" => study = value.clone(),
                "SeriesInstanceUID" => series = value.clone(),
                "SOPInstanceUID" => instance = value.clone(),
                _ => {}
            }
            if !wanted(attribute) {
                continue;
            }
            obj.put(match value {
                Some(v) if attribute.keyword == "ModalitiesInStudy" => {
                    // group_concat joins with commas; DICOM with backslashes.
                    text_element(attribute.tag, attribute.vr, &v.replace(',', "\\"))
                }
                Some(v) => text_element(attribute.tag, attribute.vr, v),
                None => DataElement::new(attribute.tag, attribute.vr, PrimitiveValue::Empty),
            });
        }
        let mut url = format!("{base}/studies/{}", study.unwrap_or_default());
        if level >= Level::Series {
            url.push_str(&format!("/series/{}", series.unwrap_or_default()));
        }
        if level >= Level::Instance {
            url.push_str(&format!("/instances/{}", instance.unwrap_or_default()));
        }
        obj.put(DataElement::new(
            tags::RETRIEVE_URL,
            VR::UR,
            PrimitiveValue::from(url),
        ));
        obj.put(DataElement::new(
            tags::INSTANCE_AVAILABILITY,
            VR::CS,
            PrimitiveValue::from("ONLINE"),
        ));
        answers.push(obj);
    }
    let body = dataset::json_array(&answers)?;
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, media::DICOM_JSON)],
        body,
    )
        .into_response();
    let mut warnings = Vec::new();
    if truncated {
        warnings.push("There are additional results that can be requested".to_owned());
    }
    if let Some(asked) = parsed.limit.filter(|l| *l > max) {
        warnings.push(format!("limit {asked} lowered to the maximum of {max}"));
    }
    // One Warning per ignored key, each named once, at most ten; the key
    // is the client's text: no quote may end the warn-text early.
    let mut ignored: Vec<&String> = Vec::new();
    for key in &parsed.ignored {
        if !ignored.contains(&key) {
            ignored.push(key);
        }
    }
    for key in ignored.iter().take(10) {
        warnings.push(format!(
            "matching on {} is not supported; the key was ignored",
            key.replace(['"', '\\'], "'")
        ));
    }
    if ignored.len() > 10 {
        warnings.push(format!(
            "{} more unsupported keys were ignored",
            ignored.len() - 10
        ));
    }
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{w}\"")) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
    Ok(response)
}

/// Parse the query string against the index's attributes.
fn parse_query(query: &str, level: Level) -> Result<Parsed, WebError> {
    let mut parsed = Parsed::default();
    let mut fuzzy = false;
    let mut matches: Vec<(&'static Attribute, String)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.trim().to_owned();
        match key.as_ref() {
            "limit" => parsed.limit = Some(number("limit", &value)?),
            "offset" => parsed.offset = number("offset", &value)?,
            "fuzzymatching" => {
                fuzzy = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(WebError::BadRequest(format!(
                            "fuzzymatching must be true or false, not {value:?}"
                        )))
                    }
                }
            }
            "includefield" => {
                for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    if name == "all" {
                        parsed.include_all = true;
                    } else if let Some(a) = lookup(name) {
                        parsed.include.push(a);
                    }
                    // Attributes the index does not hold cannot be returned
                    // from it; PS3.18 lets the server leave them out.
                }
            }
            // Viewers add cache busters and the like; they are not DICOM keys.
            "_" => {}
            // PS3.18 8.3.4: a query key the server does not support is
            // ignored (and the Warning header says so), not refused:
            // matching inside sequences, emptyvaluematching,
            // multiplevaluematching, attributes the index does not hold,
            // names that are no attribute at all.
            name if name.contains('.') => parsed.ignored.push(name.to_owned()),
            name => match lookup(name) {
                Some(a) if a.level > level => {
                    return Err(WebError::BadRequest(format!(
                        "{} is a {:?}-level attribute; it cannot be matched in a {:?}-level search",
                        a.keyword, a.level, level
                    )))
                }
                Some(a) => matches.push((a, value)),
                None => parsed.ignored.push(name.to_owned()),
            },
        }
    }
    // Repeated keys (StudyInstanceUID=a&StudyInstanceUID=b) are one list.
    let mut merged: Vec<(&'static Attribute, String)> = Vec::new();
    for (a, v) in matches {
        match merged.iter_mut().find(|(m, _)| m.tag == a.tag) {
            Some((_, existing)) if !v.is_empty() => {
                existing.push(',');
                existing.push_str(&v);
            }
            Some(_) => {}
            None => merged.push((a, v)),
        }
    }
    for (attribute, value) in merged {
        if let Some(matcher) = matcher(attribute, &value, fuzzy)? {
            parsed.conditions.push(Condition { attribute, matcher });
        } else {
            // Universal matching: return the attribute, match everything.
            parsed.include.push(attribute);
        }
    }
    Ok(parsed)
}

fn number(name: &str, value: &str) -> Result<u32, WebError> {
    value.parse().map_err(|_| {
        WebError::BadRequest(format!(
            "{name} must be a non-negative integer, not {value:?}"
        ))
    })
}

/// An index attribute by keyword or by tag (`0020000D`); `None` for
/// anything else (another attribute, or no attribute at all).
fn lookup(name: &str) -> Option<&'static Attribute> {
    if name.len() == 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        let raw = u32::from_str_radix(name, 16).ok()?;
        return attribute_by_tag(Tag((raw >> 16) as u16, raw as u16));
    }
    attribute_by_keyword(name)
}

/// How to match `value` (PS3.18 8.3.4); `None` for universal matching.
fn matcher(a: &Attribute, value: &str, fuzzy: bool) -> Result<Option<Matcher>, WebError> {
    if value.is_empty() || value == "*" {
        return Ok(None);
    }
    let bad = |why: &str| WebError::BadRequest(format!("{}={value:?}: {why}", a.keyword));
    Ok(Some(match a.vr {
        VR::UI => {
            let mut uids = Vec::new();
            for raw in value.split(',') {
                let uid = Uid::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
                uids.push(uid.as_str().to_owned());
            }
            Matcher::AnyOf(uids)
        }
        VR::DA | VR::TM => {
            let valid = |s: &str| {
                s.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.' || b == b':')
            };
            match value.split_once('-') {
                Some((low, high)) => {
                    if !valid(low) || !valid(high) || (low.is_empty() && high.is_empty()) {
                        return Err(bad("not a date/time or range"));
                    }
                    let clean = |s: &str| (!s.is_empty()).then(|| s.replace(':', ""));
                    Matcher::Range(clean(low), clean(high))
                }
                None if valid(value) => Matcher::Exact(value.replace(':', "")),
                None => return Err(bad("not a date/time or range")),
            }
        }
        VR::IS | VR::US => {
            value.parse::<i64>().map_err(|_| bad("not an integer"))?;
            Matcher::Exact(value.to_owned())
        }
        _ if value.contains(['*', '?']) => Matcher::Wildcard(value.to_owned()),
        VR::PN if fuzzy => Matcher::Fuzzy(value.to_owned()),
        VR::CS if value.contains(',') => {
            Matcher::AnyOf(value.split(',').map(|v| v.trim().to_owned()).collect())
        }
        _ => Matcher::Exact(value.to_owned()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_by_keyword_or_tag_lists_and_ranges() {
        let p = parse_query(
            "PatientName=do*&0020000D=1.2.3,1.2.4&StudyDate=20200101-&includefield=StudyDescription,00081030&includefield=all&limit=5&offset=10",
            Level::Study,
        )
        .unwrap();
        assert_eq!(p.limit, Some(5));
        assert_eq!(p.offset, 10);
        assert!(p.include_all);
        let m: Vec<_> = p
            .conditions
            .iter()
            .map(|c| (c.attribute.keyword, c.matcher.clone()))
            .collect();
        assert!(m.contains(&("PatientName", Matcher::Wildcard("do*".into()))));
        assert!(m.contains(&(
            "StudyInstanceUID",
            Matcher::AnyOf(vec!["1.2.3".into(), "1.2.4".into()])
        )));
        assert!(m.contains(&("StudyDate", Matcher::Range(Some("20200101".into()), None))));
    }

    #[test]
    fn bad_keys_and_values_are_400() {
        for q in [
            "StudyInstanceUID=1.02",
            "StudyDate=yesterday",
            "limit=-1",
            "SOPInstanceUID=1.2",
        ] {
            assert!(
                matches!(parse_query(q, Level::Study), Err(WebError::BadRequest(_))),
                "{q}"
            );
        }
        let p = parse_query("InstitutionName=X", Level::Study).unwrap();
        assert_eq!(p.ignored, vec!["InstitutionName".to_owned()]);
    }

    #[test]
    fn unsupported_keys_are_ignored_not_refused() {
        let p = parse_query(
            "NoSuchKeyword=1&RequestAttributesSequence.RequestedProcedureID=7&emptyvaluematching=true\
             &PatientID=P1",
            Level::Series,
        )
        .unwrap();
        assert_eq!(
            p.ignored,
            [
                "NoSuchKeyword",
                "RequestAttributesSequence.RequestedProcedureID",
                "emptyvaluematching"
            ]
        );
        assert_eq!(p.conditions.len(), 1, "PatientID still matches");
    }
}
