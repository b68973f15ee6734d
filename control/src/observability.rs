//! Logging setup from `[log]`: pretty or JSON, a default level plus per-module levels.

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// The `EnvFilter` directive string for a `[log]` section, or why it is invalid.
pub fn filter_directives(log: &LogConfig) -> Result<String, String> {
    let mut directives = vec![log.level.clone()];
    for (module, level) in &log.modules {
        directives.push(format!("{module}={level}"));
    }
    let joined = directives.join(",");
    EnvFilter::builder()
        .parse(&joined)
        .map_err(|e| format!("invalid log level/module filter {joined:?}: {e}"))?;
    Ok(joined)
}

/// Installs the global subscriber (stderr). `RUST_LOG`, when set, replaces the configured filter.
pub fn init(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::builder().parse(v).ok())
        .or_else(|| {
            filter_directives(log)
                .ok()
                .and_then(|d| EnvFilter::builder().parse(d).ok())
        })
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match log.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
