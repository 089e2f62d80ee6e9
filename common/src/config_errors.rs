//! Plainer wording for the errors of configuration files (`coordinator.toml`,
//! a run file, `merchant.toml`), for an operator who did not write the code.
//!
//! serde names Rust types (`expected u64`, `expected struct SecAggSettings`),
//! and a misspelt *required* key is reported as the key missing, not as the
//! typo: the types skip unknown keys where a newer peer may send more. Both
//! are rewritten here from the parser's message and the file's text.

/// `message` (a TOML parse error of `text`) with Rust type names said in
/// words, and, when a required key is missing and a key of the file looks
/// like its misspelling, a line naming that key and its line.
pub fn explain(message: &str, text: &str) -> String {
    let mut out = plain_types(message);
    if let Some(hint) = misspelt_required(message, text).or_else(|| unquoted_date(message)) {
        out = format!("{}\n{hint}", out.trim_end());
    }
    out
}

/// TOML reads `cutoff = 2017-02-01` as a date, which serde reports as "a
/// map" where a string is expected: the value wants quotes. Read off the
/// source line the parser quotes (`14 | cutoff = 2017-02-01`).
fn unquoted_date(message: &str) -> Option<String> {
    if !message.contains("invalid type: map, expected a string") {
        return None;
    }
    message.lines().find_map(|line| {
        let source = line.split_once(" | ")?.1;
        let (key, value) = source.split_once('=')?;
        let value = value.split('#').next()?.trim();
        let b = value.as_bytes();
        let date = b.len() >= 10
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[7] == b'-';
        date.then(|| {
            format!(
                "(TOML reads an unquoted {value} as a date; write it as a string: `{} = \"{value}\"`)",
                key.trim()
            )
        })
    })
}

/// What serde's `expected <type>` means in a configuration file.
fn plain_type(words: &[&str]) -> Option<(usize, &'static str)> {
    Some(match words {
        ["u8" | "u16" | "u32" | "u64" | "usize", ..] => (1, "a whole number (0 or more)"),
        ["i8" | "i16" | "i32" | "i64" | "isize", ..] => (1, "a whole number"),
        ["f32" | "f64", ..] => (1, "a number"),
        ["struct", _, ..] | ["a", "map", ..] => (2, "a table (`[section]` or `{ key = value }`)"),
        ["a", "sequence", ..] => (2, "an array (`[…]`)"),
        _ => return None,
    })
}

