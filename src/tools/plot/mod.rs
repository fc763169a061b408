//! Curves a person can look at: a `--metrics-out` JSON-lines file drawn as three panels (loss,
//! accuracy or RMSE, learning rate, each against the step) into an SVG or PNG file.
//!
//! SVG needs no font: the viewer renders the text. PNG text is rasterised here: with a TrueType
//! font of the system when one is found (`DPTRAIN_PLOT_FONT=/path/font.ttf`, else DejaVu Sans,
//! Liberation Sans, FreeSans or Arial at their usual places), else with a built-in 8×8 bitmap
//! font, so PNG output never depends on fontconfig or on any font being installed.

mod text;

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, Pos, VPos};

use crate::observe::metrics::{Metrics, read_metrics};
use text::{Glyphs, TextBackend};

/// Draws `metrics` (a `--metrics-out` file) into `out`, an `.svg` or `.png` file (by extension,
/// any case): loss, accuracy (RMSE for regression) and learning rate against the step.
pub fn plot(metrics: &Path, out: &Path) -> anyhow::Result<()> {
    let format = Format::of(out)?;
    let m = read_metrics(metrics)?;
    let title = format!(
        "dptrain: {}",
        metrics.file_name().map_or_else(
            || metrics.display().to_string(),
            |n| n.to_string_lossy().into()
        )
    );
    match format {
        Format::Svg => {
            let root = SVGBackend::new(out, SIZE).into_drawing_area();
            draw(&root, &m, &title).and_then(|()| root.present().map_err(drawing))
        }
        Format::Png => plot_png(&m, &title, out, Glyphs::system()?),
    }
    .with_context(|| format!("{}: cannot draw the plot", out.display()))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Svg,
    Png,
}

impl Format {
    fn of(out: &Path) -> anyhow::Result<Format> {
        match out
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => bail!(
                "{}: unknown plot format: the file name must end in .svg or .png",
                out.display()
            ),
        }
    }
}

const SIZE: (u32, u32) = (1000, 1200);
const FONT: &str = "sans-serif";
const TITLE_SIZE: f64 = 24.0;
const CAPTION_SIZE: f64 = 20.0;
const DESC_SIZE: f64 = 16.0;
const LABEL_SIZE: f64 = 14.0;

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const TRAIN_STEP: RGBColor = RGBColor(158, 194, 222);
const TEST: RGBColor = RGBColor(214, 39, 40);
const VAL: RGBColor = RGBColor(44, 160, 44);
const LR: RGBColor = RGBColor(148, 103, 189);

fn plot_png(m: &Metrics, title: &str, out: &Path, glyphs: Glyphs) -> anyhow::Result<()> {
    let root = TextBackend {
        inner: BitMapBackend::new(out, SIZE),
        glyphs,
    }
    .into_drawing_area();
    draw(&root, m, title)?;
    root.present().map_err(drawing)
}

