//! What a simulation reports: the summary table, `metrics.json` (schema
//! below), `metrics.csv`, `report.html` (with the SVG plots inline), the
//! PNG/SVG plot files (`plots.rs`), and the JSON summary of `--format json`.
//!
//! `metrics.json` schema: `{ "settings": {…}, "experiments": [ { "name",
//! "task", "data", "merchants", "model_len", "strategy", "mode", "final": {metric:
//! value}, "rounds": [ { "round", "selected", "reported", "committed",
//! "train": {…}, "eval": {…}, "bytes_up", "bytes_down", "seconds",
//! "virtual_seconds", "staleness_mean", "staleness_max" } ],
//! "per_merchant": { id: {metric: value} }, "secagg_keys" (with `--secagg`:
//! keys are not bound to certificates in a simulation), "timing": { "load_seconds",
//! "total_seconds", "seconds_per_round" }, "search" (with `--search`: { "metric",
//! "higher_is_better", "budget", "rounds_used", "schedule": [ { "candidates",
//! "rounds" } ], "trials": [ { "candidate", "config": { "factors", "lr", "reg",
//! "epochs", "negatives", "alpha" (iALS) }, "rungs": [ { "rung", "allotted", "rounds",
//! "best_version", "value", "error"?, "kept", "bytes_up", "seconds" } ] } ],
//! "chosen", "seconds", "seconds_per_round" }) } ] }`. Only the `seconds` and
//! `timing` fields vary between two runs with the same seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::experiment::{Experiment, RoundRow};
use super::settings::Settings;

/// Prints the summary table to stdout.
pub fn print_table(experiments: &[Experiment]) -> std::io::Result<()> {
    fedcart_common::outln!("{}", summary_table(experiments))?;
    if let Some(keys) = experiments.iter().find_map(|e| e.secagg_keys.as_deref()) {
        fedcart_common::outln!("secure aggregation keys: {keys}")?;
    }
    Ok(())
}

/// The summary table: one row per experiment.
pub(crate) fn summary_table(experiments: &[Experiment]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "experiment",
        "merchants",
        "rounds",
        "strategy",
        "first",
        "final",
        "s/round",
        "MB moved",
        "ε",
    ]);
    for e in experiments {
        // The first and last evaluated rounds (a boosted tree's inner levels
        // and its sketch round are rounds without an evaluation).
        let evaluated = |r: &&RoundRow| e.headline().is_some_and(|(k, _)| r.eval.contains_key(k));
        let metric = |r: Option<&RoundRow>| match (e.headline(), r) {
            (Some((k, _)), Some(r)) => r.eval.get(k).map_or("-".into(), |v| figure(k, *v)),
            _ => "-".into(),
        };
        let bytes: u64 = e.rounds.iter().map(|r| r.bytes_up + r.bytes_down).sum();
        // Committed rounds, as `rounds` in `--format json`; aborted
        // attempts follow in brackets.
        let committed = e.rounds.iter().filter(|r| r.committed).count();
        let aborted = e.rounds.len() - committed;
        t.add_row([
            e.name.clone(),
            e.merchants.to_string(),
            if aborted == 0 {
                committed.to_string()
            } else {
                format!("{committed} (+{aborted} aborted)")
            },
            e.strategy_label(),
            first_figure(e, evaluated, metric),
            // The served version's figure, as `final` in metrics.json and
            // `--format json` (the last version's is in the model-selection
            // line when they differ).
            match e.headline() {
                Some((k, _)) => e.final_metrics.get(k).map_or("-".into(), |v| figure(k, *v)),
                None => "-".into(),
            },
            format!("{:.4}", e.timing.seconds_per_round),
            format!("{:.1}", bytes as f64 / 1e6),
            e.privacy
                .as_ref()
                .map_or("-".into(), |p| epsilon_text(p.epsilon)),
        ]);
    }
    t
}

/// The table's `first`: the first evaluated round's headline figure; for a
/// run evaluated only at its end (k-means segments, whose Lloyd rounds
/// report their inertia from training), its first round's training figure.
/// It showed the final inertia as `first`, read as k-means never moving
/// (found by a researcher probe).
fn first_figure(
    e: &Experiment,
    evaluated: impl Fn(&&RoundRow) -> bool,
    metric: impl Fn(Option<&RoundRow>) -> String,
) -> String {
    let first = e.rounds.iter().find(&evaluated);
    let last = e.rounds.iter().rev().find(&evaluated);
    match (first, e.headline()) {
        (Some(f), Some((k, _)))
            if last.is_some_and(|l| std::ptr::eq(f, l)) && e.rounds.len() > 1 =>
        {
            e.rounds
                .iter()
                .find_map(|r| r.train.get(k))
                .map_or("-".into(), |v| figure(k, *v))
        }
        (first, _) => metric(first),
    }
}

