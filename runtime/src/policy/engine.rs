//! The compiled policy: rules indexed by action kind (and by exact topic, agent or handler
//! name), evaluated with deny-overrides-allow and default deny, without allocating.

use std::collections::HashMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{
    ActionKind, ActionPattern, AgentPattern, AuditMode, Condition, Effect, PeerPattern,
    PolicyStatement, ResourceKind, RuleSpec,
};
use super::PolicyError;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType};
use crate::types::{AgentId, Priority, ResourceLimits};

/// The other side of a message as the runtime knows it: its name and/or id. Rules naming an
/// agent by name match `name`; rules naming it by UUID match `id`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentRef<'a> {
    /// The agent's name (`AgentConfig::name`).
    pub name: Option<&'a str>,
    /// The agent's id.
    pub id: Option<AgentId>,
}

impl<'a> AgentRef<'a> {
    /// No agent (a message published on a topic without a direct recipient).
    pub const NONE: AgentRef<'static> = AgentRef {
        name: None,
        id: None,
    };

    /// An agent known by name and id.
    pub fn new(name: &'a str, id: AgentId) -> Self {
        AgentRef {
            name: Some(name),
            id: Some(id),
        }
    }

    /// An agent known by name only.
    pub fn named(name: &'a str) -> Self {
        AgentRef {
            name: Some(name),
            id: None,
        }
    }
}

impl fmt::Display for AgentRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name, self.id) {
            (Some(n), Some(id)) => write!(f, "agent `{n}` ({id})"),
            (Some(n), None) => write!(f, "agent `{n}`"),
            (None, Some(id)) => write!(f, "agent {id}"),
            (None, None) => f.write_str("no agent"),
        }
    }
}

/// What policies may look at in a message (never its payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageMeta<'a> {
    /// The message's topic.
    pub topic: &'a str,
    /// Its priority.
    pub priority: Priority,
    /// Payload size in bytes.
    pub size: usize,
    /// Its metadata (headers), if any.
    pub metadata: Option<&'a HashMap<String, String>>,
}

impl<'a> MessageMeta<'a> {
    /// Metadata of a message on `topic` with normal priority, size 0 and no headers.
    pub fn new(topic: &'a str) -> Self {
        MessageMeta {
            topic,
            priority: Priority::Normal,
            size: 0,
            metadata: None,
        }
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the payload size.
    pub fn size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }

    /// Sets the metadata.
    pub fn metadata(mut self, metadata: &'a HashMap<String, String>) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// An action the runtime is about to perform for an agent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action<'a> {
    /// The agent sends a message to `to` (or [`AgentRef::NONE`] for a topic publish).
    Send {
        /// Recipient, if direct.
        to: AgentRef<'a>,
        /// The message's metadata (topic, priority, size, headers).
        meta: MessageMeta<'a>,
    },
    /// The agent receives a message from `from`.
    Receive {
        /// Sender.
        from: AgentRef<'a>,
        /// The message's metadata.
        meta: MessageMeta<'a>,
    },
    /// The agent's sandbox gets network access.
    Network,
    /// The agent writes below `path` (absolute, outside its workspace).
    Write {
        /// The path.
        path: &'a Path,
    },
    /// The runtime runs the agent's handler `handler`.
    Exec {
        /// Handler name (see `docs/dsl.md`).
        handler: &'a str,
    },
    /// The agent requests `amount` of a resource (in [`ResourceKind::unit`];
    /// `f64::INFINITY` for "unlimited").
    Resource {
        /// Which resource.
        kind: ResourceKind,
        /// How much.
        amount: f64,
    },
}

impl Action<'_> {
    /// The action's kind.
    #[inline]
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Send { .. } => ActionKind::Send,
            Action::Receive { .. } => ActionKind::Receive,
            Action::Network => ActionKind::Network,
            Action::Write { .. } => ActionKind::Write,
            Action::Exec { .. } => ActionKind::Exec,
            Action::Resource { .. } => ActionKind::Resource,
        }
    }
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Send { to, meta } if to.name.is_none() && to.id.is_none() => {
                write!(f, "send on topic `{}`", meta.topic)
            }
            Action::Send { to, meta } => write!(f, "send to {to} on topic `{}`", meta.topic),
            Action::Receive { from, meta } => {
                write!(f, "receive from {from} on topic `{}`", meta.topic)
            }
            Action::Network => f.write_str("network access"),
            Action::Write { path } => write!(f, "write to {}", path.display()),
            Action::Exec { handler } => write!(f, "exec of handler `{handler}`"),
            Action::Resource { kind, amount } => {
                write!(f, "{kind} = {amount} {}", kind.unit())
            }
        }
    }
}

