//! The segment plot of `--task segments`: every customer (up to a sample)
//! by recency and monetary value, coloured by segment, written as
//! `segments.png`.

use std::path::Path;

use anyhow::anyhow;
use fedcart_common::train::LocalData;
use plotters::prelude::*;

use super::{FONT, PALETTE, SIZE, register_font};

/// Most customers drawn (every n-th beyond that, deterministic).
const MAX_POINTS: usize = 6000;

/// Writes `segments.png` under `dir`: recency (days) against
/// log10(1 + monetary) of each customer, coloured by its segment in `labels`
/// (one vector per merchant, training rows then held-out rows); on a
/// customer table the first and last of the features the profile shows
/// (`shown`, column indices).
pub fn segments(
    dir: &Path,
    merchants: &[LocalData],
    k: usize,
    labels: &[Vec<usize>],
    names: &[String],
    shown: &[usize],
) -> anyhow::Result<()> {
    register_font();
    // The first and last features the profile shows, named as the report
    // names them.
    let headers = crate::segments::profile_headers(names, shown);
    let (Some(&x_at), Some(&y_at)) = (shown.first(), shown.last()) else {
        return Ok(());
    };
    let (Some(x_name), Some(y_name)) = (headers.first(), headers.last()) else {
        return Ok(());
    };
    let x_desc = x_name.trim_start_matches("mean ").to_string();
    let y_desc = match y_name.as_str() {
        "monetary" => "log10(1 + monetary)".to_string(),
        other => format!("log10(1 + {})", other.trim_start_matches("mean ")),
    };
    let mut pts: Vec<(f64, f64, usize)> = Vec::new();
    for (m, l) in merchants.iter().zip(labels) {
        let Some(c) = &m.churn else { continue };
        for (row, &seg) in c.train.x.rows().into_iter().chain(c.valid.x.rows()).zip(l) {
            pts.push((
                f64::from(row[x_at]),
                (1.0 + f64::from(row[y_at]).max(0.0)).log10(),
                seg,
            ));
        }
    }
    let step = pts.len().div_ceil(MAX_POINTS).max(1);
    let pts: Vec<_> = pts.into_iter().step_by(step).collect();
    let x1 = pts.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y1 = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let png = dir.join("segments.png");
    let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", png.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(format!("{k} customer segments"), (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x1, 0.0..y1)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| err(&e))?;
    for seg in 0..k {
        let colour = if let Some(&c) = PALETTE.get(seg) {
            c
        } else {
            RGBColor(
                (seg * 67 % 256) as u8,
                (seg * 131 % 256) as u8,
                (seg * 29 % 256) as u8,
            )
        };
        c.draw_series(
            pts.iter()
                .filter(|p| p.2 == seg)
                .map(|p| Circle::new((p.0, p.1), 2, colour.mix(0.6).filled())),
        )
        .map_err(|e| err(&e))?
        .label(format!("segment {seg}"))
        .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
