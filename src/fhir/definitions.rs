//! The FHIR R4 core definitions the validator works from: the
//! StructureDefinition snapshots and required-binding ValueSet expansions that
//! `conformance/fhir/extract_r4_profiles.py` extracts into `profiles/r4/`,
//! compiled once into lookup tables.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

const STRUCTURE_DEFINITIONS: &str = include_str!("../../profiles/r4/structure-definitions.json");
const REQUIRED_VALUE_SETS: &str = include_str!("../../profiles/r4/valuesets-required.json");

const FHIR_TYPE_EXTENSION: &str =
    "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type";
const REGEX_EXTENSION: &str = "http://hl7.org/fhir/StructureDefinition/regex";
const CORE_PREFIX: &str = "http://hl7.org/fhir/StructureDefinition/";

/// What kind of thing a type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Primitive,
    Complex,
    Resource,
}

/// How a primitive is written in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonForm {
    Boolean,
    /// A JSON number without fraction or exponent, in the 32-bit range.
    Integer,
    Decimal,
    String,
}

/// The value rule of a primitive type.
#[derive(Debug)]
pub struct Primitive {
    pub json: JsonForm,
    /// The spec's regex, anchored; `None` where the spec gives none (xhtml)
    /// or where a dedicated check replaces it (base64Binary).
    pub regex: Option<Regex>,
}

/// Upper cardinality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Max {
    Count(u32),
    Unbounded,
}

impl Max {
    pub fn repeats(self) -> bool {
        self != Max::Count(1) && self != Max::Count(0)
    }
}

/// One allowed type of an element.
#[derive(Debug, Clone)]
pub struct TypeRef {
    /// FHIR type name (`string`, `HumanName`, `Reference`, `Resource`, ...).
    pub code: String,
    /// For Reference / canonical: the resource types it may point at (empty:
    /// any).
    pub targets: Vec<String>,
}

/// A child of an element, as it is named in JSON.
#[derive(Debug, Clone, Copy)]
pub struct Child {
    pub element: usize,
    /// For a choice element (`value[x]`): which of its types this JSON name
    /// selects (`valueString` selects `string`).
    pub type_index: usize,
}

/// One element of a snapshot.
#[derive(Debug)]
pub struct Element {
    /// `Patient.contact.name`.
    pub path: String,
    /// The element's name without `[x]`.
    pub name: String,
    pub min: u32,
    pub max: Max,
    pub types: Vec<TypeRef>,
    pub choice: bool,
    /// Children defined inline (BackboneElement, Element), by JSON name.
    pub children: HashMap<String, Child>,
    /// The inline children with min > 0.
    pub required: Vec<usize>,
    /// `contentReference`: this element has the children of that one.
    pub content_ref: Option<usize>,
    /// Required binding: the ValueSet URL (without version).
    pub required_binding: Option<String>,
    pub summary: bool,
    /// Invariants (`constraint` with severity error) checked by FHIRPath.
    pub constraints: Vec<Constraint>,
}

/// One invariant of an element.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub key: String,
    pub human: String,
    pub expression: String,
}

/// Invariants not evaluated by FHIRPath, and why.
const NOT_EVALUATED: &[&str] = &[
    // "All FHIR elements must have a @value or children": the structural
    // check refuses empty objects and strings already, for every element.
    "ele-1",
    // "Must have either extensions or value[x], not both": checked on every
    // Extension structurally (an extension is url + one of them).
    "ext-1",
    // Contained resources must be referenced: checked structurally, as the
    // FHIRPath form needs `as(canonical)`, i.e. a type model.
    "dom-3",
    // Need a type model (`is Boolean` on a choice, ElementDefinition path
    // typing) that the engine runs without; false on valid official
    // examples. None is on a type this server serves.
    "que-7", "sdf-4", "sdf-8", "sdf-8a", "tst-5",
];