/// Identifies a rule inside its [`PolicySet`] (see [`PolicySet::rule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleId(pub u32);

/// The outcome of evaluating one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// True when the action may proceed.
    pub allowed: bool,
    /// The rule that decided (`None`: no rule matched and the default applied).
    pub rule: Option<RuleId>,
    /// True when the policy's audit selection wants this decision recorded.
    pub audit: bool,
}

impl RuleSpec {
    /// True when this rule applies to `action` (its kind, pattern and every condition
    /// match). Never allocates.
    #[inline]
    pub fn matches(&self, action: &Action<'_>) -> bool {
        match (&self.action, action) {
            (ActionPattern::Send(p), Action::Send { to: peer, meta })
            | (ActionPattern::Receive(p), Action::Receive { from: peer, meta }) => {
                peer_matches(p, peer, meta) && conditions_hold(&self.conditions, meta)
            }
            (ActionPattern::Network, Action::Network) => true,
            (ActionPattern::Write(root), Action::Write { path }) => path_within(path, root),
            (ActionPattern::Exec(p), Action::Exec { handler }) => p.matches(handler),
            (
                ActionPattern::Resource {
                    kind: rk,
                    op,
                    amount: bound,
                },
                Action::Resource { kind, amount },
            ) => rk == kind && op.holds(*amount, *bound),
            _ => false,
        }
    }
}

#[inline]
fn peer_matches(p: &PeerPattern, peer: &AgentRef<'_>, meta: &MessageMeta<'_>) -> bool {
    match p {
        PeerPattern::Any => true,
        PeerPattern::Topic(t) => t.matches(meta.topic),
        PeerPattern::Agent(AgentPattern::Name(n)) => peer.name.is_some_and(|name| n.matches(name)),
        PeerPattern::Agent(AgentPattern::Id(id)) => peer.id.as_ref() == Some(id),
    }
}

#[inline]
fn conditions_hold(conditions: &[Condition], meta: &MessageMeta<'_>) -> bool {
    conditions.iter().all(|c| match c {
        Condition::Priority(op, p) => op.holds(meta.priority, *p),
        Condition::Size(op, n) => op.holds(meta.size as u64, *n),
        Condition::Meta { key, op, value } => {
            let actual = meta.metadata.and_then(|m| m.get(key.as_str()));
            match (op, actual) {
                (super::model::CmpOp::Ne, None) => true,
                (_, None) => false,
                (op, Some(v)) => op.holds(v.as_str(), value.as_str()),
            }
        }
    })
}

/// Rules of one effect for one kind: those keyed by an exact topic/handler or agent name,
/// and the rest, scanned in order. Every list is sorted by rule id.
#[derive(Debug, Default, Clone)]
struct Bucket {
    // foldhash: keys are the policy's own names; lookups hash a message's topic or an agent's
    // name and never insert, so a fast non-DoS-resistant hash is fine here.
    by_key: foldhash::HashMap<Box<str>, Vec<u32>>,
    by_agent: foldhash::HashMap<Box<str>, Vec<u32>>,
    scan: Vec<u32>,
}

impl Bucket {
    fn insert(&mut self, id: u32, rule: &RuleSpec) {
        let key = match &rule.action {
            ActionPattern::Send(PeerPattern::Topic(t))
            | ActionPattern::Receive(PeerPattern::Topic(t))
            | ActionPattern::Exec(t) => t.exact().map(|k| (false, k)),
            ActionPattern::Send(PeerPattern::Agent(AgentPattern::Name(n)))
            | ActionPattern::Receive(PeerPattern::Agent(AgentPattern::Name(n))) => {
                n.exact().map(|k| (true, k))
            }
            _ => None,
        };
        match key {
            Some((false, k)) => self.by_key.entry(k.into()).or_default().push(id),
            Some((true, k)) => self.by_agent.entry(k.into()).or_default().push(id),
            None => self.scan.push(id),
        }
    }

    fn is_empty(&self) -> bool {
        self.by_key.is_empty() && self.by_agent.is_empty() && self.scan.is_empty()
    }