fn plain_types(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("expected ") {
        let after = at + "expected ".len();
        out.push_str(&rest[..after]);
        rest = &rest[after..];
        let words: Vec<&str> = rest
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .take(2)
            .collect();
        if let Some((n, plain)) = plain_type(&words) {
            // The words and the one separator between them.
            let len: usize = words[..n].iter().map(|w| w.len()).sum::<usize>() + n - 1;
            out.push_str(plain);
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    out
}

/// For `missing field `x``: the file's key most like `x`, if one is close
/// enough to be its misspelling, with its line.
fn misspelt_required(message: &str, text: &str) -> Option<String> {
    let at = message.find("missing field `")? + "missing field `".len();
    let missing = message[at..].split('`').next()?;
    let far = if missing.len() >= 8 { 2 } else { 1 };
    let swapped = |k: &str| {
        k.strip_prefix("min")
            .map(|r| format!("max{r}"))
            .or_else(|| k.strip_prefix("max").map(|r| format!("min{r}")))
    };
    let (key, line, _) = keys(text)
        .filter(|(k, _)| *k != missing && swapped(k).as_deref() != Some(missing))
        .map(|(k, line)| (k, line, strsim::damerau_levenshtein(k, missing)))
        .filter(|(_, _, d)| *d <= far)
        .min_by_key(|(_, line, d)| (*d, *line))?;
    Some(format!(
        "(`{key}` on line {line} is not a key here: is it `{missing}` misspelt?)"
    ))
}

/// The keys written in `text` (bare or quoted, before an `=`), each with
/// its line (from 1). Comments and string values are skipped roughly: it
/// feeds a hint, not the parser.
fn keys(text: &str) -> impl Iterator<Item = (&str, usize)> {
    text.lines().enumerate().flat_map(|(i, line)| {
        let line = line.split('#').next().unwrap_or("");
        let mut found = Vec::new();
        let mut quoted = false;
        for (at, c) in line.char_indices() {
            match c {
                '"' | '\'' => quoted = !quoted,
                '=' if !quoted => {
                    let before = line[..at].trim_end();
                    let start = before
                        .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
                        .map_or(0, |p| p + 1);
                    let key = &before[start..];
                    if !key.is_empty() {
                        found.push((key, i + 1));
                    }
                }
                _ => {}
            }
        }
        found
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cutoff = 2017-02-01` (a TOML date) was refused as "invalid type:
    /// map, expected a string", which says nothing of quotes.
    #[test]
    fn an_unquoted_date_is_told_to_be_quoted() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Orders {
            cutoff: Option<String>,
        }
        let text = "# a run\ncutoff = 2017-02-01\n";
        let e = toml::from_str::<Orders>(text).unwrap_err().to_string();
        let shown = explain(&e, text);
        assert!(
            shown.ends_with(
                "(TOML reads an unquoted 2017-02-01 as a date; write it as a string: \
                 `cutoff = \"2017-02-01\"`)"
            ),
            "{shown}"
        );
        // A map where a string belongs, not a date: no such hint.
        let text = "cutoff = { a = 1 }\n";
        let e = toml::from_str::<Orders>(text).unwrap_err().to_string();
        assert!(!explain(&e, text).contains("unquoted"), "{e}");
    }

    #[test]
    fn rust_type_names_are_said_in_words() {
        assert_eq!(
            explain("invalid type: string \"10\", expected u64", ""),
            "invalid type: string \"10\", expected a whole number (0 or more)"
        );
        assert_eq!(
            explain(
                "invalid type: integer `3`, expected struct SecAggSettings\n",
                ""
            ),
            "invalid type: integer `3`, expected a table (`[section]` or `{ key = value }`)\n"
        );
        assert_eq!(
            explain("invalid type: string \"x\", expected f32 at line 2", ""),
            "invalid type: string \"x\", expected a number at line 2"
        );
        assert_eq!(
            explain("expected a sequence; expected i64", ""),
            "expected an array (`[…]`); expected a whole number"
        );
        // Words that only begin like a type, and messages without one, stay.
        for same in [
            "expected u64s",
            "expected a string",
            "expected one of `a`, `b`",
            "unexpected",
        ] {
            assert_eq!(explain(same, ""), same);
        }
    }

    #[test]
    fn a_missing_key_names_the_key_that_looks_like_its_misspelling() {
        let text = "[run]\nrun_id = \"r\"\nrouns = 3 # rounds = 4\n\
                    model = { kind = \"churn_lr\", num_featurs = 8 }\nmax_agents = 2\n";
        let e = explain("TOML parse error at line 1\nmissing field `rounds`\n", text);
        assert!(
            e.ends_with("missing field `rounds`\n(`rouns` on line 3 is not a key here: is it `rounds` misspelt?)"),
            "{e}"
        );
        let e = explain("missing field `num_features`", text);
        assert!(e.contains("(`num_featurs` on line 4"), "{e}");
        // Nothing close, or only the key's min/max twin: no guess.
        assert_eq!(
            explain("missing field `seed`", text),
            "missing field `seed`"
        );
        assert_eq!(
            explain("missing field `min_agents`", text),
            "missing field `min_agents`"
        );
        // A key in a string value or a comment is not a key.
        let e = explain(
            "missing field `quorum`",
            "note = \"quorun = 2\"\n# quorun = 2\n",
        );
        assert_eq!(e, "missing field `quorum`");
    }
}
