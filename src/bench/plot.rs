//! PNG plots of a bench run (plotters, bitmap backend; an embedded ASCII subset of DejaVu
//! Sans, so that no system font is needed): `throughput.png`, ops/s against clients, one
//! panel per size and one line per replica count and mode; `latency.png`, p50 and p99 against
//! ops/s for the same lines. Both axes are logarithmic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::{CellResult, Mode, Size};

/// DejaVu Sans cut to ASCII (Bitstream Vera licence: `assets/DejaVuSans-LICENSE`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-ascii.ttf");
const FAMILY: &str = "sans-serif";

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {why}")]
pub struct PlotError {
    path: PathBuf,
    why: String,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // (A font that does not parse leaves the plots without text, not the bench without
        // results; the unit test makes sure it parses.)
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// A line of a plot: replicas and mode.
type Line = (usize, Mode);

fn label((n, mode): Line) -> String {
    if mode == Mode::Unreplicated {
        mode.as_str().to_owned()
    } else {
        format!("n={n} {mode}")
    }
}

fn colour(i: usize) -> RGBColor {
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
    PALETTE.get(i % PALETTE.len()).copied().unwrap_or(BLACK)
}

/// The cells of `size`, grouped by line, each line sorted by clients.
fn lines(cells: &[CellResult], size: Size) -> BTreeMap<Line, Vec<&CellResult>> {
    let mut out: BTreeMap<Line, Vec<&CellResult>> = BTreeMap::new();
    for c in cells
        .iter()
        .filter(|c| c.size == size && c.ops_per_sec > 0.0)
    {
        out.entry((c.replicas, c.mode)).or_default().push(c);
    }
    for l in out.values_mut() {
        l.sort_by_key(|c| c.clients);
    }
    out
}

fn sizes(cells: &[CellResult]) -> Vec<Size> {
    let mut out: Vec<Size> = Vec::new();
    for c in cells {
        if !out.contains(&c.size) {
            out.push(c.size);
        }
    }
    out
}

/// Bounds of a log axis around `values` (positive ones).
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN_POSITIVE), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 1.0..10.0;
    }
    (lo / 1.5)..(hi * 1.5)
}

/// Draws both plots into `dir`; returns their paths.
///
/// # Errors
/// [`PlotError`] if a file cannot be drawn or written.
pub fn draw(dir: &Path, cells: &[CellResult]) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let throughput = dir.join("throughput.png");
    let latency = dir.join("latency.png");
    draw_throughput(&throughput, cells).map_err(|why| PlotError {
        path: throughput.clone(),
        why,
    })?;
    draw_latency(&latency, cells).map_err(|why| PlotError {
        path: latency.clone(),
        why,
    })?;
    Ok(vec![throughput, latency])
}

fn text(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

/// One line of a panel: its label, its points, and dashed points beside them (p99).
struct Series {
    label: String,
    solid: Vec<(f64, f64)>,
    dashed: Vec<(f64, f64)>,
}

/// Axis descriptions, and where the legend goes.
struct Axes<'a> {
    caption: String,
    x: (&'a str, std::ops::Range<f64>),
    y: (&'a str, std::ops::Range<f64>),
    legend: SeriesLabelPosition,
}

/// Draws one log-log panel of `series` into `area`.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    axes: Axes<'_>,
    series: Vec<Series>,
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(axes.caption, (FAMILY, 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(axes.x.1.log_scale(), axes.y.1.log_scale())
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc(axes.x.0)
        .y_desc(axes.y.0)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if *v >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .x_labels(6)
        .max_light_lines(1)
        .label_style((FAMILY, 12))
        .draw()
        .map_err(text)?;
    for (i, s) in series.into_iter().enumerate() {
        let style = colour(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.solid.clone(), style))
            .map_err(text)?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
        if !s.dashed.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    s.dashed,
                    6,
                    4,
                    colour(i).stroke_width(1),
                ))
                .map_err(text)?;
        }
        chart
            .draw_series(
                s.solid
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour(i).filled())),
            )
            .map_err(text)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 12))
        .position(axes.legend)
        .draw()
        .map_err(text)
}

fn draw_throughput(path: &Path, cells: &[CellResult]) -> Result<(), String> {
    let sizes = sizes(cells);
    let panels = sizes.len().max(1);
    let width = u32::try_from(520 * panels).unwrap_or(u32::MAX);
    let root = BitMapBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let x = log_range(cells.iter().map(|c| c.clients as f64));
    let y = log_range(cells.iter().map(|c| c.ops_per_sec));
    for (area, size) in root.split_evenly((1, panels)).iter().zip(&sizes) {
        let series = lines(cells, *size)
            .into_iter()
            .map(|(line, points)| Series {
                label: label(line),
                solid: points
                    .iter()
                    .map(|c| (c.clients as f64, c.ops_per_sec))
                    .collect(),
                dashed: Vec::new(),
            })
            .collect();
        let axes = Axes {
            caption: format!("ops/s against clients, {size}"),
            x: ("closed-loop clients", x.clone()),
            y: ("ops/s", y.clone()),
            legend: SeriesLabelPosition::LowerRight,
        };
        panel(area, axes, series)?;
    }
    root.present().map_err(text)
}

fn draw_latency(path: &Path, cells: &[CellResult]) -> Result<(), String> {
    let Some(size) = sizes(cells).first().copied() else {
        return Ok(());
    };
    let root = BitMapBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let of = cells.iter().filter(|c| c.size == size);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let axes = Axes {
        caption: format!("latency against throughput, {size} (solid p50, dashed p99)"),
        x: ("ops/s", log_range(of.clone().map(|c| c.ops_per_sec))),
        y: ("ms", log_range(of.flat_map(|c| [ms(c.p50), ms(c.p99)]))),
        legend: SeriesLabelPosition::UpperLeft,
    };
    let series = lines(cells, size)
        .into_iter()
        .map(|(line, points)| Series {
            label: label(line),
            solid: points.iter().map(|c| (c.ops_per_sec, ms(c.p50))).collect(),
            dashed: points.iter().map(|c| (c.ops_per_sec, ms(c.p99))).collect(),
        })
        .collect();
    panel(&root, axes, series)?;
    root.present().map_err(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cell(replicas: usize, mode: Mode, clients: usize, ops: f64) -> CellResult {
        CellResult {
            replicas,
            mode,
            size: Size {
                request: 0,
                reply: 0,
            },
            clients,
            ops_per_sec: ops,
            p50: Duration::from_micros(900 * clients as u64),
            p90: Duration::from_micros(1000 * clients as u64),
            p99: Duration::from_micros(1500 * clients as u64),
            max: Duration::from_millis(50),
            replica_cpu_per_kop: 1.0,
            client_cpu_per_kop: 0.5,
            wire_bytes_per_op: 900.0,
            mean_batch: 4.0,
            errors: 0,
            runs: 1,
            replica_peak_rss_mib: 40.0,
        }
    }

    #[test]
    fn the_font_parses_and_both_plots_are_png_files() {
        assert!(plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
        let dir = std::env::temp_dir().join(format!("securesmart-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cells = [
            cell(4, Mode::Full, 1, 300.0),
            cell(4, Mode::Full, 16, 3000.0),
            cell(4, Mode::Baseline, 1, 500.0),
            cell(4, Mode::Baseline, 16, 6000.0),
        ];
        let paths = draw(&dir, &cells).unwrap();
        for p in &paths {
            let bytes = std::fs::read(p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{}", p.display());
            assert!(bytes.len() > 5_000, "{} has a plot in it", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
