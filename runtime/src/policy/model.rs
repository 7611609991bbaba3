//! The policy vocabulary: statements as written (rules and audit selections), the action
//! kinds they govern and the patterns and conditions they match with.
//!
//! These types are produced by the DSL parser ([`crate::dsl::parse_policy`]) and compiled
//! into a [`crate::policy::PolicySet`].

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::types::{AgentId, Priority};

/// Whether a rule grants or refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Effect {
    /// Grants the action (unless a deny rule also matches: deny overrides allow).
    Allow,
    /// Refuses the action.
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        })
    }
}

/// The kinds of action the runtime controls. Rules are indexed by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ActionKind {
    /// Sending a message (to an agent or on a topic).
    Send,
    /// Receiving a message (from an agent or on a topic).
    Receive,
    /// Having network access at all.
    Network,
    /// Writing to a path outside the private workspace.
    Write,
    /// Running one of the agent's handlers.
    Exec,
    /// Requesting an amount of a resource.
    Resource,
}

impl ActionKind {
    /// All kinds, in index order.
    pub const ALL: [ActionKind; 6] = [
        ActionKind::Send,
        ActionKind::Receive,
        ActionKind::Network,
        ActionKind::Write,
        ActionKind::Exec,
        ActionKind::Resource,
    ];

    /// Number of kinds.
    pub const COUNT: usize = 6;

    /// Index into per-kind tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The keyword naming this kind in `audit ... for KIND` statements.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Send => "send",
            ActionKind::Receive => "receive",
            ActionKind::Network => "network",
            ActionKind::Write => "write",
            ActionKind::Exec => "exec",
            ActionKind::Resource => "resources",
        }
    }

    /// Parses an audit kind name (`send`, `receive`, `network`, `write`, `exec`,
    /// `resources`/`resource`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "send" => Some(ActionKind::Send),
            "receive" => Some(ActionKind::Receive),
            "network" => Some(ActionKind::Network),
            "write" => Some(ActionKind::Write),
            "exec" => Some(ActionKind::Exec),
            "resources" | "resource" => Some(ActionKind::Resource),
            _ => None,
        }
    }

    /// True when the action is refused unless a rule (or a capability) grants it.
    /// Resource requests are the exception: allowed unless denied, or unless `allow`
    /// rules exist for that resource, which then must grant it.
    pub fn needs_grant(self) -> bool {
        !matches!(self, ActionKind::Resource)
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A resource an agent requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResourceKind {
    /// Memory in MiB.
    Memory,
    /// CPU in cores.
    Cpu,
    /// Disk bandwidth in MB/s (0 = unlimited, compared as infinite).
    DiskIo,
    /// Network bandwidth in Mb/s (0 = unlimited, compared as infinite).
    NetworkIo,
    /// Execution timeout in seconds.
    Timeout,
}

impl ResourceKind {
    /// All resources, in index order.
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Memory,
        ResourceKind::Cpu,
        ResourceKind::DiskIo,
        ResourceKind::NetworkIo,
        ResourceKind::Timeout,
    ];

    /// Index into per-resource tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The keyword naming it in rules (`memory`, `cpu`, `disk_io`, `network_io`, `timeout`).
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Memory => "memory",
            ResourceKind::Cpu => "cpu",
            ResourceKind::DiskIo => "disk_io",
            ResourceKind::NetworkIo => "network_io",
            ResourceKind::Timeout => "timeout",
        }
    }

    /// The unit amounts are compared in.
    pub fn unit(self) -> &'static str {
        match self {
            ResourceKind::Memory => "MiB",
            ResourceKind::Cpu => "cores",
            ResourceKind::DiskIo => "MB/s",
            ResourceKind::NetworkIo => "Mb/s",
            ResourceKind::Timeout => "s",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CmpOp {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl CmpOp {
    /// Parses `<`, `<=`, `>`, `>=`, `==`, `!=`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "<" => CmpOp::Lt,
            "<=" => CmpOp::Le,
            ">" => CmpOp::Gt,
            ">=" => CmpOp::Ge,
            "==" => CmpOp::Eq,
            "!=" => CmpOp::Ne,
            _ => return None,
        })
    }

    /// `lhs OP rhs`.
    #[inline]
    pub fn holds<T: PartialOrd>(self, lhs: T, rhs: T) -> bool {
        match self {
            CmpOp::Lt => lhs < rhs,
            CmpOp::Le => lhs <= rhs,
            CmpOp::Gt => lhs > rhs,
            CmpOp::Ge => lhs >= rhs,
            CmpOp::Eq => lhs == rhs,
            CmpOp::Ne => lhs != rhs,
        }
    }

    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// A name pattern: `*` matches any run of characters (`"reports.*"`, `"*"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TextPattern {
    /// Matches everything (`any`, or `"*"`).
    Any,
    /// Matches exactly this text.
    Exact(String),
    /// Matches text starting with this prefix (`"reports.*"`).
    Prefix(String),
    /// A pattern with `*` wildcards elsewhere.
    Glob(String),
}

