//! Accept-header negotiation (PS3.18 8.7): which representation a client
//! takes, and a 406 that says what we can produce when it takes none.

use axum::http::{header, HeaderMap};

use super::WebError;

pub const DICOM: &str = "application/dicom";
pub const DICOM_JSON: &str = "application/dicom+json";
pub const DICOM_XML: &str = "application/dicom+xml";
pub const OCTET_STREAM: &str = "application/octet-stream";
/// Explicit VR Little Endian: the default transfer syntax of uncompressed
/// representations.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// One entry of an Accept header.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRange {
    /// `type/subtype`, lowercase.
    pub essence: String,
    /// Parameters, names lowercase, values unquoted.
    pub params: Vec<(String, String)>,
    pub q: f32,
}

impl MediaRange {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The Accept header's ranges, best first; no header means anything.
pub fn accepted(headers: &HeaderMap) -> Result<Vec<MediaRange>, WebError> {
    let mut ranges = Vec::new();
    for value in headers.get_all(header::ACCEPT) {
        let text = value
            .to_str()
            .map_err(|_| WebError::BadRequest("Accept header is not visible ASCII".into()))?;
        for item in split_outside_quotes(text, ',') {
            if item.trim().is_empty() {
                continue;
            }
            ranges.push(parse_range(item)?);
        }
    }
    if ranges.is_empty() {
        ranges.push(MediaRange {
            essence: "*/*".into(),
            params: Vec::new(),
            q: 1.0,
        });
    }
    // Stable: equal quality keeps the client's order.
    ranges.sort_by(|a, b| b.q.total_cmp(&a.q));
    ranges.retain(|r| r.q > 0.0);
    Ok(ranges)
}

/// A media type with parameters (a range or a Content-Type).
pub fn parse_range(text: &str) -> Result<MediaRange, WebError> {
    let mut pieces = split_outside_quotes(text, ';').into_iter();
    let essence = pieces
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if !essence.contains('/') {
        return Err(WebError::BadRequest(format!(
            "{text:?} is not a media type"
        )));
    }
    let mut params = Vec::new();
    let mut q = 1.0;
    for piece in pieces {
        let Some((name, value)) = piece.split_once('=') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().trim_matches('"').to_owned();
        if name == "q" {
            q = value.parse().unwrap_or(1.0);
        } else {
            params.push((name, value));
        }
    }
    Ok(MediaRange { essence, params, q })
}

fn split_outside_quotes(text: &str, separator: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (n, c) in text.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            out.push(&text[start..n]);
            start = n + 1;
        }
    }
    out.push(&text[start..]);
    out
}

/// Which JSON-or-XML answer a client takes for a response data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    Json,
    Xml,
}

/// For QIDO and metadata (JSON only) and the STOW response (JSON or XML).
pub fn dataset_format(headers: &HeaderMap, xml_allowed: bool) -> Result<DatasetFormat, WebError> {
    for range in accepted(headers)? {
        match range.essence.as_str() {
            "*/*" | "application/*" | DICOM_JSON | "application/json" => {
                return Ok(DatasetFormat::Json)
            }
            DICOM_XML if xml_allowed => return Ok(DatasetFormat::Xml),
            "multipart/related" if xml_allowed && range.param("type") == Some(DICOM_XML) => {
                return Ok(DatasetFormat::Xml)
            }
            _ => {}
        }
    }
    Err(WebError::NotAcceptable(if xml_allowed {
        format!("available as {DICOM_JSON} or {DICOM_XML}")
    } else {
        format!("available as {DICOM_JSON}")
    }))
}

/// How instances are packaged for a retrieve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packaging {
    /// `multipart/related; type="application/dicom"`.
    Multipart,
    /// A single `application/dicom` body (one instance only).
    Single,
}

