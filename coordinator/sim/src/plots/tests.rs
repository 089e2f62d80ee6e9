//! Plot files: present, decodable, the right size, not blank, labelled.

use std::collections::BTreeMap;

use fedcart_common::reference::{FederationValue, MerchantValue};

use super::*;
use crate::{RoundRow, Settings, SimArgs, data};

/// A churn experiment with made-up rows (no training needed to plot).
fn experiment() -> Experiment {
    let s = Settings::from_args(SimArgs {
        task: Some("churn-lr".parse().unwrap()),
        ..Default::default()
    })
    .unwrap();
    let task = data::TaskChoice::ChurnLr;
    let model = fedcart_common::task::ModelSpec::churn_lr(3);
    let mut e = Experiment::new(task, &task.default_data(), &s, 3, &model, 0.0);
    let metric = |v: f64| BTreeMap::from([("auc".to_string(), v)]);
    e.rounds = (1..=6)
        .map(|r| RoundRow {
            round: r,
            committed: true,
            eval: metric(0.7 + 0.02 * r as f64),
            virtual_seconds: 1.5 * r as f64,
            ..Default::default()
        })
        .collect();
    e.federation_value = Some(FederationValue {
        notes: Vec::new(),
        rounds: 6,
        patience: None,
        centralized_pooled: metric(0.84),
        merchants: (0..3)
            .map(|k| MerchantValue {
                merchant: format!("m{k:04}"),
                local_only: metric(0.6 + 0.05 * k as f64),
                federated: metric(0.8),
                centralized: Some(metric(0.83)),
                own_popularity: None,
                global_popularity: None,
                personalised: None,
                personalised_kept: None,
                weight: 1.0,
            })
            .collect(),
        pooled: Default::default(),
    });
    e.finish();
    e
}

/// Decodes a PNG: (width, height, pixel-value variance).
fn decode(path: &Path) -> (u32, u32, f64) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = &buf[..info.buffer_size()];
    let mean = px.iter().map(|&b| f64::from(b)).sum::<f64>() / px.len() as f64;
    let var = px
        .iter()
        .map(|&b| (f64::from(b) - mean).powi(2))
        .sum::<f64>()
        / px.len() as f64;
    (info.width, info.height, var)
}

#[test]
fn every_plot_is_written_as_a_sized_non_blank_png_and_a_labelled_svg() {
    let dir = tempfile::tempdir().unwrap();
    let plots = write_all(dir.path(), &[experiment()]).unwrap();
    let names: Vec<&str> = plots[0].iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "churn-lr-auc-by-round",
            "churn-lr-auc-by-time",
            "churn-lr-federation-value"
        ]
    );
    for p in &plots[0] {
        let (w, h, var) = decode(&dir.path().join(format!("{}.png", p.name)));
        assert_eq!((w, h), SIZE, "{}", p.name);
        assert!(var > 100.0, "{} looks blank (variance {var})", p.name);
        let svg = std::fs::read_to_string(dir.path().join(format!("{}.svg", p.name))).unwrap();
        assert_eq!(svg, p.svg);
        assert!(
            svg.starts_with("<svg") && svg.contains(&p.title),
            "{}",
            p.name
        );
        assert!(
            texts(&svg).contains(&"auc".into()),
            "{}: no y-axis label",
            p.name
        );
    }
    let svg = |k: usize| texts(&plots[0][k].svg);
    assert!(svg(0).contains(&"round".into()), "{:?}", svg(0));
    assert!(svg(1).contains(&"virtual seconds".into()));
    for label in [
        "merchant",
        "m0002",
        "local-only",
        "federated",
        "centralised",
    ] {
        assert!(
            svg(2).contains(&label.into()),
            "{label} not in {:?}",
            svg(2)
        );
    }
}

/// The text nodes of an SVG document, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

#[test]
fn text_is_drawn_with_the_embedded_font() {
    // The same chart without its title differs in the title band: the
    // glyphs were rasterised (no system font was needed to find them).
    let dir = tempfile::tempdir().unwrap();
    register_font();
    let chart = Chart::Lines {
        x_desc: "round",
        y_desc: "auc",
        series: vec![("a".into(), vec![(1.0, 0.5), (2.0, 0.6)])],
        legend: SeriesLabelPosition::LowerRight,
    };
    let a = write_one(dir.path(), "a", "A title with glyphs", &chart).unwrap();
    let b = write_one(dir.path(), "b", "", &chart).unwrap();
    assert_ne!(
        std::fs::read(&a.png).unwrap(),
        std::fs::read(&b.png).unwrap()
    );
}

#[test]
fn an_experiment_without_a_metric_has_no_plots() {
    let s = Settings::from_args(SimArgs {
        task: Some("noop:3".parse().unwrap()),
        ..Default::default()
    })
    .unwrap();
    let task = data::TaskChoice::Noop(3);
    let model = fedcart_common::task::ModelSpec::Noop { dim: 3 };
    let e = Experiment::new(task, &data::DataSpec::None, &s, 2, &model, 0.0);
    let dir = tempfile::tempdir().unwrap();
    assert!(write_all(dir.path(), &[e]).unwrap()[0].is_empty());
}

/// The attribute `name` of an SVG element's opening tag, as a number.
fn attr(tag: &str, name: &str) -> Option<f64> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    tag[start..].split('"').next()?.parse().ok()
}

