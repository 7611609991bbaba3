//! The pest parser generated from `grammar.pest`, and the translation of its errors into
//! diagnostics that name what was found, what was expected and what to do.

use parking_lot::Mutex;
use std::collections::BTreeSet;

use pest::error::{Error as PestError, InputLocation};
use pest::iterators::Pair;
use pest::Parser;

use super::diagnostics::{did_you_mean, Diagnostics};

/// The parser; `Rule` is generated from the grammar.
#[derive(pest_derive::Parser)]
#[grammar = "dsl/grammar.pest"]
pub(crate) struct DslParser;

/// Serializes the detailed re-parses: pest's error-detail switch is process-global.
static DETAIL: Mutex<()> = Mutex::new(());

fn parse(start: Rule, source: &str) -> Result<Pair<'_, Rule>, Box<PestError<Rule>>> {
    // Fast path without pest's error detail (collecting it costs ~40% of a parse). On a
    // failure, parse again with it on so the error can list literal tokens (`}`, `=`, `[`);
    // the lock keeps every detailed re-parse detailed even while another thread re-parses.
    let mut pairs = match DslParser::parse(start, source) {
        Ok(pairs) => pairs,
        Err(_) => {
            let _guard = DETAIL.lock();
            pest::set_error_detail(true);
            let detailed = DslParser::parse(start, source);
            pest::set_error_detail(false);
            detailed.map_err(Box::new)?
        }
    };
    pairs.next().ok_or_else(|| {
        Box::new(PestError::new_from_pos(
            pest::error::ErrorVariant::CustomError {
                message: "empty parse".into(),
            },
            pest::Position::from_start(source),
        ))
    })
}

/// Parses a whole definition (`agent NAME { ... }`).
pub(crate) fn parse_definition(source: &str) -> Result<Pair<'_, Rule>, Box<PestError<Rule>>> {
    parse(Rule::definition, source)
}

/// Parses a sequence of policy statements.
pub(crate) fn parse_policy_statements(
    source: &str,
) -> Result<Pair<'_, Rule>, Box<PestError<Rule>>> {
    parse(Rule::policy_statements, source)
}

/// How a rule is called in messages; `None` for rules that should not be listed.
fn describe(r: Rule) -> Option<String> {
    let name = format!("{r:?}");
    if let Some(kw) = name.strip_prefix("kw_") {
        return Some(format!("`{kw}`"));
    }
    Some(
        match r {
            Rule::ident => "a name",
            Rule::string | Rule::basic_string | Rule::raw_string => "a string",
            Rule::quantity => "a number",
            Rule::boolean => "`true` or `false`",
            Rule::scalar | Rule::value => "a value",
            Rule::list => "a list `[...]`",
            Rule::cmp => "a comparison (`<`, `<=`, `>`, `>=`, `==`, `!=`)",
            Rule::setting => "a setting `key = value`",
            Rule::env_pair => "`NAME = \"value\"`",
            Rule::EOI => "end of input",
            Rule::target => "`any`, `agent \"NAME\"` or `topic \"NAME\"`",
            Rule::condition => "`when`",
            _ => return None,
        }
        .to_string(),
    )
}

/// Agent setting keys, for "settings are written `key = value`".
const SETTING_KEYS: [&str; 5] = ["version", "description", "tier", "image", "workdir"];

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

/// The token starting at `pos`: its end offset and how to call it.
fn token_at(source: &str, pos: usize) -> (usize, String) {
    let rest = &source[pos..];
    let Some(first) = rest.chars().next() else {
        return (pos, "end of input".into());
    };
    if is_word_char(first) {
        let len = rest.find(|c: char| !is_word_char(c)).unwrap_or(rest.len());
        return (pos + len, format!("`{}`", &rest[..len]));
    }
    if first == '"' {
        let line_end = rest.find('\n').unwrap_or(rest.len());
        let len = rest[1..line_end].find('"').map_or(line_end, |i| i + 2);
        let text: String = rest[..len].chars().take(40).collect();
        return (pos + len, format!("`{text}`"));
    }
    (
        pos + first.len_utf8(),
        format!("`{}`", first.escape_debug()),
    )
}