/// A plotters error as an anyhow one.
fn drawing<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// A curve's legend label, colour and points.
type Labelled = (&'static str, RGBColor, Vec<(f64, f64)>);

/// One line on a panel.
struct Curve<'a> {
    label: &'a str,
    color: RGBColor,
    width: u32,
    points: &'a [(f64, f64)],
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    m: &Metrics,
    title: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(drawing)?;
    let body = root
        .titled(title, (FONT, TITLE_SIZE).into_font().color(&BLACK))
        .map_err(drawing)?;
    let panels = body.split_evenly((3, 1));
    let has_steps = !m.step.is_empty();
    // one step axis for the three panels, so that they line up
    let xs = range(
        m.epoch
            .values()
            .chain(m.step.values())
            .flat_map(|s| s.iter().map(|p| p.0)),
        false,
    );

    // (1) loss
    let mut loss = Vec::new();
    if has_steps {
        let pts = m.step("train_loss");
        loss.push(curve("train (per step)", TRAIN_STEP, 1, pts));
        loss.push(curve("train (epoch mean)", TRAIN, 2, m.epoch("train_loss")));
    } else {
        loss.push(curve("train", TRAIN, 2, m.epoch("train_loss")));
    }
    loss.push(curve("test", TEST, 2, m.epoch("test_loss")));
    loss.push(curve("val", VAL, 2, m.epoch("val_loss")));
    panel(&panels[0], xs, "Loss", "loss", loss, Corner::TopRight)?;

    // (2) accuracy, or RMSE for regression
    let quality = |what: &str| -> [Labelled; 3] {
        let mut train = m.epoch(&format!("train_{what}")).to_vec();
        if train.is_empty() {
            train = m.step(&format!("train_{what}")).to_vec();
        }
        [
            ("train", TRAIN, train),
            ("test", TEST, m.epoch(&format!("test_{what}")).to_vec()),
            ("val", VAL, m.epoch(&format!("val_{what}")).to_vec()),
        ]
    };
    let acc = quality("accuracy");
    let rmse = quality("rmse");
    let regression = acc.iter().all(|c| c.2.is_empty()) && rmse.iter().any(|c| !c.2.is_empty());
    let (series, caption, desc, corner) = if regression {
        (&rmse, "RMSE", "RMSE", Corner::TopRight)
    } else {
        (&acc, "Accuracy", "accuracy", Corner::BottomRight)
    };
    let curves = series
        .iter()
        .map(|(label, color, pts)| curve(label, *color, 2, pts))
        .collect();
    panel(&panels[1], xs, caption, desc, curves, corner)?;

    // (3) learning rate
    let lr = if has_steps && !m.step("lr").is_empty() {
        m.step("lr")
    } else {
        m.epoch("lr")
    };
    panel(
        &panels[2],
        xs,
        "Learning rate",
        "learning rate",
        vec![curve("lr", LR, 2, lr)],
        Corner::TopRight,
    )?;
    Ok(())
}

fn curve<'a>(label: &'a str, color: RGBColor, width: u32, points: &'a [(f64, f64)]) -> Curve<'a> {
    Curve {
        label,
        color,
        width,
        points,
    }
}

#[derive(Clone, Copy)]
enum Corner {
    TopRight,
    BottomRight,
}

/// `lo..hi` around `values`, padded by 5%, never empty.
fn range(values: impl Iterator<Item = f64>, pad: bool) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()).max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = if pad { (hi - lo) * 0.05 } else { 0.0 };
    (lo - d, hi + d)
}

/// A tick label of at most 8 characters, 3 significant digits: `0`, `0.0025`, `12.5`, `3.0e-5`,
/// `1.2e6`.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (2 - a.log10().floor() as i32).clamp(0, 5) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').into()
    } else {
        s
    }
}

/// A step tick: whole numbers as they are, others as [`tick`].
fn step_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        tick(v)
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (x0, x1): (f64, f64),
    caption: &str,
    y_desc: &str,
    curves: Vec<Curve<'_>>,
    corner: Corner,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let curves: Vec<Curve<'_>> = curves
        .into_iter()
        .filter(|c| !c.points.is_empty())
        .collect();
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let (y0, y1) = range(all().map(|p| p.1), true);

    // label areas sized from the text as this backend measures it
    let label_font: TextStyle = (FONT, LABEL_SIZE).into();
    let desc_font: TextStyle = (FONT, DESC_SIZE).into();
    let (tick_w, tick_h) = area
        .estimate_text_size("-0.00000", &label_font)
        .map_err(drawing)?;
    let (_, desc_h) = area.estimate_text_size("Ag", &desc_font).map_err(drawing)?;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, CAPTION_SIZE))
        .margin(10)
        .margin_right(30)
        .x_label_area_size(tick_h + desc_h + 20)
        .y_label_area_size(tick_w + desc_h + 20)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .x_label_formatter(&|v| step_tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .x_labels(10)
        .y_labels(8)
        .label_style(label_font.clone())
        .axis_desc_style(desc_font)
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(205, 205, 205))
        .draw()
        .map_err(drawing)?;

    for c in &curves {
        let style = c.color.stroke_width(c.width);
        chart
            .draw_series(LineSeries::new(c.points.iter().copied(), style))
            .map_err(drawing)?;
        // markers where there are few points: a single epoch is still visible
        if c.points.len() <= 30 {
            chart
                .draw_series(
                    c.points
                        .iter()
                        .map(|&p| Circle::new(p, c.width + 1, c.color.filled())),
                )
                .map_err(drawing)?;
        }
    }

    let plot_area = chart.plotting_area().strip_coord_spec();
    if curves.is_empty() {
        let (w, h) = plot_area.dim_in_pixel();
        let style = (FONT, DESC_SIZE)
            .into_font()
            .color(&RGBColor(120, 120, 120))
            .pos(Pos::new(HPos::Center, VPos::Center));
        plot_area
            .draw_text("no data", &style, (w as i32 / 2, h as i32 / 2))
            .map_err(drawing)?;
        return Ok(());
    }
    legend(&plot_area, &curves, corner)
}

