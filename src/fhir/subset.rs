//! `_summary` and `_elements`: answers with part of each resource, marked
//! `SUBSETTED` in `meta.tag` (FHIR R4 search 3.1.1.5.8-9).

use serde_json::{json, Value};

use super::definitions::Definitions;

/// What part of each resource to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subset {
    /// `_summary=true`: the elements the definitions mark isSummary.
    Summary,
    /// `_summary=text`: text, id, meta and the mandatory elements.
    Text,
    /// `_summary=data`: everything but the narrative.
    Data,
    /// `_elements=a,b`: these top-level elements (plus the mandatory ones).
    Elements(Vec<String>),
}

impl Subset {
    /// From `_summary` (`true`, `text`, `data`; `false` is no subset).
    pub fn from_summary(value: &str) -> Option<Option<Subset>> {
        match value {
            "true" => Some(Some(Subset::Summary)),
            "text" => Some(Some(Subset::Text)),
            "data" => Some(Some(Subset::Data)),
            "false" => Some(None),
            _ => None,
        }
    }

    pub fn from_elements(value: &str) -> Subset {
        Subset::Elements(
            value
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect(),
        )
    }
}

/// `body` (a stored resource) cut down to `subset`.
pub fn apply(body: &str, subset: &Subset) -> String {
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(body) else {
        return body.to_owned();
    };
    let resource_type = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let Some(def) = Definitions::core().resource(&resource_type) else {
        return body.to_owned();
    };
    let root = &def.elements[0];
    let element_of = |key: &str| {
        let name = key.strip_prefix('_').unwrap_or(key);
        root.children.get(name).map(|c| &def.elements[c.element])
    };
    obj.retain(|key, _| {
        if matches!(key.as_str(), "resourceType" | "id" | "meta") {
            return true;
        }
        let Some(el) = element_of(key) else {
            return false;
        };
        let mandatory = el.min > 0;
        match subset {
            Subset::Summary => el.summary || mandatory,
            Subset::Text => el.name == "text" || mandatory,
            Subset::Data => el.name != "text",
            Subset::Elements(names) => mandatory || names.contains(&el.name),
        }
    });
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    if let Some(meta) = meta.as_object_mut() {
        let tags = meta.entry("tag").or_insert_with(|| json!([]));
        if let Some(tags) = tags.as_array_mut() {
            tags.push(json!({
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "code": "SUBSETTED",
                "display": "subsetted",
            }));
        }
    }
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_keep_what_each_mode_names() {
        let body = json!({"resourceType": "Task", "id": "t", "meta": {"versionId": "1"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "status": "requested", "intent": "order", "description": "d", "note": [{"text": "n"}],
            "_status": {"extension": [{"url": "http://x", "valueString": "y"}]}})
        .to_string();
        let keys = |s: &str| -> Vec<String> {
            let v: Value = serde_json::from_str(s).unwrap();
            assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED");
            v.as_object().unwrap().keys().cloned().collect()
        };
        let summary = keys(&apply(&body, &Subset::Summary));
        assert!(summary.contains(&"status".to_owned()) && summary.contains(&"_status".to_owned()));
        assert!(!summary.contains(&"note".to_owned()) && !summary.contains(&"text".to_owned()));
        let text = keys(&apply(&body, &Subset::Text));
        assert!(text.contains(&"text".to_owned()) && text.contains(&"intent".to_owned()));
        assert!(!text.contains(&"description".to_owned()));
        let data = keys(&apply(&body, &Subset::Data));
        assert!(!data.contains(&"text".to_owned()) && data.contains(&"note".to_owned()));
        let elements = keys(&apply(&body, &Subset::from_elements("note")));
        assert!(elements.contains(&"note".to_owned()) && elements.contains(&"status".to_owned()));
        assert!(!elements.contains(&"description".to_owned()));
    }
}