/// A headline figure of the table: a value that is not finite (a merchant's
/// metric that overflowed; metrics.json writes it as null, the report as
/// "–") reads "n/a", not "NaN".
fn figure(metric: &str, v: f64) -> String {
    // k-means reports its inertia per customer; the report's pooled
    // inertia, a sum, was read as the same figure (found by a data probe).
    let metric = if metric == "inertia" {
        "inertia per customer"
    } else {
        metric
    };
    if v.is_finite() {
        format!("{metric} {v:.4}")
    } else {
        format!("{metric} n/a")
    }
}

/// The summary as one JSON document, what `--format json` prints: per
/// experiment its name, task, merchants, rounds committed and attempts
/// aborted, strategy, secure aggregation (how its keys were exchanged, or
/// null), final metrics, the served version chosen by validation, seconds
/// per round, ε (with DP), why it stopped early and whether that was a
/// failure, and its analysis lines (segment profiles, rules) when it has
/// them.
pub fn summary_json(experiments: &[Experiment]) -> String {
    let list: Vec<serde_json::Value> = experiments
        .iter()
        .map(|e| {
            let committed = e.rounds.iter().filter(|r| r.committed).count();
            let mut v = serde_json::json!({
                "name": e.name,
                "task": e.task,
                "merchants": e.merchants,
                "rounds": committed,
                "aborted_attempts": e.rounds.len() - committed,
                "strategy": e.strategy,
                "secagg": e.secagg_keys,
                "final": e.final_metrics,
                "best": e.best.as_ref().map(|b| serde_json::json!({
                    "round": b.round, "metric": b.metric, "value": b.value,
                })),
                "seconds_per_round": e.timing.seconds_per_round,
                "epsilon": e.privacy.as_ref().map(|p| p.epsilon),
                "stopped": e.stopped,
                "failed": e.failed,
            });
            if !e.report.is_empty() {
                v["report"] = serde_json::json!(e.report);
            }
            v
        })
        .collect();
    serde_json::json!({ "experiments": list }).to_string()
}

/// The report lines of an analysis (segment profiles, rules) as HTML: runs
/// of `| a | b |` lines become a table (the `|---|` line dropped), other
/// lines paragraphs.
fn report_html(lines: &[String]) -> String {
    let mut out = String::new();
    let mut in_table = false;
    for line in lines {
        let row = line.trim();
        if let Some(inner) = row.strip_prefix('|').and_then(|r| r.strip_suffix('|')) {
            let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
            if cells
                .iter()
                .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
            {
                continue;
            }
            let tag = if in_table { "td" } else { "th" };
            if !in_table {
                out += "<table>";
                in_table = true;
            }
            out += "<tr>";
            for c in cells {
                let _ = write!(out, "<{tag}>{}</{tag}>", esc(c));
            }
            out += "</tr>";
        } else {
            if in_table {
                out += "</table>";
                in_table = false;
            }
            let _ = write!(out, "<p>{}</p>", esc(row));
        }
    }
    if in_table {
        out += "</table>";
    }
    out
}

