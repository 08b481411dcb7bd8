//! Validation of a FHIR R4 JSON resource against the core StructureDefinition
//! snapshots (see [`super::definitions`]): unknown elements, cardinality,
//! JSON shape (array or single), types, primitive formats (the spec's
//! regexes), choice exclusivity, empty values, required-binding codes and
//! reference format. Every finding names the element by FHIRPath.
//!
//! The resource is checked as submitted, as `serde_json` values whose numbers
//! keep their lexical form (`arbitrary_precision`), so `1.50` is checked and
//! stored as `1.50`.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::definitions::{
    Codes, Constraint, Definitions, Element, JsonForm, Kind, TypeDef, TypeRef,
};
use super::outcome::Issue;

/// Validate `resource`'s structure (everything but the FHIRPath
/// invariants); with `expected_type`, its `resourceType` must be that.
/// Returns every finding, in document order.
pub fn validate(defs: &Definitions, resource: &Value, expected_type: Option<&str>) -> Vec<Issue> {
    structure(defs, resource, expected_type).0
}

/// Validate `resource` completely: structure, then, if that holds, the
/// invariants of every element present.
pub async fn validate_full(
    defs: &'static Definitions,
    resource: &Value,
    expected_type: Option<&str>,
) -> Vec<Issue> {
    let (mut issues, checks) = structure(defs, resource, expected_type);
    if !issues.iter().any(Issue::is_error) {
        issues.extend(super::invariants::evaluate(resource, &checks).await);
    }
    issues
}

/// The structural findings, and the invariants to evaluate.
pub fn structure<'d>(
    defs: &'d Definitions,
    resource: &Value,
    expected_type: Option<&str>,
) -> (Vec<Issue>, Vec<InvariantCheck<'d>>) {
    let mut walk = Walk {
        defs,
        issues: Vec::new(),
        checks: Vec::new(),
        resource: String::new(),
    };
    if let (Some(expected), Some(found)) = (
        expected_type,
        resource.get("resourceType").and_then(Value::as_str),
    ) {
        if expected != found {
            walk.issues.push(
                Issue::error(
                    "invalid",
                    format!(
                        "resourceType is {found}, but this request is for {expected}: send a {expected}"
                    ),
                )
                .at(found),
            );
            return (walk.issues, Vec::new());
        }
    }
    let root = Loc {
        path: String::new(),
        pointer: String::new(),
    };
    walk.resource(resource, &root);
    (walk.issues, walk.checks)
}

/// Whether `code` (of `system`, if given) is in `value_set`. A value set
/// that cannot be enumerated (or is not shipped) allows every code: its
/// syntax was checked already.
fn code_allowed(defs: &Definitions, value_set: &str, system: Option<&str>, code: &str) -> bool {
    match defs.value_set(value_set) {
        Some(Codes::Listed { pairs, codes }) => match system {
            Some(system) => pairs.contains(&(system.to_owned(), code.to_owned())),
            None => codes.contains(code),
        },
        Some(Codes::Open) | None => true,
    }
}

/// Whether a code, Coding or CodeableConcept (any of its codings) is in
/// `value_set`; anything is, for a value set that cannot be enumerated.
pub fn in_value_set(defs: &Definitions, value_set: &str, value: &Value) -> bool {
    if !matches!(defs.value_set(value_set), Some(Codes::Listed { .. })) {
        return true;
    }
    let coding_ok = |c: &Value| {
        c.get("code").and_then(Value::as_str).is_some_and(|code| {
            code_allowed(
                defs,
                value_set,
                c.get("system").and_then(Value::as_str),
                code,
            )
        })
    };
    match value {
        Value::String(code) => code_allowed(defs, value_set, None, code),
        Value::Object(o) if o.contains_key("coding") => o["coding"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(coding_ok)),
        Value::Object(_) => coding_ok(value),
        _ => false,
    }
}

