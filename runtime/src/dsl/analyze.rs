//! From the parse tree to an [`AgentDefinition`]: every semantic check (unknown keys and
//! capabilities, duplicates, bad versions, cron expressions, units, paths) reported as a
//! diagnostic with a hint, plus warnings for definitions that parse but will not work.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use pest::iterators::Pair;

use super::diagnostics::{did_you_mean, Diagnostics};
use super::model::{
    AgentDefinition, CronSchedule, Handler, HandlerOutput, LimitOverrides, Trigger, WorkspaceFile,
};
use super::syntax::Rule;
use super::values;
use crate::policy::{
    is_normalized_absolute, ActionKind, ActionPattern, AgentPattern, AuditMode, AuditSpec, CmpOp,
    Condition, Effect, Origin, PeerPattern, PolicyStatement, ResourceKind, RuleSpec, TextPattern,
};
use crate::types::{Capability, Priority, SecurityTier};

/// Where host files (`file "x" from "y"`) are read from, and how much.
pub(crate) struct HostFiles<'o> {
    pub(crate) base_dir: Option<&'o Path>,
    pub(crate) max_bytes: u64,
}

const AGENT_KEYS: [&str; 5] = ["version", "description", "tier", "image", "workdir"];
const STATEMENT_KEYWORDS: [&str; 7] = [
    "run",
    "env",
    "file",
    "capabilities",
    "limits",
    "on",
    "policy",
];
const LIMIT_KEYS: [&str; 7] = [
    "memory",
    "cpu",
    "disk_io",
    "network_io",
    "timeout",
    "execution_timeout",
    "idle_timeout",
];
const CAPABILITIES: [&str; 3] = ["filesystem", "network", "messaging"];
const TIERS: [&str; 4] = ["native", "docker", "gvisor", "microvm"];
const AUDIT_KINDS: [&str; 6] = ["send", "receive", "network", "write", "exec", "resources"];
const PRIORITIES: [&str; 4] = ["low", "normal", "high", "critical"];

/// The pair's byte range, without trailing whitespace (a failed repetition at the end of a
/// rule can leave whitespace inside its span).
fn span(pair: &Pair<'_, Rule>) -> Range<usize> {
    let start = pair.as_span().start();
    start..start + pair.as_str().trim_end().len()
}

/// A literal value with its place in the source.
#[derive(Debug)]
enum Scalar {
    Str(String),
    Quantity(String),
    Bool(bool),
    Ident(String),
}