/// The effective settings as readable (name, value) rows for the report:
/// scalar settings by name, objects flattened with dotted names, and the
/// partition, attack and differential privacy spelt out. The boosted
/// trees' `gbdt.*` rows are listed only when a `churn-gbdt` experiment runs
/// (a churn-lr report listed every one of them, read as settings of its
/// model).
pub fn settings_rows(s: &Settings) -> Vec<(String, String)> {
    use fedcart_common::data::partition::Partitioner;
    let gbdt = s
        .experiments()
        .iter()
        .any(|(t, _)| *t == super::data::TaskChoice::ChurnGbdt);
    let mut rows = Vec::new();
    let json = serde_json::to_value(s).unwrap_or_default();
    if let Some(map) = json.as_object() {
        for (k, v) in map {
            match k.as_str() {
                "partition" => rows.push((
                    "partition".into(),
                    match s.partition {
                        Partitioner::Iid => "iid".into(),
                        Partitioner::Dirichlet(a) => format!("dirichlet, α = {a}"),
                        Partitioner::Zipf(z) => format!("zipf, s = {z}"),
                        Partitioner::Natural => "natural (one merchant per store)".into(),
                    },
                )),
                "attack" if s.malicious > 0.0 => rows.push((
                    "attack".into(),
                    match s.attack {
                        super::settings::Attack::Scale(x) => format!("updates scaled ×{x}"),
                        super::settings::Attack::SignFlip => "updates sign-flipped".into(),
                    },
                )),
                "attack" => {}
                "dp" => {}
                "gbdt" if !gbdt => {}
                _ => flatten(&k.replace('_', " "), v, &mut rows),
            }
        }
    }
    match &s.dp {
        None => rows.push(("differential privacy".into(), "off".into())),
        Some(dp) => {
            let clip = match dp.clip {
                fedcart_coordinator::config::ClipNorm::Fixed(c) => format!("C = {c}"),
                fedcart_coordinator::config::ClipNorm::Adaptive => "adaptive".into(),
            };
            rows.push(("DP clip".into(), clip));
            if let Some(sigma) = dp.noise_multiplier {
                rows.push(("DP noise".into(), format!("σ = {sigma}")));
            }
            if let Some(eps) = dp.target_epsilon {
                rows.push(("DP target".into(), format!("ε ≤ {eps}")));
            }
            rows.push(("DP δ".into(), format!("{:e}", dp.delta)));
            rows.push(("DP mode".into(), format!("{:?}", dp.mode).to_lowercase()));
        }
    }
    rows
}

/// An experiment's model as trained (family, hyper-parameters with their
/// defaults resolved) and its local optimiser, as (name, value) rows.
pub fn model_rows(e: &Experiment) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    flatten(
        "model",
        &serde_json::to_value(&e.model).unwrap_or_default(),
        &mut rows,
    );
    if let Some(sgd) = &e.sgd {
        flatten(
            "local sgd",
            &serde_json::to_value(sgd).unwrap_or_default(),
            &mut rows,
        );
    }
    rows
}

fn flatten(name: &str, v: &serde_json::Value, rows: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let text = match v {
        Value::Null => return,
        Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
        Value::Number(n) => f32_text(n).unwrap_or_else(|| n.to_string()),
        Value::String(t) => t.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{name}.{}", k.replace('_', " ")), v, rows);
            }
            return;
        }
    };
    // The export's column names are the merchant's, spelt as its header:
    // `Article` lowercased read `article`, which the reader then refuses.
    let text = if name.starts_with("orders.") {
        text
    } else {
        lower_enum(text)
    };
    rows.push((name.to_string(), text));
}

/// A number that is an f32 setting widened to f64, at f32 precision: the
/// f32's shortest decimal (`--lr 0.1` read 0.10000000149011612). A value is
/// taken for one when it is exactly an f32 and that f32's shortest decimal
/// is another f64; an f64 setting as typed (0.1, 20.0) is never exactly such
/// an f32, so it keeps its own digits.
fn f32_text(n: &serde_json::Number) -> Option<String> {
    let x = n.as_f64().filter(|_| n.is_f64())?;
    let f = x as f32;
    let short = f.to_string();
    (f64::from(f) == x && short.parse::<f64>().ok()? != x).then_some(short)
}

/// Enum names serialised in CamelCase (`Inproc`, `Sync`) read better in
/// lower case.
fn lower_enum(text: String) -> String {
    let word = !text.is_empty() && text.chars().all(|c| c.is_ascii_alphabetic());
    if word && text.starts_with(|c: char| c.is_ascii_uppercase()) {
        text.to_lowercase()
    } else {
        text
    }
}

/// A folder inside `--out` the run writes every file into; [`Staging::publish`]
/// then moves them into `--out` (a rename each, which needs no space), so
/// that a run that fails while writing leaves the earlier run's files as
/// they were. Dropped without publishing, it is removed.
pub struct Staging {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl Staging {
    /// Creates `--out` (checking that it can be written) and the staging
    /// folder in it.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        super::check_out_dir(dir)?;
        let path = dir.join(format!(".fedcart-sim-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            path,
        })
    }