/// One compiled StructureDefinition.
#[derive(Debug)]
pub struct TypeDef {
    pub name: String,
    pub kind: Kind,
    pub is_abstract: bool,
    /// Snapshot elements; `elements[0]` is the root.
    pub elements: Vec<Element>,
    pub primitive: Option<Primitive>,
}

impl TypeDef {
    /// The element whose children describe the content of `element`: itself,
    /// or what its `contentReference` points at.
    pub fn content_of(&self, element: usize) -> usize {
        self.elements[element].content_ref.unwrap_or(element)
    }
}

/// Codes of a required ValueSet.
#[derive(Debug)]
pub enum Codes {
    /// (system, code) pairs, plus the bare codes for `code` elements.
    Listed {
        pairs: HashSet<(String, String)>,
        codes: HashSet<String>,
    },
    /// Drawn from a code system that cannot be listed (MIME types, UCUM,
    /// currencies): only syntax is checked.
    Open,
}

/// All definitions.
#[derive(Debug)]
pub struct Definitions {
    types: HashMap<String, TypeDef>,
    value_sets: HashMap<String, Codes>,
}

/// Why the embedded definitions could not be compiled (a build defect).
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("profiles/r4 is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("profiles/r4: {0}")]
    Shape(String),
}

impl Definitions {
    /// The compiled core definitions, built on first use.
    pub fn core() -> &'static Definitions {
        static CORE: OnceLock<Definitions> = OnceLock::new();
        CORE.get_or_init(|| match Definitions::compile() {
            Ok(defs) => defs,
            // The input is a file of this repository, checked by tests.
            Err(e) => panic!("embedded FHIR definitions are broken: {e}"),
        })
    }

    fn compile() -> Result<Definitions, DefinitionError> {
        // One entry at a time: the parsed JSON of all definitions at once
        // would set the process's peak memory for good (3.5 MB of text is
        // tens of MB as values), for a structure that is much smaller.
        let mut types = HashMap::new();
        for raw in raw_entries(STRUCTURE_DEFINITIONS)? {
            let sd: Value = serde_json::from_str(raw.get())?;
            // Core type profiles (SimpleQuantity) constrain a base type: the
            // base type's definition is what the validator walks.
            if sd["derivation"] == "constraint" {
                continue;
            }
            let def = compile_type(&sd)?;
            types.insert(def.name.clone(), def);
        }
        let ours = super::profiles::VALUE_SETS.iter().copied();
        let required = raw_entries(REQUIRED_VALUE_SETS)?;
        let mut value_sets = HashMap::new();
        for text in required.iter().map(|r| r.get()).chain(ours) {
            let set: Value = serde_json::from_str(text)?;
            let url = str_of(&set, "url")?;
            let codes = match set.get("expansion") {
                None => Codes::Open,
                Some(expansion) => {
                    let mut pairs = HashSet::new();
                    let mut codes = HashSet::new();
                    for c in expansion["contains"].as_array().into_iter().flatten() {
                        let code = str_of(c, "code")?;
                        codes.insert(code.to_owned());
                        pairs.insert((str_of(c, "system")?.to_owned(), code.to_owned()));
                    }
                    Codes::Listed { pairs, codes }
                }
            };
            value_sets.insert(url.to_owned(), codes);
        }
        Ok(Definitions { types, value_sets })
    }

    pub fn get(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    /// A concrete resource type of FHIR R4.
    pub fn resource(&self, name: &str) -> Option<&TypeDef> {
        self.types
            .get(name)
            .filter(|t| t.kind == Kind::Resource && !t.is_abstract)
    }

    pub fn value_set(&self, url: &str) -> Option<&Codes> {
        self.value_sets.get(url)
    }
}

/// The resources of a Bundle text, unparsed.
fn raw_entries(bundle: &str) -> Result<Vec<&serde_json::value::RawValue>, DefinitionError> {
    #[derive(serde::Deserialize)]
    struct Bundle<'a> {
        #[serde(borrow)]
        entry: Vec<Entry<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Entry<'a> {
        #[serde(borrow)]
        resource: &'a serde_json::value::RawValue,
    }
    let bundle: Bundle<'_> = serde_json::from_str(bundle)?;
    Ok(bundle.entry.into_iter().map(|e| e.resource).collect())
}