impl TextPattern {
    /// Compiles a written pattern.
    pub fn new(text: &str) -> Self {
        if text == "*" {
            return TextPattern::Any;
        }
        match text.find('*') {
            None => TextPattern::Exact(text.to_string()),
            Some(i) if i == text.len() - 1 => TextPattern::Prefix(text[..i].to_string()),
            Some(_) => TextPattern::Glob(text.to_string()),
        }
    }

    /// True when `text` matches. Never allocates.
    #[inline]
    pub fn matches(&self, text: &str) -> bool {
        match self {
            TextPattern::Any => true,
            TextPattern::Exact(e) => e == text,
            TextPattern::Prefix(p) => text.starts_with(p.as_str()),
            TextPattern::Glob(g) => glob_match(g.as_bytes(), text.as_bytes()),
        }
    }

    /// The exact text when this pattern is exact (used to index rules).
    pub fn exact(&self) -> Option<&str> {
        match self {
            TextPattern::Exact(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for TextPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextPattern::Any => f.write_str("any"),
            TextPattern::Exact(e) => write!(f, "{e:?}"),
            TextPattern::Prefix(p) => write!(f, "\"{}*\"", p.escape_debug()),
            TextPattern::Glob(g) => write!(f, "{g:?}"),
        }
    }
}

/// `*`-wildcard matching without allocation (greedy with single backtrack point).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Which agents a rule names: by name pattern, or by id when the text is a UUID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentPattern {
    /// Agents whose name matches.
    Name(TextPattern),
    /// The agent with this id.
    Id(AgentId),
}

impl AgentPattern {
    /// Compiles a written agent reference: a UUID names an id, anything else a name pattern.
    pub fn new(text: &str) -> Self {
        match text.parse::<AgentId>() {
            Ok(id) => AgentPattern::Id(id),
            Err(_) => AgentPattern::Name(TextPattern::new(text)),
        }
    }
}

impl fmt::Display for AgentPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentPattern::Name(p) => p.fmt(f),
            AgentPattern::Id(id) => write!(f, "\"{id}\""),
        }
    }
}

/// The other side of a message: `any`, `agent "NAME"` or `topic "NAME"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeerPattern {
    /// Any agent, any topic.
    Any,
    /// Messages to (or from) matching agents.
    Agent(AgentPattern),
    /// Messages on matching topics.
    Topic(TextPattern),
}

impl fmt::Display for PeerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPattern::Any => f.write_str("any"),
            PeerPattern::Agent(a) => write!(f, "agent {a}"),
            PeerPattern::Topic(t) => write!(f, "topic {t}"),
        }
    }
}

/// What a rule is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActionPattern {
    /// `send to TARGET`
    Send(PeerPattern),
    /// `receive from TARGET`
    Receive(PeerPattern),
    /// `network`
    Network,
    /// `write "/abs/path"`: the path and everything beneath it.
    Write(PathBuf),
    /// `exec "handler"` / `exec any`
    Exec(TextPattern),
    /// `memory > 1024` and friends; the amount is in the resource's unit.
    Resource {
        /// Which resource.
        kind: ResourceKind,
        /// How the request is compared.
        op: CmpOp,
        /// The bound, in [`ResourceKind::unit`].
        amount: f64,
    },
}

impl ActionPattern {
    /// The kind of action this pattern matches.
    pub fn kind(&self) -> ActionKind {
        match self {
            ActionPattern::Send(_) => ActionKind::Send,
            ActionPattern::Receive(_) => ActionKind::Receive,
            ActionPattern::Network => ActionKind::Network,
            ActionPattern::Write(_) => ActionKind::Write,
            ActionPattern::Exec(_) => ActionKind::Exec,
            ActionPattern::Resource { .. } => ActionKind::Resource,
        }
    }
}

