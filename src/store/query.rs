//! Searching the index (what QIDO-RS answers from) and finding the stored
//! objects of a study, series or instance (what WADO-RS streams).
//!
//! The searchable and returnable attributes are one table, [`ATTRIBUTES`]:
//! each names its DICOM keyword, tag and VR, the level it belongs to and the
//! SQL expression that yields it, so matching, includefield and the answer
//! all follow from the same row.

use dicom_core::{Tag, VR};

use super::BlobLocation;
use crate::ids::{PartnerId, Uid};

/// A QIDO query or answer level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Study,
    Series,
    Instance,
}

/// One attribute the index can match on or return.
#[derive(Debug)]
pub struct Attribute {
    pub keyword: &'static str,
    pub tag: Tag,
    pub vr: VR,
    pub level: Level,
    /// SQL yielding the value; `s` is the study row, `r` the series row,
    /// `i` the instance row. (Instance counts name their index: otherwise
    /// SQLite 3.46 computes count(DISTINCT sop_instance_uid) by walking the
    /// partner's whole (partner, sop_instance_uid) key, which took seconds
    /// per study on a 100,000-instance index.)
    pub sql: &'static str,
    /// Returned without being asked for (PS3.18 Table 10.6.3-3 and friends).
    pub default: bool,
}

macro_rules! attribute {
    ($kw:literal, $g:literal, $e:literal, $vr:ident, $level:ident, $sql:literal, $default:literal) => {
        Attribute {
            keyword: $kw,
            tag: Tag($g, $e),
            vr: VR::$vr,
            level: Level::$level,
            sql: $sql,
            default: $default,
        }
    };
}

/// Everything the index holds, by level.
pub static ATTRIBUTES: &[Attribute] = &[
    attribute!("SpecificCharacterSet", 0x0008, 0x0005, CS, Study, "s.specific_character_set", true),
    attribute!("StudyDate", 0x0008, 0x0020, DA, Study, "s.study_date", true),
    attribute!("StudyTime", 0x0008, 0x0030, TM, Study, "s.study_time", true),
    attribute!("AccessionNumber", 0x0008, 0x0050, SH, Study, "s.accession_number", true),
    attribute!("ModalitiesInStudy", 0x0008, 0x0061, CS, Study,
        "(SELECT group_concat(DISTINCT x.modality) FROM series x WHERE x.partner = s.partner AND x.study_uid = s.study_uid)", true),
    attribute!("ReferringPhysicianName", 0x0008, 0x0090, PN, Study, "s.referring_physician_name", true),
    attribute!("StudyDescription", 0x0008, 0x1030, LO, Study, "s.study_description", false),
    attribute!("PatientName", 0x0010, 0x0010, PN, Study, "s.patient_name", true),
    attribute!("PatientID", 0x0010, 0x0020, LO, Study, "s.patient_id", true),
    attribute!("IssuerOfPatientID", 0x0010, 0x0021, LO, Study, "s.issuer_of_patient_id", false),
    attribute!("PatientBirthDate", 0x0010, 0x0030, DA, Study, "s.patient_birth_date", true),
    attribute!("PatientSex", 0x0010, 0x0040, CS, Study, "s.patient_sex", true),
    attribute!("StudyInstanceUID", 0x0020, 0x000D, UI, Study, "s.study_uid", true),
    attribute!("StudyID", 0x0020, 0x0010, SH, Study, "s.study_id", true),
    attribute!("NumberOfStudyRelatedSeries", 0x0020, 0x1206, IS, Study,
        "CAST((SELECT count(*) FROM series x WHERE x.partner = s.partner AND x.study_uid = s.study_uid) AS TEXT)", true),
    attribute!("NumberOfStudyRelatedInstances", 0x0020, 0x1208, IS, Study,
        "CAST((SELECT count(DISTINCT x.sop_instance_uid) FROM instances x INDEXED BY instances_by_study WHERE x.partner = s.partner AND x.study_uid = s.study_uid) AS TEXT)", true),
    attribute!("Modality", 0x0008, 0x0060, CS, Series, "r.modality", true),
    attribute!("SeriesDate", 0x0008, 0x0021, DA, Series, "r.series_date", false),
    attribute!("SeriesTime", 0x0008, 0x0031, TM, Series, "r.series_time", false),
    attribute!("SeriesDescription", 0x0008, 0x103E, LO, Series, "r.series_description", true),
    attribute!("BodyPartExamined", 0x0018, 0x0015, CS, Series, "r.body_part_examined", false),
    attribute!("SeriesInstanceUID", 0x0020, 0x000E, UI, Series, "r.series_uid", true),
    attribute!("SeriesNumber", 0x0020, 0x0011, IS, Series, "CAST(r.series_number AS TEXT)", true),
    attribute!("NumberOfSeriesRelatedInstances", 0x0020, 0x1209, IS, Series,
        "CAST((SELECT count(DISTINCT x.sop_instance_uid) FROM instances x INDEXED BY instances_by_series WHERE x.partner = r.partner AND x.series_uid = r.series_uid) AS TEXT)", true),
    attribute!("SOPClassUID", 0x0008, 0x0016, UI, Instance, "i.sop_class_uid", true),
    attribute!("SOPInstanceUID", 0x0008, 0x0018, UI, Instance, "i.sop_instance_uid", true),
    attribute!("AvailableTransferSyntaxUID", 0x0008, 0x3002, UI, Instance, "i.transfer_syntax", false),
    attribute!("InstanceNumber", 0x0020, 0x0013, IS, Instance, "CAST(i.instance_number AS TEXT)", true),
    attribute!("NumberOfFrames", 0x0028, 0x0008, IS, Instance, "CAST(i.number_of_frames AS TEXT)", true),
    attribute!("Rows", 0x0028, 0x0010, US, Instance, "CAST(i.rows AS TEXT)", true),
    attribute!("Columns", 0x0028, 0x0011, US, Instance, "CAST(i.columns AS TEXT)", true),
];

