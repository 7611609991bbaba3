//! Diagnostics people can act on: each has a severity, a message, the byte span it points
//! at (with 1-based line and column), a label under the caret and an optional hint.
//! [`Diagnostics::render`] prints them with a source excerpt (via `codespan-reporting`):
//!
//! ```text
//! error[DSL_001]: unknown capability `netwrok`
//!   --> summarizer.agent:4:17
//!   |
//! 4 |   capabilities [netwrok]
//!   |                 ^^^^^^^ not a capability
//!   |
//!   = hint: did you mean `network`?
//! ```

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, Chars, Config};
use serde::{Deserialize, Serialize};

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// The definition is refused.
    Error,
    /// The definition is accepted, but probably does not do what its author meant.
    Warning,
}

/// One problem found in a source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong.
    pub message: String,
    /// Byte range in the source it points at.
    pub span: Range<usize>,
    /// 1-based line of the span's start.
    pub line: usize,
    /// 1-based column (in characters) of the span's start.
    pub column: usize,
    /// Text under the caret.
    pub label: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// A related place (e.g. the first of two duplicates) and what it is.
    pub related: Option<(Range<usize>, String)>,
}

/// The diagnostics of one source, with the source kept for rendering excerpts.
#[derive(Clone, PartialEq, Eq)]
pub struct Diagnostics {
    file_name: String,
    source: Arc<str>,
    items: Vec<Diagnostic>,
}

impl fmt::Debug for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Diagnostics")
            .field("file_name", &self.file_name)
            .field("items", &self.items)
            .finish()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Diagnostics {}

/// Largest index `<= i` on a char boundary of `s`.
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Smallest index `>= i` on a char boundary of `s`.
fn ceil_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

impl Diagnostics {
    /// No diagnostics yet for `source` named `file_name`.
    pub fn new(file_name: impl Into<String>, source: &str) -> Self {
        Diagnostics {
            file_name: file_name.into(),
            source: Arc::from(source),
            items: Vec::new(),
        }
    }

    /// The source's name.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    fn clamp(&self, span: Range<usize>) -> Range<usize> {
        let start = floor_boundary(&self.source, span.start);
        let end = ceil_boundary(&self.source, span.end.max(start));
        start..end
    }

    /// 1-based line and column (in characters) of byte offset `at`.
    pub fn line_col(&self, at: usize) -> (usize, usize) {
        let at = floor_boundary(&self.source, at);
        let before = &self.source[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// Adds a diagnostic; returns it for adding a hint or related place.
    pub fn push(
        &mut self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> &mut Diagnostic {
        let span = self.clamp(span);
        let (line, column) = self.line_col(span.start);
        self.items.push(Diagnostic {
            severity,
            message: message.into(),
            span,
            line,
            column,
            label: label.into(),
            hint: None,
            related: None,
        });
        let last = self.items.len() - 1;
        &mut self.items[last]
    }

    /// Adds an error.
    pub fn error(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> &mut Diagnostic {
        self.push(Severity::Error, span, message, label)
    }

    /// Adds a warning.
    pub fn warning(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> &mut Diagnostic {
        self.push(Severity::Warning, span, message, label)
    }

    /// Every diagnostic, in the order found.
    pub fn items(&self) -> &[Diagnostic] {
        &self.items
    }

    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }

    /// True when at least one error was found.
    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    /// True when there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Keeps only the warnings (used once a source is accepted).
    pub(crate) fn only_warnings(mut self) -> Self {
        self.items.retain(|d| d.severity == Severity::Warning);
        self
    }

    /// Renders every diagnostic as plain text with line, column, a caret excerpt and the
    /// hint, followed by a summary line.
    pub fn render(&self) -> String {
        let file = SimpleFile::new(self.file_name.as_str(), &*self.source);
        let config = Config {
            chars: Chars::ascii(),
            ..Config::default()
        };
        let mut out = String::new();
        for d in &self.items {
            let cs = match d.severity {
                Severity::Error => CsDiagnostic::error().with_code("DSL_001"),
                Severity::Warning => CsDiagnostic::warning(),
            };
            let mut labels = vec![Label::primary((), d.span.clone()).with_message(&d.label)];
            if let Some((span, what)) = &d.related {
                labels.push(Label::secondary((), self.clamp(span.clone())).with_message(what));
            }
            let mut notes = Vec::new();
            if let Some(hint) = &d.hint {
                notes.push(format!("hint: {hint}"));
            }
            let cs = cs
                .with_message(&d.message)
                .with_labels(labels)
                .with_notes(notes);
            if term::emit_to_string(&mut out, &config, &file, &cs).is_err() {
                // The excerpt could not be drawn (should not happen: spans are clamped);
                // still give the location and the message.
                out.push_str(&format!(
                    "{}: {}:{}:{}: {}\n",
                    if d.severity == Severity::Error {
                        "error"
                    } else {
                        "warning"
                    },
                    self.file_name,
                    d.line,
                    d.column,
                    d.message
                ));
            }
        }
        let errors = self.errors().count();
        let warnings = self.warnings().count();
        if errors + warnings > 0 {
            let plural = |n: usize, what: &str| {
                if n == 1 {
                    format!("1 {what}")
                } else {
                    format!("{n} {what}s")
                }
            };
            out.push_str(&format!(
                "{}: {} and {}\n",
                self.file_name,
                plural(errors, "error"),
                plural(warnings, "warning")
            ));
        }
        out
    }
}

impl Diagnostic {
    /// Sets the hint.
    pub fn hint(&mut self, hint: impl Into<String>) -> &mut Self {
        self.hint = Some(hint.into());
        self
    }

    /// Sets the related place.
    pub fn related(&mut self, span: Range<usize>, what: impl Into<String>) -> &mut Self {
        self.related = Some((span, what.into()));
        self
    }
}

/// `did you mean `x`?` for the closest of `candidates` to `word`, when close enough.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let lower = word.to_ascii_lowercase();
    let best = candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3) && *d < c.len())
        .min_by_key(|(d, _)| *d)?;
    Some(format!("did you mean `{}`?", best.1))
}