/// Negotiate a retrieve of instances stored in `stored` transfer syntaxes.
/// Instances are served as stored (never transcoded): `transfer-syntax=*`,
/// or no parameter, or the stored syntax itself.
pub fn instances(
    headers: &HeaderMap,
    stored: &[&str],
    count: usize,
) -> Result<Packaging, WebError> {
    let as_stored = |range: &MediaRange| match range.param("transfer-syntax") {
        None | Some("*") => true,
        Some(ts) => stored.iter().all(|s| *s == ts),
    };
    for range in accepted(headers)? {
        match range.essence.as_str() {
            "*/*" | "multipart/*" => return Ok(Packaging::Multipart),
            "multipart/related" => {
                let part_type = range.param("type").unwrap_or(DICOM);
                if part_type == DICOM && as_stored(&range) {
                    return Ok(Packaging::Multipart);
                }
            }
            DICOM if count == 1 && as_stored(&range) => return Ok(Packaging::Single),
            _ => {}
        }
    }
    let mut syntaxes: Vec<&str> = stored.to_vec();
    syntaxes.sort_unstable();
    syntaxes.dedup();
    Err(WebError::NotAcceptable(format!(
        "instances are served as stored, never transcoded: ask for multipart/related; \
         type=\"application/dicom\" with transfer-syntax=* (or {})",
        syntaxes
            .iter()
            .map(|ts| format!("transfer-syntax={ts}"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The media type of pixel data in a compressed transfer syntax (PS3.18
/// Table 8.7.3-2), if it has one.
pub fn pixel_media_type(transfer_syntax: &str) -> Option<&'static str> {
    let suffix = transfer_syntax.strip_prefix("1.2.840.10008.1.2.")?;
    Some(match suffix {
        "4.50" | "4.51" | "4.57" | "4.70" => "image/jpeg",
        "4.80" | "4.81" => "image/jls",
        "4.90" | "4.91" => "image/jp2",
        "4.92" | "4.93" => "image/jpx",
        "4.201" | "4.202" | "4.203" => "image/jphc",
        "5" => "image/dicom-rle",
        "4.100" | "4.101" => "video/mpeg",
        "4.102" | "4.103" | "4.104" | "4.105" | "4.106" => "video/mp4",
        "4.107" | "4.108" => "video/H265",
        _ => return None,
    })
}

/// Whether pixel data in this transfer syntax is native (uncompressed,
/// little endian) bytes.
pub fn is_native_le(transfer_syntax: &str) -> bool {
    transfer_syntax == EXPLICIT_LE || transfer_syntax == IMPLICIT_LE
}

/// Negotiate frames or bulk data of an instance stored in `stored`. Returns
/// the Content-Type of each part.
pub fn pixels(headers: &HeaderMap, stored: &str) -> Result<String, WebError> {
    let stored_type = pixel_media_type(stored);
    for range in accepted(headers)? {
        let (part_type, ts) = match range.essence.as_str() {
            "*/*" | "multipart/*" => (OCTET_STREAM.to_owned(), Some("*")),
            "multipart/related" => (
                range
                    .param("type")
                    .unwrap_or(OCTET_STREAM)
                    .to_ascii_lowercase(),
                range.param("transfer-syntax"),
            ),
            _ => continue,
        };
        let fits = match (part_type.as_str(), ts) {
            (OCTET_STREAM, Some("*")) => true,
            // The default for octet-stream is uncompressed Explicit VR Little
            // Endian, whose native bytes are the same as Implicit's.
            (OCTET_STREAM, None) => is_native_le(stored),
            (OCTET_STREAM, Some(ts)) => ts == stored || (ts == EXPLICIT_LE && is_native_le(stored)),
            (other, ts) => {
                Some(other) == stored_type.map(str::to_ascii_lowercase).as_deref()
                    && (matches!(ts, None | Some("*")) || ts == Some(stored))
            }
        };
        if fits {
            let ts = if is_native_le(stored) && part_type == OCTET_STREAM {
                EXPLICIT_LE
            } else {
                stored
            };
            return Ok(format!("{part_type}; transfer-syntax={ts}"));
        }
    }
    Err(WebError::NotAcceptable(format!(
        "pixel data is served as stored, never transcoded: ask for multipart/related; \
         type=\"application/octet-stream\"; transfer-syntax=* (stored as {stored}{})",
        stored_type
            .map(|t| format!(", also available as type=\"{t}\""))
            .unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn quoted_and_unquoted_type_parameters() {
        for value in [
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            "multipart/related; type=application/dicom",
            "multipart/related;type=\"application/dicom\";q=0.9, application/json;q=0.1",
        ] {
            assert_eq!(
                instances(&accept(value), &["1.2.840.10008.1.2.4.50"], 2).unwrap(),
                Packaging::Multipart,
                "{value}"
            );
        }
    }

    #[test]
    fn a_transfer_syntax_we_do_not_store_is_406_naming_what_we_have() {
        let err = instances(
            &accept("multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.1"),
            &["1.2.840.10008.1.2.4.50"],
            1,
        )
        .unwrap_err();
        assert!(matches!(&err, WebError::NotAcceptable(m) if m.contains("1.2.840.10008.1.2.4.50")));
    }

    #[test]
    fn frames_negotiation() {
        let ohif = accept("multipart/related; type=application/octet-stream; transfer-syntax=*");
        assert_eq!(
            pixels(&ohif, "1.2.840.10008.1.2.4.50").unwrap(),
            "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50"
        );
        let plain = accept("multipart/related; type=\"application/octet-stream\"");
        assert!(pixels(&plain, "1.2.840.10008.1.2").is_ok());
        assert!(matches!(
            pixels(&plain, "1.2.840.10008.1.2.4.50"),
            Err(WebError::NotAcceptable(_))
        ));
        let jpeg = accept("multipart/related; type=\"image/jpeg\"");
        assert_eq!(
            pixels(&jpeg, "1.2.840.10008.1.2.4.50").unwrap(),
            "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
        );
    }

    #[test]
    fn json_or_xml() {
        assert_eq!(
            dataset_format(&HeaderMap::new(), true).unwrap(),
            DatasetFormat::Json
        );
        assert_eq!(
            dataset_format(&accept("application/dicom+xml"), true).unwrap(),
            DatasetFormat::Xml
        );
        assert!(dataset_format(&accept("application/dicom+xml"), false).is_err());
    }
}
