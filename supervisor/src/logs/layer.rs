//! The tracing layer that turns records into queued JSON entries, with the journal's
//! field names: spans' fields (root first) then the event's, uppercased.

use super::Shared;
use crate::telemetry::AGENT_TARGET;
use serde_json::{Map, Value};
use std::sync::Arc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Feeds a [`Shared`] queue. Cheap when shipping is off (one atomic load per record).
pub struct ShipLayer {
    shared: Arc<Shared>,
}

impl ShipLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// A span's fields, by journal name, kept in the span's extensions.
struct SpanFields(Map<String, Value>);

/// The journal's name of a field: uppercased, anything but letters, digits and `_` as
/// `_` (what tracing-journald writes); the event's `message` is `MESSAGE`.
fn journal_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The journal's priority of a level (tracing-journald's mapping).
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "5",
        Level::DEBUG => "6",
        _ => "7",
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            journal_name(field.name()),
            Value::String(format!("{value:?}")),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(journal_name(field.name()), Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(journal_name(field.name()), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(journal_name(field.name()), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(journal_name(field.name()), value.into());
    }
}

impl<S> Layer<S> for ShipLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !self.shared.keeps_records() {
            return;
        }
        let mut map = Map::new();
        attrs.record(&mut Fields(&mut map));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(map));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        match ext.get_mut::<SpanFields>() {
            Some(fields) => values.record(&mut Fields(&mut fields.0)),
            None if self.shared.keeps_records() => {
                let mut map = Map::new();
                values.record(&mut Fields(&mut map));
                ext.insert(SpanFields(map));
            }
            None => {}
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if !self.shared.keeps_records() {
            return;
        }
        let meta = event.metadata();
        let mut map = Map::new();
        map.insert("PRIORITY".into(), priority(meta.level()).into());
        let identifier = if meta.target() == AGENT_TARGET {
            "semaphore-agent"
        } else {
            "agent-supervisor"
        };
        map.insert("SYSLOG_IDENTIFIER".into(), identifier.into());
        map.insert("TARGET".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    map.extend(fields.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut Fields(&mut map));
        self.shared.push(map);
    }
}