/// The palette-coloured rectangles (bars, legend swatches) of an SVG:
/// (x0, y0, x1, y1).
fn coloured_rects(svg: &str) -> Vec<(f64, f64, f64, f64)> {
    let palette: Vec<String> = PALETTE
        .iter()
        .map(|c| format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2))
        .collect();
    svg.split("<rect")
        .skip(1)
        .filter_map(|t| {
            let tag = &t[..t.find("/>")?];
            palette
                .iter()
                .any(|p| tag.contains(p.as_str()))
                .then_some(())?;
            let (x, y) = (attr(tag, "x")?, attr(tag, "y")?);
            Some((x, y, x + attr(tag, "width")?, y + attr(tag, "height")?))
        })
        .collect()
}

/// Each text node of an SVG with its anchor point: (text, x, y).
fn placed_texts(svg: &str) -> Vec<(String, f64, f64)> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let tag = &t[..t.find('>')?];
            let body = &t[t.find('>')? + 1..];
            let text = body[..body.find("</text>")?].trim().to_string();
            Some((text, attr(tag, "x")?, attr(tag, "y")?))
        })
        .collect()
}

#[test]
fn the_federation_value_legend_covers_no_bar() {
    // Twenty merchants, the six columns of a personalised recommender, every
    // bar near the top: no corner of the plotting area is free for a legend.
    let mut e = experiment();
    let metric = |v: f64| BTreeMap::from([("auc".to_string(), v)]);
    let level = |k: usize, s: usize| 0.8 + 0.01 * ((k * 7 + s) % 5) as f64;
    let v = e.federation_value.as_mut().unwrap();
    v.merchants = (0..20)
        .map(|k| MerchantValue {
            merchant: format!("m{k:04}"),
            global_popularity: Some(metric(level(k, 0))),
            own_popularity: Some(metric(level(k, 1))),
            local_only: metric(level(k, 2)),
            federated: metric(level(k, 3)),
            centralized: Some(metric(level(k, 4))),
            personalised: Some(metric(level(k, 5))),
            personalised_kept: Some(true),
            weight: 1.0,
        })
        .collect();
    for (s, col) in [
        "global_popularity",
        "own_popularity",
        "local_only",
        "federated",
        "selected",
    ]
    .iter()
    .enumerate()
    {
        v.pooled.insert(col.to_string(), metric(level(20, s)));
    }
    register_font();
    let (_, title, chart) = charts(&e).pop().unwrap();
    let Chart::Bars { series, .. } = &chart else {
        panic!("the federation-value chart has bars");
    };
    let labels: Vec<String> = series.iter().map(|s| s.0.clone()).collect();
    assert_eq!(labels.len(), 6);
    let mut svg = String::new();
    let layout = {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let layout = draw(&root, &title, &chart).unwrap().unwrap();
        root.present().unwrap();
        layout
    };
    // The legend lies in the image, wholly below the plotting area.
    let (legend_x, legend_y) = &layout.legend;
    assert!(legend_y.start >= layout.plot.1.end, "{layout:?}");
    assert!(
        legend_x.start >= 0 && legend_x.end <= SIZE.0 as i32,
        "{layout:?}"
    );
    assert!(legend_y.end <= SIZE.1 as i32, "{layout:?}");
    // In the drawn SVG: every label is there, and no coloured rectangle (a
    // bar, or another entry's swatch) crosses a label's text box.
    let rects = coloured_rects(&svg);
    assert!(rects.len() > 20 * 6, "{} bars", rects.len());
    let texts = placed_texts(&svg);
    let mut scratch = String::new();
    let sizer = SVGBackend::with_string(&mut scratch, SIZE).into_drawing_area();
    for label in &labels {
        let &(_, x, y) = texts
            .iter()
            .find(|t| &t.0 == label)
            .unwrap_or_else(|| panic!("legend label {label} not drawn"));
        let (w, h) = sizer.estimate_text_size(label, &(FONT, 13).into()).unwrap();
        let (x0, x1, y0, y1) = (
            x,
            x + f64::from(w),
            y - f64::from(h) / 2.0,
            y + f64::from(h) / 2.0,
        );
        for r in &rects {
            let crosses = r.0 < x1 && x0 < r.2 && r.1 < y1 && y0 < r.3;
            assert!(!crosses, "legend label {label} at ({x}, {y}) crosses {r:?}");
        }
    }
}

/// A task's parameters put `:` and `,` in the file names
/// (`churn-mlp:16,8-auc-by-round.png`), which Windows refuses and shells
/// and URLs treat specially; the files are named portably, the titles keep
/// the task's name.
#[test]
fn plot_files_of_a_task_with_parameters_have_portable_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = experiment();
    e.task = "churn-mlp:16,8".into();
    let plots = write_all(dir.path(), &[e]).unwrap();
    let names: Vec<&str> = plots[0].iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "churn-mlp-16-8-auc-by-round",
            "churn-mlp-16-8-auc-by-time",
            "churn-mlp-16-8-federation-value"
        ]
    );
    for p in &plots[0] {
        assert!(dir.path().join(format!("{}.png", p.name)).is_file());
        assert!(p.title.starts_with("churn-mlp:16,8: "), "{}", p.title);
    }
}