/// Reports a pest error as one diagnostic.
pub(crate) fn report(diags: &mut Diagnostics, source: &str, err: &PestError<Rule>) {
    let pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    }
    .min(source.len());
    let pos = if source.is_char_boundary(pos) { pos } else { 0 };
    let (end, found) = token_at(source, pos);

    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut keywords: Vec<String> = Vec::new();
    if let pest::error::ErrorVariant::ParsingError { positives, .. } = &err.variant {
        for r in positives {
            if let Some(text) = describe(*r) {
                if let Some(kw) = text.strip_prefix('`').and_then(|t| t.strip_suffix('`')) {
                    keywords.push(kw.to_string());
                }
                expected.insert(text);
            }
        }
    }
    if let Some(attempts) = err.parse_attempts().filter(|a| a.max_position == pos) {
        for token in attempts.expected_tokens() {
            // `ParsingToken` is not exported; its Display is the literal text.
            let token = token.to_string();
            {
                if token.chars().all(|c| c.is_ascii_alphabetic() || c == '_') {
                    keywords.push(token.clone());
                    expected.insert(format!("`{token}`"));
                } else if matches!(
                    token.as_str(),
                    "{" | "}" | "[" | "]" | "=" | "," | ">=" | "<=" | "==" | "!=" | ">" | "<"
                ) {
                    expected.insert(format!("`{token}`"));
                }
            }
        }
        for stack in attempts.call_stacks() {
            for r in stack
                .deepest
                .get_rule()
                .into_iter()
                .chain(stack.parent.as_ref())
            {
                if let Some(text) = describe(*r) {
                    if let Some(kw) = text.strip_prefix('`').and_then(|t| t.strip_suffix('`')) {
                        if kw.chars().all(|c| c.is_ascii_alphabetic() || c == '_') {
                            keywords.push(kw.to_string());
                        }
                    }
                    expected.insert(text);
                }
            }
        }
    }
    // `any`, `agent "NAME"`, `topic "NAME"` are listed once, as the target.
    if expected
        .iter()
        .any(|e| e.starts_with("`any`, `agent \"NAME\"`"))
    {
        for kw in ["`any`", "`agent`", "`topic`"] {
            expected.remove(kw);
        }
    }
    // Comparison operators are listed once, as `a comparison`.
    if expected.contains("a comparison (`<`, `<=`, `>`, `>=`, `==`, `!=`)") {
        for op in ["`<`", "`<=`", "`>`", "`>=`", "`==`", "`!=`"] {
            expected.remove(op);
        }
    }
    let in_body = keywords.iter().any(|k| k == "run");
    let in_policy = keywords.iter().any(|k| k == "allow");
    if (in_body || in_policy) && !expected.contains("end of input") {
        // Inside a block, its closing brace is always a way out.
        expected.insert("`}`".to_string());
    }
    let list: Vec<&str> = expected.iter().map(String::as_str).collect();
    let label = match list.len() {
        0 => "not expected here".to_string(),
        1 => format!("expected {}", list[0]),
        n if n <= 12 => format!("expected {} or {}", list[..n - 1].join(", "), list[n - 1]),
        _ => format!("expected one of {}, ...", list[..12].join(", ")),
    };
    let message = if pos >= source.len() {
        "unexpected end of input".to_string()
    } else {
        format!("unexpected {found}")
    };
    let word = source[pos..end].to_string();
    let hint = if pos >= source.len() {
        Some(if expected.contains("`}`") {
            "a `{` is not closed: add the missing `}`".to_string()
        } else {
            "the text ends in the middle of a statement".to_string()
        })
    } else if source[pos..].starts_with('"') && !source[pos + 1..end].contains('"') {
        Some(
            "a string must end with `\"` on the same line; use `\"\"\"...\"\"\"` for text over \
             several lines"
                .to_string(),
        )
    } else if source[pos..].starts_with('"')
        && expected.iter().any(|e| e.starts_with("`any`, `agent"))
    {
        Some(format!(
            "say what the name is: `topic {}` or `agent {}`",
            &source[pos..end],
            &source[pos..end]
        ))
    } else if in_body && SETTING_KEYS.contains(&word.as_str()) {
        Some(format!("settings are written `{word} = VALUE`"))
    } else if !word.is_empty() && word.chars().all(is_word_char) {
        let candidates: Vec<&str> = keywords.iter().map(String::as_str).collect();
        did_you_mean(&word, candidates).or_else(|| {
            if in_body {
                Some(
                    "an agent body holds settings (`key = value`), `run [...]`, `env`, `file`, \
                     `capabilities [...]`, `limits { ... }`, `on ...` handlers and \
                     `policy { ... }` blocks"
                        .to_string(),
                )
            } else if in_policy {
                Some("a policy statement starts with `allow`, `deny` or `audit`".to_string())
            } else if keywords.iter().any(|k| k == "network")
                && keywords.iter().any(|k| k == "send")
            {
                Some(
                    "after `allow`/`deny` comes an action: `send to ...`, `receive from ...`, \
                     `network`, `write \"/PATH\"`, `exec \"HANDLER\"` or a resource bound such \
                     as `memory > 1024`"
                        .to_string(),
                )
            } else if keywords.iter().any(|k| k == "start") {
                Some(
                    "a handler is `on start`, `on message \"TOPIC\"` or `on schedule \"CRON\"`"
                        .to_string(),
                )
            } else if expected.contains("a number") && !expected.contains("a name") {
                Some(
                    "write a number, with its unit where it has one: `1024`, `64MiB`, `30s`"
                        .to_string(),
                )
            } else if expected.contains("a string") {
                Some(format!("put the text in double quotes: `\"{word}\"`"))
            } else {
                None
            }
        })
    } else if expected.contains("`=`") && expected.len() <= 2 {
        Some("settings are written `key = value`".to_string())
    } else {
        None
    };
    let hint = hint.or_else(|| {
        if expected.len() == 1 && expected.contains("end of input") {
            Some("a definition holds one agent; put each agent in its own file".to_string())
        } else {
            Some("see the grammar in docs/dsl.md".to_string())
        }
    });
    let d = diags.error(pos..end, message, label);
    if let Some(h) = hint {
        d.hint(h);
    }
}
