//! Names the key of a type error inside an inline table.
//!
//! The run's `model` is a tagged enum: serde reads its table into a buffer
//! before it knows the variant, so a value of the wrong type inside it
//! (`model = { …, valid_fraction = "0.1" }`) is reported with the whole
//! table's span and no key. The error still quotes the value serde met
//! (`invalid type: string "0.1", expected f64`): the key is the one entry
//! of that table holding exactly that value.

/// `e`'s message, with the key named when `e` is a type error whose span is
/// an inline table of `text` and exactly one entry of that table (nested
/// tables included) holds the value the error quotes.
///
/// Rust type names are then said in words and a misspelt required key is
/// named ([`fedcart_common::config_errors::explain`]), and a `schedule` where
/// no schedule goes says where it does.
pub fn message(e: &toml::de::Error, text: &str) -> String {
    let shown = e.to_string();
    let shown = match key_of(e, text) {
        Some(key) => format!("{}\n(the key `{key}` of this table)", shown.trim_end()),
        None => shown,
    };
    let mut shown = fedcart_common::config_errors::explain(&shown, text);
    if e.message().starts_with("unknown field `schedule`") {
        shown = format!("{}\n{SCHEDULE_GOES}", shown.trim_end());
    }
    shown
}

/// Where `[schedule]` goes, for a file that has it elsewhere
/// (`[run.schedule]`, or coordinator.toml).
pub const SCHEDULE_GOES: &str = "(`[schedule]` goes at the top level of a run file given to \
    `fedcart-coordinator runs submit`, beside `[run]`, not inside it as `[run.schedule]`, and \
    not in coordinator.toml: the coordinator's own run is not rescheduled)";

fn key_of(e: &toml::de::Error, text: &str) -> Option<String> {
    // `invalid type: …`, or `hyper: invalid type: …` from a nested table
    // that gives its own path.
    let message = e.message();
    let at = message.find("invalid type: ")?;
    let unexpected = message[at + "invalid type: ".len()..]
        .split(", expected")
        .next()?;
    let snippet = text.get(e.span()?)?;
    if !snippet.trim_start().starts_with('{') {
        return None;
    }
    let doc: toml::Table = toml::from_str(&format!("v = {snippet}")).ok()?;
    let mut found = Vec::new();
    walk(doc.get("v")?.as_table()?, "", unexpected, &mut found);
    (found.len() == 1).then(|| found.remove(0))
}

/// The paths under `table` whose value serde would show as `unexpected`.
fn walk(table: &toml::Table, prefix: &str, unexpected: &str, found: &mut Vec<String>) {
    for (k, v) in table {
        let path = format!("{prefix}{k}");
        if let toml::Value::Table(t) = v {
            walk(t, &format!("{path}."), unexpected, found);
        }
        if shown(v).as_deref() == Some(unexpected) {
            found.push(path);
        }
    }
}

/// How serde's `Unexpected` shows a TOML value (`string "x"`,
/// `integer `3``, `floating point `0.5``, `boolean `true``); `None` for the
/// kinds it shows without the value (a sequence, a map, a date).
fn shown(v: &toml::Value) -> Option<String> {
    Some(match v {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(i) => format!("integer `{i}`"),
        toml::Value::Float(f) => format!("floating point `{f}`"),
        toml::Value::Boolean(b) => format!("boolean `{b}`"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        let e = toml::from_str::<crate::config::RunConfig>(text).unwrap_err();
        message(&e, text)
    }

    const RUN: &str = "run_id = \"r\"\nseed = 1\nrounds = 2\nquorum = 1\nround_timeout_ms = 1000\n";

    #[test]
    fn a_wrong_type_inside_the_model_table_names_its_key() {
        let text = format!(
            "{RUN}model = {{ family = \"churn_lr\", num_features = 8, valid_fraction = \"0.1\" }}\n"
        );
        let e = error_of(&text);
        assert!(
            e.contains("invalid type: string \"0.1\", expected a number")
                && e.contains("(the key `valid_fraction` of this table)"),
            "{e}"
        );
        let text = format!("{RUN}model = {{ family = \"churn_lr\", num_features = \"8\" }}\n");
        assert!(
            error_of(&text).contains("(the key `num_features` of this table)"),
            "{}",
            error_of(&text)
        );
        // Nested: an MF model's hyper-parameters.
        let text = format!(
            "{RUN}model = {{ family = \"mf\", num_users = 3, num_items = 4, factors = 2, \
             hyper = {{ learning_rate = true }} }}\n"
        );
        assert!(
            error_of(&text).contains("(the key `hyper.learning_rate` of this table)"),
            "{}",
            error_of(&text)
        );
    }

    #[test]
    fn an_ambiguous_value_names_no_key() {
        // Two entries hold "8": which one serde met is not known.
        let text = format!(
            "{RUN}model = {{ family = \"churn_lr\", num_features = \"8\", valid_fraction = \"8\" }}\n"
        );
        assert!(!error_of(&text).contains("the key"), "{}", error_of(&text));
    }
}
