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
                weight: 1.0,
                ..Default::default()
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
            validation_weight: 1.0,
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

/// [`experiment`] with `n` merchants: the first `better` federated above
/// local-only, the next `tied` equal, the rest below; `unmeasured` more
/// without a local-only figure.
fn many_merchants(better: usize, tied: usize, worse: usize, unmeasured: usize) -> Experiment {
    let mut e = experiment();
    let metric = |v: f64| BTreeMap::from([("auc".to_string(), v)]);
    let v = e.federation_value.as_mut().unwrap();
    let n = better + tied + worse + unmeasured;
    v.merchants = (0..n)
        .map(|k| {
            let local = 0.5 + 0.004 * (k % 50) as f64;
            let federated = match k {
                k if k < better => local + 0.01 * (1 + k % 7) as f64,
                k if k < better + tied => local,
                _ => local - 0.02,
            };
            MerchantValue {
                merchant: format!("m{k:04}"),
                local_only: if k < n - unmeasured {
                    metric(local)
                } else {
                    BTreeMap::new()
                },
                federated: metric(federated),
                weight: 1.0,
                ..Default::default()
            }
        })
        .collect();
    v.pooled.insert("federated".into(), metric(0.8504));
    v.pooled.insert("local_only".into(), metric(0.7008));
    v.patience = Some(5);
    e
}

/// A thousand merchants drew a thousand groups of bars in 800 pixels, their
/// labels overprinted and the pooled group lost. Past
/// [`MAX_MERCHANT_BARS`] the chart is each merchant's federated −
/// local-only difference, sorted, with the pooled figures and the better /
/// tied / worse counts (as the report's line gives them) written below it.
#[test]
fn many_merchants_are_plotted_as_their_sorted_federated_minus_local_only() {
    let e = many_merchants(30, 50, 20, 5);
    register_font();
    let (name, title, chart) = charts(&e).pop().unwrap();
    assert_eq!(name, "churn-lr-federation-value");
    let Chart::Sorted { values, notes, .. } = &chart else {
        panic!("105 merchants are not plotted as bars");
    };
    assert_eq!(values.len(), 100);
    assert!(values.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(values.iter().filter(|&&d| d == 0.0).count(), 50);
    assert_eq!(
        notes[0],
        "pooled auc: federated 0.8504, local-only 0.7008, centralised 0.8400"
    );
    assert_eq!(
        notes[1],
        "federated beats local-only for 30 of 100 merchants, ties it for 50, loses to it for 20 \
         (5 of 105 without both figures)"
    );
    assert!(
        notes[2].starts_with(
            "above 0: federated better; baselines at most 6 rounds, stopped as the \
         run stops, patience 5"
        ),
        "{}",
        notes[2]
    );
    let mut svg = String::new();
    let layout = {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let layout = draw(&root, &title, &chart).unwrap().unwrap();
        root.present().unwrap();
        layout
    };
    // The notes are drawn whole, in the image and below the chart; no
    // merchant's name is an axis label.
    let texts = texts(&svg);
    for note in notes {
        assert!(texts.contains(note), "{note} not in {texts:?}");
    }
    assert!(!texts.iter().any(|t| t.starts_with("m00")), "{texts:?}");
    assert!(layout.legend.1.start >= layout.plot.1.end, "{layout:?}");
    assert!(
        layout.legend.0.start >= 0 && layout.legend.0.end <= SIZE.0 as i32,
        "{layout:?}"
    );
    assert!(layout.legend.1.end <= SIZE.1 as i32, "{layout:?}");
    // Up to the limit, the bars stay.
    let e = many_merchants(MAX_MERCHANT_BARS, 0, 0, 0);
    assert!(matches!(charts(&e).pop().unwrap().2, Chart::Bars { .. }));
}

/// A churn run's bar legend listed "global popularity" and "own
/// popularity", which have no bars on churn; a column with no figure is
/// left out, and the others keep their colours.
#[test]
fn federation_value_bars_list_only_columns_with_bars_in_their_own_colours() {
    let (_, _, chart) = charts(&experiment()).pop().unwrap();
    let Chart::Bars { series, .. } = &chart else {
        panic!("three merchants are plotted as bars");
    };
    let labels: Vec<(&str, usize)> = series.iter().map(|s| (s.0.as_str(), s.1)).collect();
    assert_eq!(
        labels,
        [("local-only", 2), ("federated", 3), ("centralised", 4)]
    );
}

/// Grocery stores that scored HR@10 0 drew a stub below an axis that went
/// to -0.02; a metric none of whose values is negative starts at 0. A
/// difference can be negative and keeps its room below 0.
#[test]
fn a_metric_axis_does_not_go_below_zero() {
    let (lo, hi) = metric_span([0.0, 0.05, 0.3].into_iter());
    assert_eq!(lo, 0.0);
    assert!(hi > 0.3);
    assert!(metric_span([0.8, 0.9].into_iter()).0 > 0.7);
    assert!(metric_span([-0.1, 0.2].into_iter()).0 < -0.1);
}

/// The title said "baselines 10 rounds" of a run that stopped early, whose
/// baselines stopped with it; it says what the report says, and a title
/// wider than the image is set smaller to be read whole.
#[test]
fn the_federation_value_title_says_how_the_baselines_stopped_and_fits() {
    let mut e = experiment();
    e.federation_value.as_mut().unwrap().patience = Some(5);
    register_font();
    let (_, title, chart) = charts(&e).pop().unwrap();
    assert!(
        title.ends_with("(baselines at most 6 rounds, stopped as the run stops, patience 5)"),
        "{title}"
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, &title, &chart).unwrap();
        root.present().unwrap();
    }
    let tag = svg
        .split("<text")
        .find(|t| t.contains(&title))
        .expect("the title is drawn");
    let size = attr(tag, "font-size").expect("font-size");
    let mut scratch = String::new();
    let sizer = SVGBackend::with_string(&mut scratch, SIZE).into_drawing_area();
    let (w, _) = sizer
        .estimate_text_size(&title, &(FONT, size).into())
        .unwrap();
    assert!(w <= SIZE.0 - 2 * MARGIN, "{w} pixels at {size}");
}
