//! The simulator's plot files: PNG and SVG drawn with `plotters`.
//!
//! Per experiment: the headline metric by round and by virtual time (see
//! `clock.rs`), and — when the federation-value baselines were computed —
//! each merchant's metric trained alone, federated and centralised. Every
//! plot is written as `<name>.png` and `<name>.svg`; `report.html` inlines the
//! SVGs.
//!
//! Text is laid out with the DejaVu Sans font compiled into the binary
//! (plotters' `ab_glyph` backend), never a system font: the plots render the
//! same on a fresh machine without fontconfig or any font installed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::experiment::Experiment;

mod segments;
pub use segments::segments;

/// Pixel size of every plot.
pub const SIZE: (u32, u32) = (800, 480);

const FONT: &str = "sans-serif";

/// Colours of the series, in order (matplotlib's first six, for familiarity:
/// the federation-value plot has six series with personalisation).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One plot written to disk.
#[derive(Debug, Clone)]
pub struct Plot {
    /// File stem, e.g. `churn-lr-auc-by-round`.
    pub name: String,
    /// Title shown above the chart.
    pub title: String,
    /// The SVG document (also written to `<name>.svg`).
    pub svg: String,
    /// Where the PNG was written.
    pub png: PathBuf,
}

/// Registers the embedded font under the family name plotters asks for.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            // The bytes are a fixed, valid TrueType file compiled in.
            unreachable!("the embedded DejaVu Sans font does not parse");
        }
    });
}

/// What one chart shows.
enum Chart<'a> {
    /// Lines: (label, points).
    Lines {
        x_desc: &'a str,
        y_desc: &'a str,
        series: Vec<(String, Vec<(f64, f64)>)>,
        /// Where the legend goes: away from where the curve ends up.
        legend: SeriesLabelPosition,
    },
    /// Grouped bars: category labels, then (series label, its colour's
    /// index in [`PALETTE`], value per category). A column keeps its colour
    /// whichever others are left out.
    Bars {
        y_desc: &'a str,
        categories: Vec<String>,
        series: Vec<(String, usize, Vec<Option<f64>>)>,
    },
    /// One value per merchant, sorted, as an area about zero, with lines of
    /// text below the chart: the federation value of more merchants than
    /// bars can show (a thousand groups of bars in 800 pixels were a smear).
    Sorted {
        x_desc: String,
        y_desc: String,
        values: Vec<f64>,
        notes: Vec<String>,
    },
}

/// Above this many merchants the federation-value plot shows each one's
/// federated − local-only difference, sorted, instead of a group of bars
/// per merchant: forty groups of five bars are about the most an 800-pixel
/// chart keeps readable, with labels that still fit their slot.
pub const MAX_MERCHANT_BARS: usize = 40;

/// Writes every plot of `experiments` into `dir` and returns them, per experiment.
pub fn write_all(dir: &Path, experiments: &[Experiment]) -> anyhow::Result<Vec<Vec<Plot>>> {
    register_font();
    experiments
        .iter()
        .map(|e| {
            charts(e)
                .into_iter()
                .map(|(name, title, chart)| write_one(dir, &file_stem(&name), &title, &chart))
                .collect()
        })
        .collect()
}

/// A chart's name as a portable file stem: a task's parameters (`noop:1000`,
/// `churn-mlp:16,8`, `segments:4`) made `:` and `,` part of the file names,
/// which Windows refuses and shells and URLs treat specially.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The charts of one experiment: (file stem, title, chart).
fn charts(e: &Experiment) -> Vec<(String, String, Chart<'static>)> {
    let Some((key, higher_is_better)) = e.headline() else {
        return Vec::new();
    };
    let legend = || {
        if higher_is_better {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        }
    };
    let mut out = Vec::new();
    let by = |x: &dyn Fn(&super::RoundRow) -> f64| -> Vec<(f64, f64)> {
        e.rounds
            .iter()
            .filter_map(|r| r.eval.get(key).map(|v| (x(r), *v)))
            .collect()
    };
    let label = format!("{} ({})", e.strategy, e.mode);
    let rounds = by(&|r| r.round as f64);
    if !rounds.is_empty() {
        out.push((
            format!("{}-{key}-by-round", e.task),
            format!("{}: {key} by round", e.task),
            Chart::Lines {
                x_desc: if e.mode == "fedbuff" {
                    "version"
                } else {
                    "round"
                },
                y_desc: key,
                series: vec![(label.clone(), rounds)],
                legend: legend(),
            },
        ));
        // A run whose rows all read virtual time 0 (no training round
        // committed) would draw a vertical line: no plot.
        let by_time = by(&|r| r.virtual_seconds);
        if by_time.iter().any(|&(t, _)| t > 0.0) {
            out.push((
                format!("{}-{key}-by-time", e.task),
                format!("{}: {key} by virtual time", e.task),
                Chart::Lines {
                    x_desc: "virtual seconds",
                    y_desc: key,
                    series: vec![(label, by_time)],
                    legend: legend(),
                },
            ));
        }
    }
    if let Some(v) = &e.federation_value {
        out.extend(federation_value(e, v, key, higher_is_better));
    }
    out
}

