//! The agent definition language carried in `AgentConfig::dsl_source`: its grammar
//! (`grammar.pest`, parsed with pest), the checks that turn a parse tree into an
//! [`AgentDefinition`], the diagnostics people can act on, and the mapping of a definition
//! onto a [`crate::sandbox::SandboxSpec`], [`Handler`]s and a [`crate::policy::PolicySet`].
//! The reference is `docs/dsl.md`.
//!
//! ```
//! use symbiont_runtime::dsl;
//!
//! let source = r#"
//! agent summarizer {
//!   version = "1.2.0"
//!   run ["/bin/sh", "/workspace/summarize.sh"]
//!   file "summarize.sh" = "wc -w"
//!   on message "summarize" reply "summary"
//!   policy {
//!     allow send to topic "summary"
//!     allow receive from agent "collector"
//!     deny network
//!     audit all
//!   }
//! }
//! "#;
//! let def = dsl::check(source, "summarizer.agent").expect("valid");
//! assert_eq!(def.handlers[0].name, "message:summarize");
//!
//! let err = dsl::check("agent x { capabilities [netwrok] run [\"/bin/true\"] }", "x.agent")
//!     .unwrap_err();
//! assert!(err.render().contains("did you mean `network`?"));
//! ```
//!
//! No input makes the parser panic: the grammar has no recursive rules, sources are limited
//! in size, and every semantic problem is a diagnostic.

use std::path::{Path, PathBuf};

use thiserror::Error;

mod analyze;
mod diagnostics;
mod mapping;
mod model;
mod syntax;
mod values;

pub use diagnostics::{Diagnostic, Diagnostics, Severity};
pub use mapping::{compile_definition, CompiledAgent};
pub use model::{
    AgentDefinition, CronSchedule, Handler, HandlerOutput, LimitOverrides, Trigger, WorkspaceFile,
};

use crate::error::RuntimeError;
use crate::policy::PolicyStatement;
use crate::types::AgentConfig;

/// Errors of the agent definition language.
#[derive(Debug, Error)]
pub enum DslError {
    /// The source does not parse or does not make sense; the message has line, column, an
    /// excerpt and a hint.
    #[error("{0}")]
    Invalid(String),
}

impl DslError {
    /// Stable code: DSL_001 invalid definition.
    pub fn code(&self) -> &'static str {
        "DSL_001"
    }
}

impl From<Diagnostics> for DslError {
    fn from(d: Diagnostics) -> Self {
        DslError::Invalid(d.render())
    }
}

/// How a definition is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Directory host files (`file "x" from "y"`) are read from; `None` refuses host files.
    pub base_dir: Option<PathBuf>,
    /// Name of the source in diagnostics (`None`: `AGENT_NAME:dsl_source` in [`compile`]).
    pub file_name: Option<String>,
    /// Largest accepted source, in bytes.
    pub max_source_bytes: usize,
    /// Largest host file, in bytes.
    pub max_file_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            base_dir: None,
            file_name: None,
            max_source_bytes: 1024 * 1024,
            max_file_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Parses and checks a definition, reading host files from `options.base_dir`. On success
/// the definition carries its warnings; on failure every error (and warning) found.
pub fn load(
    source: &str,
    file_name: &str,
    options: &LoadOptions,
) -> Result<AgentDefinition, Diagnostics> {
    let mut diags = Diagnostics::new(file_name, source);
    if source.len() > options.max_source_bytes {
        diags
            .error(
                0..0,
                format!(
                    "the definition is {} bytes; at most {} are accepted",
                    source.len(),
                    options.max_source_bytes
                ),
                "too large",
            )
            .hint("move large file contents to host files (`file \"x\" from \"y\"`)");
        return Err(diags);
    }
    if source.trim().is_empty() {
        diags
            .error(0..0, "the definition is empty", "nothing here")
            .hint("an agent definition starts with `agent NAME {` and names its program with `run [...]`");
        return Err(diags);
    }
    let pair = match syntax::parse_definition(source) {
        Ok(pair) => pair,
        Err(e) => {
            syntax::report(&mut diags, source, &e);
            return Err(diags);
        }
    };
    let host = analyze::HostFiles {
        base_dir: options.base_dir.as_deref(),
        max_bytes: options.max_file_bytes,
    };
    let def = analyze::definition(pair, &mut diags, &host);
    match def {
        Some(mut def) if !diags.has_errors() => {
            def.warnings = diags.only_warnings();
            Ok(def)
        }
        _ => {
            if !diags.has_errors() {
                diags
                    .error(0..0, "the definition could not be read", "here")
                    .hint("check it against the reference in docs/dsl.md");
            }
            Err(diags)
        }
    }
}

/// Parses and checks a definition without reading host files (they are refused).
pub fn parse(source: &str, file_name: &str) -> Result<AgentDefinition, Diagnostics> {
    load(source, file_name, &LoadOptions::default())
}

/// What `symbiont dsl check FILE` runs: parses and checks `source`, reading host files
/// relative to the directory of `file_name` (the current directory when it has none).
pub fn check(source: &str, file_name: &str) -> Result<AgentDefinition, Diagnostics> {
    let dir = Path::new(file_name)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let options = LoadOptions {
        base_dir: Some(dir.to_path_buf()),
        ..LoadOptions::default()
    };
    load(source, file_name, &options)
}

/// Reads `path` and [`check`]s it; an unreadable file is reported as a diagnostic.
pub fn check_file(path: &Path) -> Result<AgentDefinition, Diagnostics> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(source) => check(&source, &name),
        Err(e) => {
            let mut d = Diagnostics::new(name.clone(), "");
            d.error(0..0, format!("cannot read {name}: {e}"), "unreadable")
                .hint("check the path and that the file is UTF-8 text");
            Err(d)
        }
    }
}

/// Parses policy statements written as text (an `AgentConfig::policies` entry, or the body
/// of a `policy { ... }` block), named `file_name` in diagnostics.
pub fn parse_policy(source: &str, file_name: &str) -> Result<Vec<PolicyStatement>, Diagnostics> {
    let mut diags = Diagnostics::new(file_name, source);
    if source.len() > LoadOptions::default().max_source_bytes {
        diags.error(0..0, "the policy text is too large", "too large");
        return Err(diags);
    }
    let pair = match syntax::parse_policy_statements(source) {
        Ok(pair) => pair,
        Err(e) => {
            syntax::report(&mut diags, source, &e);
            return Err(diags);
        }
    };
    let statements = analyze::policy_statements(pair, &mut diags);
    if diags.has_errors() {
        Err(diags)
    } else {
        Ok(statements)
    }
}

/// Loads `config.dsl_source` and merges it with `config` into what the runtime runs.
/// A bad definition is DSL_001 (the message is the rendered diagnostics); a definition whose
/// resources its own policy refuses is SEC_001; an impossible sandbox spec is SANDBOX_002.
pub fn compile(config: &AgentConfig, options: &LoadOptions) -> Result<CompiledAgent, RuntimeError> {
    let name = options
        .file_name
        .clone()
        .unwrap_or_else(|| format!("{}:dsl_source", config.name));
    let definition = load(&config.dsl_source, &name, options).map_err(DslError::from)?;
    compile_definition(definition, config)
}
