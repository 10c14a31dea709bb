//! The report's SVG plots (plotters' SVG backend: no fonts or images needed, inlined into the
//! HTML).

use plotters::prelude::*;
use serde_json::Value;

use crate::stats;

const W: u32 = 520;
const H: u32 = 340;

fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    PALETTE[i % PALETTE.len()]
}

/// Renders with `draw`, or a one-line note when plotting fails (never fails the report).
fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>) -> String {
    let mut out = String::new();
    let result = {
        let root = SVGBackend::with_string(&mut out, (W, H)).into_drawing_area();
        let r = root.fill(&WHITE).map_err(|e| e.to_string()).and_then(|_| draw(&root));
        r.and_then(|_| root.present().map_err(|e| e.to_string()))
    };
    match result {
        Ok(()) => out,
        Err(e) => format!("<p>(plot unavailable: {e})</p>"),
    }
}

/// ECDFs of one per-prompt quantity per level. Infinite values (prompts never solved) keep the
/// curve below 1; the legend says how many there were.
pub fn ecdf_svg(title: &str, xlabel: &str, levels: &[&str], values: &[Vec<f64>]) -> String {
    let finite_max = values.iter().flatten().copied().filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let xmax = if finite_max > 0.0 { finite_max * 1.05 } else { 1.0 };
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..xmax, 0f64..1.02f64)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc(xlabel).y_desc("fraction of prompts").draw().map_err(|e| e.to_string())?;
        for (i, (level, vals)) in levels.iter().zip(values).enumerate() {
            let n = vals.len().max(1) as f64;
            let unsolved = vals.iter().filter(|v| !v.is_finite()).count();
            let finite: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
            // A step function from 0: each finite value raises the curve by its share.
            let mut pts = vec![(0.0, 0.0)];
            let mut last = 0.0;
            for (x, f) in stats::ecdf(&finite) {
                let y = f * finite.len() as f64 / n;
                pts.push((x, last));
                pts.push((x, y));
                last = y;
            }
            pts.push((xmax, last));
            let c = color(i);
            let label = if unsolved > 0 { format!("{level} ({unsolved} never solved)") } else { level.to_string() };
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// Grouped bars: each criterion's pass rate at each level.
pub fn criteria_svg(criteria: &[String], levels: &[&str], rates: &[Vec<f64>]) -> String {
    let n = criteria.len().max(1);
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Pass rate per criterion", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(60)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..n as f64, 0f64..1.02f64)
            .map_err(|e| e.to_string())?;
        let names = criteria.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("fraction of answers passing")
            .draw()
            .map_err(|e| e.to_string())?;
        let width = 0.8 / levels.len().max(1) as f64;
        for (li, level) in levels.iter().enumerate() {
            let c = color(li);
            let bars = rates[li].iter().enumerate().map(|(ci, r)| {
                let x0 = ci as f64 + 0.1 + li as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *r)], c.filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(level.to_string())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// The adapter's loss curve (`loss.json`: `train` per step, `eval` per epoch).
pub fn loss_svg(loss: &Value) -> String {
    let series = |key: &str| -> Vec<(f64, f64)> {
        loss[key]
            .as_array()
            .map(|a| a.iter().filter_map(|p| Some((p["step"].as_f64()?, p["loss"].as_f64()?))).collect())
            .unwrap_or_default()
    };
    let train = series("train");
    let eval = series("eval");
    let xmax = train.iter().chain(&eval).map(|p| p.0).fold(1.0f64, f64::max);
    let ymax = train.iter().chain(&eval).map(|p| p.1).filter(|v| v.is_finite()).fold(0.1f64, f64::max) * 1.05;
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Training loss", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| e.to_string())?;
        let c = color(0);
        chart
            .draw_series(LineSeries::new(train, c.stroke_width(1)))
            .map_err(|e| e.to_string())?
            .label("train")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        let e = color(3);
        chart
            .draw_series(eval.iter().map(|p| Circle::new(*p, 4, e.filled())))
            .map_err(|e| e.to_string())?
            .label("eval (per epoch)")
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, e.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}
