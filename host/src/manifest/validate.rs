//! Parsing with positions, and the checks serde cannot express.

use std::path::{Path, PathBuf};

use serde_path_to_error::Segment;
use toml::de::{DeTable, DeValue};

use super::{BrokerConfig, DEFAULT_TENANT, EMBEDDED_BROKER, Manifest, ManifestError, ManifestErrors, SourceKind};
use crate::delivery::RetryPolicy;
use crate::subject::SubjectPattern;

/// A field path: `["handlers", "validate", "publish", "0"]`.
type FieldPath = Vec<String>;

pub(super) fn parse(file: &Path, text: &str) -> Result<Manifest, ManifestErrors> {
    let doc = Located { file, text };
    let table = DeTable::parse(text).map_err(|e| ManifestErrors(vec![doc.toml_error(&e, None)]))?;
    let tree = table.clone();
    let deserializer = toml::de::Deserializer::from(table);
    let mut manifest: Manifest = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path: FieldPath = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                Segment::Map { key } => Some(key.clone()),
                Segment::Seq { index } => Some(index.to_string()),
                Segment::Enum { variant } => Some(variant.clone()),
                Segment::Unknown => None,
            })
            .collect();
        ManifestErrors(vec![doc.toml_error(e.inner(), Some((&tree, path)))])
    })?;
    manifest.file = file.to_path_buf();

    let errors = std::cell::RefCell::new(Vec::new());
    let warnings = std::cell::RefCell::new(Vec::new());
    let at = |path: &[&str], message: String| {
        let path: FieldPath = path.iter().map(|s| s.to_string()).collect();
        ManifestError {
            file: file.to_path_buf(),
            line: Some(doc.line_of_path(&tree, &path)),
            field: path.join("."),
            message,
        }
    };
    check(
        &mut manifest,
        &mut |path: &[&str], message: String| errors.borrow_mut().push(at(path, message)),
        &mut |path: &[&str], message: String| warnings.borrow_mut().push(at(path, message)),
    );
    let mut errors = errors.into_inner();
    manifest.warnings = warnings.into_inner();
    if errors.is_empty() {
        Ok(manifest)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(ManifestErrors(errors))
    }
}