/// The federation-value chart: up to [`MAX_MERCHANT_BARS`] merchants, a
/// group of bars per merchant after the pooled group; beyond, each
/// merchant's federated − local-only difference, sorted, with the pooled
/// figures and the better / tied / worse counts written under it.
fn federation_value(
    e: &Experiment,
    v: &fedcart_common::reference::FederationValue,
    key: &'static str,
    higher_is_better: bool,
) -> Option<(String, String, Chart<'static>)> {
    use fedcart_common::reference::MerchantValue;
    type Metrics = std::collections::BTreeMap<String, f64>;
    let get = |m: Option<&Metrics>| m.and_then(|m| m.get(key)).copied();
    // What the report's baselines line says of how long they trained.
    let baselines = match v.patience {
        Some(p) => format!(
            "baselines at most {} rounds, stopped as the run stops, patience {p}",
            v.rounds
        ),
        None => format!("baselines {} rounds", v.rounds),
    };
    let served = e
        .best
        .as_ref()
        .map(|b| format!("served version {}; ", b.round))
        .unwrap_or_default();
    let name = format!("{}-federation-value", e.task);
    if v.merchants.len() > MAX_MERCHANT_BARS {
        let both: Vec<&MerchantValue> = v
            .merchants
            .iter()
            .filter(|m| m.federated.contains_key(key) && m.local_only.contains_key(key))
            .collect();
        let mut values: Vec<f64> = both
            .iter()
            .map(|m| m.federated[key] - m.local_only[key])
            .filter(|d| d.is_finite())
            .collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let tally = super::experiment::VersusLocal::count(
            both.iter().copied(),
            key,
            higher_is_better,
            |m| &m.federated,
        );
        let pooled: Vec<String> = [
            ("federated", v.pooled.get("federated")),
            ("local-only", v.pooled.get("local_only")),
            ("own popularity", v.pooled.get("own_popularity")),
            ("global popularity", v.pooled.get("global_popularity")),
            ("selected copy", v.pooled.get("selected")),
            ("centralised", Some(&v.centralized_pooled)),
        ]
        .into_iter()
        .filter_map(|(label, m)| get(m).map(|x| format!("{label} {x:.4}")))
        .collect();
        let unmeasured = v.merchants.len() - both.len();
        let notes = vec![
            format!("pooled {key}: {}", pooled.join(", ")),
            format!(
                "federated {}{}",
                tally,
                if unmeasured > 0 {
                    format!(
                        " ({unmeasured} of {} without both figures)",
                        v.merchants.len()
                    )
                } else {
                    String::new()
                }
            ),
            format!(
                "{} 0: federated better; {baselines}",
                if higher_is_better { "above" } else { "below" }
            ),
        ];
        return Some((
            name,
            format!(
                "{}: federated − local-only {key} per merchant, sorted ({served}{} merchants)",
                e.task,
                v.merchants.len()
            ),
            Chart::Sorted {
                x_desc: "merchants, sorted by the difference".into(),
                y_desc: format!("federated − local-only {key}"),
                values,
                notes,
            },
        ));
    }
    let personal = v.merchants.iter().any(|m| m.personalised_kept.is_some());
    // One series per column: the pooled figure first, then each merchant's.
    let series = |label: &str,
                  colour: usize,
                  pooled: Option<&Metrics>,
                  per: &dyn Fn(&MerchantValue) -> Option<f64>| {
        let values: Vec<Option<f64>> = std::iter::once(get(pooled))
            .chain(v.merchants.iter().map(per))
            .collect();
        (label.to_string(), colour, values)
    };
    let mut all = vec![
        series(
            "global popularity",
            0,
            v.pooled.get("global_popularity"),
            &|m| get(m.global_popularity.as_ref()),
        ),
        series("own popularity", 1, v.pooled.get("own_popularity"), &|m| {
            get(m.own_popularity.as_ref())
        }),
        series("local-only", 2, v.pooled.get("local_only"), &|m| {
            get(Some(&m.local_only))
        }),
        series("federated", 3, v.pooled.get("federated"), &|m| {
            get(Some(&m.federated))
        }),
        series("centralised", 4, Some(&v.centralized_pooled), &|m| {
            get(m.centralized.as_ref())
        }),
    ];
    if personal {
        // The fine-tuned copy where the merchant kept it (no bar where
        // it was discarded); pooled: every merchant's selected copy.
        all.push(series(
            "personalised where kept (pooled: selected)",
            5,
            v.pooled.get("selected"),
            &|m| match m.personalised_kept {
                Some(true) => get(m.personalised.as_ref()),
                _ => None,
            },
        ));
    }
    // A column with no figure anywhere (popularity on a churn task) has
    // no bars and no legend entry.
    all.retain(|(_, _, values)| values.iter().any(Option::is_some));
    Some((
        name,
        format!("{}: {key} per merchant ({served}{baselines})", e.task),
        Chart::Bars {
            y_desc: key,
            categories: std::iter::once("pooled".to_string())
                .chain(v.merchants.iter().map(|m| m.merchant.clone()))
                .collect(),
            series: all,
        },
    ))
}