    /// The lowest-numbered matching rule.
    #[inline]
    fn first_match(&self, rules: &[RuleSpec], action: &Action<'_>) -> Option<u32> {
        let mut best = u32::MAX;
        let consider = |ids: &[u32], best: &mut u32| {
            for &i in ids {
                if i >= *best {
                    break;
                }
                if rules[i as usize].matches(action) {
                    *best = i;
                    break;
                }
            }
        };
        if !self.by_key.is_empty() {
            let key = match action {
                Action::Send { meta, .. } | Action::Receive { meta, .. } => Some(meta.topic),
                Action::Exec { handler } => Some(*handler),
                _ => None,
            };
            if let Some(ids) = key.and_then(|k| self.by_key.get(k)) {
                consider(ids, &mut best);
            }
        }
        if !self.by_agent.is_empty() {
            let name = match action {
                Action::Send { to: peer, .. } | Action::Receive { from: peer, .. } => peer.name,
                _ => None,
            };
            if let Some(ids) = name.and_then(|n| self.by_agent.get(n)) {
                consider(ids, &mut best);
            }
        }
        consider(&self.scan, &mut best);
        (best != u32::MAX).then_some(best)
    }
}

#[derive(Debug, Default, Clone)]
struct KindIndex {
    allow: Bucket,
    deny: Bucket,
}

/// A compiled set of policy statements for one agent.
///
/// Evaluation: the first (lowest-numbered) matching `deny` rule refuses; otherwise the
/// first matching `allow` rule grants; otherwise the kind's default applies — refuse for
/// send, receive, network, write and exec; allow for a resource unless `allow` rules exist
/// for that resource. Rules are indexed by kind and by exact name, so a decision touches only
/// the rules that can match; nothing is allocated.
#[derive(Debug, Clone)]
pub struct PolicySet {
    rules: Vec<RuleSpec>,
    index: [KindIndex; ActionKind::COUNT],
    resources: [KindIndex; 5],
    audit: [AuditMode; ActionKind::COUNT],
    writable: Vec<PathBuf>,
    read_only: Vec<PathBuf>,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::empty()
    }
}

impl PolicySet {
    /// A set without rules: every action needing a grant is refused; denials are audited.
    pub fn empty() -> Self {
        PolicySet {
            rules: Vec::new(),
            index: Default::default(),
            resources: Default::default(),
            audit: [AuditMode::Denials; ActionKind::COUNT],
            writable: Vec::new(),
            read_only: Vec::new(),
        }
    }

    /// Compiles statements, in order (later `audit` statements override earlier ones for
    /// the kinds they name). Refuses rules that cannot be enforced as written: conditions on
    /// anything but send/receive, relative or non-normalized write paths, non-finite bounds.
    pub fn compile(
        statements: impl IntoIterator<Item = PolicyStatement>,
    ) -> Result<Self, PolicyError> {
        let mut set = Self::empty();
        for statement in statements {
            match statement {
                PolicyStatement::Rule(rule) => set.push_rule(rule)?,
                PolicyStatement::Audit(a) => {
                    if a.kinds.is_empty() {
                        set.audit = [a.mode; ActionKind::COUNT];
                    } else {
                        for k in a.kinds {
                            set.audit[k.index()] = a.mode;
                        }
                    }
                }
            }
        }
        set.compute_paths();
        Ok(set)
    }

    fn push_rule(&mut self, mut rule: RuleSpec) -> Result<(), PolicyError> {
        let kind = rule.action.kind();
        let invalid = |why: String| PolicyError::Invalid {
            rule: format!("`{}` at {}", rule.text, rule.origin),
            reason: why,
        };
        if !rule.conditions.is_empty() && !matches!(kind, ActionKind::Send | ActionKind::Receive) {
            return Err(invalid(
                "`when` conditions apply to send and receive rules only".into(),
            ));
        }
        if let ActionPattern::Write(p) = &rule.action {
            if !is_normalized_absolute(p) {
                return Err(invalid(format!(
                    "write path `{}` must be absolute and contain no `.` or `..`",
                    p.display()
                )));
            }
        }
        if let ActionPattern::Write(p) = &mut rule.action {
            // Normal form (no `//`, no trailing `/`) so matching can compare bytes.
            *p = p.components().collect();
        }
        if let ActionPattern::Resource { amount, .. } = &rule.action {
            if !amount.is_finite() {
                return Err(invalid("the bound must be a finite number".into()));
            }
        }
        let id = u32::try_from(self.rules.len())
            .map_err(|_| invalid("too many rules (more than 4 billion)".into()))?;
        let index = match &rule.action {
            ActionPattern::Resource { kind, .. } => &mut self.resources[kind.index()],
            _ => &mut self.index[kind.index()],
        };
        match rule.effect {
            Effect::Allow => index.allow.insert(id, &rule),
            Effect::Deny => index.deny.insert(id, &rule),
        }
        self.rules.push(rule);
        Ok(())
    }

