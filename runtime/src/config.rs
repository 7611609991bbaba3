//! `runtime_config.toml` and the `SYMBIONT_*` environment variables, validated once into a
//! [`RuntimeConfig`].
//!
//! Each section's type is owned by its component (`[lifecycle]` → [`LifecycleConfig`], ...);
//! this module composes them, parses the file, applies environment overrides and runs every
//! section's [`Validate`] check. Errors name the offending key and its line:
//!
//! ```text
//! runtime_config.toml:3: lifecycle.max_agents: must be at least 1
//! ```
//!
//! Durations are written as humantime strings (`"60s"`, `"5m"`, `"250ms"`). Every field has a
//! default, so an empty file is a valid configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::communication::CommunicationConfig;
use crate::error_handler::ErrorHandlerConfig;
use crate::integrations::audit_trail::AuditConfig;
use crate::lifecycle::LifecycleConfig;
use crate::resource::ResourceManagerConfig;
use crate::sandbox::SandboxConfig;
use crate::scheduler::SchedulerConfig;
use crate::storage::StorageConfig;

/// Environment variable overriding `[log] level`.
pub const ENV_LOG_LEVEL: &str = "SYMBIONT_LOG_LEVEL";
/// Environment variable overriding `[lifecycle] max_agents`.
pub const ENV_MAX_AGENTS: &str = "SYMBIONT_MAX_AGENTS";
/// Environment variable overriding `[resource] enforcement_enabled`.
pub const ENV_RESOURCE_ENFORCEMENT: &str = "SYMBIONT_RESOURCE_ENFORCEMENT";

/// One problem found while validating a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `lifecycle.max_agents`.
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl ConfigIssue {
    /// A new issue for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Implemented by every configuration section: pushes one [`ConfigIssue`] per impossible
/// value (keys are full dotted paths).
pub trait Validate {
    /// Appends the problems of this section to `issues`.
    fn validate(&self, issues: &mut Vec<ConfigIssue>);
}

/// Errors loading or validating configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{origin}:{line}: {message}")]
    Parse {
        /// File name (or `<string>`).
        origin: String,
        /// 1-based line of the problem (0 when unknown).
        line: usize,
        /// The parser's explanation, naming the key.
        message: String,
    },
    /// A value is well-formed but impossible.
    #[error("{}", format_invalid(.origin, .issues))]
    Invalid {
        /// File name, `<string>` or `<env>`.
        origin: String,
        /// Every problem found, with its line when it came from the file.
        issues: Vec<(ConfigIssue, Option<usize>)>,
    },
    /// An environment variable has a value that cannot be used.
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is expected.
        message: String,
    },
}

fn format_invalid(origin: &str, issues: &[(ConfigIssue, Option<usize>)]) -> String {
    issues
        .iter()
        .map(|(issue, line)| match line {
            Some(line) => format!("{origin}:{line}: {}: {}", issue.key, issue.message),
            None => format!("{origin}: {}: {}", issue.key, issue.message),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Stable code: CONFIG_001 for every configuration error.
    pub fn code(&self) -> &'static str {
        "CONFIG_001"
    }
}

/// `[log]` configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `trace`, `debug`, `info`, `warn` or `error`, or a full `tracing` filter directive.
    pub level: String,
    /// `text` (human) or `json` (one object per line).
    pub format: LogFormat,
}

/// The log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON objects, one per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Validate for LogConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            issues.push(ConfigIssue::new(
                "log.level",
                format!(
                    "`{}` is not a log level (trace, debug, info, warn, error)",
                    self.level
                ),
            ));
        }
    }
}

/// `[api]` configuration of the HTTP service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on; loopback by default.
    pub listen: String,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7420".into(),
            max_body_bytes: 2 * 1024 * 1024,
        }
    }
}

impl Validate for ApiConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            issues.push(ConfigIssue::new(
                "api.listen",
                format!("`{}` is not an address like 127.0.0.1:7420", self.listen),
            ));
        }
        if self.max_body_bytes == 0 {
            issues.push(ConfigIssue::new("api.max_body_bytes", "must be at least 1"));
        }
    }
}

/// The whole runtime configuration: one field per section of `runtime_config.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `[lifecycle]`
    pub lifecycle: LifecycleConfig,
    /// `[resource]`
    pub resource: ResourceManagerConfig,
    /// `[scheduler]`
    pub scheduler: SchedulerConfig,
    /// `[communication]`
    pub communication: CommunicationConfig,
    /// `[error_handler]`
    pub error_handler: ErrorHandlerConfig,
    /// `[sandbox]`
    pub sandbox: SandboxConfig,
    /// `[audit]`
    pub audit: AuditConfig,
    /// `[storage]`
    pub storage: StorageConfig,
    /// `[api]`
    pub api: ApiConfig,
    /// `[log]`
    pub log: LogConfig,
}