fn write_one(dir: &Path, name: &str, title: &str, chart: &Chart<'_>) -> anyhow::Result<Plot> {
    let png = dir.join(format!("{name}.png"));
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(&root, title, chart).map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, title, chart).map_err(|e| anyhow!("drawing {name}.svg: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing {name}.svg: {e}"))?;
    }
    let path = dir.join(format!("{name}.svg"));
    std::fs::write(&path, &svg).with_context(|| format!("writing {}", path.display()))?;
    Ok(Plot {
        name: name.into(),
        title: title.into(),
        svg,
        png,
    })
}

/// A range around `values` with a little headroom, never empty.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

/// [`span`] of a metric's values, not below 0 when none is: HR, AUC or
/// RMSE cannot be negative, and an axis padded to -0.02 drew a stub of a
/// bar under 0 for every merchant that scored 0.
fn metric_span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    let (lo, hi) = span(values.iter().copied());
    if values.iter().all(|&v| v >= 0.0) {
        (lo.max(0.0), hi)
    } else {
        (lo, hi)
    }
}

/// Margin around a chart, in pixels.
const MARGIN: u32 = 14;

/// A chart on `area` with the title and the axes' label areas. A title
/// wider than the image is set smaller (down to 12 pixels) so that it is
/// read whole.
fn builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, DB> {
    let room = area.dim_in_pixel().0.saturating_sub(2 * MARGIN);
    let mut size = 20.0;
    while size > 12.0
        && area
            .estimate_text_size(title, &(FONT, size).into())
            .is_ok_and(|(w, _)| w > room)
    {
        size -= 1.0;
    }
    let mut b = ChartBuilder::on(area);
    b.caption(title, (FONT, size))
        .margin(MARGIN)
        .x_label_area_size(44)
        .y_label_area_size(64);
    b
}

/// Legend swatch side, gap to its label, gap between entries, row height
/// and padding of the bar chart's legend strip, in pixels.
const SWATCH: i32 = 12;
const SWATCH_GAP: i32 = 6;
const ENTRY_GAP: i32 = 22;
const ROW: i32 = 20;
const LEGEND_PAD: i32 = 6;

