//! From a definition and its [`AgentConfig`] to what the runtime runs: the
//! [`SandboxSpec`], the handler list and the compiled [`PolicySet`].
//!
//! Precedence (also in `docs/dsl.md`):
//! - program, environment, files, image, workdir, handlers: the definition's;
//! - tier: the stronger isolation of the definition's `tier` and `AgentConfig::security_tier`;
//! - limits: per limit, the smaller of the definition's and `AgentConfig::resource_limits`
//!   (0 bandwidth = unlimited counts as the largest); the config is the ceiling;
//! - capabilities: the union of the definition's and `AgentConfig::capabilities`, plus those
//!   implied by allow rules, minus what the merged policy refuses (`deny network`);
//! - policy: the definition's statements, then `AgentConfig::policies`, then implicit rules
//!   (`capability network` = allow network; each declared handler = allow exec of it);
//!   deny overrides allow, so the operator restricts an agent with `AgentConfig::policies`;
//! - `ExecutionMode::Scheduled { schedule }` adds a schedule handler unless the definition
//!   already has one with that schedule.

use std::sync::Arc;

use super::model::{AgentDefinition, CronSchedule, Handler, HandlerOutput, Trigger};
use super::{parse_policy, DslError};
use crate::error::RuntimeError;
use crate::policy::{
    ActionPattern, Effect, Origin, PolicySet, PolicyStatement, RuleSpec, TextPattern,
};
use crate::sandbox::{SandboxFile, SandboxSpec, WORKSPACE_DIR};
use crate::types::{AgentConfig, Capability, ExecutionMode, ResourceLimits};

/// Everything the runtime needs to run an agent, derived from its definition and config.
#[derive(Clone, Debug)]
pub struct CompiledAgent {
    /// The checked definition (with its warnings).
    pub definition: AgentDefinition,
    /// The sandbox to create: argv, env, files, image, capabilities, limits.
    pub spec: SandboxSpec,
    /// The effective isolation tier.
    pub tier: crate::types::SecurityTier,
    /// The handlers the scheduler (start, schedule) and the bus (message) drive.
    pub handlers: Vec<Handler>,
    /// The merged, compiled policy.
    pub policy: Arc<PolicySet>,
    /// What the merge changed, for the operator (e.g. a limit capped by the config).
    pub notes: Vec<String>,
}

impl CompiledAgent {
    /// The topics the agent's message handlers listen on.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.handlers.iter().filter_map(|h| match &h.trigger {
            Trigger::Message { topic } => Some(topic.as_str()),
            _ => None,
        })
    }

    /// The handler named `name`.
    pub fn handler(&self, name: &str) -> Option<&Handler> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

fn implicit(what: &str) -> Origin {
    Origin {
        source: format!("implicit ({what})"),
        line: 0,
        column: 0,
    }
}

