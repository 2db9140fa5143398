//! Config errors: each names the document, the field path and the reason, and
//! a config with any error is rejected as a whole.

use std::fmt;

/// One problem in a config file, shown as `<Kind> "<name>" (document N): <field>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Which document, e.g. `HTTPRoute "canary" (document 3)` (documents count from 1),
    /// or `document 2` when it has no readable kind and name, or the file's path for I/O errors.
    pub document: String,
    /// The field path inside the document, e.g. `spec.rules[0].backendRefs[1].weight`;
    /// empty when the problem is the document as a whole.
    pub field: String,
    /// What is wrong and, where it helps, what to write instead.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.document, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.document, self.field, self.reason)
        }
    }
}

/// Every problem found, in document order; the config is rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "config rejected ({n} error{}):", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

/// Collects the problems of one parse, so a single run reports all of them.
#[derive(Debug, Default)]
pub(crate) struct Report {
    errors: Vec<ConfigError>,
}

impl Report {
    /// Records that `field` of `document` is wrong because of `reason`.
    pub(crate) fn err(&mut self, document: &str, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError { document: document.into(), field: field.into(), reason: reason.into() });
    }

    /// `value` if nothing was recorded, else every recorded problem.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}