/// Where a bar chart's parts landed, in the image's pixels: the plotting
/// area (the bars) and the legend (below the chart, outside the plotting
/// area, so it never hides a bar); for a [`Chart::Sorted`], the plotting
/// area and its notes.
#[derive(Debug, Clone, PartialEq)]
struct BarsLayout {
    /// x and y pixel ranges of the plotting area.
    plot: (std::ops::Range<i32>, std::ops::Range<i32>),
    /// x and y pixel ranges of the legend's entries.
    legend: (std::ops::Range<i32>, std::ops::Range<i32>),
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    chart: &Chart<'_>,
) -> Result<Option<BarsLayout>, DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    match chart {
        Chart::Lines {
            x_desc,
            y_desc,
            series,
            legend,
        } => {
            let (x0, x1) = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
            let (y0, y1) = metric_span(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
            let mut c = builder(root, title).build_cartesian_2d(x0..x1, y0..y1)?;
            let mut mesh = c.configure_mesh();
            mesh.x_desc(*x_desc)
                .y_desc(*y_desc)
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 15));
            if matches!(*x_desc, "round" | "version") {
                mesh.x_label_formatter(&whole);
            }
            mesh.draw()?;
            for (i, (label, pts)) in series.iter().enumerate() {
                let colour = PALETTE[i % PALETTE.len()];
                c.draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))?
                    .label(label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                // Markers only while they stay readable.
                if pts.len() <= 60 {
                    c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
                }
            }
            c.configure_series_labels()
                .position(legend.clone())
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font((FONT, 13))
                .draw()?;
            Ok(None)
        }
        Chart::Bars {
            y_desc,
            categories,
            series,
        } => {
            // The legend gets its own strip below the chart: every bar may
            // reach any height, so no corner of the plotting area is free.
            let style: TextStyle = (FONT, 13).into();
            let (width, height) = root.dim_in_pixel();
            let mut rows: Vec<Vec<(usize, i32)>> = vec![Vec::new()];
            let mut row_width = Vec::new();
            let mut x = 0;
            for (s, (label, _, _)) in series.iter().enumerate() {
                let text = root.estimate_text_size(label, &style)?.0 as i32;
                let w = SWATCH + SWATCH_GAP + text;
                if x > 0 && x + w > width as i32 - 2 * LEGEND_PAD {
                    row_width.push(x - ENTRY_GAP);
                    rows.push(Vec::new());
                    x = 0;
                }
                if let Some(row) = rows.last_mut() {
                    row.push((s, x));
                }
                x += w + ENTRY_GAP;
            }
            row_width.push((x - ENTRY_GAP).max(0));
            let strip = rows.len() as i32 * ROW + 2 * LEGEND_PAD;
            let (chart_area, legend_area) = root.split_vertically(height as i32 - strip);
            let n = categories.len().max(1);
            let (lo, hi) = metric_span(series.iter().flat_map(|s| s.2.iter().flatten().copied()));
            let mut c = builder(&chart_area, title)
                .build_cartesian_2d(-0.5..(n as f64 - 0.5), lo.min(hi - 1e-3)..hi)?;
            // Category labels shrink until they fit their slot.
            let slot = c.plotting_area().dim_in_pixel().0 as f64 / n as f64;
            let mut size = 13.0;
            while size > 8.0 {
                let widest = categories
                    .iter()
                    .map(|l| root.estimate_text_size(l, &(FONT, size).into()))
                    .try_fold(0, |m, w| w.map(|w| m.max(w.0)))?;
                if f64::from(widest) <= 0.9 * slot {
                    break;
                }
                size -= 1.0;
            }
            let cats = categories.clone();
            c.configure_mesh()
                .disable_x_mesh()
                .x_labels(n)
                .x_label_formatter(&move |x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 {
                        cats.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .x_desc("merchant")
                .y_desc(*y_desc)
                .label_style((FONT, 13))
                .x_label_style((FONT, size))
                .axis_desc_style((FONT, 15))
                .draw()?;
            let bar_width = 0.8 / series.len().max(1) as f64;
            for (s, (_, colour, values)) in series.iter().enumerate() {
                let colour = PALETTE[colour % PALETTE.len()];
                let bars = values.iter().enumerate().filter_map(|(i, v)| {
                    let left = i as f64 - 0.4 + s as f64 * bar_width;
                    v.map(|v| {
                        Rectangle::new([(left, lo), (left + bar_width * 0.9, v)], colour.filled())
                    })
                });
                c.draw_series(bars)?;
            }
            // Rows centred under the chart.
            let label_style = style.pos(Pos::new(HPos::Left, VPos::Center));
            let mut left = width as i32;
            let mut right = 0;
            for (r, entries) in rows.iter().enumerate() {
                let x0 = (width as i32 - row_width[r]) / 2;
                left = left.min(x0);
                right = right.max(x0 + row_width[r]);
                let y = LEGEND_PAD + r as i32 * ROW + ROW / 2;
                for &(s, dx) in entries {
                    let colour = PALETTE[series[s].1 % PALETTE.len()];
                    let x = x0 + dx;
                    legend_area.draw(&Rectangle::new(
                        [(x, y - SWATCH / 2), (x + SWATCH, y + SWATCH / 2)],
                        colour.filled(),
                    ))?;
                    legend_area.draw(&Text::new(
                        series[s].0.as_str(),
                        (x + SWATCH + SWATCH_GAP, y),
                        label_style.clone(),
                    ))?;
                }
            }
            let (bx, by) = legend_area.get_base_pixel();
            Ok(Some(BarsLayout {
                plot: c.plotting_area().get_pixel_range(),
                legend: (
                    bx + left..bx + right,
                    by + LEGEND_PAD..by + LEGEND_PAD + rows.len() as i32 * ROW,
                ),
            }))
        }
        Chart::Sorted {
            x_desc,
            y_desc,
            values,
            notes,
        } => {
            // The notes get their own strip below the chart, one row each.
            let (width, height) = root.dim_in_pixel();
            let strip = notes.len() as i32 * ROW + 2 * LEGEND_PAD;
            let (chart_area, notes_area) = root.split_vertically(height as i32 - strip);
            let n = values.len().max(1) as f64;
            // Zero is always on the axis: the line that splits better
            // from worse.
            let (lo, hi) = span(values.iter().copied().chain([0.0]));
            let mut c = builder(&chart_area, title).build_cartesian_2d(0.5..n + 0.5, lo..hi)?;
            // Ticks to the decimals their spacing needs; zero reads 0,
            // not the -0.0 a rounding of -1e-17 prints.
            let decimals = (-((hi - lo) / 10.0).log10().floor()).clamp(0.0, 6.0) as usize;
            let tick = move |y: &f64| {
                let text = format!("{y:.decimals$}");
                if text
                    .trim_start_matches('-')
                    .chars()
                    .all(|c| matches!(c, '0' | '.'))
                {
                    "0".to_string()
                } else {
                    text
                }
            };
            c.configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&whole)
                .y_label_formatter(&tick)
                .x_desc(x_desc.as_str())
                .y_desc(y_desc.as_str())
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 15))
                .draw()?;
            let colour = PALETTE[0];
            let points: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as f64 + 1.0, v))
                .collect();
            // The area between the curve and zero, then the curve.
            let outline = std::iter::once((1.0, 0.0))
                .chain(points.iter().copied())
                .chain([(n, 0.0)]);
            c.draw_series([Polygon::new(
                outline.collect::<Vec<_>>(),
                colour.mix(0.35).filled(),
            )])?;
            c.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
            c.draw_series(LineSeries::new(
                [(0.5, 0.0), (n + 0.5, 0.0)],
                BLACK.stroke_width(1),
            ))?;
            let style: TextStyle = (FONT, 13).into();
            let centred = style.pos(Pos::new(HPos::Center, VPos::Center));
            let mut widest = 0;
            for (r, note) in notes.iter().enumerate() {
                widest = widest.max(root.estimate_text_size(note, &style)?.0 as i32);
                let y = LEGEND_PAD + r as i32 * ROW + ROW / 2;
                notes_area.draw(&Text::new(
                    note.as_str(),
                    (width as i32 / 2, y),
                    centred.clone(),
                ))?;
            }
            let (bx, by) = notes_area.get_base_pixel();
            let left = (width as i32 - widest) / 2;
            Ok(Some(BarsLayout {
                plot: c.plotting_area().get_pixel_range(),
                legend: (
                    bx + left..bx + left + widest,
                    by + LEGEND_PAD..by + LEGEND_PAD + notes.len() as i32 * ROW,
                ),
            }))
        }
    }
}

/// A tick label for an axis of whole numbers (rounds, versions, merchant
/// ranks): the number at a whole tick, nothing between.
fn whole(x: &f64) -> String {
    let r = x.round();
    if (x - r).abs() < 1e-6 {
        format!("{}", r as i64)
    } else {
        String::new()
    }
}
#[cfg(test)]
mod tests;