/// Whether `id` is a valid logical id (`[A-Za-z0-9\-\.]{1,64}`).
/// A relative reference to a resource: `Type/id` or `Type/id/_history/v`,
/// with a type these definitions know.
pub fn is_resource_reference(defs: &Definitions, reference: &str) -> bool {
    let mut parts = reference.split('/');
    let type_ok = parts.next().is_some_and(|t| defs.resource(t).is_some());
    let id_ok = parts.next().is_some_and(is_valid_id);
    type_ok
        && id_ok
        && match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => true,
            (Some("_history"), Some(version), None) => is_valid_id(version),
            _ => false,
        }
}

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Where a value is: as FHIRPath (for issues) and as JSON pointer (for
/// evaluating invariants there).
#[derive(Debug, Clone)]
struct Loc {
    path: String,
    pointer: String,
}

impl Loc {
    /// Child element: FHIRPath `name` (e.g. `value.ofType(string)`), JSON
    /// key `key`.
    fn child(&self, name: &str, key: &str) -> Loc {
        Loc {
            path: format!("{}.{name}", self.path),
            pointer: format!("{}/{key}", self.pointer),
        }
    }

    fn index(&self, i: usize) -> Loc {
        Loc {
            path: format!("{}[{i}]", self.path),
            pointer: format!("{}/{i}", self.pointer),
        }
    }

    /// `path.name[i]`, for an issue only.
    fn index_path(&self, name: &str, i: usize) -> String {
        format!("{}.{name}[{i}]", self.path)
    }

    /// A FHIRPath below this one, for an issue only.
    fn sub(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }
}

/// Invariants to evaluate at one place of the resource.
#[derive(Debug)]
pub struct InvariantCheck<'d> {
    /// JSON pointer of the resource the focus is in ("" for the top one; a
    /// contained or Bundle entry resource is its own `%resource`).
    pub resource: String,
    /// JSON pointer of the focus within that resource.
    pub pointer: String,
    /// FHIRPath of the focus, for the issue.
    pub path: String,
    /// The focus's FHIR type, when it is a data type.
    pub type_name: Option<String>,
    pub constraints: Vec<&'d Constraint>,
}

struct Walk<'d> {
    defs: &'d Definitions,
    issues: Vec<Issue>,
    checks: Vec<InvariantCheck<'d>>,
    /// JSON pointer of the resource being walked.
    resource: String,
}

impl<'d> Walk<'d> {
    fn error(&mut self, code: &'static str, path: &str, diagnostics: String) {
        self.issues.push(Issue::error(code, diagnostics).at(path));
    }

    fn check(&mut self, at: &Loc, type_name: Option<&str>, constraints: &'d [Constraint]) {
        if constraints.is_empty() {
            return;
        }
        self.checks.push(InvariantCheck {
            resource: self.resource.clone(),
            pointer: at
                .pointer
                .strip_prefix(self.resource.as_str())
                .unwrap_or(&at.pointer)
                .to_owned(),
            path: at.path.clone(),
            type_name: type_name.map(str::to_owned),
            constraints: constraints.iter().collect(),
        });
    }

    /// A resource at `at` (path "" for the root).
    fn resource(&mut self, value: &Value, at: &Loc) {
        let shown = if at.path.is_empty() {
            "Resource"
        } else {
            at.path.as_str()
        };
        let Some(obj) = value.as_object() else {
            self.error(
                "structure",
                shown,
                "a resource must be a JSON object".to_owned(),
            );
            return;
        };
        let Some(type_name) = obj.get("resourceType").and_then(Value::as_str) else {
            self.error(
                "required",
                &format!("{shown}.resourceType"),
                "resourceType is missing: every resource names its type".to_owned(),
            );
            return;
        };
        let defs = self.defs;
        let Some(def) = defs.resource(type_name) else {
            self.error(
                "not-supported",
                &format!("{shown}.resourceType"),
                format!("'{type_name}' is not a FHIR R4 resource type"),
            );
            return;
        };
        let base = Loc {
            path: if at.path.is_empty() {
                type_name.to_owned()
            } else {
                at.path.clone()
            },
            pointer: at.pointer.clone(),
        };
        if let Some(id) = obj.get("id") {
            if !id.as_str().is_some_and(is_valid_id) {
                self.error(
                    "value",
                    &base.sub("id"),
                    format!("id {id} is not a valid logical id (1-64 of A-Z a-z 0-9 - .)"),
                );
            }
        }
        // A Bundle entry (or parameter) is its own %resource; a contained
        // resource is evaluated in its container (%rootResource).
        let contained = at.pointer.rsplit('/').nth(1) == Some("contained");
        let own = if contained {
            self.resource.clone()
        } else {
            base.pointer.clone()
        };
        let outer = std::mem::replace(&mut self.resource, own);
        self.check(&base, None, &def.elements[0].constraints);
        self.contained_are_referenced(obj, &base);
        self.object(obj, def, 0, &base, true);
        self.resource = outer;
    }