/// Merges `definition` with `config` (see the module documentation for precedence).
pub fn compile_definition(
    definition: AgentDefinition,
    config: &AgentConfig,
) -> Result<CompiledAgent, RuntimeError> {
    let mut notes = Vec::new();

    // Handlers: the definition's, plus the config's schedule.
    let mut handlers = definition.handlers.clone();
    if let ExecutionMode::Scheduled { schedule } = &config.execution_mode {
        let cron = CronSchedule::parse(schedule).map_err(|why| {
            DslError::Invalid(format!(
                "AgentConfig.execution_mode: bad cron schedule `{schedule}`: {why}"
            ))
        })?;
        let present = handlers
            .iter()
            .any(|h| matches!(&h.trigger, Trigger::Schedule(c) if c.normalized == cron.normalized));
        if !present {
            let name = format!("schedule:{}", cron.expression);
            if handlers.iter().any(|h| h.name == name) {
                return Err(DslError::Invalid(format!(
                    "AgentConfig.execution_mode adds handler `{name}`, but the definition already has a handler with that name"
                ))
                .into());
            }
            notes.push(format!(
                "added handler `{name}` from AgentConfig.execution_mode"
            ));
            handlers.push(Handler {
                name,
                trigger: Trigger::Schedule(cron),
                output: HandlerOutput::None,
                timeout: None,
            });
        }
    }

    // Policy: definition, then config, then implicit grants.
    let mut statements: Vec<PolicyStatement> = definition.policy.clone();
    for (i, text) in config.policies.iter().enumerate() {
        let parsed = parse_policy(text, &format!("policies[{i}]"))
            .map_err(|d| DslError::Invalid(d.render()))?;
        statements.extend(parsed);
    }
    let mut capabilities: Vec<Capability> = definition.capabilities.clone();
    for cap in &config.capabilities {
        if !capabilities.contains(cap) {
            capabilities.push(cap.clone());
        }
    }
    if capabilities.contains(&Capability::Network) {
        statements.push(PolicyStatement::Rule(RuleSpec::new(
            Effect::Allow,
            ActionPattern::Network,
            implicit("capability `network`"),
        )));
    }
    for h in &handlers {
        statements.push(PolicyStatement::Rule(RuleSpec::new(
            Effect::Allow,
            ActionPattern::Exec(TextPattern::Exact(h.name.clone())),
            implicit(&format!("handler `{}` is declared", h.name)),
        )));
    }
    let policy = PolicySet::compile(statements)?;

    // Capabilities the sandbox gets.
    let messaging = policy.rules().iter().any(|r| {
        r.effect == Effect::Allow
            && matches!(r.action, ActionPattern::Send(_) | ActionPattern::Receive(_))
    });
    if messaging && !capabilities.contains(&Capability::Messaging) {
        capabilities.push(Capability::Messaging);
    }
    let network = policy.evaluate(&crate::policy::Action::Network).allowed;
    if network && !capabilities.contains(&Capability::Network) {
        capabilities.push(Capability::Network);
    } else if !network && capabilities.contains(&Capability::Network) {
        notes.push("capability `network` removed: the policy denies network".into());
        capabilities.retain(|c| *c != Capability::Network);
    }
    let writable = !policy.writable_paths().is_empty();
    if writable && !capabilities.contains(&Capability::FileSystem) {
        capabilities.push(Capability::FileSystem);
    } else if !writable && capabilities.contains(&Capability::FileSystem) {
        notes.push(
            "capability `filesystem` removed: no `allow write` rule names a writable path".into(),
        );
        capabilities.retain(|c| *c != Capability::FileSystem);
    }
    capabilities.sort();

    // Limits: the config is the ceiling.
    let limits = merge_limits(&config.resource_limits, &definition, &mut notes);

    let tier = definition
        .tier
        .unwrap_or_default()
        .max(config.security_tier);
    if definition.tier.is_some_and(|t| t < tier) {
        notes.push(format!(
            "tier {tier} from AgentConfig.security_tier applies (stronger than the definition's)"
        ));
    }

    let mut spec = SandboxSpec::new(config.id, definition.argv.clone());
    spec.env = definition
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    spec.files = definition
        .files
        .iter()
        .map(|f| SandboxFile {
            path: f.path.clone(),
            contents: f.contents.clone(),
            mode: f.mode,
        })
        .collect();
    spec.workdir = definition
        .workdir
        .clone()
        .unwrap_or_else(|| WORKSPACE_DIR.into());
    spec.image = definition.image.clone();
    spec.capabilities = capabilities;
    spec.limits = limits;
    spec.timeout = match config.execution_mode {
        ExecutionMode::Ephemeral | ExecutionMode::Scheduled { .. } => {
            Some(spec.limits.execution_timeout)
        }
        ExecutionMode::Persistent | ExecutionMode::EventDriven => None,
    };
    spec.validate()?;
    policy.check_resources(&spec.limits)?;

    Ok(CompiledAgent {
        definition,
        spec,
        tier,
        handlers,
        policy: Arc::new(policy),
        notes,
    })
}

fn merge_limits(
    config: &ResourceLimits,
    def: &AgentDefinition,
    notes: &mut Vec<String>,
) -> ResourceLimits {
    let mut out = config.clone();
    let o = &def.limits;
    let mut cap = |name: &str, asked: String, allowed: String| {
        notes.push(format!(
            "limits.{name}: the definition asks {asked}, AgentConfig allows {allowed}; {allowed} applies"
        ));
    };
    if let Some(m) = o.memory_mb {
        if m > config.memory_mb {
            cap(
                "memory",
                format!("{m} MiB"),
                format!("{} MiB", config.memory_mb),
            );
        }
        out.memory_mb = m.min(config.memory_mb);
    }
    if let Some(c) = o.cpu_cores {
        if c > config.cpu_cores {
            cap(
                "cpu",
                format!("{c} cores"),
                format!("{} cores", config.cpu_cores),
            );
        }
        out.cpu_cores = c.min(config.cpu_cores);
    }
    // 0 = unlimited: the larger the number the more it allows, except 0 which allows all.
    let min_bw = |def: u64, cfg: u64| match (def, cfg) {
        (d, 0) => d,
        (0, c) => c,
        (d, c) => d.min(c),
    };
    if let Some(d) = o.disk_io_mbps {
        let merged = min_bw(d, config.disk_io_mbps);
        if merged != d {
            cap(
                "disk_io",
                format!("{d} MB/s"),
                format!("{} MB/s", config.disk_io_mbps),
            );
        }
        out.disk_io_mbps = merged;
    }
    if let Some(n) = o.network_io_mbps {
        let merged = min_bw(n, config.network_io_mbps);
        if merged != n {
            cap(
                "network_io",
                format!("{n} Mb/s"),
                format!("{} Mb/s", config.network_io_mbps),
            );
        }
        out.network_io_mbps = merged;
    }
    if let Some(t) = o.execution_timeout {
        if t > config.execution_timeout {
            cap(
                "timeout",
                humantime::format_duration(t).to_string(),
                humantime::format_duration(config.execution_timeout).to_string(),
            );
        }
        out.execution_timeout = t.min(config.execution_timeout);
    }
    if let Some(t) = o.idle_timeout {
        if t > config.idle_timeout {
            cap(
                "idle_timeout",
                humantime::format_duration(t).to_string(),
                humantime::format_duration(config.idle_timeout).to_string(),
            );
        }
        out.idle_timeout = t.min(config.idle_timeout);
    }
    out
}