fn str_of<'a>(v: &'a Value, key: &str) -> Result<&'a str, DefinitionError> {
    v[key]
        .as_str()
        .ok_or_else(|| DefinitionError::Shape(format!("missing {key}")))
}

fn compile_type(sd: &Value) -> Result<TypeDef, DefinitionError> {
    let name = str_of(sd, "type")?.to_owned();
    let kind = match str_of(sd, "kind")? {
        "primitive-type" => Kind::Primitive,
        "complex-type" => Kind::Complex,
        "resource" => Kind::Resource,
        other => return Err(DefinitionError::Shape(format!("{name}: kind {other}"))),
    };
    let raw = sd["snapshot"]["element"]
        .as_array()
        .ok_or_else(|| DefinitionError::Shape(format!("{name}: no snapshot")))?;
    let mut elements = Vec::with_capacity(raw.len());
    let mut primitive_regex = None;
    for e in raw {
        let path = str_of(e, "path")?.to_owned();
        let last = path.rsplit('.').next().unwrap_or(&path);
        let choice = last.ends_with("[x]");
        let types = e["type"]
            .as_array()
            .into_iter()
            .flatten()
            .map(type_ref)
            .collect::<Result<Vec<_>, _>>()?;
        if kind == Kind::Primitive && path == format!("{name}.value") {
            primitive_regex = e["type"][0]["extension"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["url"] == REGEX_EXTENSION)
                .and_then(|x| x["valueString"].as_str())
                .map(str::to_owned);
        }
        let binding = &e["binding"];
        let required_binding = (binding["strength"] == "required")
            .then(|| binding["valueSet"].as_str())
            .flatten()
            .map(|url| url.split('|').next().unwrap_or(url).to_owned());
        elements.push(Element {
            name: last.trim_end_matches("[x]").to_owned(),
            min: e["min"].as_u64().unwrap_or(0) as u32,
            max: match e["max"].as_str() {
                Some("*") | None => Max::Unbounded,
                Some(n) => Max::Count(
                    n.parse()
                        .map_err(|_| DefinitionError::Shape(format!("{path}: max {n}")))?,
                ),
            },
            types,
            choice,
            children: HashMap::new(),
            required: Vec::new(),
            content_ref: None,
            required_binding,
            summary: e["isSummary"].as_bool().unwrap_or(false),
            constraints: constraints_of(e),
            path,
        });
    }
    // Link children to parents and resolve content references.
    let by_path: HashMap<String, usize> = elements
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    for (i, e) in raw.iter().enumerate() {
        if let Some(reference) = e["contentReference"].as_str() {
            let target = reference.trim_start_matches('#');
            elements[i].content_ref = Some(*by_path.get(target).ok_or_else(|| {
                DefinitionError::Shape(format!("{}: bad contentReference", elements[i].path))
            })?);
        }
    }
    for i in 1..elements.len() {
        let path = elements[i].path.clone();
        let Some((parent_path, _)) = path.rsplit_once('.') else {
            continue;
        };
        let Some(&parent) = by_path.get(parent_path) else {
            continue;
        };
        let child = &elements[i];
        let mut names = Vec::new();
        if child.choice {
            for (t, ty) in child.types.iter().enumerate() {
                names.push((format!("{}{}", child.name, capitalise(&ty.code)), t));
            }
        } else {
            names.push((child.name.clone(), 0));
        }
        let required = child.min > 0;
        let parent = &mut elements[parent];
        for (json_name, type_index) in names {
            parent.children.insert(
                json_name,
                Child {
                    element: i,
                    type_index,
                },
            );
        }
        if required {
            parent.required.push(i);
        }
    }
    let primitive = (kind == Kind::Primitive).then(|| Primitive {
        json: match name.as_str() {
            "boolean" => JsonForm::Boolean,
            "integer" | "positiveInt" | "unsignedInt" => JsonForm::Integer,
            "decimal" => JsonForm::Decimal,
            _ => JsonForm::String,
        },
        regex: match name.as_str() {
            // Checked by decoding: the spec's regex backtracks badly on
            // megabytes of data.
            "base64Binary" => None,
            _ => primitive_regex
                .and_then(|r| Regex::new(&format!("^(?:{})$", java_classes(&r))).ok()),
        },
    });
    Ok(TypeDef {
        name,
        kind,
        is_abstract: sd["abstract"].as_bool().unwrap_or(false),
        elements,
        primitive,
    })
}