    fn compute_paths(&mut self) {
        let paths = |effect: Effect| -> Vec<PathBuf> {
            self.rules
                .iter()
                .filter(|r| r.effect == effect)
                .filter_map(|r| match &r.action {
                    ActionPattern::Write(p) => Some(p.clone()),
                    _ => None,
                })
                .collect()
        };
        let allowed = paths(Effect::Allow);
        let denied = paths(Effect::Deny);
        let mut writable: Vec<PathBuf> = allowed
            .iter()
            .filter(|a| !denied.iter().any(|d| a.starts_with(d)))
            .cloned()
            .collect();
        writable.sort();
        writable.dedup();
        // Drop paths already covered by a shorter writable path.
        let covered: Vec<bool> = writable
            .iter()
            .map(|p| writable.iter().any(|q| q != p && p.starts_with(q)))
            .collect();
        let mut i = 0;
        writable.retain(|_| {
            let keep = !covered[i];
            i += 1;
            keep
        });
        let mut read_only: Vec<PathBuf> = denied
            .into_iter()
            .filter(|d| writable.iter().any(|w| d.starts_with(w)))
            .collect();
        read_only.sort();
        read_only.dedup();
        self.writable = writable;
        self.read_only = read_only;
    }

    /// Decides `action`. Never allocates. A write to a path not in normal form (relative,
    /// or with `//`, `.`, `..` or a trailing `/`) is refused without consulting the rules.
    #[inline]
    pub fn evaluate(&self, action: &Action<'_>) -> Decision {
        let kind = action.kind();
        if let Action::Write { path } = action {
            if !is_normal_path(path) {
                return Decision {
                    allowed: false,
                    rule: None,
                    audit: self.audit[kind.index()] != AuditMode::None,
                };
            }
        }
        let (index, needs_grant) = match action {
            Action::Resource { kind: rk, .. } => {
                let idx = &self.resources[rk.index()];
                (idx, !idx.allow.is_empty())
            }
            _ => (&self.index[kind.index()], kind.needs_grant()),
        };
        let (allowed, rule) = if let Some(id) = index.deny.first_match(&self.rules, action) {
            (false, Some(RuleId(id)))
        } else if let Some(id) = index.allow.first_match(&self.rules, action) {
            (true, Some(RuleId(id)))
        } else {
            (!needs_grant, None)
        };
        let audit = match self.audit[kind.index()] {
            AuditMode::All => true,
            AuditMode::Denials => !allowed,
            AuditMode::None => false,
        };
        Decision {
            allowed,
            rule,
            audit,
        }
    }

    /// Decides `action` and turns a refusal into [`PolicyError::Denied`] (SEC_001) naming the
    /// rule (or the default) that refused it.
    pub fn check(&self, action: &Action<'_>) -> Result<Decision, PolicyError> {
        let decision = self.evaluate(action);
        if decision.allowed {
            Ok(decision)
        } else {
            Err(self.denial(action, &decision))
        }
    }

    /// The [`PolicyError::Denied`] describing a refused decision.
    pub fn denial(&self, action: &Action<'_>, decision: &Decision) -> PolicyError {
        PolicyError::Denied {
            action: action.to_string(),
            rule: self.describe(decision),
            audit: decision.audit,
        }
    }

    /// A one-line description of what decided: the rule's text and origin, or the default.
    pub fn describe(&self, decision: &Decision) -> String {
        match decision.rule.and_then(|id| self.rule(id)) {
            Some(rule) => format!("rule `{}` at {}", rule.text, rule.origin),
            None if decision.allowed => "allowed by default (no rule restricts it)".to_string(),
            None => "denied by default (no rule allows it)".to_string(),
        }
    }

    /// May the agent send this message? `to` is the recipient for a direct message,
    /// [`AgentRef::NONE`] for a topic publish.
    pub fn check_send(
        &self,
        to: AgentRef<'_>,
        meta: MessageMeta<'_>,
    ) -> Result<Decision, PolicyError> {
        self.check(&Action::Send { to, meta })
    }

    /// May the agent receive this message from `from`?
    pub fn check_receive(
        &self,
        from: AgentRef<'_>,
        meta: MessageMeta<'_>,
    ) -> Result<Decision, PolicyError> {
        self.check(&Action::Receive { from, meta })
    }

    /// May the agent's sandbox have network access? (Called at sandbox setup.)
    pub fn check_network(&self) -> Result<Decision, PolicyError> {
        self.check(&Action::Network)
    }

    /// May the agent write below `path`? Paths not in normal form are refused.
    pub fn check_write(&self, path: &Path) -> Result<Decision, PolicyError> {
        if !is_normal_path(path) {
            return Err(PolicyError::Denied {
                action: Action::Write { path }.to_string(),
                rule: "the path must be absolute, without `//`, `.`, `..` or a trailing `/`".into(),
                audit: self.audit[ActionKind::Write.index()] != AuditMode::None,
            });
        }
        self.check(&Action::Write { path })
    }