    /// Where the run writes its files.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error of a run whose files could not all be written, saying that
    /// the earlier results were left as they were.
    pub fn abandon(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "the results were not written; the files of an earlier run in {} are as they were",
            self.dir.display()
        ))
    }

    /// Moves every file the run wrote into `--out`, replacing an earlier
    /// run's files of the same names, removes the staging folder and
    /// returns the names moved (for [`retire_stale`]).
    pub fn publish(self) -> anyhow::Result<Vec<String>> {
        let listing = |e: std::io::Error| anyhow::anyhow!("reading {}: {e}", self.path.display());
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(listing)? {
            let entry = entry.map_err(listing)?;
            if entry.file_type().map_err(listing)?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        for name in &names {
            let from = self.path.join(name);
            let to = self.dir.join(name);
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
        Ok(names)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where a run lists the files it wrote into its `--out` directory, so that
/// the next run into the same directory can retire them.
pub const MANIFEST: &str = ".fedcart-sim-files";

/// Removes the files an earlier run listed in `dir`'s [`MANIFEST`] that this
/// run did not write again (`written`, the names [`write_all`] returns) — a
/// plot of another task beside this run's `report.html` read as this run's —
/// then lists `written`. Only names an earlier run listed are removed,
/// never a file of the user's (one written into the folder during a run
/// included); returns the names removed.
pub fn retire_stale(dir: &Path, written: &[String]) -> anyhow::Result<Vec<String>> {
    let mut fresh: Vec<String> = written.to_vec();
    fresh.sort();
    fresh.dedup();
    let manifest = dir.join(MANIFEST);
    let listed = std::fs::read_to_string(&manifest).unwrap_or_default();
    let mut removed = Vec::new();
    for name in listed.lines().map(str::trim) {
        // A plain name in `dir`, as this function writes them.
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\'])
            && name != MANIFEST;
        if !plain || fresh.iter().any(|f| f == name) {
            continue;
        }
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing {} of an earlier run", path.display()))?;
            removed.push(name.to_string());
        }
    }
    std::fs::write(&manifest, fresh.join("\n") + "\n")
        .with_context(|| format!("writing {}", manifest.display()))?;
    Ok(removed)
}

/// Writes `metrics.json`, `metrics.csv`, `analysis.md` (when there is a
/// report), `report.html` and the plots into `dir`; returns the names of
/// every file the run wrote there (the experiments' own
/// [`Experiment::files`] included), for [`retire_stale`].
pub fn write_all(
    dir: &Path,
    s: &Settings,
    experiments: &[Experiment],
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::json!({ "settings": s, "experiments": experiments });
    let path = dir.join("metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("metrics.csv");
    std::fs::write(&path, csv_text(experiments))
        .with_context(|| format!("writing {}", path.display()))?;
    let report: Vec<&str> = experiments
        .iter()
        .flat_map(|e| e.report.iter().map(String::as_str))
        .collect();
    if !report.is_empty() {
        let path = dir.join("analysis.md");
        std::fs::write(&path, report.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let plots = super::plots::write_all(dir, experiments)?;
    let path = dir.join("report.html");
    std::fs::write(&path, html(s, experiments, &plots))
        .with_context(|| format!("writing {}", path.display()))?;
    let mut written: Vec<String> = ["metrics.json", "metrics.csv", "report.html"]
        .map(String::from)
        .into();
    if !report.is_empty() {
        written.push("analysis.md".into());
    }
    for p in plots.iter().flatten() {
        written.extend([format!("{}.png", p.name), format!("{}.svg", p.name)]);
    }
    written.extend(experiments.iter().flat_map(|e| e.files.iter().cloned()));
    Ok(written)
}

fn csv_text(experiments: &[Experiment]) -> String {
    let mut keys: Vec<String> = experiments
        .iter()
        .flat_map(|e| e.rounds.iter().flat_map(|r| r.eval.keys().cloned()))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out =
        String::from("experiment,round,selected,reported,committed,bytes_up,bytes_down,seconds");
    for k in &keys {
        let _ = write!(out, ",{k}");
    }
    let dp = experiments
        .iter()
        .any(|e| e.rounds.iter().any(|r| r.epsilon.is_some()));
    if dp {
        out.push_str(",epsilon,dp_noise");
    }
    out += ",mode,virtual_seconds,staleness_mean";
    out.push('\n');
    for e in experiments {
        for r in &e.rounds {
            let _ = write!(
                out,
                "\"{}\",{},{},{},{},{},{},{:.6}",
                // RFC 4180: a quote inside a quoted field is doubled (a data
                // file named `a"b.csv` broke the row).
                e.name.replace('"', "\"\""),
                r.round,
                r.selected,
                r.reported,
                r.committed,
                r.bytes_up,
                r.bytes_down,
                r.seconds
            );
            for k in &keys {
                match r.eval.get(k) {
                    Some(v) => {
                        let _ = write!(out, ",{v}");
                    }
                    None => out.push(','),
                }
            }
            if dp {
                out.push(',');
                if let Some(eps) = r.epsilon {
                    let _ = write!(out, "{eps}");
                }
                out.push(',');
                if let Some(z) = r.dp_noise {
                    let _ = write!(out, "{z}");
                }
            }
            let _ = write!(
                out,
                ",{},{:.6},{:.4}",
                e.mode, r.virtual_seconds, r.staleness_mean
            );
            out.push('\n');
        }
    }
    out
}

/// ε as the tables show it: three decimals, in scientific notation from
/// 10,000 on (a run with almost no noise reached ε ≈ 1.65e12, thirteen
/// digits of a meaningless number) and below 0.001 (`--target-epsilon
/// 0.001` showed as 0.000).
pub(crate) fn epsilon_text(eps: f64) -> String {
    if eps.abs() >= 1e4 || (eps != 0.0 && eps.abs() < 1e-3) {
        format!("{eps:.3e}")
    } else {
        format!("{eps:.3}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The federation-value table: each merchant's headline metric alone,
/// federated and centralised.
fn value_table(v: &fedcart_common::reference::FederationValue, metric: Option<&str>) -> String {
    let Some(key) = metric.or_else(|| v.centralized_pooled.keys().next().map(String::as_str))
    else {
        return String::new();
    };
    let cell = |m: Option<&BTreeMap<String, f64>>| {
        m.and_then(|m| m.get(key))
            .map_or_else(|| "–".to_string(), |x| format!("{x:.4}"))
    };
    let pooled = |col: &str| cell(v.pooled.get(col));
    // With personalisation: each merchant's fine-tuned copy (kept or
    // discarded on its validation slice) and the copy it serves.
    let personal = v.merchants.iter().any(|m| m.personalised_kept.is_some());
    let mut out = format!(
        "<h3>Federation value ({} of the run's served version; baselines trained {} rounds{}; \
         centralised on all rows: {}; pooled: each column's figures weighted by held-out \
         rows, validation figures by validation rows)</h3><table><tr><th>merchant</th><th>global popularity</th>\
         <th>own popularity</th><th>local-only</th><th>federated</th>{}<th>centralised</th></tr>\
         <tr><td><b>pooled</b></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}<td>–</td></tr>",
        esc(key),
        v.rounds,
        v.patience
            .map(|p| format!(" at most, stopping as the run does (patience {p})"))
            .unwrap_or_default(),
        cell(Some(&v.centralized_pooled)),
        if personal {
            "<th>personalised (kept?)</th><th>selected copy</th>"
        } else {
            ""
        },
        pooled("global_popularity"),
        pooled("own_popularity"),
        pooled("local_only"),
        pooled("federated"),
        if personal {
            format!(
                "<td>{} ({} of {} kept)</td><td>{}</td>",
                pooled("personalised"),
                v.merchants
                    .iter()
                    .filter(|m| m.personalised_kept == Some(true))
                    .count(),
                v.merchants.len(),
                pooled("selected")
            )
        } else {
            String::new()
        },
    );
    for m in &v.merchants {
        let personal_cells = if personal {
            let kept = match m.personalised_kept {
                Some(true) => "kept",
                Some(false) => "discarded",
                None => "–",
            };
            format!(
                "<td>{} ({kept})</td><td>{}</td>",
                cell(m.personalised.as_ref()),
                cell(Some(m.selected()))
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{personal_cells}<td>{}</td></tr>",
            esc(&m.merchant),
            cell(m.global_popularity.as_ref()),
            cell(m.own_popularity.as_ref()),
            cell(Some(&m.local_only)),
            cell(Some(&m.federated)),
            cell(m.centralized.as_ref())
        );
    }
    out += "</table>";
    out
}

/// The hyper-parameter search's trials: one row per candidate, its
/// configuration, then per rung the rounds it spent and its validation
/// score, kept or dropped.
fn search_table(s: &super::experiment::SearchSummary) -> String {
    let mut out = format!(
        "<h3>Hyper-parameter search: {} of {} budgeted rounds, trials ranked by their best \
         version's federated {} ({} is better)</h3><table><tr><th>candidate</th><th>factors</th>\
         <th>lr (SGD) / α (iALS)</th><th>reg</th><th>epochs</th><th>negatives</th>",
        s.rounds_used,
        s.budget,
        esc(&s.metric),
        if s.higher_is_better {
            "higher"
        } else {
            "lower"
        }
    );
    for (r, rung) in s.schedule.iter().enumerate() {
        let _ = write!(
            out,
            "<th>rung {} ({} × {} rounds)</th>",
            r + 1,
            rung.candidates,
            rung.rounds
        );
    }
    out += "<th>outcome</th></tr>";
    for t in &s.trials {
        let c = &t.config;
        let _ = write!(
            out,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            t.candidate,
            if t.candidate == 0 { " (given)" } else { "" },
            c.factors,
            c.alpha
                .map_or_else(|| c.lr.to_string(), |a| format!("α {a}")),
            c.reg,
            c.epochs,
            if c.alpha.is_some() {
                "–".to_string()
            } else {
                c.negatives.to_string()
            }
        );
        for r in 0..s.schedule.len() {
            let cell = t
                .rungs
                .iter()
                .find(|x| x.rung == r)
                .map_or(String::new(), |x| match (x.value, &x.error) {
                    (Some(v), _) => format!(
                        "{v:.4} (v{}, {} rounds)",
                        x.best_version.unwrap_or(0),
                        x.rounds
                    ),
                    (None, Some(e)) => format!("failed: {e}"),
                    (None, None) => format!("no metric ({} rounds)", x.rounds),
                });
            let _ = write!(out, "<td>{}</td>", esc(&cell));
        }
        let outcome = if t.candidate == s.chosen {
            "chosen".to_string()
        } else {
            format!("dropped after rung {}", t.rungs.len())
        };
        let _ = write!(out, "<td>{outcome}</td></tr>");
    }
    out += "</table>";
    out
}

/// A table of (name, value) rows, names left-aligned in the first column.
fn name_value_table(out: &mut String, class: &str, rows: &[(String, String)]) {
    let _ = write!(out, "<table class=\"{class}\">");
    for (k, v) in rows {
        let _ = write!(
            out,
            "<tr><th style=\"text-align:left\">{}</th><td style=\"text-align:left\">{}</td></tr>",
            esc(k),
            esc(v)
        );
    }
    *out += "</table>";
}

pub(crate) fn html(
    s: &Settings,
    experiments: &[Experiment],
    plots: &[Vec<super::plots::Plot>],
) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>fedcart simulation</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>\
         <h1>fedcart simulation</h1><h2>Settings</h2>",
    );
    name_value_table(&mut out, "settings", &settings_rows(s));
    for (i, e) in experiments.iter().enumerate() {
        let _ = write!(
            out,
            "<h2>{}</h2><p>{} merchants, strategy {}, partition {}, {:.4} s per round after the first.</p>",
            esc(&e.name),
            e.merchants,
            esc(&e.strategy_label()),
            esc(&e.partition),
            e.timing.seconds_per_round
        );
        // The model as trained, defaults resolved: the settings table
        // holds only what was given.
        name_value_table(&mut out, "model", &model_rows(e));
        if let Some(p) = &e.privacy {
            // Distributed noise: a round that lost agents was charged at
            // the smaller noise its survivors added, which is what ε
            // composes; the planned σ alone did not give this ε.
            let charged = e
                .rounds
                .iter()
                .filter_map(|r| r.dp_noise)
                .fold(f64::INFINITY, f64::min);
            let lower = if charged < p.noise_multiplier * (1.0 - 1e-9) {
                format!(
                    " planned (rounds that lost agents were charged at down to {charged:.4}, \
                     each round's in metrics.csv's <code>dp_noise</code>)"
                )
            } else {
                String::new()
            };
            let _ = write!(
                out,
                "<p class=\"dp\">Differential privacy ({:?} noise, merchant level): \
                 ε = {} at δ = {:e} after {} rounds, noise multiplier {:.4}{lower}, \
                 {} clip norm {:.4}; noise source: {}.</p>",
                p.mode,
                epsilon_text(p.epsilon),
                p.delta,
                e.rounds.iter().filter(|r| r.committed).count(),
                p.noise_multiplier,
                if p.adaptive { "adaptive" } else { "fixed" },
                p.clip,
                esc(&p.dp_noise)
            );
        }
        if let Some(keys) = &e.secagg_keys {
            let _ = write!(
                out,
                "<p class=\"dp\">Secure aggregation keys: {}.</p>",
                esc(keys)
            );
        }
        for p in plots.get(i).into_iter().flatten() {
            let _ = write!(
                out,
                "<figure>{}<figcaption>{}.png, {}.svg</figcaption></figure>",
                p.svg,
                esc(&p.name),
                esc(&p.name)
            );
        }
        out += &report_html(&e.report);
        if let Some(search) = &e.search {
            out += &search_table(search);
        }
        if e.task.starts_with("segments") {
            // Written beside this file by the segments run (`plots::segments`).
            out += "<figure><img src=\"segments.png\" alt=\"customer segments\">\
                    <figcaption>segments.png: each customer's first feature against its \
                    third (recency against monetary value on an orders export), one colour \
                    per segment</figcaption></figure>";
        }
        let keys: Vec<&String> = e.final_metrics.keys().collect();
        out += "<table><tr><th>round</th><th>reported</th>";
        for k in &keys {
            let _ = write!(out, "<th>{}</th>", esc(k));
        }
        let dp = e.privacy.is_some();
        if dp {
            out += "<th>ε</th>";
        }
        out += "<th>s</th></tr>";
        for r in &e.rounds {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}/{}</td>",
                r.round, r.reported, r.selected
            );
            // A round without an evaluation (an inner level of a boosted
            // tree, a round that did not commit) shows a dash.
            for k in &keys {
                match r.eval.get(*k) {
                    Some(v) => _ = write!(out, "<td>{v:.4}</td>"),
                    None => out += "<td>–</td>",
                }
            }
            if dp {
                match r.epsilon {
                    Some(eps) => _ = write!(out, "<td>{}</td>", epsilon_text(eps)),
                    None => out += "<td>–</td>",
                }
            }
            let _ = write!(out, "<td>{:.3}</td></tr>", r.seconds);
        }
        out += "</table>";
        if let Some(v) = &e.federation_value {
            out += &value_table(v, e.headline().map(|(k, _)| k));
        }
    }
    out += "</body></html>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run writes into a staging folder: abandoned (a full disk, a failed
    /// plot), it leaves the earlier run's files as they were and no folder
    /// behind; published, every file it wrote moves into --out.
    #[test]
    fn a_run_that_fails_to_write_leaves_the_earlier_results_whole() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("metrics.json"), "earlier").unwrap();
        let stage = Staging::new(d).unwrap();
        std::fs::write(stage.path().join("metrics.json"), "trunc").unwrap();
        let e = stage.abandon(anyhow::anyhow!(
            "writing metrics.json: No space left on device"
        ));
        drop(stage);
        assert_eq!(
            std::fs::read_to_string(d.join("metrics.json")).unwrap(),
            "earlier"
        );
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["metrics.json"]);
        assert!(
            format!("{e:#}").starts_with(&format!(
                "the results were not written; the files of an earlier run in {} are as they were: \
                 writing metrics.json",
                d.display()
            )),
            "{e:#}"
        );

        let stage = Staging::new(d).unwrap();
        for f in ["metrics.json", "rules.csv"] {
            std::fs::write(stage.path().join(f), "new").unwrap();
        }
        assert_eq!(stage.publish().unwrap(), ["metrics.json", "rules.csv"]);
        assert_eq!(
            std::fs::read_to_string(d.join("metrics.json")).unwrap(),
            "new"
        );
        let mut left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["metrics.json", "rules.csv"]);
    }

    fn settings_of(task: &str, lr: Option<f32>) -> Vec<(String, String)> {
        let s = Settings::from_args(crate::SimArgs {
            task: Some(task.parse().unwrap()),
            lr,
            ..Default::default()
        })
        .unwrap();
        settings_rows(&s)
    }

    /// Column names of an orders mapping keep their case; enum names read
    /// in lower case.
    #[test]
    fn mapped_column_names_keep_their_case() {
        let mut rows = Vec::new();
        flatten(
            "orders",
            &serde_json::json!({ "item": "Article", "merchant": "Branch" }),
            &mut rows,
        );
        flatten("transport", &serde_json::json!("Inproc"), &mut rows);
        assert_eq!(
            rows,
            [
                ("orders.item".to_string(), "Article".to_string()),
                ("orders.merchant".to_string(), "Branch".to_string()),
                ("transport".to_string(), "inproc".to_string()),
            ]
        );
    }

    /// The table printed "final rmse NaN" where metrics.json said null.
    #[test]
    fn a_figure_that_is_not_finite_reads_n_a() {
        assert_eq!(figure("rmse", 0.86104), "rmse 0.8610");
        assert_eq!(figure("rmse", f64::NAN), "rmse n/a");
        assert_eq!(figure("auc", f64::INFINITY), "auc n/a");
    }

    /// A `--mode fedbuff` run's summary table and report said `fedavg`, as
    /// a synchronous run's do; they give the mode beside the strategy.
    #[test]
    fn a_fedbuff_runs_strategy_is_shown_with_its_mode() {
        let experiment = |mode| {
            let s = Settings::from_args(crate::SimArgs {
                task: Some("churn-lr".parse().unwrap()),
                mode,
                ..Default::default()
            })
            .unwrap();
            let task = crate::data::TaskChoice::ChurnLr;
            let model = fedcart_common::task::ModelSpec::churn_lr(3);
            let e = Experiment::new(task, &task.default_data(), &s, 3, &model, 0.0);
            (s, e)
        };
        let (s, e) = experiment(Some(crate::args::ModeName::Fedbuff));
        let table = summary_table(std::slice::from_ref(&e)).to_string();
        assert!(table.contains("fedavg (fedbuff)"), "{table}");
        assert!(html(&s, &[e], &[]).contains("strategy fedavg (fedbuff),"));
        let (s, e) = experiment(None);
        let table = summary_table(std::slice::from_ref(&e)).to_string();
        assert!(
            table.contains("| fedavg ") && !table.contains("(sync)"),
            "{table}"
        );
        assert!(html(&s, &[e], &[]).contains("strategy fedavg,"));
    }

    /// A churn-lr report listed every `gbdt.*` setting, with the trees'
    /// learning rate as 0.10000000149011612 (an f32 widened to f64): the
    /// trees' settings are listed for churn-gbdt only, and an f32 setting
    /// reads as it was given.
    #[test]
    fn settings_list_the_trees_for_churn_gbdt_only_at_f32_precision() {
        let value = |rows: &[(String, String)], key: &str| {
            rows.iter().find(|r| r.0 == key).map(|r| r.1.clone())
        };
        let lr = settings_of("churn-lr", Some(0.1));
        assert!(!lr.iter().any(|r| r.0.starts_with("gbdt")), "{lr:?}");
        assert_eq!(value(&lr, "lr").as_deref(), Some("0.1"));
        let gbdt = settings_of("churn-gbdt", None);
        assert_eq!(value(&gbdt, "gbdt.learning rate").as_deref(), Some("0.1"));
        assert_eq!(value(&gbdt, "gbdt.trees").as_deref(), Some("300"));
        // f64 settings keep their digits.
        assert_eq!(
            value(&gbdt, "gbdt.min child weight").as_deref(),
            Some("20.0")
        );
        assert_eq!(value(&gbdt, "valid fraction").as_deref(), Some("0.1"));
        assert_eq!(value(&gbdt, "clock.availability").as_deref(), Some("1.0"));
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A second run into the same `--out` left the first run's plots of
    /// another task beside its own report, read as this run's. What an
    /// earlier run wrote and this one did not is removed; a file of the
    /// user's never is, even one written into the folder while a run went
    /// on (file times once decided what a run had written, and such a file
    /// was listed and deleted by the next run), nor one named outside the
    /// directory.
    #[test]
    fn a_run_retires_what_an_earlier_run_wrote_and_it_did_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        let first = names(&["metrics.json", "mf-rmse-by-round.png", "segments.csv"]);
        for f in &first {
            std::fs::write(d.join(f), "first").unwrap();
        }
        // The user's, written while the first run was going.
        std::fs::write(d.join("my-notes.txt"), "mine").unwrap();
        assert!(retire_stale(d, &first).unwrap().is_empty());
        let listed = std::fs::read_to_string(d.join(MANIFEST)).unwrap();
        assert_eq!(listed, "metrics.json\nmf-rmse-by-round.png\nsegments.csv\n");
        // The second run: another task, right after.
        let outside = dir.path().parent().unwrap().join("outside-the-out-dir.txt");
        let mut manifest = std::fs::read_to_string(d.join(MANIFEST)).unwrap();
        manifest.push_str("../outside-the-out-dir.txt\nnotes-gone.txt\n");
        std::fs::write(d.join(MANIFEST), manifest).unwrap();
        let second = names(&["metrics.json", "churn-lr-auc-by-round.png"]);
        for f in &second {
            std::fs::write(d.join(f), "second").unwrap();
        }
        let removed = retire_stale(d, &second).unwrap();
        assert_eq!(removed, ["mf-rmse-by-round.png", "segments.csv"]);
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                MANIFEST,
                "churn-lr-auc-by-round.png",
                "metrics.json",
                "my-notes.txt",
                "notes.txt"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(d.join(MANIFEST)).unwrap(),
            "churn-lr-auc-by-round.png\nmetrics.json\n"
        );
        assert!(!outside.exists() || std::fs::read_to_string(&outside).is_ok());
    }
}