fn constraints_of(element: &Value) -> Vec<Constraint> {
    element["constraint"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["severity"] == "error")
        .filter_map(|c| {
            let key = c["key"].as_str()?;
            if NOT_EVALUATED.contains(&key) {
                return None;
            }
            Some(Constraint {
                key: key.to_owned(),
                human: c["human"].as_str().unwrap_or("").to_owned(),
                expression: c["expression"].as_str()?.to_owned(),
            })
        })
        .collect()
}

fn type_ref(t: &Value) -> Result<TypeRef, DefinitionError> {
    let code = str_of(t, "code")?;
    // Snapshot elements such as `id` are typed System.String with the FHIR
    // type in an extension.
    let code = if code.starts_with("http://hl7.org/fhirpath/System.") {
        t["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["url"] == FHIR_TYPE_EXTENSION)
            .and_then(|x| x["valueUrl"].as_str())
            .unwrap_or("string")
    } else {
        code
    };
    let targets = t["targetProfile"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .filter_map(|p| p.strip_prefix(CORE_PREFIX))
        .filter(|p| *p != "Resource")
        .map(str::to_owned)
        .collect();
    Ok(TypeRef {
        code: code.to_owned(),
        targets,
    })
}

/// The spec's regexes are Java regexes, where `\s` and `\S` are ASCII-only
/// (a no-break space is `\S`); in Rust they are Unicode-aware.
fn java_classes(regex: &str) -> String {
    regex
        .replace("\\S", "[^ \\t\\n\\x0B\\f\\r]")
        .replace("\\s", "[ \\t\\n\\x0B\\f\\r]")
}

/// `dateTime` → `DateTime`: the suffix of a choice element's JSON name.
pub fn capitalise(code: &str) -> String {
    let mut chars = code.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_definitions_compile() {
        let defs = Definitions::core();
        let task = defs.resource("Task").expect("Task");
        let root = &task.elements[0];
        let status = root.children["status"].element;
        assert_eq!(task.elements[status].min, 1);
        assert_eq!(
            task.elements[status].required_binding.as_deref(),
            Some("http://hl7.org/fhir/ValueSet/task-status")
        );
        // Choice element names.
        let input = root.children["input"].element;
        assert!(task.elements[input].children.contains_key("valueString"));
        // Content references.
        let bundle = defs.resource("Bundle").expect("Bundle");
        let entry = bundle.elements[0].children["entry"].element;
        let link = bundle.elements[entry].children["link"].element;
        assert_eq!(bundle.elements[bundle.content_of(link)].path, "Bundle.link");
        assert!(defs.resource("Resource").is_none(), "abstract");
        let date = defs
            .get("date")
            .and_then(|d| d.primitive.as_ref())
            .expect("date");
        assert!(date.regex.as_ref().is_some_and(|r| r.is_match("2024-02")));
        assert!(!date.regex.as_ref().is_some_and(|r| r.is_match("2024-13")));
        match defs.value_set("http://hl7.org/fhir/ValueSet/task-status") {
            Some(Codes::Listed { codes, .. }) => assert!(codes.contains("in-progress")),
            other => panic!("task-status: {other:?}"),
        }
    }
}
