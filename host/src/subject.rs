//! Subjects and the grant patterns that match them.
//!
//! Subjects are `.`-separated tokens (`orders.eu.created`). Patterns follow
//! NATS: `*` matches exactly one token, `>` matches one or more trailing
//! tokens and may only come last. The same syntax is used for every broker so
//! a manifest's grants read the same whatever the backend.

/// A parsed publish grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPattern {
    tokens: Vec<String>,
}

impl SubjectPattern {
    /// Parse `pattern`, explaining what is wrong with it.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let tokens: Vec<String> = pattern.split('.').map(str::to_string).collect();
        for (i, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                return Err(format!("pattern {pattern:?} has an empty token"));
            }
            if t == ">" && i + 1 != tokens.len() {
                return Err(format!("pattern {pattern:?}: `>` may only be the last token"));
            }
            if t.len() > 1 && (t.contains('*') || t.contains('>')) {
                return Err(format!("pattern {pattern:?}: `*` and `>` must stand alone as a token"));
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "pattern {pattern:?} contains whitespace or a control character"
                ));
            }
        }
        Ok(Self { tokens })
    }

    /// Check that `subject` is a literal subject (no wildcards), as a source or
    /// a publish target must be.
    pub fn check_literal(subject: &str) -> Result<(), String> {
        let pattern = Self::parse(subject).map_err(|e| e.replacen("pattern", "subject", 1))?;
        if pattern.tokens.iter().any(|t| t == "*" || t == ">") {
            return Err(format!("subject {subject:?} may not contain wildcards"));
        }
        Ok(())
    }

    /// Whether `subject` matches this pattern.
    pub fn matches(&self, subject: &str) -> bool {
        let mut parts = subject.split('.');
        for (i, t) in self.tokens.iter().enumerate() {
            if t == ">" {
                // One or more remaining tokens, none empty.
                let rest: Vec<&str> = parts.collect();
                return !rest.is_empty() && rest.iter().all(|p| !p.is_empty()) && i + 1 == self.tokens.len();
            }
            match parts.next() {
                Some(p) if !p.is_empty() && (t == "*" || t == p) => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

/// A set of grants: a subject is allowed when any pattern matches it.
#[derive(Debug, Clone, Default)]
pub struct Grants(Vec<SubjectPattern>);

impl Grants {
    /// Parse every pattern (already validated by the manifest).
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        patterns
            .iter()
            .map(|p| SubjectPattern::parse(p))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `subject` is covered by any grant.
    pub fn allows(&self, subject: &str) -> bool {
        self.0.iter().any(|p| p.matches(subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        SubjectPattern::parse(p).expect("valid pattern").matches(s)
    }

    #[test]
    fn literal_and_wildcards() {
        assert!(m("orders", "orders"));
        assert!(!m("orders", "orders.x"));
        assert!(m("orders.*", "orders.eu"));
        assert!(!m("orders.*", "orders"));
        assert!(!m("orders.*", "orders.eu.x"));
        assert!(m("orders.>", "orders.eu.x"));
        assert!(!m("orders.>", "orders"));
        assert!(m(">", "anything.at.all"));
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a..c"));
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert!(SubjectPattern::parse("a.>.b").unwrap_err().contains("last token"));
        assert!(SubjectPattern::parse("a..b").unwrap_err().contains("empty token"));
        assert!(SubjectPattern::parse("a.b*").unwrap_err().contains("stand alone"));
        assert!(SubjectPattern::check_literal("a.*").unwrap_err().contains("wildcards"));
    }
}