    /// The directories the sandbox should make writable (outside its workspace): every
    /// `allow write` path not itself denied, without paths nested in another.
    pub fn writable_paths(&self) -> &[PathBuf] {
        &self.writable
    }

    /// Paths denied for writing that lie inside a writable path; the sandbox must keep them
    /// read-only (for example with a read-only bind mount over them).
    pub fn read_only_paths(&self) -> &[PathBuf] {
        &self.read_only
    }

    /// May the runtime run handler `handler`? (Called by the scheduler before a dispatch.)
    pub fn check_exec(&self, handler: &str) -> Result<Decision, PolicyError> {
        self.check(&Action::Exec { handler })
    }

    /// Evaluates each resource of `limits` (0 for disk/network bandwidth means unlimited and
    /// is compared as infinite).
    pub fn evaluate_resources(
        &self,
        limits: &ResourceLimits,
    ) -> [(ResourceKind, f64, Decision); 5] {
        ResourceKind::ALL.map(|kind| {
            let amount = resource_amount(kind, limits);
            (
                kind,
                amount,
                self.evaluate(&Action::Resource { kind, amount }),
            )
        })
    }

    /// May the agent have these limits? The first refused resource is the error.
    /// (Called by the scheduler and resource admission.)
    pub fn check_resources(&self, limits: &ResourceLimits) -> Result<(), PolicyError> {
        for (kind, amount, decision) in self.evaluate_resources(limits) {
            if !decision.allowed {
                return Err(self.denial(&Action::Resource { kind, amount }, &decision));
            }
        }
        Ok(())
    }

    /// The rule with this id.
    pub fn rule(&self, id: RuleId) -> Option<&RuleSpec> {
        self.rules.get(id.0 as usize)
    }

    /// Every rule, in evaluation-id order.
    pub fn rules(&self) -> &[RuleSpec] {
        &self.rules
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The audit selection for a kind.
    pub fn audit_mode(&self, kind: ActionKind) -> AuditMode {
        self.audit[kind.index()]
    }

    /// The audit record of a decision (type [`AuditEventType::PolicyDecision`]; metadata
    /// `action_kind`, `action`, `allowed`, `rule`, and `rule_origin` when a rule decided).
    pub fn audit_event(
        &self,
        agent_id: Option<AgentId>,
        action: &Action<'_>,
        decision: &Decision,
    ) -> AuditEvent {
        let verdict = if decision.allowed {
            "allowed"
        } else {
            "denied"
        };
        let mut event = AuditEvent::new(
            AuditEventType::PolicyDecision,
            agent_id,
            format!("policy {verdict} {action}"),
        )
        .with("action_kind", action.kind().name())
        .with("action", action.to_string())
        .with("allowed", decision.allowed.to_string())
        .with("rule", self.describe(decision));
        if let Some(rule) = decision.rule.and_then(|id| self.rule(id)) {
            event = event.with("rule_origin", rule.origin.to_string());
        }
        event
    }
}

/// The amount of `kind` in `limits`, in the resource's policy unit.
pub fn resource_amount(kind: ResourceKind, limits: &ResourceLimits) -> f64 {
    let unlimited_if_zero = |v: u64| {
        if v == 0 {
            f64::INFINITY
        } else {
            v as f64
        }
    };
    match kind {
        ResourceKind::Memory => limits.memory_mb as f64,
        ResourceKind::Cpu => limits.cpu_cores,
        ResourceKind::DiskIo => unlimited_if_zero(limits.disk_io_mbps),
        ResourceKind::NetworkIo => unlimited_if_zero(limits.network_io_mbps),
        ResourceKind::Timeout => limits.execution_timeout.as_secs_f64(),
    }
}

/// True when `path` is `root` or lies below it. Both must be in normal form (see
/// [`is_normal_path`]); then comparing bytes equals comparing components.
#[inline]
fn path_within(path: &Path, root: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (p, r) = (path.as_os_str().as_bytes(), root.as_os_str().as_bytes());
    p.starts_with(r) && (p.len() == r.len() || r == b"/" || p[r.len()] == b'/')
}

/// True for an absolute path in normal form: no empty (`//`), `.` or `..` components and no
/// trailing `/` (except the root itself). One pass over the bytes.
#[inline]
pub fn is_normal_path(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    if bytes.len() == 1 {
        return true;
    }
    bytes[1..]
        .split(|&b| b == b'/')
        .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// True for an absolute path made only of normal components (no `.`, `..`).
pub fn is_normalized_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}
