//! Prometheus counters and gauges of the control side, rendered in the text exposition format.
//!
//! Hand-written because the control side needs a handful of labelled counters and a scrape
//! endpoint it already serves; a metrics framework would add a second HTTP stack for no gain.
//! Nothing here is on the packet path (the dataplane keeps its own counters and reports them).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A value read at scrape time.
pub struct Gauge {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Gauge {
    /// A gauge with string labels.
    pub fn new(name: &str, labels: &[(&str, String)], value: f64) -> Self {
        Self {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            value,
        }
    }
}

/// Labelled counters, keyed by metric name then rendered label set.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(&self, name: &str, label_pairs: &[(&str, &str)]) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry(name.to_string())
            .or_default()
            .entry(labels(label_pairs))
            .or_default() += 1;
    }

    /// Current value of a counter (tests, status).
    pub fn get(&self, name: &str, label_pairs: &[(&str, &str)]) -> u64 {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.get(name)
            .and_then(|m| m.get(&labels(label_pairs)))
            .copied()
            .unwrap_or(0)
    }

    /// Renders the counters, then `gauges` (name, labels, value) computed by the caller at scrape time.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (name, series) in c.iter() {
            let _ = writeln!(out, "# TYPE {name} counter");
            for (l, v) in series {
                let _ = writeln!(out, "{name}{l} {v}");
            }
        }
        let mut last = "";
        for Gauge {
            name,
            labels: l,
            value: v,
        } in gauges
        {
            if name != last {
                let _ = writeln!(out, "# TYPE {name} gauge");
                last = name;
            }
            let pairs: Vec<(&str, &str)> =
                l.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let _ = writeln!(out, "{name}{} {v}", labels(&pairs));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inc("siptg_sip_requests_total", &[("method", "OPTIONS")]);
        m.inc("siptg_sip_requests_total", &[("method", "OPTIONS")]);
        let text = m.render(&[Gauge::new("siptg_up", &[("role", "worker".into())], 1.0)]);
        assert!(text.contains("# TYPE siptg_sip_requests_total counter\n"));
        assert!(text.contains("siptg_sip_requests_total{method=\"OPTIONS\"} 2\n"));
        assert!(text.contains("siptg_up{role=\"worker\"} 1\n"));
        assert_eq!(
            m.get("siptg_sip_requests_total", &[("method", "OPTIONS")]),
            2
        );
    }
}
