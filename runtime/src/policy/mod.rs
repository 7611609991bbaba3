//! The policy engine: rules over the actions the runtime controls (send, receive, network,
//! writable paths, exec of handlers, resource requests), deny-overrides-allow evaluation with
//! default deny, conditions on message metadata, and audit selection.
//!
//! Statements are written in the policy syntax of `docs/dsl.md` (inside an agent
//! definition's `policy { ... }` blocks, or one per entry of `AgentConfig::policies`), parsed
//! by [`crate::dsl`] into [`PolicyStatement`]s and compiled into a [`PolicySet`]:
//!
//! ```
//! use symbiont_runtime::policy::{AgentRef, MessageMeta, PolicySet};
//! use symbiont_runtime::Priority;
//!
//! let set = PolicySet::from_sources(&[
//!     "allow send to topic \"summary\" when priority >= High",
//!     "deny network",
//! ])
//! .expect("valid statements");
//! let urgent = MessageMeta::new("summary").priority(Priority::Critical);
//! assert!(set.check_send(AgentRef::NONE, urgent).is_ok());
//! let low = MessageMeta::new("summary").priority(Priority::Low);
//! assert_eq!(set.check_send(AgentRef::NONE, low).unwrap_err().code(), "SEC_001");
//! assert!(set.check_network().is_err());
//! ```
//!
//! The hooks other components call:
//! - the bus: [`AgentPolicies::check_send`] / [`AgentPolicies::check_receive`] (or
//!   [`PolicySet::check_send`] / [`PolicySet::check_receive`] on one agent's set);
//! - sandbox setup: [`PolicySet::check_network`], [`PolicySet::writable_paths`],
//!   [`PolicySet::read_only_paths`];
//! - the scheduler: [`PolicySet::check_exec`], [`PolicySet::check_resources`].
//!
//! [`PolicyEnforcer`] wraps one agent's set with the audit sink so that each check records
//! what the policy's `audit` selection asks for.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use thiserror::Error;

use crate::integrations::audit_trail::AuditSink;
use crate::types::{AgentId, ResourceLimits};

mod engine;
mod model;

pub use engine::{
    is_normal_path, is_normalized_absolute, resource_amount, Action, AgentRef, Decision,
    MessageMeta, PolicySet, RuleId,
};
pub use model::{
    ActionKind, ActionPattern, AgentPattern, AuditMode, AuditSpec, CmpOp, Condition, Effect,
    Origin, PeerPattern, PolicyStatement, ResourceKind, RuleSpec, TextPattern,
};

/// Errors of the policy engine.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// A policy denied the action.
    #[error("security violation: policy denies {action} ({rule})")]
    Denied {
        /// What was attempted.
        action: String,
        /// The rule that refused it (text and origin), or the default.
        rule: String,
        /// True when the policy's audit selection wants the denial recorded.
        audit: bool,
    },
    /// A statement cannot be enforced as written.
    #[error("invalid policy {rule}: {reason}")]
    Invalid {
        /// The statement and where it was written.
        rule: String,
        /// Why it is refused.
        reason: String,
    },
    /// Policy statements did not parse; the text is the rendered diagnostics.
    #[error("{0}")]
    Syntax(String),
}

impl PolicyError {
    /// Stable code: SEC_001 for a denial, SEC_002 for a statement that is invalid or does not
    /// parse.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::Denied { .. } => "SEC_001",
            PolicyError::Invalid { .. } | PolicyError::Syntax(_) => "SEC_002",
        }
    }
}

impl PolicySet {
    /// Parses and compiles policy statements written as text (each entry one or more
    /// statements, as in `AgentConfig::policies`). Errors carry rendered diagnostics.
    pub fn from_sources<S: AsRef<str>>(sources: &[S]) -> Result<Self, PolicyError> {
        let mut statements = Vec::new();
        for (i, source) in sources.iter().enumerate() {
            let name = format!("policies[{i}]");
            match crate::dsl::parse_policy(source.as_ref(), &name) {
                Ok(parsed) => statements.extend(parsed),
                Err(diagnostics) => return Err(PolicyError::Syntax(diagnostics.render())),
            }
        }
        PolicySet::compile(statements)
    }
}