impl Scalar {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Str(_) => "a string",
            Scalar::Quantity(_) => "a number",
            Scalar::Bool(_) => "a boolean",
            Scalar::Ident(_) => "a bare word",
        }
    }

    /// The text of a string, or of a bare word / number (for values where either is fine).
    fn text(&self) -> String {
        match self {
            Scalar::Str(s) | Scalar::Quantity(s) | Scalar::Ident(s) => s.clone(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

enum Value {
    One(Scalar, Range<usize>),
    List(Range<usize>),
}

struct Analyzer<'d> {
    diags: &'d mut Diagnostics,
}

impl Analyzer<'_> {
    fn origin(&self, at: usize) -> Origin {
        let (line, column) = self.diags.line_col(at);
        Origin {
            source: self.diags.file_name().to_string(),
            line,
            column,
        }
    }

    /// Decodes a `string` pair; reports bad escapes.
    fn string(&mut self, pair: &Pair<'_, Rule>) -> Option<String> {
        let token = pair.as_str();
        match values::decode_string(token) {
            Ok(s) => Some(s),
            Err((offset, why)) => {
                let at = pair.as_span().start() + offset;
                self.diags
                    .error(at.saturating_sub(1)..at + 1, "invalid string", why)
                    .hint("to write a backslash itself, double it: `\\\\`");
                None
            }
        }
    }

    fn scalar(&mut self, pair: Pair<'_, Rule>) -> Option<(Scalar, Range<usize>)> {
        let sp = span(&pair);
        let inner = pair.into_inner().next()?;
        let s = match inner.as_rule() {
            Rule::string => Scalar::Str(self.string(&inner)?),
            Rule::quantity => Scalar::Quantity(inner.as_str().to_string()),
            Rule::boolean => Scalar::Bool(inner.as_str() == "true"),
            _ => Scalar::Ident(inner.as_str().to_string()),
        };
        Some((s, sp))
    }

    fn list(&mut self, pair: Pair<'_, Rule>) -> Option<Vec<(Scalar, Range<usize>)>> {
        let mut items = Vec::new();
        let mut ok = true;
        for p in pair.into_inner() {
            match self.scalar(p) {
                Some(s) => items.push(s),
                None => ok = false,
            }
        }
        ok.then_some(items)
    }

    fn value(&mut self, pair: Pair<'_, Rule>) -> Option<Value> {
        let sp = span(&pair);
        let inner = pair.into_inner().next()?;
        match inner.as_rule() {
            Rule::list => {
                self.list(inner)?;
                Some(Value::List(sp))
            }
            _ => {
                let (s, ssp) = self.scalar(inner)?;
                Some(Value::One(s, ssp))
            }
        }
    }

    fn expect_string(&mut self, value: Value, key: &str) -> Option<(String, Range<usize>)> {
        match value {
            Value::One(Scalar::Str(s), sp) => Some((s, sp)),
            Value::One(other, sp) => {
                let text = other.text();
                self.diags
                    .error(
                        sp,
                        format!("`{key}` must be a string"),
                        format!("this is {}", other.kind()),
                    )
                    .hint(format!("put it in double quotes: `{key} = \"{text}\"`"));
                None
            }
            Value::List(sp) => {
                self.diags
                    .error(
                        sp,
                        format!("`{key}` must be a string, not a list"),
                        "a list",
                    )
                    .hint(format!("write `{key} = \"...\"`"));
                None
            }
        }
    }

    // ------------------------------------------------------------------ the agent

    fn definition(
        &mut self,
        pair: Pair<'_, Rule>,
        host: &HostFiles<'_>,
    ) -> Option<AgentDefinition> {
        let agent = pair.into_inner().find(|p| p.as_rule() == Rule::agent)?;
        let mut inner = agent.into_inner();
        let _kw = inner.next()?;
        let name_pair = inner.next()?;
        let name_span = span(&name_pair);
        let mut def = AgentDefinition {
            name: name_pair.as_str().to_string(),
            version: None,
            description: None,
            tier: None,
            image: None,
            workdir: None,
            argv: Vec::new(),
            env: BTreeMap::new(),
            files: Vec::new(),
            capabilities: Vec::new(),
            limits: LimitOverrides::default(),
            handlers: Vec::new(),
            policy: Vec::new(),
            warnings: Diagnostics::new(self.diags.file_name(), ""),
        };
        let mut seen: HashMap<&'static str, Range<usize>> = HashMap::new();
        let mut env_spans: HashMap<String, Range<usize>> = HashMap::new();
        let mut file_spans: HashMap<PathBuf, Range<usize>> = HashMap::new();
        let mut handler_spans: Vec<Range<usize>> = Vec::new();
        let mut cap_spans: Vec<Range<usize>> = Vec::new();
        let mut run_seen = false;

        for item in inner {
            let item_span = span(&item);
            match item.as_rule() {
                Rule::setting => self.agent_setting(item, &mut def, &mut seen),
                Rule::run_stmt if self.once("run", item_span.clone(), &mut seen) => {
                    run_seen = true;
                    self.run(item, &mut def);
                }
                Rule::env_stmt => {
                    for pair in item.into_inner().flat_map(|p| {
                        if p.as_rule() == Rule::env_block {
                            p.into_inner().collect::<Vec<_>>()
                        } else {
                            vec![p]
                        }
                    }) {
                        if pair.as_rule() == Rule::env_pair {
                            self.env_pair(pair, &mut def, &mut env_spans);
                        }
                    }
                }
                Rule::file_stmt => self.file(item, &mut def, &mut file_spans, host),
                Rule::caps_stmt if self.once("capabilities", item_span.clone(), &mut seen) => {
                    self.capabilities(item, &mut def, &mut cap_spans);
                }
                Rule::limits_block if self.once("limits", item_span.clone(), &mut seen) => {
                    self.limits(item, &mut def);
                }
                Rule::handler => {
                    let errors_before = self.diags.errors().count();
                    match self.handler(item, &def.handlers, &handler_spans) {
                        Some(h) => {
                            def.handlers.push(h);
                            handler_spans.push(item_span);
                        }
                        None => self.never_silently_dropped(errors_before, item_span),
                    }
                }
                Rule::policy_block => {
                    for stmt in item.into_inner() {
                        if let Some(s) = self.policy_statement(stmt) {
                            def.policy.push(s);
                        }
                    }
                }
                _ => {}
            }
        }
        if !run_seen {
            self.diags
                .error(
                    name_span.clone(),
                    format!("agent `{}` has no program", def.name),
                    "no `run [...]` in this agent",
                )
                .hint("add the program to run, e.g. `run [\"/bin/sh\", \"/workspace/main.sh\"]`");
        }
        self.warn_unreachable(&def, &handler_spans, &cap_spans);
        Some(def)
    }

    /// Records the first occurrence of a once-only statement; reports later ones.
    fn once(
        &mut self,
        what: &'static str,
        sp: Range<usize>,
        seen: &mut HashMap<&'static str, Range<usize>>,
    ) -> bool {
        if let Some(first) = seen.get(what) {
            let first = first.clone();
            self.diags
                .error(sp, format!("duplicate `{what}`"), format!("`{what}` again"))
                .related(first, "first given here")
                .hint(format!(
                    "an agent has at most one `{what}`; remove one of them"
                ));
            false
        } else {
            seen.insert(what, sp);
            true
        }
    }

    fn agent_setting(
        &mut self,
        pair: Pair<'_, Rule>,
        def: &mut AgentDefinition,
        seen: &mut HashMap<&'static str, Range<usize>>,
    ) {
        let sp = span(&pair);
        let mut inner = pair.into_inner();
        let (Some(key_pair), Some(value_pair)) = (inner.next(), inner.next()) else {
            return;
        };
        let key_span = span(&key_pair);
        let key = key_pair.as_str();
        let Some(known) = AGENT_KEYS.iter().copied().find(|k| *k == key) else {
            let d = self.diags.error(
                key_span,
                format!("unknown key `{key}`"),
                "not a setting of an agent",
            );
            let hint = did_you_mean(
                key,
                AGENT_KEYS.iter().chain(STATEMENT_KEYWORDS.iter()).copied(),
            )
            .unwrap_or_else(|| {
                format!(
                    "the settings of an agent are {}",
                    AGENT_KEYS.map(|k| format!("`{k}`")).join(", ")
                )
            });
            d.hint(hint);
            return;
        };
        if !self.once(known, sp, seen) {
            return;
        }
        let Some(value) = self.value(value_pair) else {
            return;
        };
        match known {
            "version" => {
                let (text, vsp) = match value {
                    Value::One(Scalar::Str(s), vsp) | Value::One(Scalar::Quantity(s), vsp) => {
                        (s, vsp)
                    }
                    Value::One(other, vsp) => (other.text(), vsp),
                    Value::List(vsp) => (String::new(), vsp),
                };
                match semver::Version::parse(&text) {
                    Ok(_) => def.version = Some(text),
                    Err(e) => {
                        self.diags
                            .error(vsp, format!("bad version `{text}`"), e.to_string())
                            .hint("versions are semantic versions MAJOR.MINOR.PATCH, e.g. `version = \"1.2.0\"`");
                    }
                }
            }
            "description" => {
                if let Some((s, _)) = self.expect_string(value, "description") {
                    def.description = Some(s);
                }
            }
            "image" => {
                if let Some((s, vsp)) = self.expect_string(value, "image") {
                    if s.trim().is_empty() {
                        self.diags.error(vsp, "empty image name", "no image named").hint(
                            "name a local image, e.g. `image = \"local/busybox:latest\"`, or remove the line",
                        );
                    } else {
                        def.image = Some(s);
                    }
                }
            }
            "workdir" => {
                if let Some((s, vsp)) = self.expect_string(value, "workdir") {
                    let p = PathBuf::from(&s);
                    if is_normalized_absolute(&p) {
                        def.workdir = Some(p);
                    } else {
                        self.diags
                            .error(vsp, format!("bad workdir `{s}`"), "not an absolute path")
                            .hint("write an absolute path without `.` or `..`, e.g. `workdir = \"/workspace\"`");
                    }
                }
            }
            "tier" => {
                let (text, vsp) = match value {
                    Value::One(s, vsp) => (s.text(), vsp),
                    Value::List(vsp) => (String::new(), vsp),
                };
                match parse_tier(&text) {
                    Some(t) => def.tier = Some(t),
                    None => {
                        let hint = did_you_mean(&text, TIERS).unwrap_or_else(|| {
                            "the tiers are `native`, `docker`, `gvisor` and `microvm`".into()
                        });
                        self.diags
                            .error(vsp, format!("unknown tier `{text}`"), "not a security tier")
                            .hint(hint);
                    }
                }
            }
            _ => {}
        }
    }

    fn run(&mut self, pair: Pair<'_, Rule>, def: &mut AgentDefinition) {
        let Some(list) = pair.into_inner().find(|p| p.as_rule() == Rule::list) else {
            return;
        };
        let list_span = span(&list);
        let Some(items) = self.list(list) else {
            return;
        };
        if items.is_empty() {
            self.diags
                .error(
                    list_span,
                    "empty program",
                    "`run` needs at least the program",
                )
                .hint("e.g. `run [\"/bin/sh\", \"/workspace/main.sh\"]`");
            return;
        }
        let mut argv = Vec::new();
        for (i, (item, sp)) in items.into_iter().enumerate() {
            match item {
                Scalar::Str(s) => {
                    if i == 0 && s.is_empty() {
                        self.diags
                            .error(sp, "empty program path", "empty")
                            .hint("the first element is the program, e.g. \"/bin/sh\"");
                    }
                    argv.push(s);
                }
                other => {
                    let text = other.text();
                    self.diags
                        .error(
                            sp,
                            "program arguments must be strings",
                            format!("this is {}", other.kind()),
                        )
                        .hint(format!("put it in double quotes: `\"{text}\"`"));
                }
            }
        }
        def.argv = argv;
    }

    fn env_pair(
        &mut self,
        pair: Pair<'_, Rule>,
        def: &mut AgentDefinition,
        spans: &mut HashMap<String, Range<usize>>,
    ) {
        let mut inner = pair.into_inner();
        let (Some(key), Some(value)) = (inner.next(), inner.next()) else {
            return;
        };
        let key_span = span(&key);
        let name = key.as_str().to_string();
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            self.diags
                .error(key_span.clone(), format!("bad environment variable name `{name}`"), "not a variable name")
                .hint("names are letters, digits and `_`, not starting with a digit, e.g. `LOG_LEVEL`");
            return;
        }
        if let Some(first) = spans.get(&name) {
            let first = first.clone();
            self.diags
                .error(
                    key_span,
                    format!("duplicate environment variable `{name}`"),
                    "set again",
                )
                .related(first, "first set here")
                .hint("set each variable once");
            return;
        }
        let Some((scalar, vsp)) = self.scalar(value) else {
            return;
        };
        match scalar {
            Scalar::Str(s) => {
                spans.insert(name.clone(), key_span);
                def.env.insert(name, s);
            }
            other => {
                let text = other.text();
                self.diags
                    .error(
                        vsp,
                        "environment values must be strings",
                        format!("this is {}", other.kind()),
                    )
                    .hint(format!("put it in double quotes: `{name} = \"{text}\"`"));
            }
        }
    }

    fn file(
        &mut self,
        pair: Pair<'_, Rule>,
        def: &mut AgentDefinition,
        spans: &mut HashMap<PathBuf, Range<usize>>,
        host: &HostFiles<'_>,
    ) {
        let mut path: Option<(String, Range<usize>)> = None;
        let mut mode: Option<u32> = None;
        let mut contents: Option<Vec<u8>> = None;
        let mut host_path: Option<PathBuf> = None;
        let mut ok = true;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::string => {
                    let sp = span(&p);
                    match self.string(&p) {
                        Some(s) => path = Some((s, sp)),
                        None => ok = false,
                    }
                }
                Rule::file_mode => {
                    if let Some(q) = p.into_inner().find(|q| q.as_rule() == Rule::quantity) {
                        match values::parse_mode(q.as_str()) {
                            Ok(m) => mode = Some(m),
                            Err(why) => {
                                self.diags.error(span(&q), "bad file mode", why).hint(
                                    "modes are octal, as for chmod: `0755` for programs, `0644` for data",
                                );
                                ok = false;
                            }
                        }
                    }
                }
                Rule::file_inline => {
                    if let Some(s) = p.into_inner().next() {
                        match self.string(&s) {
                            Some(text) => contents = Some(text.into_bytes()),
                            None => ok = false,
                        }
                    }
                }
                Rule::file_from => {
                    if let Some(s) = p.into_inner().find(|q| q.as_rule() == Rule::string) {
                        let sp = span(&s);
                        match self.string(&s) {
                            Some(rel) => match self.read_host_file(&rel, sp, host) {
                                Some((resolved, bytes)) => {
                                    host_path = Some(resolved);
                                    contents = Some(bytes);
                                }
                                None => ok = false,
                            },
                            None => ok = false,
                        }
                    }
                }
                _ => {}
            }
        }
        let Some((path, path_span)) = path else {
            return;
        };
        let pb = PathBuf::from(&path);
        let relative_ok =
            !path.is_empty() && pb.components().all(|c| matches!(c, Component::Normal(_)));
        if !relative_ok {
            let stripped = path
                .trim_start_matches("/workspace/")
                .trim_start_matches('/');
            self.diags
                .error(
                    path_span,
                    format!("bad workspace file path `{path}`"),
                    "must be relative to the workspace",
                )
                .hint(format!(
                    "files are placed in /workspace; write the path relative to it, without `.` or `..`, e.g. `file \"{}\"`",
                    if stripped.is_empty() || stripped.contains("..") { "main.sh" } else { stripped }
                ));
            return;
        }
        if let Some(first) = spans.get(&pb) {
            let first = first.clone();
            self.diags
                .error(
                    path_span,
                    format!("duplicate file `{path}`"),
                    "placed again",
                )
                .related(first, "first placed here")
                .hint("place each file once");
            return;
        }
        if !ok {
            return;
        }
        let Some(contents) = contents else {
            return;
        };
        spans.insert(pb.clone(), path_span);
        let mode = mode.unwrap_or(if contents.starts_with(b"#!") {
            0o755
        } else {
            0o644
        });
        def.files.push(WorkspaceFile {
            path: pb,
            mode,
            contents,
            host_path,
        });
    }

    fn read_host_file(
        &mut self,
        rel: &str,
        sp: Range<usize>,
        host: &HostFiles<'_>,
    ) -> Option<(PathBuf, Vec<u8>)> {
        let Some(base) = host.base_dir else {
            self.diags
                .error(sp, "host files need a definition loaded from a file", "no directory to read this from")
                .hint("give the content inline (`file \"x\" = \"\"\"...\"\"\"`) or load the definition from a file");
            return None;
        };
        let rel_path = Path::new(rel);
        let plain = !rel.is_empty()
            && rel_path
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            self.diags
                .error(sp, format!("bad host file path `{rel}`"), "must stay inside the definition's directory")
                .hint("host files are read relative to the definition file's directory; no absolute paths, `.` or `..`");
            return None;
        }
        let joined = base.join(rel_path);
        let fail = |diags: &mut Diagnostics, why: String| {
            diags
                .error(sp.clone(), format!("cannot read host file `{rel}`"), why)
                .hint(format!("the path is relative to {}", base.display()));
        };
        let canonical_base = match base.canonicalize() {
            Ok(b) => b,
            Err(e) => {
                fail(self.diags, e.to_string());
                return None;
            }
        };
        let resolved = match joined.canonicalize() {
            Ok(p) => p,
            Err(e) => {
                fail(self.diags, e.to_string());
                return None;
            }
        };
        if !resolved.starts_with(&canonical_base) {
            fail(
                self.diags,
                "it resolves (through a symbolic link) outside the definition's directory".into(),
            );
            return None;
        }
        match std::fs::metadata(&resolved) {
            Ok(m) if !m.is_file() => {
                fail(self.diags, "not a regular file".into());
                return None;
            }
            Ok(m) if m.len() > host.max_bytes => {
                fail(
                    self.diags,
                    format!(
                        "{} bytes is more than the {} byte limit",
                        m.len(),
                        host.max_bytes
                    ),
                );
                return None;
            }
            Err(e) => {
                fail(self.diags, e.to_string());
                return None;
            }
            Ok(_) => {}
        }
        match std::fs::read(&resolved) {
            Ok(bytes) => Some((resolved, bytes)),
            Err(e) => {
                fail(self.diags, e.to_string());
                None
            }
        }
    }

    fn capabilities(
        &mut self,
        pair: Pair<'_, Rule>,
        def: &mut AgentDefinition,
        spans: &mut Vec<Range<usize>>,
    ) {
        let Some(list) = pair.into_inner().find(|p| p.as_rule() == Rule::list) else {
            return;
        };
        let Some(items) = self.list(list) else {
            return;
        };
        for (item, sp) in items {
            let text = item.text();
            match text.parse::<Capability>() {
                Ok(cap) => {
                    if let Some(i) = def.capabilities.iter().position(|c| *c == cap) {
                        self.diags
                            .warning(sp, format!("capability `{cap}` is listed twice"), "again")
                            .related(spans[i].clone(), "first listed here");
                    } else {
                        def.capabilities.push(cap);
                        spans.push(sp);
                    }
                }
                Err(_) => {
                    let hint = did_you_mean(&text, CAPABILITIES).unwrap_or_else(|| {
                        "the capabilities are `filesystem`, `network`, `messaging` and \"custom:NAME\""
                            .into()
                    });
                    self.diags
                        .error(
                            sp,
                            format!("unknown capability `{text}`"),
                            "not a capability",
                        )
                        .hint(hint);
                }
            }
        }
    }

    fn limits(&mut self, pair: Pair<'_, Rule>, def: &mut AgentDefinition) {
        let mut seen: HashMap<&'static str, Range<usize>> = HashMap::new();
        for setting in pair.into_inner().filter(|p| p.as_rule() == Rule::setting) {
            let sp = span(&setting);
            let mut inner = setting.into_inner();
            let (Some(key_pair), Some(value_pair)) = (inner.next(), inner.next()) else {
                continue;
            };
            let key = key_pair.as_str();
            let Some(known) = LIMIT_KEYS.iter().copied().find(|k| *k == key) else {
                let hint = did_you_mean(key, LIMIT_KEYS).unwrap_or_else(|| {
                    "the limits are `memory`, `cpu`, `disk_io`, `network_io`, `timeout` and `idle_timeout`".into()
                });
                self.diags
                    .error(
                        span(&key_pair),
                        format!("unknown limit `{key}`"),
                        "not a resource limit",
                    )
                    .hint(hint);
                continue;
            };
            let canonical = if known == "execution_timeout" {
                "timeout"
            } else {
                known
            };
            if let Some(first) = seen.get(canonical) {
                let first = first.clone();
                self.diags
                    .error(sp, format!("duplicate limit `{canonical}`"), "set again")
                    .related(first, "first set here");
                continue;
            }
            seen.insert(canonical, sp);
            let Some(value) = self.value(value_pair) else {
                continue;
            };
            let (text, vsp) = match value {
                Value::One(s, vsp) => (s.text(), vsp),
                Value::List(vsp) => {
                    self.diags
                        .error(
                            vsp,
                            format!("`{canonical}` must be a single value"),
                            "a list",
                        )
                        .hint("limits take one value, e.g. `memory = 256MiB`");
                    continue;
                }
            };
            let result: Result<(), String> = match canonical {
                "memory" => values::parse_memory_mib(&text).and_then(|m| {
                    if m == 0 {
                        Err("memory must be at least 1 MiB".into())
                    } else {
                        def.limits.memory_mb = Some(m);
                        Ok(())
                    }
                }),
                "cpu" => match values::split_quantity(&text) {
                    Some((n, "")) if n > 0.0 && n <= 4096.0 => {
                        def.limits.cpu_cores = Some(n);
                        Ok(())
                    }
                    _ => Err(format!(
                        "`{text}` is not a number of cores above 0 (e.g. `0.5`, `2`)"
                    )),
                },
                "disk_io" | "network_io" => match values::split_quantity(&text) {
                    Some((n, "")) if n >= 0.0 && n.fract() == 0.0 && n < u64::MAX as f64 => {
                        if canonical == "disk_io" {
                            def.limits.disk_io_mbps = Some(n as u64);
                        } else {
                            def.limits.network_io_mbps = Some(n as u64);
                        }
                        Ok(())
                    }
                    _ => Err(format!(
                        "`{text}` is not a whole number of {} (0 = unlimited)",
                        if canonical == "disk_io" {
                            "MB/s"
                        } else {
                            "Mb/s"
                        }
                    )),
                },
                _ => values::parse_duration(&text).and_then(|d| {
                    if d.is_zero() {
                        Err("must be longer than 0s".into())
                    } else {
                        if canonical == "timeout" {
                            def.limits.execution_timeout = Some(d);
                        } else {
                            def.limits.idle_timeout = Some(d);
                        }
                        Ok(())
                    }
                }),
            };
            if let Err(why) = result {
                let example = match canonical {
                    "memory" => "memory = 256MiB",
                    "cpu" => "cpu = 0.5",
                    "disk_io" => "disk_io = 50",
                    "network_io" => "network_io = 10",
                    "timeout" => "timeout = 30m",
                    _ => "idle_timeout = 5m",
                };
                self.diags
                    .error(vsp, format!("bad `{canonical}` limit"), why)
                    .hint(format!("e.g. `{example}`"));
            }
        }
    }

    // ------------------------------------------------------------------ handlers

    fn handler(
        &mut self,
        pair: Pair<'_, Rule>,
        existing: &[Handler],
        existing_spans: &[Range<usize>],
    ) -> Option<Handler> {
        let handler_span = span(&pair);
        let mut trigger: Option<(Trigger, Range<usize>)> = None;
        let mut name: Option<(String, Range<usize>)> = None;
        let mut output = HandlerOutput::None;
        let mut output_span: Option<Range<usize>> = None;
        let mut timeout = None;
        let mut timeout_seen = false;
        let mut ok = true;
        for p in pair.into_inner() {
            let sp = span(&p);
            match p.as_rule() {
                Rule::trigger_start => trigger = Some((Trigger::Start, sp)),
                Rule::trigger_message => {
                    let s = p.into_inner().find(|q| q.as_rule() == Rule::string)?;
                    let ssp = span(&s);
                    let topic = self.string(&s)?;
                    if topic.trim().is_empty() {
                        self.diags
                            .error(ssp, "empty topic", "no topic named")
                            .hint("name the topic, e.g. `on message \"jobs\"`");
                        ok = false;
                    }
                    trigger = Some((Trigger::Message { topic }, sp));
                }
                Rule::trigger_schedule => {
                    let s = p.into_inner().find(|q| q.as_rule() == Rule::string)?;
                    let ssp = span(&s);
                    let expr = self.string(&s)?;
                    match CronSchedule::parse(&expr) {
                        Ok(c) => trigger = Some((Trigger::Schedule(c), sp)),
                        Err(why) => {
                            self.diags
                                .error(ssp, format!("bad cron schedule `{expr}`"), why)
                                .hint("5 fields `minute hour day-of-month month day-of-week` (e.g. \"*/5 * * * *\"), or 6 with seconds first (e.g. \"0 */5 * * * *\")");
                            ok = false;
                        }
                    }
                }
                Rule::opt_as => {
                    if name.is_some() {
                        self.diags
                            .error(sp, "duplicate `as`", "a handler has one name");
                        ok = false;
                        continue;
                    }
                    let n = p.into_inner().find(|q| q.as_rule() != Rule::kw_as)?;
                    let text = if n.as_rule() == Rule::string {
                        self.string(&n)?
                    } else {
                        n.as_str().to_string()
                    };
                    if text.trim().is_empty() {
                        self.diags
                            .error(sp, "empty handler name", "no name")
                            .hint("e.g. `as nightly`");
                        ok = false;
                    }
                    name = Some((text, span(&n)));
                }
                Rule::opt_reply | Rule::opt_send => {
                    let is_reply = p.as_rule() == Rule::opt_reply;
                    let s = p.into_inner().find(|q| q.as_rule() == Rule::string)?;
                    let topic = self.string(&s)?;
                    if let Some(first) = &output_span {
                        self.diags
                            .error(
                                sp,
                                "a handler's output goes to one place",
                                "second destination",
                            )
                            .related(first.clone(), "first destination")
                            .hint("keep either `reply \"TOPIC\"` or `send \"TOPIC\"`");
                        ok = false;
                        continue;
                    }
                    if topic.trim().is_empty() {
                        self.diags
                            .error(span(&s), "empty topic", "no topic named")
                            .hint("name the topic, e.g. `send \"results\"`");
                        ok = false;
                    }
                    output_span = Some(sp);
                    output = if is_reply {
                        HandlerOutput::Reply { topic }
                    } else {
                        HandlerOutput::Publish { topic }
                    };
                }
                Rule::opt_timeout => {
                    if timeout_seen {
                        self.diags
                            .error(sp, "duplicate `timeout`", "a handler has one timeout")
                            .hint("keep one `timeout DURATION`");
                        ok = false;
                        continue;
                    }
                    timeout_seen = true;
                    let v = p.into_inner().find(|q| q.as_rule() != Rule::kw_timeout)?;
                    let text = if v.as_rule() == Rule::string {
                        self.string(&v)?
                    } else {
                        v.as_str().to_string()
                    };
                    match values::parse_duration(&text) {
                        Ok(d) if !d.is_zero() => timeout = Some(d),
                        Ok(_) => {
                            self.diags
                                .error(span(&v), "bad handler timeout", "must be longer than 0s")
                                .hint(
                                    "e.g. `timeout 30s`; leave it out to use the agent's timeout",
                                );
                            ok = false;
                        }
                        Err(why) => {
                            self.diags
                                .error(span(&v), "bad handler timeout", why)
                                .hint("e.g. `timeout 30s`");
                            ok = false;
                        }
                    }
                }
                _ => {}
            }
        }
        let (trigger, trigger_span) = trigger?;
        if let (HandlerOutput::Reply { .. }, Some(osp)) = (&output, &output_span) {
            if !matches!(trigger, Trigger::Message { .. }) {
                self.diags
                    .error(
                        osp.clone(),
                        "nothing to reply to",
                        "only message handlers have a sender",
                    )
                    .hint("use `send \"TOPIC\"` to publish the output instead");
                ok = false;
            }
        }
        let (name, name_span) = match name {
            Some((n, sp)) => (n, sp),
            None => (
                match &trigger {
                    Trigger::Start => "start".to_string(),
                    Trigger::Message { topic } => format!("message:{topic}"),
                    Trigger::Schedule(c) => format!("schedule:{}", c.expression),
                },
                trigger_span.clone(),
            ),
        };
        for (other, other_span) in existing.iter().zip(existing_spans) {
            let clash = match (&trigger, &other.trigger) {
                (Trigger::Start, Trigger::Start) => Some("a second `on start` handler".to_string()),
                (Trigger::Message { topic: a }, Trigger::Message { topic: b }) if a == b => {
                    Some(format!("a second handler for messages on topic `{a}`"))
                }
                _ if other.name == name => Some(format!("a second handler named `{name}`")),
                _ => None,
            };
            if let Some(what) = clash {
                self.diags
                    .error(
                        name_span.clone(),
                        format!("duplicate handler: {what}"),
                        "duplicate",
                    )
                    .related(other_span.clone(), "the first one")
                    .hint("merge them into one handler, or name them apart with `as NAME`");
                return None;
            }
        }
        let _ = handler_span;
        ok.then_some(Handler {
            name,
            trigger,
            output,
            timeout,
        })
    }

    // ------------------------------------------------------------------ policies

    fn policy_statement(&mut self, pair: Pair<'_, Rule>) -> Option<PolicyStatement> {
        let errors_before = self.diags.errors().count();
        let sp = span(&pair);
        let statement = match pair.as_rule() {
            Rule::policy_rule => self.rule(pair).map(PolicyStatement::Rule),
            Rule::audit_stmt => self.audit(pair).map(PolicyStatement::Audit),
            // `policy`, `{`, `}` and end of input carry no statement.
            _ => return None,
        };
        if statement.is_none() {
            self.never_silently_dropped(errors_before, sp);
        }
        statement
    }

    /// A statement that yields nothing must have said why: a dropped `deny` would widen
    /// what the agent may do.
    fn never_silently_dropped(&mut self, errors_before: usize, sp: Range<usize>) {
        if self.diags.errors().count() == errors_before {
            self.diags
                .error(sp, "this statement could not be read", "not understood")
                .hint("check it against the reference in docs/dsl.md");
        }
    }

    fn target(&mut self, pair: Pair<'_, Rule>) -> Option<PeerPattern> {
        let mut inner = pair.into_inner();
        let kw = inner.next()?;
        match kw.as_rule() {
            Rule::kw_any => Some(PeerPattern::Any),
            other => {
                let s = inner.next()?;
                let sp = span(&s);
                let text = self.string(&s)?;
                if text.is_empty() {
                    self.diags
                        .error(sp, "empty name", "names nothing")
                        .hint("write a name, a pattern like \"reports.*\", or `any`");
                    return None;
                }
                Some(if other == Rule::kw_agent {
                    PeerPattern::Agent(AgentPattern::new(&text))
                } else {
                    PeerPattern::Topic(TextPattern::new(&text))
                })
            }
        }
    }

    fn rule(&mut self, pair: Pair<'_, Rule>) -> Option<RuleSpec> {
        let sp = span(&pair);
        let text = pair
            .as_str()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let origin = self.origin(sp.start);
        let mut inner = pair.into_inner();
        let effect = match inner.next()?.as_rule() {
            Rule::kw_allow => Effect::Allow,
            _ => Effect::Deny,
        };
        let act = inner.next()?;
        let act_span = span(&act);
        let action = match act.as_rule() {
            Rule::act_send | Rule::act_receive => {
                let is_send = act.as_rule() == Rule::act_send;
                let target = act.into_inner().find(|p| p.as_rule() == Rule::target)?;
                let peer = self.target(target)?;
                if is_send {
                    ActionPattern::Send(peer)
                } else {
                    ActionPattern::Receive(peer)
                }
            }
            Rule::act_network => ActionPattern::Network,
            Rule::act_write => {
                let s = act.into_inner().find(|p| p.as_rule() == Rule::string)?;
                let ssp = span(&s);
                let path = self.string(&s)?;
                let pb = PathBuf::from(&path);
                if !is_normalized_absolute(&pb) {
                    self.diags
                        .error(ssp, format!("bad write path `{path}`"), "not an absolute, normalized path")
                        .hint("write an absolute path without `.` or `..`, e.g. `allow write \"/var/lib/reports\"`; the workspace is always writable");
                    return None;
                }
                ActionPattern::Write(pb)
            }
            Rule::act_exec => {
                let t = act.into_inner().find(|p| p.as_rule() != Rule::kw_exec)?;
                if t.as_rule() == Rule::kw_any {
                    ActionPattern::Exec(TextPattern::Any)
                } else {
                    let name = self.string(&t)?;
                    ActionPattern::Exec(TextPattern::new(&name))
                }
            }
            Rule::act_resource => {
                let mut parts = act.into_inner();
                let kind = match parts.next()?.as_rule() {
                    Rule::kw_memory => ResourceKind::Memory,
                    Rule::kw_cpu => ResourceKind::Cpu,
                    Rule::kw_disk_io => ResourceKind::DiskIo,
                    Rule::kw_network_io => ResourceKind::NetworkIo,
                    _ => ResourceKind::Timeout,
                };
                let op = CmpOp::parse(parts.next()?.as_str())?;
                let v = parts.next()?;
                let vsp = span(&v);
                let vtext = if v.as_rule() == Rule::string {
                    self.string(&v)?
                } else {
                    v.as_str().to_string()
                };
                let amount = match kind {
                    ResourceKind::Memory => values::parse_memory_mib(&vtext).map(|m| m as f64),
                    ResourceKind::Timeout => {
                        values::parse_duration(&vtext).map(|d| d.as_secs_f64())
                    }
                    ResourceKind::Cpu | ResourceKind::DiskIo | ResourceKind::NetworkIo => {
                        match values::split_quantity(&vtext) {
                            Some((n, "")) if n >= 0.0 => Ok(n),
                            _ => Err(format!(
                                "`{vtext}` is not a plain number of {}",
                                kind.unit()
                            )),
                        }
                    }
                };
                match amount {
                    Ok(amount) => ActionPattern::Resource { kind, op, amount },
                    Err(why) => {
                        let example = match kind {
                            ResourceKind::Memory => "deny memory > 1GiB",
                            ResourceKind::Cpu => "deny cpu > 2",
                            ResourceKind::DiskIo => "deny disk_io > 100",
                            ResourceKind::NetworkIo => "deny network_io > 50",
                            ResourceKind::Timeout => "deny timeout > 1h",
                        };
                        self.diags
                            .error(vsp, format!("bad {kind} amount"), why)
                            .hint(format!("e.g. `{example}`"));
                        return None;
                    }
                }
            }
            _ => return None,
        };
        let mut conditions = Vec::new();
        if let Some(cond_pair) = inner.next() {
            let csp = span(&cond_pair);
            if !matches!(action, ActionPattern::Send(_) | ActionPattern::Receive(_)) {
                self.diags
                    .error(
                        csp,
                        "conditions apply to messages only",
                        format!("`{}` has no message to look at", action.kind()),
                    )
                    .related(act_span, "this rule is not about a message")
                    .hint("use `when` on `send to ...` and `receive from ...` rules");
                return None;
            }
            for c in cond_pair.into_inner().filter(|p| p.as_rule() == Rule::cond) {
                conditions.push(self.condition(c)?);
            }
        }
        Some(RuleSpec {
            effect,
            action,
            conditions,
            text,
            origin,
        })
    }

    fn condition(&mut self, pair: Pair<'_, Rule>) -> Option<Condition> {
        let mut inner = pair.into_inner();
        let kw = inner.next()?;
        // `meta "key" OP "value"` has the key before the operator.
        let key_pair = if kw.as_rule() == Rule::kw_meta {
            Some(inner.next()?)
        } else {
            None
        };
        let op_pair = inner.next()?;
        let op_span = span(&op_pair);
        let op = CmpOp::parse(op_pair.as_str())?;
        let v = inner.next()?;
        let vsp = span(&v);
        match kw.as_rule() {
            Rule::kw_priority => {
                let text = v.as_str();
                match parse_priority(text) {
                    Some(p) => Some(Condition::Priority(op, p)),
                    None => {
                        let hint = did_you_mean(text, PRIORITIES).unwrap_or_else(|| {
                            "the priorities are `Low`, `Normal`, `High` and `Critical`".into()
                        });
                        self.diags
                            .error(vsp, format!("unknown priority `{text}`"), "not a priority")
                            .hint(hint);
                        None
                    }
                }
            }
            Rule::kw_size => match values::parse_bytes(v.as_str()) {
                Ok(n) => Some(Condition::Size(op, n)),
                Err(why) => {
                    self.diags
                        .error(vsp, "bad size", why)
                        .hint("e.g. `when size <= 64KiB`");
                    None
                }
            },
            _ => {
                let key = self.string(&key_pair?)?;
                let value = self.string(&v)?;
                if !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                    self.diags
                        .error(
                            op_span,
                            "metadata is compared with `==` or `!=`",
                            "not an equality",
                        )
                        .hint(format!("e.g. `meta \"{key}\" == \"{value}\"`"));
                    return None;
                }
                Some(Condition::Meta { key, op, value })
            }
        }
    }

    fn audit(&mut self, pair: Pair<'_, Rule>) -> Option<AuditSpec> {
        let origin = self.origin(pair.as_span().start());
        let mut mode = AuditMode::Denials;
        let mut kinds = Vec::new();
        let mut ok = true;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::kw_all => mode = AuditMode::All,
                Rule::kw_denials => mode = AuditMode::Denials,
                Rule::kw_none => mode = AuditMode::None,
                Rule::ident => match ActionKind::from_name(p.as_str()) {
                    Some(k) => kinds.push(k),
                    None => {
                        let hint = did_you_mean(p.as_str(), AUDIT_KINDS).unwrap_or_else(|| {
                            "the kinds are `send`, `receive`, `network`, `write`, `exec` and `resources`".into()
                        });
                        self.diags
                            .error(
                                span(&p),
                                format!("unknown action kind `{}`", p.as_str()),
                                "not an action kind",
                            )
                            .hint(hint);
                        ok = false;
                    }
                },
                _ => {}
            }
        }
        ok.then_some(AuditSpec {
            mode,
            kinds,
            origin,
        })
    }

    // ------------------------------------------------------------------ warnings

    fn warn_unreachable(
        &mut self,
        def: &AgentDefinition,
        handler_spans: &[Range<usize>],
        cap_spans: &[Range<usize>],
    ) {
        let rules: Vec<&RuleSpec> = def
            .policy
            .iter()
            .filter_map(|s| match s {
                PolicyStatement::Rule(r) => Some(r),
                _ => None,
            })
            .collect();
        let allows = |f: &dyn Fn(&ActionPattern) -> bool| {
            rules
                .iter()
                .any(|r| r.effect == Effect::Allow && f(&r.action))
        };
        for (h, sp) in def.handlers.iter().zip(handler_spans) {
            if let Trigger::Message { topic } = &h.trigger {
                let reachable = allows(&|a| match a {
                    ActionPattern::Receive(PeerPattern::Topic(t)) => t.matches(topic),
                    ActionPattern::Receive(_) => true,
                    _ => false,
                });
                if !reachable {
                    self.diags
                        .warning(sp.clone(), format!("no policy rule lets this agent receive messages on `{topic}`"), "this handler will never run")
                        .hint(format!("add `allow receive from topic \"{topic}\"` (or `from agent \"NAME\"`) to a policy block, unless AgentConfig.policies grants it"));
                }
            }
            if let Some(topic) = h.output.topic() {
                let is_reply = matches!(h.output, HandlerOutput::Reply { .. });
                let sendable = allows(&|a| match a {
                    ActionPattern::Send(PeerPattern::Topic(t)) => t.matches(topic),
                    ActionPattern::Send(PeerPattern::Any) => true,
                    ActionPattern::Send(PeerPattern::Agent(_)) => is_reply,
                    _ => false,
                });
                if !sendable {
                    self.diags
                        .warning(sp.clone(), format!("no policy rule lets this agent send on `{topic}`"), "its output will be refused")
                        .hint(format!("add `allow send to topic \"{topic}\"` to a policy block, unless AgentConfig.policies grants it"));
                }
            }
        }
        for (cap, sp) in def.capabilities.iter().zip(cap_spans) {
            match cap {
                Capability::Network => {
                    if let Some(r) = rules
                        .iter()
                        .find(|r| r.effect == Effect::Deny && r.action == ActionPattern::Network)
                    {
                        let (line, col) = (r.origin.line, r.origin.column);
                        self.diags
                            .warning(sp.clone(), "capability `network` is denied by this agent's own policy", "never granted")
                            .hint(format!("`{}` at line {line}, column {col} overrides it; remove one of them", r.text));
                    }
                }
                Capability::FileSystem if !allows(&|a| matches!(a, ActionPattern::Write(_))) => {
                    self.diags
                            .warning(sp.clone(), "capability `filesystem` grants nothing by itself", "no writable path named")
                            .hint("add `allow write \"/ABSOLUTE/PATH\"` rules to a policy block; the workspace is always writable");
                }
                _ => {}
            }
        }
    }
}

