//! The approved opinion as a PDF (`DiagnosticReport.presentedForm`), made
//! with pdf-writer: plain text in the standard Helvetica font (no font file
//! to embed), WinAnsi-encoded, wrapped, as many A4 pages as it needs.

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str};
use serde_json::Value;

use super::records::{extensions, items};

/// Extension on the opinion (`DiagnosticReport.extension`): one section
/// the opinion answers, with sub-extensions `kind` (valueCode, from
/// `CodeSystem/opinion-section`), `answer` (valueCodeableConcept, optional)
/// and `text` (valueString).
pub const OPINION_SECTION: &str = "http://konsil.dev/fhir/StructureDefinition/opinion-section";

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const MARGIN: f32 = 56.0;
const SIZE: f32 = 10.5;
const LEADING: f32 = 14.0;
const WRAP: usize = 92;

/// Titles of the sections of `CodeSystem/opinion-section`.
fn section_title(kind: &str) -> &str {
    match kind {
        "diagnosis-agreement" => "Agreement with the diagnosis",
        "treatment-agreement" => "Agreement with the treatment plan",
        "recommendations" => "Recommendations",
        "would-change" => "What would change this opinion",
        other => other,
    }
}

/// The lines of the opinion, in reading order.
fn lines(report: &Value, issued: &str) -> Vec<(bool, String)> {
    let text = |v: Option<&Value>| -> Option<String> {
        let v = v?;
        v.get("text")
            .and_then(Value::as_str)
            .or_else(|| {
                v.get("coding")?
                    .as_array()?
                    .iter()
                    .find_map(|c| c.get("display").and_then(Value::as_str))
            })
            .map(str::to_owned)
    };
    let mut out: Vec<(bool, String)> = vec![(true, "Second opinion".to_owned())];
    if let Some(code) = text(report.get("code")) {
        out.push((false, code));
    }
    out.push((false, format!("Issued: {issued}")));
    let refs = |key: &str| -> Vec<String> {
        let list: Vec<&Value> = match report.get(key) {
            Some(Value::Array(l)) => l.iter().collect(),
            Some(one) => vec![one],
            None => vec![],
        };
        list.iter()
            .filter_map(|r| {
                r.get("display")
                    .or_else(|| r.get("reference"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    };
    for (label, key) in [
        ("Referral", "basedOn"),
        ("Patient", "subject"),
        ("Specialist", "resultsInterpreter"),
        ("Imaging reviewed", "imagingStudy"),
    ] {
        let values = refs(key);
        if !values.is_empty() {
            out.push((false, format!("{label}: {}", values.join(", "))));
        }
    }
    out.push((false, String::new()));
    if let Some(conclusion) = report.get("conclusion").and_then(Value::as_str) {
        out.push((true, "Conclusion".to_owned()));
        out.extend(conclusion.lines().map(|l| (false, l.to_owned())));
        out.push((false, String::new()));
    }
    let coded: Vec<String> = items(Some(report), "conclusionCode")
        .filter_map(|c| text(Some(c)))
        .collect();
    if !coded.is_empty() {
        out.push((true, "Coded conclusion".to_owned()));
        out.extend(coded.into_iter().map(|c| (false, format!("- {c}"))));
        out.push((false, String::new()));
    }
    for section in extensions(Some(report), OPINION_SECTION) {
        let part = |name: &'static str| extensions(Some(section), name).next();
        let kind = part("kind")
            .and_then(|e| e.get("valueCode"))
            .and_then(Value::as_str)
            .unwrap_or("section");
        out.push((true, section_title(kind).to_owned()));
        if let Some(answer) = part("answer").and_then(|e| text(e.get("valueCodeableConcept"))) {
            out.push((false, format!("Answer: {answer}")));
        }
        if let Some(body) = part("text")
            .and_then(|e| e.get("valueString"))
            .and_then(Value::as_str)
        {
            out.extend(body.lines().map(|l| (false, l.to_owned())));
        }
        out.push((false, String::new()));
    }
    out
}

/// Wrap at word boundaries.
fn wrap(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for word in line.split_whitespace() {
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > WRAP {
            out.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    out.push(current);
    out
}

/// WinAnsi bytes of a text (Latin-1 covers what the standard font shows;
/// anything else becomes '?').
fn win_ansi(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| match c as u32 {
            0x20..=0x7E | 0xA0..=0xFF => c as u32 as u8,
            0x2019 => b'\'',
            0x201C | 0x201D => b'"',
            0x2013 | 0x2014 => b'-',
            _ => b'?',
        })
        .collect()
}

/// Render the opinion.
pub fn render_opinion(report: &Value, issued: &str) -> Vec<u8> {
    let mut wrapped: Vec<(bool, String)> = Vec::new();
    for (bold, line) in lines(report, issued) {
        wrapped.extend(wrap(&line).into_iter().map(|l| (bold, l)));
    }
    let per_page = ((PAGE_H - 2.0 * MARGIN) / LEADING) as usize;
    let pages: Vec<&[(bool, String)]> = wrapped.chunks(per_page.max(1)).collect();

    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let regular = Ref::new(3);
    let bold = Ref::new(4);
    let first_page = 5;
    let page_ids: Vec<Ref> = (0..pages.len())
        .map(|i| Ref::new(first_page + 2 * i as i32))
        .collect();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree)
        .kids(page_ids.iter().copied())
        .count(pages.len() as i32);
    for (i, lines) in pages.iter().enumerate() {
        let page_id = page_ids[i];
        let content_id = Ref::new(page_id.get() + 1);
        let mut page = pdf.page(page_id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H));
        page.parent(tree);
        page.contents(content_id);
        {
            let mut resources = page.resources();
            let mut fonts = resources.fonts();
            fonts.pair(Name(b"F1"), regular);
            fonts.pair(Name(b"F2"), bold);
        }
        page.finish();
        let mut content = Content::new();
        content.begin_text();
        content.set_leading(LEADING);
        content.next_line(MARGIN, PAGE_H - MARGIN);
        for (is_bold, line) in lines.iter() {
            let font = if *is_bold { Name(b"F2") } else { Name(b"F1") };
            content.set_font(font, if *is_bold { SIZE + 1.5 } else { SIZE });
            content.show(Str(&win_ansi(line)));
            content.next_line_using_leading();
        }
        content.end_text();
        pdf.stream(content_id, &content.finish());
    }
    pdf.type1_font(regular)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(bold)
        .base_font(Name(b"Helvetica-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_opinion_pdf_is_a_pdf_with_every_section() {
        let report = json!({
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": {"text": "Oncology second opinion"},
            "conclusion": "We agree with the staging.",
            "extension": [{
                "url": OPINION_SECTION,
                "extension": [
                    {"url": "kind", "valueCode": "recommendations"},
                    {"url": "text", "valueString": "Consider PET-CT before surgery. ".repeat(40)},
                ]
            }]
        });
        let pdf = render_opinion(&report, "2026-11-24T10:00:00.000Z");
        assert!(pdf.starts_with(b"%PDF-"));
        let text = String::from_utf8_lossy(&pdf);
        assert!(text.contains("We agree with the staging."));
        assert!(text.contains("Recommendations"));
        assert!(text.contains("Helvetica"));
    }

    #[test]
    fn long_text_wraps_and_non_latin_is_replaced() {
        assert!(wrap(&"word ".repeat(100)).iter().all(|l| l.len() <= WRAP));
        assert_eq!(win_ansi("Müller – ok ✓"), b"M\xfcller - ok ?".to_vec());
    }
}