impl Attribute {
    /// Computed from other rows (counts, ModalitiesInStudy).
    pub fn is_aggregate(&self) -> bool {
        self.sql.contains("SELECT")
    }
}

/// The attribute with this keyword or tag.
pub fn attribute_by_keyword(keyword: &str) -> Option<&'static Attribute> {
    ATTRIBUTES.iter().find(|a| a.keyword == keyword)
}

pub fn attribute_by_tag(tag: Tag) -> Option<&'static Attribute> {
    ATTRIBUTES.iter().find(|a| a.tag == tag)
}

/// How one attribute is matched (PS3.4 C.2.2.2, as PS3.18 8.3.4 uses it).
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// Single value matching (case-sensitive, except person names).
    Exact(String),
    /// `*` and `?` wildcards.
    Wildcard(String),
    /// A list of values (UIDs, modalities), any of which matches.
    AnyOf(Vec<String>),
    /// A date or time range; either end may be open. Bounds are compared
    /// as text, which orders DA and TM values correctly.
    Range(Option<String>, Option<String>),
    /// Person name, fuzzy: any name component starting with the value.
    Fuzzy(String),
}

/// One search condition.
#[derive(Debug, Clone)]
pub struct Condition {
    pub attribute: &'static Attribute,
    pub matcher: Matcher,
}

/// A search of the index.
#[derive(Debug, Clone)]
pub struct Search {
    pub level: Level,
    /// Whose data to search: the caller's partner, or every partner for staff.
    pub partners: Vec<PartnerId>,
    pub conditions: Vec<Condition>,
    pub limit: u32,
    pub offset: u32,
}

/// One answer: the values of the attributes at or above the search level,
/// in [`ATTRIBUTES`] order (see [`Search::columns`]).
#[derive(Debug, Clone)]
pub struct SearchRow {
    pub values: Vec<Option<String>>,
}

impl Search {
    /// The attributes each [`SearchRow`] carries, in order: those of the
    /// search level and above, except the counts and lists of higher levels
    /// (a series' NumberOfStudyRelatedInstances is not asked of a series
    /// search, and computing it per row would cost a subquery each).
    pub fn columns(&self) -> impl Iterator<Item = &'static Attribute> + '_ {
        ATTRIBUTES
            .iter()
            .filter(move |a| a.level == self.level || (a.level < self.level && !a.is_aggregate()))
    }
}

/// Everything needed to stream one stored instance or to serve its
/// metadata and frames.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    pub id: i64,
    pub study_uid: Uid,
    pub series_uid: Uid,
    pub sop_instance_uid: Uid,
    pub sop_class_uid: Uid,
    pub transfer_syntax: Uid,
    pub received_at_ms: i64,
    pub dataset_sha256: String,
    pub blob: BlobLocation,
}

/// Which stored instances to find: a study, optionally narrowed to a series
/// and an instance.
#[derive(Debug, Clone)]
pub struct Locate {
    /// Whose data to look in, as for [`Search::partners`].
    pub partners: Vec<PartnerId>,
    pub study_uid: Uid,
    pub series_uid: Option<Uid>,
    pub sop_instance_uid: Option<Uid>,
}

/// Escape `%`, `_` and the escape character for a LIKE pattern.
pub(crate) fn like_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A DICOM wildcard value (`*`, `?`) as a LIKE pattern.
pub(crate) fn like_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A DICOM wildcard value as a (case-sensitive) GLOB pattern: `*` and `?`
/// mean the same; `[` must be quoted.
pub(crate) fn glob_pattern(value: &str) -> String {
    value.replace('[', "[[]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_table_has_unique_keywords_and_tags() {
        for (n, a) in ATTRIBUTES.iter().enumerate() {
            for b in &ATTRIBUTES[n + 1..] {
                assert_ne!(a.keyword, b.keyword);
                assert_ne!(a.tag, b.tag);
            }
        }
        assert_eq!(
            attribute_by_keyword("PatientName").map(|a| a.tag),
            Some(Tag(0x0010, 0x0010))
        );
    }

    #[test]
    fn patterns_quote_sql_metacharacters() {
        assert_eq!(like_pattern("Do*e?_%"), "Do%e_\\_\\%");
        assert_eq!(like_literal("a%b"), "a\\%b");
        assert_eq!(glob_pattern("CT[1]*"), "CT[[]1]*");
    }
}