/// One agent's policy set together with the audit sink: every check evaluates, records the
/// decision when the policy's `audit` selection asks for it, and returns SEC_001 on denial.
#[derive(Clone)]
pub struct PolicyEnforcer {
    agent_id: AgentId,
    policy: Arc<PolicySet>,
    audit: Option<AuditSink>,
}

impl std::fmt::Debug for PolicyEnforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEnforcer")
            .field("agent_id", &self.agent_id)
            .field("rules", &self.policy.len())
            .field("audited", &self.audit.is_some())
            .finish()
    }
}

impl PolicyEnforcer {
    /// An enforcer for `agent_id`; decisions are recorded into `audit` when given.
    pub fn new(agent_id: AgentId, policy: Arc<PolicySet>, audit: Option<AuditSink>) -> Self {
        PolicyEnforcer {
            agent_id,
            policy,
            audit,
        }
    }

    /// The policy set.
    pub fn policy(&self) -> &Arc<PolicySet> {
        &self.policy
    }

    /// Evaluates `action`, audits as selected, and refuses with SEC_001.
    pub fn check(&self, action: &Action<'_>) -> Result<Decision, PolicyError> {
        let decision = self.policy.evaluate(action);
        self.record(action, &decision);
        if decision.allowed {
            Ok(decision)
        } else {
            tracing::info!(agent = %self.agent_id, %action, "policy denied");
            Err(self.policy.denial(action, &decision))
        }
    }

    fn record(&self, action: &Action<'_>, decision: &Decision) {
        if decision.audit {
            if let Some(audit) = &self.audit {
                audit.submit(
                    self.policy
                        .audit_event(Some(self.agent_id), action, decision),
                );
            }
        }
    }

    /// See [`PolicySet::check_send`].
    pub fn check_send(
        &self,
        to: AgentRef<'_>,
        meta: MessageMeta<'_>,
    ) -> Result<Decision, PolicyError> {
        self.check(&Action::Send { to, meta })
    }

    /// See [`PolicySet::check_receive`].
    pub fn check_receive(
        &self,
        from: AgentRef<'_>,
        meta: MessageMeta<'_>,
    ) -> Result<Decision, PolicyError> {
        self.check(&Action::Receive { from, meta })
    }

    /// See [`PolicySet::check_network`].
    pub fn check_network(&self) -> Result<Decision, PolicyError> {
        self.check(&Action::Network)
    }

    /// See [`PolicySet::check_write`].
    pub fn check_write(&self, path: &std::path::Path) -> Result<Decision, PolicyError> {
        match self.policy.check_write(path) {
            Ok(d) => {
                self.record(&Action::Write { path }, &d);
                Ok(d)
            }
            Err(e) => {
                let decision = self.policy.evaluate(&Action::Write { path });
                let decision = Decision {
                    allowed: false,
                    ..decision
                };
                self.record(&Action::Write { path }, &decision);
                Err(e)
            }
        }
    }

    /// See [`PolicySet::check_exec`].
    pub fn check_exec(&self, handler: &str) -> Result<Decision, PolicyError> {
        self.check(&Action::Exec { handler })
    }

    /// See [`PolicySet::check_resources`]; each audited resource decision is recorded.
    pub fn check_resources(&self, limits: &ResourceLimits) -> Result<(), PolicyError> {
        let mut first_denial = None;
        for (kind, amount, decision) in self.policy.evaluate_resources(limits) {
            let action = Action::Resource { kind, amount };
            self.record(&action, &decision);
            if !decision.allowed && first_denial.is_none() {
                first_denial = Some(self.policy.denial(&action, &decision));
            }
        }
        first_denial.map_or(Ok(()), Err)
    }
}

struct Registered {
    name: String,
    policy: Arc<PolicySet>,
}

