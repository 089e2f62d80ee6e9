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
    /// Grouped bars: category labels, then (series label, value per category).
    Bars {
        y_desc: &'a str,
        categories: Vec<String>,
        series: Vec<(String, Vec<Option<f64>>)>,
    },
}

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
        // Only the in-process transport runs the virtual clock (over gRPC
        // every row's virtual time is 0: a vertical line, no plot).
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
        use fedcart_common::reference::MerchantValue;
        type Metrics = std::collections::BTreeMap<String, f64>;
        let get = |m: Option<&Metrics>| m.and_then(|m| m.get(key)).copied();
        let personal = v.merchants.iter().any(|m| m.personalised_kept.is_some());
        // One series per column: the pooled figure first, then each merchant's.
        let series =
            |label: &str, pooled: Option<&Metrics>, per: &dyn Fn(&MerchantValue) -> Option<f64>| {
                let values = std::iter::once(get(pooled))
                    .chain(v.merchants.iter().map(per))
                    .collect();
                (label.to_string(), values)
            };
        let mut all = vec![
            series(
                "global popularity",
                v.pooled.get("global_popularity"),
                &|m| get(m.global_popularity.as_ref()),
            ),
            series("own popularity", v.pooled.get("own_popularity"), &|m| {
                get(m.own_popularity.as_ref())
            }),
            series("local-only", v.pooled.get("local_only"), &|m| {
                get(Some(&m.local_only))
            }),
            series("federated", v.pooled.get("federated"), &|m| {
                get(Some(&m.federated))
            }),
            series("centralised", Some(&v.centralized_pooled), &|m| {
                get(m.centralized.as_ref())
            }),
        ];
        if personal {
            // The fine-tuned copy where the merchant kept it (no bar where
            // it was discarded); pooled: every merchant's selected copy.
            all.push(series(
                "personalised where kept (pooled: selected)",
                v.pooled.get("selected"),
                &|m| match m.personalised_kept {
                    Some(true) => get(m.personalised.as_ref()),
                    _ => None,
                },
            ));
        }
        out.push((
            format!("{}-federation-value", e.task),
            match &e.best {
                Some(b) => format!(
                    "{}: {key} per merchant (served version {}; baselines {} rounds)",
                    e.task, b.round, v.rounds
                ),
                None => format!(
                    "{}: {key} per merchant (baselines {} rounds)",
                    e.task, v.rounds
                ),
            },
            Chart::Bars {
                y_desc: key,
                categories: std::iter::once("pooled".to_string())
                    .chain(v.merchants.iter().map(|m| m.merchant.clone()))
                    .collect(),
                series: all,
            },
        ));
    }
    out
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

/// A chart on `area` with the title and the axes' label areas.
fn builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(area);
    b.caption(title, (FONT, 20))
        .margin(14)
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
/// area, so it never hides a bar).
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
            let (y0, y1) = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
            let mut c = builder(root, title).build_cartesian_2d(x0..x1, y0..y1)?;
            // Rounds and versions are whole numbers: label only whole ticks.
            let whole = |x: &f64| {
                let r = x.round();
                if (x - r).abs() < 1e-6 {
                    format!("{}", r as i64)
                } else {
                    String::new()
                }
            };
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
            for (s, (label, _)) in series.iter().enumerate() {
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
            let (lo, hi) = span(series.iter().flat_map(|s| s.1.iter().flatten().copied()));
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
            for (s, (_, values)) in series.iter().enumerate() {
                let colour = PALETTE[s % PALETTE.len()];
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
                    let colour = PALETTE[s % PALETTE.len()];
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
    }
}

#[cfg(test)]
mod tests;