impl RuntimeConfig {
    /// Reads, parses and validates `path`, then applies the `SYMBIONT_*` environment overrides.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_with_env(&text, &path.display().to_string(), &ProcessEnv)
    }

    /// Parses and validates TOML text (no environment overrides).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse_and_validate(text, "<string>", &NoEnv)
    }

    /// Parses TOML text, applies overrides from `env` and validates the result. `origin`
    /// names the text in error messages.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        Self::parse_and_validate(text, origin, env)
    }

    /// Defaults plus environment overrides, validated (for running without a file).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::parse_and_validate("", "<env>", &ProcessEnv)
    }

    fn parse_and_validate(
        text: &str,
        origin: &str,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let mut config: RuntimeConfig = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => (
                    line_of_offset(text, span.start),
                    key_at_offset(text, span.start),
                ),
                None => (0, None),
            };
            let message = e.message().trim();
            ConfigError::Parse {
                origin: origin.to_string(),
                line,
                message: match key {
                    Some(key) if !message.contains(&key) => format!("{key}: {message}"),
                    _ => message.to_string(),
                },
            }
        })?;
        config.apply_env(env)?;
        let issues = config.issues();
        if issues.is_empty() {
            Ok(config)
        } else {
            let located = issues
                .into_iter()
                .map(|issue| {
                    let line = line_of_key(text, &issue.key);
                    (issue, line)
                })
                .collect();
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                issues: located,
            })
        }
    }

    /// Applies `SYMBIONT_LOG_LEVEL`, `SYMBIONT_MAX_AGENTS` and
    /// `SYMBIONT_RESOURCE_ENFORCEMENT` from `env`.
    pub fn apply_env(&mut self, env: &dyn EnvSource) -> Result<(), ConfigError> {
        if let Some(level) = env.var(ENV_LOG_LEVEL) {
            self.log.level = level;
        }
        if let Some(value) = env.var(ENV_MAX_AGENTS) {
            self.lifecycle.max_agents =
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| ConfigError::Env {
                        var: ENV_MAX_AGENTS,
                        value: value.clone(),
                        message: "expected a whole number of agents".into(),
                    })?;
        }
        if let Some(value) = env.var(ENV_RESOURCE_ENFORCEMENT) {
            self.resource.enforcement_enabled =
                parse_bool(&value).ok_or_else(|| ConfigError::Env {
                    var: ENV_RESOURCE_ENFORCEMENT,
                    value: value.clone(),
                    message: "expected true/false, 1/0, yes/no or on/off".into(),
                })?;
        }
        Ok(())
    }

    /// Every problem of every section.
    pub fn issues(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        self.lifecycle.validate(&mut issues);
        self.resource.validate(&mut issues);
        self.scheduler.validate(&mut issues);
        self.communication.validate(&mut issues);
        self.error_handler.validate(&mut issues);
        self.sandbox.validate(&mut issues);
        self.audit.validate(&mut issues);
        self.storage.validate(&mut issues);
        self.api.validate(&mut issues);
        self.log.validate(&mut issues);
        issues
    }

    /// Checks the configuration as it stands (after programmatic changes).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let issues = self.issues();
        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: "<config>".into(),
                issues: issues.into_iter().map(|i| (i, None)).collect(),
            })
        }
    }

    /// The configuration as TOML (e.g. for `symbiont config check --print`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Where environment overrides come from (the process environment, or a map in tests).
pub trait EnvSource {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

struct NoEnv;

impl EnvSource for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

impl EnvSource for std::collections::HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key (`section.field`, nested as deep as needed) whose value covers byte
/// `offset` of `text`.
fn key_at_offset(text: &str, offset: usize) -> Option<String> {
    fn walk(table: &dyn toml_edit::TableLike, prefix: &str, offset: usize) -> Option<String> {
        for (name, item) in table.iter() {
            let key = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            };
            if let Some(inner) = item.as_table_like() {
                if let Some(found) = walk(inner, &key, offset) {
                    return Some(found);
                }
            } else if item.span().is_some_and(|s| s.contains(&offset)) {
                return Some(key);
            }
        }
        None
    }
    let doc: toml_edit::Document<String> = toml_edit::Document::parse(text.to_string()).ok()?;
    walk(doc.as_table(), "", offset)
}

/// The 1-based line where the dotted `key` (e.g. `sandbox.native.x`) is written in `text`.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc: toml_edit::Document<String> = toml_edit::Document::parse(text.to_string()).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, item) = table.get_key_value(part)?;
        if parts.peek().is_none() {
            let span = k.span().or_else(|| item.span())?;
            return Some(line_of_offset(text, span.start));
        }
        table = item.as_table_like()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const SEED_EXAMPLE: &str = r#"
[lifecycle]
initialization_timeout = "60s"
termination_timeout = "30s"
max_agents = 100

[resource]
total_memory = 8589934592  # 8GB
total_cpu_cores = 8
enforcement_enabled = true