/// The semantic checks. `report(path, message)` records one error; paths
/// are resolved against the manifest's folder as a side effect.
fn check(m: &mut Manifest, report: &mut dyn FnMut(&[&str], String), warn: &mut dyn FnMut(&[&str], String)) {
    let base = m.file.parent().map(Path::to_path_buf).unwrap_or_default();
    m.host.data_dir = resolve(&base, &m.host.data_dir);
    if m.host.worker_threads == Some(0) {
        report(&["host", "worker_threads"], "must be at least 1".into());
    }
    if m.host.shards == Some(0) {
        report(&["host", "shards"], "must be at least 1".into());
    }

    for (name, tenant) in &m.tenants {
        let at = |field: &'static str| ["tenants", name.as_str(), field];
        if tenant.max_concurrency == 0 {
            report(&at("max_concurrency"), "must be at least 1".into());
        }
        if tenant.max_memory_mb == 0 {
            report(&at("max_memory_mb"), "must be at least 1".into());
        }
        if tenant.max_timeout_ms == 0 {
            report(&at("max_timeout_ms"), "must be at least 1".into());
        }
        check_patterns(&tenant.publish, &["tenants", name, "publish"], report);
    }

    for (name, h) in &mut m.handlers {
        let at = |field: &'static str| ["handlers", name.as_str(), field];
        h.component = resolve(&base, &h.component);
        if !h.component.is_file() {
            report(
                &at("component"),
                format!("no component at {} (build it first?)", h.component.display()),
            );
        }
        let tenant = match m.tenants.get(&h.tenant) {
            Some(t) => t.clone(),
            None if h.tenant == DEFAULT_TENANT => Default::default(),
            None => {
                report(
                    &at("tenant"),
                    format!("unknown tenant {:?}; declare it under [tenants.{}]", h.tenant, h.tenant),
                );
                Default::default()
            }
        };
        let broker = h.source.broker.as_str();
        let source_at = |field: &'static str| ["handlers", name.as_str(), "source", field];
        let source_broker = m
            .brokers
            .get(broker)
            .cloned()
            .or_else(|| (broker == EMBEDDED_BROKER).then_some(BrokerConfig::Embedded {}));
        let kind = h.source.kind;
        match &source_broker {
            Some(BrokerConfig::Embedded {}) => {
                if !matches!(kind, None | Some(SourceKind::Queue)) {
                    report(
                        &source_at("kind"),
                        "the embedded broker has only `queue` sources".into(),
                    );
                }
                if h.source.group.is_some() {
                    report(
                        &source_at("group"),
                        "`group` applies to Redis stream and NATS core sources only".into(),
                    );
                }
            }
            Some(BrokerConfig::Redis { .. }) => {
                match kind {
                    Some(SourceKind::Queue | SourceKind::Core | SourceKind::Jetstream) => report(
                        &source_at("kind"),
                        "Redis sources are `stream`, `list`, `channel` or `pattern`".into(),
                    ),
                    Some(SourceKind::Channel | SourceKind::Pattern) => warn(
                        &source_at("kind"),
                        "Redis pub/sub is at-most-once: messages published while no host is subscribed, or in flight when a host dies, are lost".into(),
                    ),
                    _ => {}
                }
                if h.source.group.is_some() && !matches!(kind, None | Some(SourceKind::Stream)) {
                    report(
                        &source_at("group"),
                        "`group` applies to Redis stream and NATS core sources only".into(),
                    );
                }
            }
            Some(BrokerConfig::Amqp { .. }) => {
                if !matches!(kind, None | Some(SourceKind::Queue)) {
                    report(&source_at("kind"), "RabbitMQ sources are `queue`s".into());
                }
                if h.source.group.is_some() {
                    report(&source_at("group"), "`group` does not apply to RabbitMQ sources".into());
                }
                if h.concurrency > u32::from(u16::MAX) {
                    report(&at("concurrency"), "RabbitMQ prefetch is at most 65535".into());
                }
            }
            Some(BrokerConfig::Nats { streams, .. }) => match kind {
                None | Some(SourceKind::Core) => warn(
                    &source_at("kind"),
                    "core NATS is at-most-once: messages published while no host is subscribed, or in flight when a host dies, are lost; use kind = \"jetstream\" to keep them".into(),
                ),
                Some(SourceKind::Jetstream) => {
                    if h.source.stream.is_none() {
                        report(&source_at("stream"), "a `jetstream` source needs the `stream` it consumes".into());
                    }
                    let dead = h.dead_letter.clone().unwrap_or_else(|| format!("wharf.dead.{name}"));
                    let captured = streams
                        .iter()
                        .any(|s| s.subjects.iter().any(|p| SubjectPattern::parse(p).is_ok_and(|p| p.matches(&dead))));
                    if !captured {
                        warn(
                            &["handlers", name, "dead_letter"],
                            format!("no stream declared here captures the dead-letter subject {dead:?}; unless one exists on the server, dead-lettering will fail and the message will be redelivered"),
                        );
                    }
                }
                Some(_) => report(&source_at("kind"), "NATS sources are `core` or `jetstream`".into()),
            },
            None => report(
                &source_at("broker"),
                format!("unknown broker {broker:?}; declare it under [brokers.{broker}]"),
            ),
        }
        if let Some(to) = &h.publish_to {
            let target = to.broker.as_deref().unwrap_or(broker);
            let at = |field: &'static str| ["handlers", name.as_str(), "publish_to", field];
            if to.exchange.is_some() && !matches!(m.brokers.get(target), Some(BrokerConfig::Amqp { .. })) {
                report(&at("exchange"), "`exchange` applies to RabbitMQ targets only".into());
            }
            match m
                .brokers
                .get(target)
                .cloned()
                .or_else(|| (target == EMBEDDED_BROKER).then_some(BrokerConfig::Embedded {}))
            {
                None => report(
                    &at("broker"),
                    format!("unknown broker {target:?}; declare it under [brokers.{target}]"),
                ),
                Some(BrokerConfig::Embedded {}) => {
                    if to.kind.is_some_and(|k| k != SourceKind::Queue) {
                        report(&at("kind"), "the embedded broker publishes to queues only".into());
                    }
                    if to.maxlen.is_some() {
                        report(&at("maxlen"), "`maxlen` applies to Redis streams only".into());
                    }
                }
                Some(BrokerConfig::Redis { .. }) => {
                    if matches!(
                        to.kind,
                        Some(SourceKind::Queue | SourceKind::Pattern | SourceKind::Core | SourceKind::Jetstream)
                    ) {
                        report(
                            &at("kind"),
                            "Redis publish targets are `stream`, `list` or `channel`".into(),
                        );
                    }
                }
                Some(BrokerConfig::Amqp { .. }) => {
                    if to.kind.is_some_and(|k| k != SourceKind::Queue) {
                        report(
                            &at("kind"),
                            "RabbitMQ publishes to an exchange: set `exchange`, not `kind`".into(),
                        );
                    }
                    if to.maxlen.is_some() {
                        report(&at("maxlen"), "`maxlen` applies to Redis streams only".into());
                    }
                }
                Some(BrokerConfig::Nats { .. }) => {
                    if to
                        .kind
                        .is_some_and(|k| !matches!(k, SourceKind::Core | SourceKind::Jetstream))
                    {
                        report(&at("kind"), "NATS publish targets are `core` or `jetstream`".into());
                    }
                    if to.maxlen.is_some() {
                        report(&at("maxlen"), "`maxlen` applies to Redis streams only".into());
                    }
                }
            }
        }
        if kind != Some(SourceKind::Jetstream) {
            for (field, set) in [
                ("stream", h.source.stream.is_some()),
                ("consumer", h.source.consumer.is_some()),
                ("double_ack", h.source.double_ack.is_some()),
            ] {
                if set {
                    report(
                        &source_at(field),
                        format!("`{field}` applies to NATS `jetstream` sources only"),
                    );
                }
            }
        }
        if matches!(source_broker, Some(BrokerConfig::Nats { .. })) {
            if let Err(e) = crate::broker::nats::check_source_subject(&h.source.subject) {
                report(&source_at("subject"), e.to_string());
            }
        } else if kind == Some(SourceKind::Pattern) {
            if h.source.subject.is_empty() || h.source.subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
                report(
                    &source_at("subject"),
                    "pattern must be non-empty with no whitespace".into(),
                );
            }
        } else if let Err(e) = SubjectPattern::check_literal(&h.source.subject) {
            report(&["handlers", name, "source", "subject"], e);
        }
        if let Some(dl) = &h.dead_letter
            && let Err(e) = SubjectPattern::check_literal(dl)
        {
            report(&at("dead_letter"), e);
        }
        if h.instance_reuse == 0 {
            report(
                &at("instance_reuse"),
                "must be at least 1 (1: a fresh instance per message)".into(),
            );
        }
        if h.concurrency == 0 {
            report(&at("concurrency"), "must be at least 1".into());
        }
        if h.timeout_ms == 0 {
            report(&at("timeout_ms"), "must be at least 1".into());
        } else if h.timeout_ms > tenant.max_timeout_ms {
            report(
                &at("timeout_ms"),
                format!(
                    "{} exceeds tenant {:?}'s max_timeout_ms {}",
                    h.timeout_ms, h.tenant, tenant.max_timeout_ms
                ),
            );
        }
        if h.memory_mb == 0 {
            report(&at("memory_mb"), "must be at least 1".into());
        } else if h.memory_mb > tenant.max_memory_mb {
            report(
                &at("memory_mb"),
                format!(
                    "{} exceeds tenant {:?}'s max_memory_mb {}",
                    h.memory_mb, h.tenant, tenant.max_memory_mb
                ),
            );
        }
        if h.max_payload_bytes == 0 {
            report(&at("max_payload_bytes"), "must be at least 1".into());
        }
        check_patterns(&h.publish, &["handlers", name, "publish"], report);

        let r = &h.retry;
        let retry_at = |field: &'static str| ["handlers", name.as_str(), "retry", field];
        if r.max_attempts == 0 {
            report(&retry_at("max_attempts"), "must be at least 1".into());
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            report(
                &retry_at("multiplier"),
                format!("must be a number >= 1.0, not {}", r.multiplier),
            );
        }
        if r.max_delay_ms < r.initial_delay_ms {
            report(
                &retry_at("max_delay_ms"),
                format!("{} is below initial_delay_ms {}", r.max_delay_ms, r.initial_delay_ms),
            );
        }
        if let Some(dedup) = &h.dedup {
            let horizon = RetryPolicy::from(r).horizon(std::time::Duration::from_millis(h.timeout_ms));
            if dedup.ttl_secs == 0 || u128::from(dedup.ttl_secs) * 1000 < horizon.as_millis() {
                report(
                    &["handlers", name, "dedup", "ttl_secs"],
                    format!(
                        "dedup TTL {}s is shorter than the retry horizon {}s ({} attempts of up to {} ms with backoff up to {} ms); a retried message could run twice",
                        dedup.ttl_secs,
                        horizon.as_secs_f64().ceil() as u64,
                        r.max_attempts,
                        h.timeout_ms,
                        r.max_delay_ms
                    ),
                );
            }
        }
        if let Some(rl) = &h.rate_limit {
            if rl.messages == 0 {
                report(
                    &["handlers", name, "rate_limit", "messages"],
                    "must be at least 1".into(),
                );
            }
            if rl.per_ms == 0 {
                report(&["handlers", name, "rate_limit", "per_ms"], "must be at least 1".into());
            }
        }
    }
}