    /// dom-3, checked here rather than by FHIRPath (whose `as(canonical)`
    /// needs a type model): every contained resource is referred to from
    /// the rest of the resource or its narrative (`#id`), or refers to the
    /// container (`#`).
    fn contained_are_referenced(&mut self, obj: &Map<String, Value>, at: &Loc) {
        let Some(contained) = obj.get("contained").and_then(Value::as_array) else {
            return;
        };
        fn strings<'v>(v: &'v Value, out: &mut HashSet<&'v str>) {
            match v {
                Value::String(s) if s.starts_with('#') => {
                    out.insert(s.as_str());
                }
                Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
                Value::Object(o) => o.values().for_each(|x| strings(x, out)),
                _ => {}
            }
        }
        let mut outside = HashSet::new();
        for (k, v) in obj {
            if k != "contained" {
                strings(v, &mut outside);
            }
        }
        // What each contained resource refers to: references between
        // contained resources count (R4 dom-3 looks at all descendants).
        let inner: Vec<HashSet<&str>> = contained
            .iter()
            .map(|c| {
                let mut set = HashSet::new();
                strings(c, &mut set);
                set
            })
            .collect();
        for (i, c) in contained.iter().enumerate() {
            let Some(id) = c.get("id").and_then(Value::as_str) else {
                continue;
            };
            let inside = &inner[i];
            let local = format!("#{id}");
            let from_sibling = inner
                .iter()
                .enumerate()
                .any(|(j, refs)| j != i && refs.contains(local.as_str()));
            // The narrative may be what refers to it (<img src="#id">), as in
            // the official examples.
            let from_narrative = obj
                .get("text")
                .and_then(|t| t.get("div"))
                .and_then(Value::as_str)
                .is_some_and(|div| div.contains(&format!("\"{local}\"")));
            if !outside.contains(local.as_str())
                && !from_sibling
                && !inside.contains("#")
                && !from_narrative
            {
                self.error(
                    "invariant",
                    &at.index_path("contained", i),
                    format!("dom-3: contained resource '{id}' is not referred to from the resource (by #{id}) and does not refer to it (by #)"),
                );
            }
        }
    }

    /// The content of a complex value: `obj` described by the children of
    /// `def.elements[element]`.
    fn object(
        &mut self,
        obj: &Map<String, Value>,
        def: &'d TypeDef,
        element: usize,
        at: &Loc,
        is_resource: bool,
    ) {
        let node = &def.elements[def.content_of(element)];
        if obj.is_empty() || (is_resource && obj.len() == 1) {
            self.error(
                "structure",
                &at.path,
                "an element must have content: empty objects are not allowed".to_owned(),
            );
            return;
        }
        let mut present = HashSet::new();
        let mut choices: HashMap<usize, &str> = HashMap::new();
        for (key, value) in obj {
            if is_resource && key == "resourceType" {
                continue;
            }
            let (extension_part, name) = match key.strip_prefix('_') {
                Some(name) => (true, name),
                None => (false, key.as_str()),
            };
            let Some(child) = node.children.get(name) else {
                self.error(
                    "structure",
                    &at.sub(key),
                    format!(
                        "unknown element '{key}': {} has no such element in FHIR R4 (check the spelling and the FHIR version)",
                        node.path
                    ),
                );
                continue;
            };
            let el = &def.elements[child.element];
            let ty = el.types.get(child.type_index);
            if el.choice {
                if let Some(other) = choices.insert(child.element, name) {
                    if other != name {
                        self.error(
                            "structure",
                            &at.sub(&el.name),
                            format!(
                                "{}[x] has two values ('{other}' and '{name}'): a choice element takes exactly one type",
                                el.name
                            ),
                        );
                    }
                }
            }
            present.insert(child.element);
            let child_at = match (el.choice, ty) {
                (true, Some(ty)) => at.child(&format!("{}.ofType({})", el.name, ty.code), key),
                _ => at.child(&el.name, key),
            };
            if el.max == super::definitions::Max::Count(0) {
                self.error(
                    "structure",
                    &child_at.path,
                    format!("{} is not allowed here (maximum 0)", el.name),
                );
                continue;
            }
            let primitive = ty
                .and_then(|t| self.defs.get(&t.code))
                .filter(|t| t.kind == Kind::Primitive);
            if extension_part {
                if primitive.is_none() {
                    self.error(
                        "structure",
                        &at.sub(key),
                        format!("unknown element '{key}': '_' marks extensions of primitive elements, and {name} is not one"),
                    );
                    continue;
                }
                let element_def = self.defs.get("Element");
                self.items(
                    value,
                    el,
                    &child_at,
                    obj.contains_key(name),
                    |walk, item, item_at| {
                        let Some(item_obj) = item.as_object() else {
                            walk.error(
                                "structure",
                                &item_at.path,
                                "the '_' part of a primitive holds an object with id and extension"
                                    .to_owned(),
                            );
                            return;
                        };
                        if let Some(element_def) = element_def {
                            walk.object(item_obj, element_def, 0, item_at, false);
                        }
                    },
                );
                continue;
            }
            let paired = obj.contains_key(&format!("_{name}"));
            self.items(value, el, &child_at, paired, |walk, item, item_at| {
                walk.value(item, def, child.element, ty, item_at)
            });
            if name == "extension" || name == "modifierExtension" {
                if let Some(items) = value.as_array() {
                    for (code, at, why) in super::extensions::check_counts(items, &child_at.path) {
                        self.error(code, &at, why);
                    }
                }
            }
            if let (true, Some(values), Some(extensions)) = (
                el.max.repeats(),
                value.as_array(),
                obj.get(&format!("_{name}")).and_then(Value::as_array),
            ) {
                if values.len() != extensions.len() {
                    self.error(
                        "structure",
                        &child_at.path,
                        format!("'{name}' and '_{name}' must have the same number of items (use null to fill)"),
                    );
                }
            }
        }
        for &required in &node.required {
            if !present.contains(&required) {
                let el = &def.elements[required];
                let shown = if el.choice {
                    format!("{}[x]", el.name)
                } else {
                    el.name.clone()
                };
                self.error(
                    "required",
                    &at.sub(&el.name),
                    format!(
                        "{shown} is required (minimum cardinality {}) but missing",
                        el.min
                    ),
                );
            }
        }
    }

    /// One JSON property's value(s): shape (array or single), count, then
    /// `each` item. `paired`: the primitive also has a `_name` part, so nulls
    /// may fill an array.
    fn items(
        &mut self,
        value: &Value,
        el: &Element,
        at: &Loc,
        paired: bool,
        mut each: impl FnMut(&mut Self, &Value, &Loc),
    ) {
        if el.max.repeats() {
            let Some(list) = value.as_array() else {
                self.error(
                    "structure",
                    &at.path,
                    format!("{} repeats: send a JSON array, even for one value", el.name),
                );
                return;
            };
            if list.is_empty() {
                self.error(
                    "structure",
                    &at.path,
                    format!(
                        "{}: empty arrays are not allowed; leave the element out",
                        el.name
                    ),
                );
            }
            if let super::definitions::Max::Count(max) = el.max {
                if list.len() > max as usize {
                    self.error(
                        "structure",
                        &at.path,
                        format!(
                            "{} allows at most {max} values, found {}",
                            el.name,
                            list.len()
                        ),
                    );
                }
            }
            for (i, item) in list.iter().enumerate() {
                let item_at = at.index(i);
                if item.is_null() {
                    if !paired {
                        self.error("structure", &item_at.path, "null is not a value".to_owned());
                    }
                    continue;
                }
                each(self, item, &item_at);
            }
        } else if value.is_array() {
            self.error(
                "structure",
                &at.path,
                format!("{} takes a single value, not an array", el.name),
            );
        } else if value.is_null() {
            self.error("structure", &at.path, "null is not a value".to_owned());
        } else {
            each(self, value, at);
        }
    }

    /// One value of element `def.elements[element]`, of type `ty`.
    fn value(
        &mut self,
        item: &Value,
        def: &'d TypeDef,
        element: usize,
        ty: Option<&TypeRef>,
        at: &Loc,
    ) {
        let defs = self.defs;
        let el = &def.elements[element];
        let path = at.path.as_str();
        let type_def = ty.and_then(|t| defs.get(&t.code));
        if let Some(type_def) = type_def {
            match type_def.kind {
                Kind::Primitive => {
                    self.primitive(item, type_def, path);
                    if let (Some(vs), Some(code)) = (&el.required_binding, item.as_str()) {
                        if type_def.name == "code" && !self.code_allowed(vs, None, code) {
                            self.error(
                                "code-invalid",
                                path,
                                format!("'{code}' is not a valid code here: the value set {vs} (required binding) does not contain it"),
                            );
                        }
                    }
                    return;
                }
                Kind::Resource => {
                    self.resource(item, at);
                    return;
                }
                Kind::Complex => {}
            }
        }
        let Some(obj) = item.as_object() else {
            let type_name = ty.map(|t| t.code.as_str()).unwrap_or("BackboneElement");
            self.error(
                "structure",
                path,
                format!("{} is a {type_name}: send a JSON object", el.name),
            );
            return;
        };
        let content = def.content_of(element);
        // The element's own invariants, then (for a data type) the type's.
        self.check(
            at,
            ty.map(|t| t.code.as_str()),
            &def.elements[content].constraints,
        );
        if !def.elements[content].children.is_empty() {
            self.object(obj, def, content, at, false);
        } else if let Some(type_def) = type_def {
            self.check(at, Some(&type_def.name), &type_def.elements[0].constraints);
            self.object(obj, type_def, 0, at, false);
        }
        match (ty.map(|t| t.code.as_str()), &el.required_binding) {
            (Some("Reference"), _) => self.reference(obj, ty, path),
            (Some("Extension"), _) => {
                // ext-1: an extension has a value or nested extensions.
                let has_value = obj
                    .keys()
                    .any(|k| k.starts_with("value") || k.starts_with("_value"));
                let has_nested = obj.contains_key("extension");
                if has_value == has_nested {
                    self.error(
                        "invariant",
                        path,
                        "ext-1: an extension has either a value[x] or nested extensions, exactly one of them".to_owned(),
                    );
                }
                // One of ours: its definition applies. Its context is the
                // element it sits on (`DiagnosticReport.extension` sits on
                // `DiagnosticReport`).
                let ours = obj
                    .get("url")
                    .and_then(Value::as_str)
                    .and_then(super::extensions::find);
                if let (Some(definition), Some((context, name))) = (ours, el.path.rsplit_once('.'))
                {
                    let in_set = |vs: &str, v: &Value| in_value_set(defs, vs, v);
                    let modifier = name == "modifierExtension";
                    for (code, at, why) in definition.check(obj, path, context, modifier, &in_set) {
                        self.error(code, &at, why);
                    }
                }
            }
            (Some("Coding"), Some(vs)) => {
                if let Some(code) = obj.get("code").and_then(Value::as_str) {
                    let system = obj.get("system").and_then(Value::as_str);
                    if !self.code_allowed(vs, system, code) {
                        self.error(
                            "code-invalid",
                            &format!("{path}.code"),
                            format!(
                                "'{}|{code}' is not in the value set {vs} (required binding)",
                                system.unwrap_or("")
                            ),
                        );
                    }
                }
            }
            (Some("CodeableConcept"), Some(vs)) => {
                if let Some(codings) = obj.get("coding").and_then(Value::as_array) {
                    let any = codings.iter().any(|c| {
                        c.get("code").and_then(Value::as_str).is_some_and(|code| {
                            self.code_allowed(vs, c.get("system").and_then(Value::as_str), code)
                        })
                    });
                    if !any {
                        self.error(
                            "code-invalid",
                            &format!("{path}.coding"),
                            format!(
                                "none of the codings is in the value set {vs} (required binding)"
                            ),
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn code_allowed(&self, value_set: &str, system: Option<&str>, code: &str) -> bool {
        code_allowed(self.defs, value_set, system, code)
    }

    fn primitive(&mut self, item: &Value, type_def: &TypeDef, path: &str) {
        let Some(rule) = &type_def.primitive else {
            return;
        };
        let name = &type_def.name;
        let literal = match (rule.json, item) {
            (JsonForm::Boolean, Value::Bool(_)) => return,
            (JsonForm::Integer | JsonForm::Decimal, Value::Number(n)) => n.to_string(),
            (JsonForm::String, Value::String(s)) => {
                if s.is_empty() {
                    self.error(
                        "value",
                        path,
                        "empty strings are not allowed: leave the element out".to_owned(),
                    );
                    return;
                }
                if name == "base64Binary" {
                    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
                    if base64::engine::general_purpose::STANDARD
                        .decode(compact.as_bytes())
                        .is_err()
                    {
                        self.error(
                            "value",
                            path,
                            "not valid base64 (RFC 4648, with padding)".to_owned(),
                        );
                    }
                    return;
                }
                s.clone()
            }
            (form, other) => {
                let expected = match form {
                    JsonForm::Boolean => "a JSON boolean (true or false)",
                    JsonForm::Integer | JsonForm::Decimal => "a JSON number",
                    JsonForm::String => "a JSON string",
                };
                self.error(
                    "value",
                    path,
                    format!("{name} is written as {expected}, found {}", kind_of(other)),
                );
                return;
            }
        };
        let valid = rule.regex.as_ref().is_none_or(|r| r.is_match(&literal))
            && (rule.json != JsonForm::Integer || literal.parse::<i32>().is_ok());
        if !valid {
            let shown: String = literal.chars().take(80).collect();
            self.error(
                "value",
                path,
                format!("'{shown}' is not a valid {name}{}", format_hint(name)),
            );
        }
    }

    /// `Reference.reference`: relative (`Type/id`, optionally
    /// `/_history/v`), absolute URL, `urn:uuid:` / `urn:oid:`, a contained
    /// `#id`, or a conditional `Type?search` (resolved in transactions).
    fn reference(&mut self, obj: &Map<String, Value>, ty: Option<&TypeRef>, path: &str) {
        let Some(reference) = obj.get("reference").and_then(Value::as_str) else {
            return;
        };
        let path = format!("{path}.reference");
        if reference.starts_with('#')
            || reference.starts_with("urn:uuid:")
            || reference.starts_with("urn:oid:")
            || reference.starts_with("http://")
            || reference.starts_with("https://")
        {
            return;
        }
        let type_name = reference.split(['/', '?']).next().unwrap_or(reference);
        let well_formed = match reference.split_once('?') {
            Some((named, query)) => self.defs.resource(named).is_some() && !query.is_empty(),
            None => is_resource_reference(self.defs, reference),
        };
        if !well_formed {
            self.error(
                "value",
                &path,
                format!("'{reference}' is not a valid reference: use Type/id, an absolute URL, urn:uuid:, or #contained-id"),
            );
            return;
        }
        if let Some(ty) = ty {
            if !ty.targets.is_empty() && !ty.targets.iter().any(|t| t == type_name) {
                self.error(
                    "value",
                    &path,
                    format!(
                        "a reference to {type_name} is not allowed here: expected {}",
                        ty.targets.join(" or ")
                    ),
                );
            }
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn format_hint(type_name: &str) -> &'static str {
    match type_name {
        "date" => " (YYYY, YYYY-MM or YYYY-MM-DD)",
        "dateTime" => " (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz)",
        "instant" => " (YYYY-MM-DDThh:mm:ss.sss+zz:zz, with a time zone)",
        "time" => " (hh:mm:ss)",
        "integer" => " (a whole number in the 32-bit range)",
        "positiveInt" => " (a whole number >= 1)",
        "unsignedInt" => " (a whole number >= 0)",
        "id" => " (1-64 of A-Z a-z 0-9 - .)",
        "code" => " (no leading, trailing or double whitespace)",
        "oid" => " (urn:oid: followed by a dotted OID)",
        "uuid" => " (urn:uuid: followed by a lower-case UUID)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(resource: Value) -> Vec<Issue> {
        validate(Definitions::core(), &resource, None)
    }

    fn one_error_at(resource: Value, expression: &str) {
        let issues = check(resource);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(
            issues[0].expression.as_deref(),
            Some(expression),
            "{issues:#?}"
        );
    }

    fn task() -> Value {
        json!({"resourceType": "Task", "status": "requested", "intent": "order"})
    }

    #[test]
    fn accepts_a_valid_resource() {
        let mut t = task();
        t["input"] = json!([{"type": {"text": "x"}, "valueDecimal": 1.50}]);
        t["for"] = json!({"reference": "Patient/p1"});
        t["authoredOn"] = json!("2024-02-29T10:00:00+01:00");
        t["note"] = json!([{"text": "a"}]);
        t["_status"] = json!({"extension": [{"url": "http://x", "valueString": "y"}]});
        assert_eq!(check(t), vec![]);
    }

    #[test]
    fn finds_each_defect_with_its_path() {
        let mut t = task();
        t["bogus"] = json!(1);
        one_error_at(t, "Task.bogus");
        let mut t = task();
        t.as_object_mut().map(|o| o.remove("intent"));
        one_error_at(t, "Task.intent");
        let mut t = task();
        t["status"] = json!("bogus");
        one_error_at(t, "Task.status");
        let mut t = task();
        t["authoredOn"] = json!("2024-13-01");
        one_error_at(t, "Task.authoredOn");
        let mut t = task();
        t["priority"] = json!(3);
        one_error_at(t, "Task.priority");
        let mut t = task();
        t["note"] = json!({"text": "single"});
        one_error_at(t, "Task.note");
        let mut t = task();
        t["description"] = json!(["a"]);
        one_error_at(t, "Task.description");
        let mut t = task();
        t["input"] = json!([{"type": {"text": "x"}, "valueString": "a", "valueBoolean": true}]);
        one_error_at(t, "Task.input[0].value");
        let mut t = task();
        t["description"] = json!("");
        one_error_at(t, "Task.description");
        let mut t = task();
        t["for"] = json!({"reference": "not a reference"});
        one_error_at(t, "Task.for.reference");
        let mut t = task();
        t["note"] = json!([{"text": "a", "authorReference": {"reference": "Device/d1"}}]);
        one_error_at(t, "Task.note[0].author.ofType(Reference).reference");
        let mut t = task();
        t["input"] = json!([{"type": {"text": "x"}, "valueInteger": 1.5}]);
        one_error_at(t, "Task.input[0].value.ofType(integer)");
    }

    #[test]
    fn nested_resources_and_required_codings() {
        let bundle = json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": {"resourceType": "Patient", "gender": "x"},
                       "request": {"method": "POST", "url": "Patient"}}]
        });
        one_error_at(bundle, "Bundle.entry[0].resource.gender");
        let bundle = json!({"resourceType": "Bundle", "type": "nonsense"});
        one_error_at(bundle, "Bundle.type");
    }
}