/// Every agent's policy set by id: the adapter the communication bus calls for each delivery
/// (the sender's `send` rules, then each recipient's `receive` rules), auditing decisions as
/// each agent's policy selects.
#[derive(Default)]
pub struct AgentPolicies {
    agents: RwLock<HashMap<AgentId, Registered>>,
    audit: Option<AuditSink>,
}

impl std::fmt::Debug for AgentPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPolicies")
            .field("agents", &self.agents.read().len())
            .finish()
    }
}

impl AgentPolicies {
    /// An empty registry recording decisions into `audit` when given.
    pub fn new(audit: Option<AuditSink>) -> Self {
        AgentPolicies {
            agents: RwLock::new(HashMap::new()),
            audit,
        }
    }

    /// Registers (or replaces) an agent's name and policy set.
    pub fn register(&self, id: AgentId, name: impl Into<String>, policy: Arc<PolicySet>) {
        self.agents.write().insert(
            id,
            Registered {
                name: name.into(),
                policy,
            },
        );
    }

    /// Forgets an agent.
    pub fn unregister(&self, id: AgentId) {
        self.agents.write().remove(&id);
    }

    /// An agent's policy set.
    pub fn policy(&self, id: AgentId) -> Option<Arc<PolicySet>> {
        self.agents.read().get(&id).map(|r| r.policy.clone())
    }

    /// An agent's registered name.
    pub fn name(&self, id: AgentId) -> Option<String> {
        self.agents.read().get(&id).map(|r| r.name.clone())
    }

    fn unknown(id: AgentId, what: &str) -> PolicyError {
        PolicyError::Denied {
            action: format!("{what} by agent {id}"),
            rule: "the agent has no registered policy".into(),
            audit: true,
        }
    }

    fn audit_decision(
        &self,
        agent: AgentId,
        policy: &PolicySet,
        action: &Action<'_>,
        decision: &Decision,
    ) {
        if decision.audit {
            if let Some(audit) = &self.audit {
                audit.submit(policy.audit_event(Some(agent), action, decision));
            }
        }
    }

    /// May `from` send this message to `to` (`None`: a topic publish)? Unknown senders are
    /// refused.
    pub fn check_send(
        &self,
        from: AgentId,
        to: Option<AgentId>,
        meta: MessageMeta<'_>,
    ) -> Result<Decision, PolicyError> {
        let agents = self.agents.read();
        let sender = agents
            .get(&from)
            .ok_or_else(|| Self::unknown(from, "send"))?;
        let to_name = to.and_then(|id| agents.get(&id)).map(|r| r.name.as_str());
        let action = Action::Send {
            to: AgentRef {
                name: to_name,
                id: to,
            },
            meta,
        };
        let decision = sender.policy.evaluate(&action);
        self.audit_decision(from, &sender.policy, &action, &decision);
        if decision.allowed {
            Ok(decision)
        } else {
            Err(sender.policy.denial(&action, &decision))
        }
    }

    /// May `to` receive this message from `from`? Unknown recipients are refused.
    pub fn check_receive(
        &self,
        to: AgentId,
        from: AgentId,
        meta: MessageMeta<'_>,
    ) -> Result<Decision, PolicyError> {
        let agents = self.agents.read();
        let recipient = agents
            .get(&to)
            .ok_or_else(|| Self::unknown(to, "receive"))?;
        let from_name = agents.get(&from).map(|r| r.name.as_str());
        let action = Action::Receive {
            from: AgentRef {
                name: from_name,
                id: Some(from),
            },
            meta,
        };
        let decision = recipient.policy.evaluate(&action);
        self.audit_decision(to, &recipient.policy, &action, &decision);
        if decision.allowed {
            Ok(decision)
        } else {
            Err(recipient.policy.denial(&action, &decision))
        }
    }

    /// A direct delivery: the sender's send check, then the recipient's receive check.
    pub fn check_delivery(
        &self,
        from: AgentId,
        to: AgentId,
        meta: MessageMeta<'_>,
    ) -> Result<(), PolicyError> {
        self.check_send(from, Some(to), meta)?;
        self.check_receive(to, from, meta)?;
        Ok(())
    }
}
