//! OperationOutcome issues: what the validator and the REST edge report.

use serde_json::{json, Value};

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    /// IssueType code (`structure`, `required`, `value`, `code-invalid`,
    /// `invalid`, `not-found`, `conflict`, ...).
    pub code: &'static str,
    /// What is wrong and what to do about it, for a person.
    pub diagnostics: String,
    /// FHIRPath of the element, e.g. `ServiceRequest.authoredOn`.
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn warning(code: &'static str, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Warning,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn information(code: &'static str, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Information,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Issue {
        self.expression = Some(expression.into());
        self
    }

    pub fn is_error(&self) -> bool {
        matches!(self.severity, Severity::Error | Severity::Fatal)
    }

    pub fn to_json(&self) -> Value {
        let mut issue = json!({
            "severity": self.severity.as_str(),
            "code": self.code,
            "diagnostics": self.diagnostics,
        });
        if let Some(expression) = &self.expression {
            issue["expression"] = json!([expression]);
        }
        issue
    }
}

/// An OperationOutcome resource of these issues.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = if issues.is_empty() {
        vec![Issue::information("informational", "All OK").to_json()]
    } else {
        issues.iter().map(Issue::to_json).collect()
    };
    json!({ "resourceType": "OperationOutcome", "issue": issues })
}