fn check_patterns(patterns: &[String], path: &[&str], report: &mut dyn FnMut(&[&str], String)) {
    for (i, p) in patterns.iter().enumerate() {
        if let Err(e) = SubjectPattern::parse(p) {
            let index = i.to_string();
            let mut at: Vec<&str> = path.to_vec();
            at.push(&index);
            report(&at, e);
        }
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// The manifest text, for turning byte offsets and field paths into lines.
struct Located<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn line_at(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// The line of the deepest part of `path` present in the document: the
    /// field itself, or its table when the field is missing.
    fn line_of_path(&self, tree: &toml::Spanned<DeTable<'_>>, path: &[String]) -> usize {
        let mut offset = tree.span().start;
        let mut current: Option<&DeValue<'_>> = None;
        let mut table: Option<&DeTable<'_>> = Some(tree.get_ref());
        for segment in path {
            let next = match (table, current) {
                (Some(t), _) => t.get_key_value(segment.as_str()).map(|(k, v)| (k.span().start, v)),
                (None, Some(DeValue::Array(items))) => segment
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get(i))
                    .map(|v| (v.span().start, v)),
                _ => None,
            };
            let Some((at, value)) = next else { break };
            offset = at;
            current = Some(value.get_ref());
            table = match value.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        self.line_at(offset)
    }

    fn toml_error(&self, err: &toml::de::Error, at: Option<(&toml::Spanned<DeTable<'_>>, FieldPath)>) -> ManifestError {
        let message = err.message().trim().to_string();
        let (mut field, path_line) = match &at {
            Some((tree, path)) => (path.join("."), Some(self.line_of_path(tree, path))),
            None => (String::new(), None),
        };
        // serde reports an unknown field against the table that holds it; name
        // the field itself, and find its line.
        if let Some(unknown) = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split('`').next())
        {
            if field.is_empty() {
                field = unknown.to_string();
            } else if !field.ends_with(&format!(".{unknown}")) && field != unknown {
                field = format!("{field}.{unknown}");
            }
        }
        let line = err.span().map(|s| self.line_at(s.start)).or(path_line);
        ManifestError {
            file: self.file.to_path_buf(),
            line,
            field,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Manifest::parse(Path::new("/nowhere/wharf.toml"), text) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let e = errors(
            "[host]\nshutdown_grace_ms = 5\n\n[handlers.a]\ncomponent = \"a.wasm\"\nsource = { subject = \"x\" }\nconcurency = 3\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("/nowhere/wharf.toml:7: handlers.a.concurency: unknown field `concurency`"),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_type_is_named_with_its_line() {
        let e = errors("[handlers.a]\ncomponent = \"a.wasm\"\nsource = { subject = \"x\" }\ntimeout_ms = \"soon\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("/nowhere/wharf.toml:4: handlers.a.timeout_ms: invalid type"),
            "{e:?}"
        );
    }

    #[test]
    fn missing_field_points_at_its_table() {
        let e = errors("\n[handlers.a]\nsource = { subject = \"x\" }\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("/nowhere/wharf.toml:2: handlers.a: missing field `component`"),
            "{e:?}"
        );
    }

    #[test]
    fn semantic_errors_are_all_reported_in_line_order() {
        let e = errors(
            "[handlers.a]\ncomponent = \"a.wasm\"\nsource = { subject = \"x\", broker = \"nope\" }\npublish = [\"ok\", \"a.>.b\"]\n[handlers.a.dedup]\nttl_secs = 1\n",
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].starts_with("/nowhere/wharf.toml:2: handlers.a.component: no component at /nowhere/a.wasm"));
        assert!(e[1].starts_with("/nowhere/wharf.toml:3: handlers.a.source.broker: unknown broker \"nope\""));
        assert!(
            e[2].starts_with("/nowhere/wharf.toml:4: handlers.a.publish.1: "),
            "{e:?}"
        );
        assert!(e[3].starts_with(
            "/nowhere/wharf.toml:6: handlers.a.dedup.ttl_secs: dedup TTL 1s is shorter than the retry horizon"
        ));
    }

    #[test]
    fn zero_worker_threads_or_shards_is_named_with_its_line() {
        let handler = "[handlers.a]\ncomponent = \"a.wasm\"\nsource = { subject = \"x\" }\n";
        let e = errors(&format!(
            "[host]\nwatch = false\nworker_threads = 0\nshards = 0\n{handler}"
        ));
        assert!(
            e[0].starts_with("/nowhere/wharf.toml:3: host.worker_threads: must be at least 1"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("/nowhere/wharf.toml:4: host.shards: must be at least 1"),
            "{e:?}"
        );
        // One is allowed (only the missing component is reported).
        let e = errors(&format!("[host]\nworker_threads = 1\nshards = 1\n{handler}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("handlers.a.component"), "{e:?}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = errors("[host]\nhttp = \n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("/nowhere/wharf.toml:2: "), "{e:?}");
    }
}