/// The legend, drawn by hand so that its box fits the text as the backend measures it (plotters'
/// own legend measures with its built-in estimate, which the PNG fonts here do not follow).
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &[Curve<'_>],
    corner: Corner,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let font: TextStyle = (FONT, LABEL_SIZE).into();
    let (line_len, gap, pad, margin) = (24i32, 8i32, 8i32, 10i32);
    let mut text_w = 0i32;
    let mut row_h = 0i32;
    for c in curves {
        let (w, h) = area.estimate_text_size(c.label, &font).map_err(drawing)?;
        // SVG text is laid out by the viewer: allow for fonts wider than the estimate
        let w = (w as i32).max((0.6 * LABEL_SIZE * c.label.chars().count() as f64) as i32);
        text_w = text_w.max(w);
        row_h = row_h.max(h as i32);
    }
    let row_h = row_h.max(LABEL_SIZE as i32) + 6;
    let box_w = pad + line_len + gap + text_w + pad;
    let box_h = pad + row_h * curves.len() as i32 + pad - 6;
    let (w, h) = area.dim_in_pixel();
    let x = w as i32 - margin - box_w;
    let y = match corner {
        Corner::TopRight => margin,
        Corner::BottomRight => h as i32 - margin - box_h,
    };
    area.draw(&Rectangle::new(
        [(x, y), (x + box_w, y + box_h)],
        WHITE.mix(0.85).filled(),
    ))
    .map_err(drawing)?;
    area.draw(&Rectangle::new(
        [(x, y), (x + box_w, y + box_h)],
        RGBColor(150, 150, 150).stroke_width(1),
    ))
    .map_err(drawing)?;
    let text_style = font.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, c) in curves.iter().enumerate() {
        let cy = y + pad + row_h * i as i32 + (row_h - 6) / 2;
        let lx = x + pad;
        area.draw(&PathElement::new(
            vec![(lx, cy), (lx + line_len, cy)],
            c.color.stroke_width(c.width.max(2)),
        ))
        .map_err(drawing)?;
        area.draw_text(c.label, &text_style, (lx + line_len + gap, cy))
            .map_err(drawing)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::text::{FONT_PATHS, load_font};
    use super::*;
    use crate::observe::metrics::parse_metrics;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// What `dptrain train --metrics-out` writes for a classifier, with per-step records,
    /// validation fields, an unknown field, an unknown kind and a blank line mixed in.
    fn classifier_metrics() -> String {
        let mut s = String::new();
        let mut step = 0;
        for epoch in 1..=6u32 {
            for _ in 0..10 {
                step += 1;
                let loss = 2.0 / (1.0 + 0.05 * step as f64) + 0.05 * ((step * 7 % 5) as f64);
                let lr = 0.1 * (1.0 - step as f64 / 70.0);
                s += &format!(
                    "{{\"kind\":\"step\",\"step\":{step},\"train_loss\":{loss},\"lr\":{lr}}}\n"
                );
            }
            let e = epoch as f64;
            s += &format!(
                "{{\"epoch\":{epoch},\"step\":{step},\"lr\":{lr},\"train_loss\":{tl},\
                 \"train_accuracy\":{ta},\"test_loss\":{xl},\"test_accuracy\":{xa},\
                 \"val_loss\":{vl},\"val_accuracy\":{va},\"samples_per_s\":1234.5,\
                 \"elapsed_s\":{el},\"future_field\":[1,2]}}\n",
                lr = 0.1 * (1.0 - step as f64 / 70.0),
                tl = 2.0 / (1.0 + e),
                ta = 1.0 - 0.5 / e,
                xl = 2.2 / (1.0 + e),
                xa = 0.95 - 0.5 / e,
                vl = 2.1 / (1.0 + e),
                va = 0.97 - 0.5 / e,
                el = 1.5 * e,
            );
            if epoch == 3 {
                s += "\n{\"kind\":\"checkpoint\",\"path\":\"x\"}\n";
            }
        }
        s
    }

    fn regression_metrics() -> String {
        (1..=5)
            .map(|e| {
                format!(
                    "{{\"epoch\":{e},\"step\":{},\"lr\":0.01,\"train_loss\":{},\"test_loss\":{},\
                     \"test_rmse\":{},\"samples_per_s\":10.0,\"elapsed_s\":{e}}}\n",
                    e * 100,
                    1.0 / e as f64,
                    1.1 / e as f64,
                    (1.1 / e as f64).sqrt()
                )
            })
            .collect()
    }

    #[test]
    fn parses_epoch_and_step_records() {
        let m = parse_metrics(&classifier_metrics()).unwrap();
        assert_eq!(m.step("train_loss").len(), 60);
        assert_eq!(m.step("lr").len(), 60);
        assert_eq!(m.epoch("train_loss").len(), 6);
        assert_eq!(m.epoch("val_accuracy").len(), 6);
        assert_eq!(m.epoch("test_accuracy")[0].0, 10.0);
        assert_eq!(m.epoch("train_accuracy")[1], (20.0, 0.75));
        assert!(m.epoch("test_rmse").is_empty());
        assert!(!m.epoch.contains_key("samples_per_s"));
        assert!(!m.epoch.contains_key("future_field"));
    }

    #[test]
    fn nulls_are_absent_and_points_are_in_step_order() {
        let m = parse_metrics(
            "{\"step\":20,\"train_loss\":1.0,\"test_loss\":null}\n\
             {\"step\":10,\"train_loss\":2.0,\"kind\":\"epoch\"}\n",
        )
        .unwrap();
        assert_eq!(m.epoch("train_loss"), &[(10.0, 2.0), (20.0, 1.0)]);
        assert!(m.epoch("test_loss").is_empty());
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_it() {
        let dir = tmp("malformed");
        let metrics = dir.join("m.jsonl");
        let good = "{\"epoch\":1,\"step\":10,\"lr\":0.1,\"train_loss\":1.0}\n";
        for (bad, what) in [
            ("{\"epoch\":2,\"step\":20,", "not JSON"),
            ("[1, 2]", "not a JSON object"),
            ("{\"epoch\":2,\"lr\":0.1}", "step"),
            ("{\"step\":20,\"train_loss\":\"low\"}", "train_loss"),
            ("{\"step\":20,\"kind\":3}", "kind"),
        ] {
            std::fs::write(&metrics, format!("{good}\n{bad}\n{good}")).unwrap();
            let err = format!("{:#}", plot(&metrics, &dir.join("p.svg")).unwrap_err());
            assert!(err.contains("line 3"), "{bad}: {err}");
            assert!(err.contains(what), "{bad}: {err}");
            assert!(err.contains("m.jsonl"), "{bad}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_or_missing_file_is_an_error() {
        let dir = tmp("empty");
        let metrics = dir.join("m.jsonl");
        std::fs::write(&metrics, "\n\n").unwrap();
        let err = format!("{:#}", plot(&metrics, &dir.join("p.svg")).unwrap_err());
        assert!(err.contains("no metrics records"), "{err}");
        let err = format!(
            "{:#}",
            plot(&dir.join("nope.jsonl"), &dir.join("p.svg")).unwrap_err()
        );
        assert!(err.contains("nope.jsonl"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_format_comes_from_the_extension() {
        assert_eq!(Format::of(Path::new("a/b.svg")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("b.SVG")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("b.png")).unwrap(), Format::Png);
        for bad in ["b.pdf", "b", "svg", "b.svg.txt"] {
            let err = Format::of(Path::new(bad)).unwrap_err().to_string();
            assert!(err.contains(".svg or .png") && err.contains(bad), "{err}");
        }
        // checked before the metrics file is read
        let err = plot(Path::new("/nonexistent/m.jsonl"), Path::new("out.jpg")).unwrap_err();
        assert!(err.to_string().contains("out.jpg"), "{err}");
    }

    /// Whether the SVG has a `<text>` element of exactly `text`.
    fn has_text(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">\n{text}\n</text>"))
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    #[test]
    fn plots_a_classifier_to_svg() {
        let dir = tmp("svg");
        let metrics = dir.join("m.jsonl");
        std::fs::write(&metrics, classifier_metrics()).unwrap();
        let out = dir.join("curves.svg");
        plot(&metrics, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.len() > 10_000, "{} bytes", svg.len());
        assert!(svg.contains("<svg"));
        // curves: train per step, train epoch mean, test, val; train, test, val; lr; and the
        // legends' sample lines
        let lines = count(&svg, "<polyline") + count(&svg, "<path");
        assert!(lines >= 8, "{lines} lines");
        for text in [
            "step",
            "loss",
            "accuracy",
            "learning rate",
            "Loss",
            "Accuracy",
            "Learning rate",
            "train (per step)",
            "train (epoch mean)",
            "test",
            "val",
            "lr",
            "dptrain: m.jsonl",
        ] {
            assert!(has_text(&svg, text), "no {text} in the SVG");
        }
        assert!(!has_text(&svg, "RMSE"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plots_a_regression_with_rmse_to_svg() {
        let dir = tmp("rmse");
        let metrics = dir.join("reg.jsonl");
        std::fs::write(&metrics, regression_metrics()).unwrap();
        let out = dir.join("reg.svg");
        plot(&metrics, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(has_text(&svg, "RMSE"));
        assert!(!has_text(&svg, "accuracy"));
        assert!(has_text(&svg, "train") && has_text(&svg, "test"));
        assert!(!has_text(&svg, "val"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_single_epoch_without_test_data_still_plots() {
        let dir = tmp("single");
        let metrics = dir.join("one.jsonl");
        std::fs::write(
            &metrics,
            "{\"epoch\":1,\"step\":0,\"lr\":0.05,\"train_loss\":0.7,\"samples_per_s\":1.0,\"elapsed_s\":0.1}\n",
        )
        .unwrap();
        let out = dir.join("one.svg");
        plot(&metrics, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(
            has_text(&svg, "no data"),
            "the empty accuracy panel says so"
        );
        assert!(svg.contains("<circle"), "a lone point is marked");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 8_000, "{} bytes", bytes.len());
        // IHDR: width and height
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), SIZE);
    }

    #[test]
    fn plots_to_png_with_whatever_font_there_is() {
        let dir = tmp("png");
        let metrics = dir.join("m.jsonl");
        std::fs::write(&metrics, classifier_metrics()).unwrap();
        let out = dir.join("curves.png");
        plot(&metrics, &out).unwrap();
        assert_png(&out);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plots_to_png_with_the_builtin_bitmap_font() {
        let dir = tmp("png-bitmap");
        let m = parse_metrics(&regression_metrics()).unwrap();
        let out = dir.join("reg.png");
        plot_png(&m, "dptrain: reg.jsonl", &out, Glyphs::Bitmap).unwrap();
        assert_png(&out);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plots_to_png_with_a_truetype_font_when_the_system_has_one() {
        let Some(font) = FONT_PATHS.iter().find_map(|p| load_font(Path::new(p)).ok()) else {
            eprintln!("no TrueType font at the usual places: skipped");
            return;
        };
        let dir = tmp("png-ttf");
        let m = parse_metrics(&classifier_metrics()).unwrap();
        let out = dir.join("c.png");
        plot_png(&m, "dptrain: m.jsonl", &out, Glyphs::Outline(font)).unwrap();
        assert_png(&out);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unusable_font_file_is_an_error_naming_it() {
        let dir = tmp("badfont");
        let font = dir.join("not-a-font.ttf");
        std::fs::write(&font, b"definitely not a font").unwrap();
        let err = load_font(&font).unwrap_err().to_string();
        assert!(err.contains("not-a-font.ttf"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Renders `text` through [`TextBackend`] into an in-memory RGB buffer and returns the
    /// bounding box of the non-white pixels.
    fn ink(glyphs: Glyphs, text: &str, transform: FontTransform) -> Option<(i32, i32, i32, i32)> {
        let (w, h) = (200u32, 200u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let mut b = TextBackend {
                inner: BitMapBackend::with_buffer(&mut buf, (w, h)),
                glyphs,
            };
            let style = (FONT, 16.0).into_font().transform(transform).color(&BLACK);
            b.draw_text(text, &style, (100, 100)).unwrap();
            b.present().unwrap();
        }
        let mut bbox: Option<(i32, i32, i32, i32)> = None;
        for y in 0..h as i32 {
            for x in 0..w as i32 {
                let i = ((y as u32 * w + x as u32) * 3) as usize;
                if buf[i] < 128 {
                    bbox = Some(match bbox {
                        None => (x, y, x, y),
                        Some((a, b, c, d)) => (a.min(x), b.min(y), c.max(x), d.max(y)),
                    });
                }
            }
        }
        bbox
    }

    #[test]
    fn png_text_is_drawn_where_anchored_and_rotated() {
        let mut fonts = vec![Glyphs::Bitmap];
        fonts.extend(
            FONT_PATHS
                .iter()
                .find_map(|p| load_font(Path::new(p)).ok())
                .map(Glyphs::Outline),
        );
        for g in fonts {
            let (tw, th) = g.size("HHHH", 16.0);
            assert!(tw > 2 * th, "{tw}x{th}");
            // unrotated, anchored top-left at (100, 100): ink to the right and below
            let (x0, y0, x1, y1) = ink(g.clone(), "HHHH", FontTransform::None).unwrap();
            assert!(x0 >= 100 && y0 >= 100, "{x0},{y0}");
            assert!(x1 <= 100 + tw && y1 <= 100 + th, "{x1},{y1}");
            assert!(x1 - x0 > 2 * (y1 - y0), "wider than tall");
            // rotated 270° (the y axis' label): taller than wide, above the anchor
            let (x0, y0, x1, y1) = ink(g.clone(), "HHHH", FontTransform::Rotate270).unwrap();
            assert!(y1 - y0 > 2 * (x1 - x0), "taller than wide");
            assert!(y1 <= 100 && y0 >= 100 - tw, "{y0}..{y1}");
            assert!(x0 >= 100 && x1 <= 100 + th, "{x0}..{x1}");
        }
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(0.0025), "0.0025");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(1.0), "1");
        assert_eq!(tick(3e-5), "3.0e-5");
        assert_eq!(tick(-0.2), "-0.2");
        assert_eq!(tick(250000.0), "2.5e5");
        assert_eq!(step_tick(12000.0), "12000");
        assert_eq!(step_tick(2.5), "2.5");
        for v in [0.123456, 1234.5678, -0.00999, 99999.0] {
            assert!(tick(v).len() <= 8, "{v}: {}", tick(v));
        }
    }
}