[scheduler]
max_concurrent_tasks = 100
load_balancing_strategy = "ResourceBased"

[communication]
enable_encryption = true
max_message_size = 1048576  # 1MB

[error_handler]
enable_auto_recovery = true
max_recovery_attempts = 3
"#;

    #[test]
    fn seed_example_parses() {
        let config = RuntimeConfig::from_toml_str(SEED_EXAMPLE).expect("seed config is valid");
        assert_eq!(config.lifecycle.max_agents, 100);
        assert_eq!(
            config.lifecycle.initialization_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(config.resource.total_memory, 8_589_934_592);
        assert_eq!(config.communication.max_message_size, 1_048_576);
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = RuntimeConfig::from_toml_str("").expect("empty is valid");
        assert_eq!(config, RuntimeConfig::default());
    }

    #[test]
    fn unknown_key_is_refused_with_its_name_and_line() {
        let text = "[lifecycle]\nmax_agents = 3\nmax_agnets = 4\n";
        let err = RuntimeConfig::from_toml_str(text).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("max_agnets"), "{msg}");
        assert!(msg.contains(":3:"), "{msg}");
        assert_eq!(err.code(), "CONFIG_001");
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = RuntimeConfig::from_toml_str("[lifecycel]\nmax_agents = 3\n").expect_err("typo");
        assert!(err.to_string().contains("lifecycel"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = "\n[lifecycle]\nmax_agents = \"many\"\n";
        let err = RuntimeConfig::from_toml_str(text).expect_err("wrong type");
        let msg = err.to_string();
        assert!(msg.contains(":3:"), "{msg}");
        assert!(msg.contains("max_agents"), "{msg}");
    }

    #[test]
    fn unparsable_duration_names_key_and_line() {
        let text = "[lifecycle]\n\ninitialization_timeout = \"soon\"\n";
        let err = RuntimeConfig::from_toml_str(text).expect_err("bad duration");
        let msg = err.to_string();
        assert!(msg.contains(":3:"), "{msg}");
        assert!(msg.contains("initialization_timeout"), "{msg}");
    }

    #[test]
    fn impossible_value_names_key_and_line() {
        let text = "[log]\nlevel = \"info\"\n[lifecycle]\nmax_agents = 0\n";
        let err = RuntimeConfig::from_toml_str(text).expect_err("0 agents");
        let msg = err.to_string();
        assert!(msg.contains("<string>:4: lifecycle.max_agents"), "{msg}");
    }

    #[test]
    fn nested_key_is_located() {
        let text = "[sandbox]\nstate_dir = \"/x\"\n\n[sandbox.native]\n";
        assert_eq!(line_of_key(text, "sandbox.state_dir"), Some(2));
        let text = "[sandbox]\npids_limit = 2\n";
        let err = RuntimeConfig::from_toml_str(text).expect_err("too few pids");
        assert!(
            err.to_string().contains("<string>:2: sandbox.pids_limit"),
            "{err}"
        );
    }

    #[test]
    fn negative_memory_is_refused() {
        let err = RuntimeConfig::from_toml_str("[resource]\ntotal_memory = -1\n")
            .expect_err("negative memory");
        let msg = err.to_string();
        assert!(msg.contains("total_memory") && msg.contains(":2:"), "{msg}");
    }

    #[test]
    fn env_vars_override_the_file() {
        let text = "[lifecycle]\nmax_agents = 5\n[resource]\nenforcement_enabled = true\n";
        let env: HashMap<String, String> = [
            (ENV_MAX_AGENTS.to_string(), "42".to_string()),
            (ENV_RESOURCE_ENFORCEMENT.to_string(), "off".to_string()),
            (ENV_LOG_LEVEL.to_string(), "debug".to_string()),
        ]
        .into_iter()
        .collect();
        let config = RuntimeConfig::from_toml_with_env(text, "t.toml", &env).expect("valid");
        assert_eq!(config.lifecycle.max_agents, 42);
        assert!(!config.resource.enforcement_enabled);
        assert_eq!(config.log.level, "debug");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let env: HashMap<String, String> =
            [(ENV_MAX_AGENTS.to_string(), "lots".to_string())].into();
        let err = RuntimeConfig::from_toml_with_env("", "t.toml", &env).expect_err("bad env");
        assert!(err.to_string().contains(ENV_MAX_AGENTS), "{err}");
    }

    #[test]
    fn env_zero_agents_is_refused_too() {
        let env: HashMap<String, String> = [(ENV_MAX_AGENTS.to_string(), "0".to_string())].into();
        let err = RuntimeConfig::from_toml_with_env("", "t.toml", &env).expect_err("0 agents");
        assert!(err.to_string().contains("lifecycle.max_agents"), "{err}");
    }

    #[test]
    fn rendered_config_parses_back() {
        let config = RuntimeConfig::default();
        let back = RuntimeConfig::from_toml_str(&config.to_toml()).expect("round trip");
        assert_eq!(config, back);
    }
}
