//! Validation errors: each names the file, the JSON path, the offending value
//! and the reason, so a security team can fix the policy without guessing.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// File name (or `<config>` when the policy arrived as filter config).
    pub file: String,
    /// JSON path such as `keys[3].limits.requests_per_minute`.
    pub path: String,
    /// The offending value as JSON text, if there is one.
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "$"
        } else {
            &self.path
        };
        match &self.value {
            Some(v) => write!(f, "{}: {}: {} (value: {})", self.file, path, self.reason, v),
            None => write!(f, "{}: {}: {}", self.file, path, self.reason),
        }
    }
}

/// Outcome of compiling a policy: warnings that do not stop it loading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyReport {
    pub warnings: Vec<PolicyError>,
}