fn parse_tier(text: &str) -> Option<SecurityTier> {
    match text.to_ascii_lowercase().as_str() {
        "native" => Some(SecurityTier::Native),
        "docker" | "tier1" => Some(SecurityTier::Tier1),
        "gvisor" | "tier2" => Some(SecurityTier::Tier2),
        "microvm" | "tier3" => Some(SecurityTier::Tier3),
        _ => None,
    }
}

fn parse_priority(text: &str) -> Option<Priority> {
    match text.to_ascii_lowercase().as_str() {
        "low" => Some(Priority::Low),
        "normal" => Some(Priority::Normal),
        "high" => Some(Priority::High),
        "critical" => Some(Priority::Critical),
        _ => None,
    }
}

/// Checks a parsed definition; errors and warnings go to `diags`.
pub(crate) fn definition(
    pair: Pair<'_, Rule>,
    diags: &mut Diagnostics,
    host: &HostFiles<'_>,
) -> Option<AgentDefinition> {
    Analyzer { diags }.definition(pair, host)
}

/// Checks parsed policy statements; errors go to `diags`.
pub(crate) fn policy_statements(
    pair: Pair<'_, Rule>,
    diags: &mut Diagnostics,
) -> Vec<PolicyStatement> {
    let mut analyzer = Analyzer { diags };
    pair.into_inner()
        .filter_map(|p| analyzer.policy_statement(p))
        .collect()
}