impl fmt::Display for ActionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActionPattern::Send(p) => write!(f, "send to {p}"),
            ActionPattern::Receive(p) => write!(f, "receive from {p}"),
            ActionPattern::Network => f.write_str("network"),
            ActionPattern::Write(p) => write!(f, "write {:?}", p.display().to_string()),
            ActionPattern::Exec(p) => write!(f, "exec {p}"),
            ActionPattern::Resource { kind, op, amount } => write!(f, "{kind} {op} {amount}"),
        }
    }
}

/// A condition on a message's metadata (`when ...`). Only send and receive rules have them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    /// `priority OP Level`
    Priority(CmpOp, Priority),
    /// `size OP BYTES` (payload size)
    Size(CmpOp, u64),
    /// `meta "key" == "value"` / `!=`; a missing key never equals and always differs.
    Meta {
        /// Metadata key.
        key: String,
        /// `Eq` or `Ne`.
        op: CmpOp,
        /// Compared value.
        value: String,
    },
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Priority(op, p) => write!(f, "priority {op} {p:?}"),
            Condition::Size(op, n) => write!(f, "size {op} {n}"),
            Condition::Meta { key, op, value } => write!(f, "meta {key:?} {op} {value:?}"),
        }
    }
}

/// Where a statement came from, for error messages and audit records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Source name: the definition's file name, `policies[N]`, or `implicit`.
    pub source: String,
    /// 1-based line (0 for implicit rules).
    pub line: usize,
    /// 1-based column (0 for implicit rules).
    pub column: usize,
}

impl Origin {
    /// An origin for a rule the runtime derived (capabilities, declared handlers).
    pub fn implicit() -> Self {
        Origin {
            source: "implicit".into(),
            line: 0,
            column: 0,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.source)
        } else {
            write!(f, "{}:{}:{}", self.source, self.line, self.column)
        }
    }
}

/// One `allow`/`deny` rule as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Allow or deny.
    pub effect: Effect,
    /// What it is about.
    pub action: ActionPattern,
    /// All must hold for the rule to match (message actions only).
    pub conditions: Vec<Condition>,
    /// The statement's text, for audit records and error messages.
    pub text: String,
    /// Where it was written.
    pub origin: Origin,
}

impl RuleSpec {
    /// A rule without conditions whose text is its canonical form.
    pub fn new(effect: Effect, action: ActionPattern, origin: Origin) -> Self {
        let text = format!("{effect} {action}");
        RuleSpec {
            effect,
            action,
            conditions: Vec::new(),
            text,
            origin,
        }
    }
}

/// What gets recorded in the audit trail for decisions of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum AuditMode {
    /// Every decision.
    All,
    /// Only denials (the default).
    #[default]
    Denials,
    /// Nothing.
    None,
}

/// `audit all|denials|none [for KIND, ...]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSpec {
    /// What to record.
    pub mode: AuditMode,
    /// For which kinds; empty = all kinds.
    pub kinds: Vec<ActionKind>,
    /// Where it was written.
    pub origin: Origin,
}

/// One statement of a policy block or of `AgentConfig::policies`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PolicyStatement {
    /// An allow/deny rule.
    Rule(RuleSpec),
    /// An audit selection; later statements override earlier ones for the kinds they name.
    Audit(AuditSpec),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns_match_like_shell_stars() {
        assert!(TextPattern::new("*").matches("anything"));
        assert!(TextPattern::new("reports.*").matches("reports.daily"));
        assert!(!TextPattern::new("reports.*").matches("report"));
        assert!(TextPattern::new("a*c").matches("abbbc"));
        assert!(TextPattern::new("*.log").matches("x.log"));
        assert!(!TextPattern::new("*.log").matches("x.log.gz"));
        assert!(TextPattern::new("a*b*c").matches("a-b-b-c"));
        assert!(!TextPattern::new("a*b*c").matches("a-c"));
        assert!(TextPattern::new("exact").matches("exact"));
        assert!(!TextPattern::new("exact").matches("exactly"));
    }

    #[test]
    fn cmp_ops_compare() {
        assert!(CmpOp::Ge.holds(Priority::High, Priority::High));
        assert!(CmpOp::Gt.holds(2.0, 1.0));
        assert!(!CmpOp::Lt.holds(2, 1));
        assert!(CmpOp::Ne.holds(1, 2));
    }

    #[test]
    fn agent_pattern_recognizes_ids() {
        let id = AgentId::new();
        assert_eq!(AgentPattern::new(&id.to_string()), AgentPattern::Id(id));
        assert!(matches!(
            AgentPattern::new("collector"),
            AgentPattern::Name(_)
        ));
    }
}
