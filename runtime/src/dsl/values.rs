//! Literal values: string escapes and `"""` blocks, sizes, durations, octal modes.

use std::time::Duration;

/// Decodes a string token (with its quotes). On error returns the byte offset (relative to
/// the token) of the bad escape and why.
pub(crate) fn decode_string(token: &str) -> Result<String, (usize, String)> {
    if let Some(inner) = token
        .strip_prefix("\"\"\"")
        .and_then(|t| t.strip_suffix("\"\"\""))
    {
        return Ok(dedent(inner));
    }
    let inner = token
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .ok_or((0, "not a string".to_string()))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let at = i + 1;
        match chars.next() {
            Some((_, 'n')) => out.push('\n'),
            Some((_, 't')) => out.push('\t'),
            Some((_, 'r')) => out.push('\r'),
            Some((_, '0')) => out.push('\0'),
            Some((_, '\\')) => out.push('\\'),
            Some((_, '"')) => out.push('"'),
            Some((_, '\'')) => out.push('\''),
            Some((j, 'u')) => {
                let rest = &inner[j + 1..];
                let close = rest.find('}');
                let hex = match (rest.starts_with('{'), close) {
                    (true, Some(close)) => &rest[1..close],
                    _ => {
                        return Err((
                            at,
                            "a unicode escape is written `\\u{HEX}`, e.g. `\\u{e9}`".into(),
                        ))
                    }
                };
                let ch = u32::from_str_radix(hex, 16)
                    .ok()
                    .filter(|_| !hex.is_empty() && hex.len() <= 6)
                    .and_then(char::from_u32)
                    .ok_or((at, format!("`\\u{{{hex}}}` is not a unicode character")))?;
                out.push(ch);
                // Skip `{HEX}`.
                for _ in 0..hex.len() + 2 {
                    chars.next();
                }
            }
            Some((_, other)) => {
                return Err((
                    at,
                    format!(
                        "unknown escape `\\{}` (use \\n, \\t, \\r, \\0, \\\\, \\\", \\u{{HEX}})",
                        other.escape_debug()
                    ),
                ))
            }
            None => return Err((at, "a string cannot end with `\\`".into())),
        }
    }
    Ok(out)
}

/// The content of a `"""` block: a newline right after the opening quotes is dropped, the
/// indentation common to all non-blank lines is removed, and a last line holding only
/// whitespace (the closing quotes' indentation) is dropped. No escapes are processed.
pub(crate) fn dedent(inner: &str) -> String {
    let inner = inner
        .strip_prefix("\r\n")
        .or_else(|| inner.strip_prefix('\n'))
        .unwrap_or(inner);
    let mut lines: Vec<&str> = inner.split('\n').collect();
    let trailing_blank = lines.len() > 1
        && lines
            .last()
            .is_some_and(|l| l.chars().all(|c| c == ' ' || c == '\t' || c == '\r'));
    if trailing_blank {
        lines.pop();
    }
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start_matches([' ', '\t']).len())
        .min()
        .unwrap_or(0);
    let mut out = String::with_capacity(inner.len());
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if line.len() >= indent && line.is_char_boundary(indent) {
            out.push_str(&line[indent..]);
        } else {
            out.push_str(line.trim_start_matches([' ', '\t']));
        }
    }
    if trailing_blank {
        out.push('\n');
    }
    out
}

/// Splits a quantity token into its number and unit (`"256MiB"` → `(256.0, "MiB")`).
pub(crate) fn split_quantity(text: &str) -> Option<(f64, &str)> {
    let split = text
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || ((c == '-' || c == '+') && i == 0)))
        .map_or(text.len(), |(i, _)| i);
    let number: f64 = text[..split].parse().ok()?;
    number.is_finite().then_some((number, &text[split..]))
}

/// A memory amount in whole MiB: `256`, `256MiB`, `256MB`, `256M`, `1GiB`, `1G`, `2048KiB`.
pub(crate) fn parse_memory_mib(text: &str) -> Result<u64, String> {
    let (n, unit) = split_quantity(text).ok_or_else(|| format!("`{text}` is not a number"))?;
    let factor = match unit {
        "" | "MiB" | "MB" | "M" | "Mi" => 1.0,
        "GiB" | "GB" | "G" | "Gi" => 1024.0,
        "KiB" | "KB" | "K" | "Ki" => 1.0 / 1024.0,
        other => {
            return Err(format!(
                "unknown memory unit `{other}` (use KiB, MiB or GiB; a bare number is MiB)"
            ))
        }
    };
    let mib = n * factor;
    if mib < 0.0 || mib.fract() != 0.0 || mib > (u64::MAX / (1024 * 1024)) as f64 {
        return Err(format!("`{text}` is not a whole, positive number of MiB"));
    }
    Ok(mib as u64)
}

/// A size in bytes: `4096`, `4096B`, `4KiB`, `1MiB`, `1GiB` (KB/MB/GB mean the same).
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let (n, unit) = split_quantity(text).ok_or_else(|| format!("`{text}` is not a number"))?;
    let factor: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" | "KB" | "K" => 1024.0,
        "MiB" | "MB" | "M" => 1024.0 * 1024.0,
        "GiB" | "GB" | "G" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB or GiB; a bare number is bytes)"
            ))
        }
    };
    let bytes = n * factor;
    if bytes < 0.0 || bytes.fract() != 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{text}` is not a whole, positive number of bytes"));
    }
    Ok(bytes as u64)
}

/// A duration: `30s`, `5m`, `1h30m`, `250ms` (humantime), or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. `30s`, `5m`, `1h30m`"))
}

/// A Unix mode in octal: `755`, `0755`, `0o755`.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("`{text}` is not an octal mode; write e.g. `0755` or `0644`"))?;
    if mode > 0o7777 {
        return Err(format!("mode `{text}` is larger than 07777"));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_decode() {
        assert_eq!(
            decode_string(r#""a\nb\t\"q\" \u{e9}""#),
            Ok("a\nb\t\"q\" é".into())
        );
        assert!(decode_string(r#""bad \q""#).is_err());
        assert!(decode_string(r#""bad \u{zz}""#).is_err());
        assert!(decode_string(r#""bad \u{110000}""#).is_err());
    }

    #[test]
    fn blocks_dedent() {
        let block = "\"\"\"\n    #!/bin/sh\n      echo hi\n    \"\"\"";
        assert_eq!(decode_string(block), Ok("#!/bin/sh\n  echo hi\n".into()));
        assert_eq!(decode_string("\"\"\"one line\"\"\""), Ok("one line".into()));
    }

    #[test]
    fn quantities_parse_with_units() {
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert_eq!(parse_memory_mib("1GiB"), Ok(1024));
        assert_eq!(parse_memory_mib("2048KiB"), Ok(2));
        assert!(parse_memory_mib("1000KiB").is_err());
        assert!(parse_memory_mib("5parsecs").is_err());
        assert_eq!(parse_bytes("4KiB"), Ok(4096));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("0o644"), Ok(0o644));
        assert!(parse_mode("0958").is_err());
    }
}
