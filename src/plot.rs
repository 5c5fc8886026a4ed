//! PNG plots: line curves (training logs; several panels in one image), a heatmap (confusion matrix) and a class-coloured
//! scatter (t-SNE). Text is drawn with an embedded DejaVu Sans (see `assets/README.md`), so no
//! system font is needed. Every file is written atomically (`.<name>.tmp.png`, then rename).
use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// The embedded font (DejaVu Sans 2.37, Bitstream Vera licence).
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Font family name under which the embedded font is registered.
const FONT: &str = "sans-serif";
static REGISTER: Once = Once::new();

/// Registers the embedded font with plotters (once per process).
fn ensure_font() {
    REGISTER.call_once(|| {
        // The embedded bytes are a valid TTF; failure here would be a build defect.
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            eprintln!(
                "warning: the embedded plot font could not be registered; text will be missing"
            );
        }
    });
}

/// Image size of line charts and scatter plots, in pixels.
const CHART_SIZE: (u32, u32) = (900, 600);

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("{}: plotting failed: {e}", path.display()))
}

/// The temporary file a plot is drawn into before the rename (keeps the `.png` extension, which
/// the bitmap encoder uses to pick the format).
fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.png"))
}

/// Draws with `draw` into a bitmap of `size` and moves it to `path` atomically.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    ensure_font();
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    let tmp = tmp_path(path);
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        draw(&root).map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Range `[lo, hi]` of `values` with a 5% margin; a degenerate range is widened to width 1.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}

/// A line chart of several named series of `(x, y)` points (non-finite points are skipped).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    render(path, CHART_SIZE, |root| {
        draw_lines(root, title, 24, x_label, y_label, series, false)
    })
}

/// One panel of [`line_panels`]: a titled line chart.
#[derive(Debug, Clone, Default)]
pub struct LinePanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Named series of `(x, y)` points (non-finite points are skipped).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Several line charts in one image, two per row (one row for a single panel), under a common
/// `title`; every point is also marked (series may be sparse). A panel without points is drawn
/// empty with its title.
pub fn line_panels(path: &Path, title: &str, panels: &[LinePanel]) -> Result<()> {
    if panels.is_empty() {
        return Err(Error::config(format!(
            "{}: line_panels needs at least one panel",
            path.display()
        )));
    }
    let cols = panels.len().min(2);
    let rows = panels.len().div_ceil(cols);
    let size = (700 * cols as u32, 40 + 480 * rows as u32);
    render(path, size, |root| {
        let body = root.titled(title, (FONT, 24)).map_err(|e| e.to_string())?;
        for (area, p) in body.split_evenly((rows, cols)).iter().zip(panels) {
            let series: Vec<(&str, Vec<(f64, f64)>)> = p
                .series
                .iter()
                .map(|(n, pts)| (n.as_str(), pts.clone()))
                .collect();
            draw_lines(area, &p.title, 18, &p.x_label, &p.y_label, &series, true)?;
        }
        Ok(())
    })
}

/// Draws a line chart of `series` into `area` (see [`line_chart`]); `markers`: a dot at every
/// point too. Series without finite points get no legend entry.
fn draw_lines(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    title_px: u32,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    markers: bool,
) -> std::result::Result<(), String> {
    let finite = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        pts.iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    };
    let all = || series.iter().flat_map(|(_, pts)| pts.iter().copied());
    let (x0, x1) = padded_range(all().map(|p| p.0));
    let (y0, y1) = padded_range(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, title_px))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut labelled = 0;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = finite(pts);
        if markers && pts.is_empty() {
            continue;
        }
        if markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        labelled += 1;
    }
    if labelled > 0 {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Colour for `t` in `[0, 1]`: a viridis-like ramp (dark blue -> teal -> green -> yellow).
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A heatmap of `matrix` (rows x cols; e.g. a confusion matrix with true classes as rows, drawn
/// top to bottom). Colours are scaled to `[min, max]` of the matrix; values are printed in the cells
/// when the matrix is at most 20 x 20. Rows are labelled `index label` and columns by index (when
/// there are at most 60 of them; column labels longer than 6 characters are replaced by the index).
pub fn heatmap(
    path: &Path,
    title: &str,
    matrix: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
) -> Result<()> {
    let rows = matrix.len();
    let cols = matrix.first().map_or(0, |r| r.len());
    if rows == 0 || cols == 0 || matrix.iter().any(|r| r.len() != cols) {
        return Err(Error::config(format!(
            "heatmap {}: the matrix must be non-empty and rectangular",
            path.display()
        )));
    }
    // Cells are 8..60 px so that the image stays within ~1600 px of cells.
    let cell = (1600 / rows.max(cols)).clamp(8, 60) as u32;
    let row_name = |r: usize| -> String {
        let name = row_labels.get(r).cloned().unwrap_or_default();
        let name: String = name.chars().take(40).collect();
        if name.is_empty() || name == r.to_string() {
            r.to_string()
        } else {
            format!("{r} {name}")
        }
    };
    let longest = (0..rows.min(60))
        .map(|r| row_name(r).chars().count())
        .max()
        .unwrap_or(1);
    let ylab = if rows <= 60 {
        14 + 7 * longest as u32
    } else {
        50
    };
    let size = (
        (cols as u32 * cell + ylab + 60).max(600),
        (rows as u32 * cell + 140).max(500),
    );
    let finite = || matrix.iter().flatten().copied().filter(|v| v.is_finite());
    let lo = finite().fold(f64::INFINITY, f64::min);
    let hi = finite().fold(f64::NEG_INFINITY, f64::max);
    let show_values = rows.max(cols) <= 20;
    // Column labels are shown when short (at most 6 characters), else the column index.
    let col_name = |c: usize| match col_labels.get(c) {
        Some(l) if !l.is_empty() && l.chars().count() <= 6 => l.clone(),
        _ => c.to_string(),
    };
    render(path, size, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(ylab)
            .build_cartesian_2d(
                (0..cols - 1).into_segmented(),
                (0..rows - 1).into_segmented(),
            )
            .map_err(|e| e.to_string())?;
        // Row r is drawn at y = rows - 1 - r (top to bottom).
        let xfmt = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(c) if *c < cols => col_name(*c),
            _ => String::new(),
        };
        let yfmt = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(y) if *y < rows => row_name(rows - 1 - *y),
            _ => String::new(),
        };
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh()
            .label_style((FONT, 12))
            .x_label_formatter(&xfmt)
            .y_label_formatter(&yfmt)
            .x_desc("predicted class");
        mesh.x_labels(if cols <= 60 { cols } else { 10 });
        mesh.y_labels(if rows <= 60 { rows } else { 10 });
        mesh.draw().map_err(|e| e.to_string())?;
        let scale = |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.0 };
        let y_of = |r: usize| rows - 1 - r;
        chart
            .draw_series(matrix.iter().enumerate().flat_map(|(r, row)| {
                row.iter().enumerate().map(move |(c, &v)| {
                    Rectangle::new(
                        [
                            (SegmentValue::Exact(c), SegmentValue::Exact(y_of(r))),
                            (SegmentValue::Exact(c + 1), SegmentValue::Exact(y_of(r) + 1)),
                        ],
                        ramp(scale(v)).filled(),
                    )
                })
            }))
            .map_err(|e| e.to_string())?;
        if show_values {
            let font_px = (cell as f64 * 0.3).clamp(9.0, 16.0);
            for (r, row) in matrix.iter().enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    let text = if v.fract() == 0.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.2}")
                    };
                    let color = if scale(v) > 0.6 { BLACK } else { WHITE };
                    let style = TextStyle::from((FONT, font_px).into_font())
                        .color(&color)
                        .pos(plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Center,
                        ));
                    chart
                        .draw_series(std::iter::once(Text::new(
                            text,
                            (SegmentValue::CenterOf(c), SegmentValue::CenterOf(y_of(r))),
                            style,
                        )))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    })
}

/// A scatter of `(x, y, class)` points, one colour per class, with a legend of `class_names`
/// (a class without a name is shown by its index).
pub fn scatter(
    path: &Path,
    title: &str,
    points: &[(f64, f64, usize)],
    class_names: &[String],
) -> Result<()> {
    let (x0, x1) = padded_range(points.iter().map(|p| p.0));
    let (y0, y1) = padded_range(points.iter().map(|p| p.1));
    let mut classes: Vec<usize> = points.iter().map(|p| p.2).collect();
    classes.sort_unstable();
    classes.dedup();
    render(path, (1000, 750), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 24))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .label_style((FONT, 12))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, &class) in classes.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let name = class_names
                .get(class)
                .cloned()
                .unwrap_or_else(|| class.to_string());
            let name: String = name.chars().take(40).collect();
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|p| p.2 == class && p.0.is_finite() && p.1.is_finite())
                        .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
                )
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
        }
        if !classes.is_empty() {
            chart
                .configure_series_labels()
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_ends() {
        assert_eq!(ramp(0.0), RGBColor(68, 1, 84));
        assert_eq!(ramp(1.0), RGBColor(253, 231, 37));
        assert_eq!(ramp(f64::NAN), RGBColor(68, 1, 84));
    }

    #[test]
    fn line_panels_writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("panels.png");
        let panel = |t: &str, pts: Vec<(f64, f64)>| LinePanel {
            title: t.into(),
            x_label: "epoch".into(),
            y_label: "y".into(),
            series: vec![("a".into(), pts)],
        };
        line_panels(
            &p,
            "t",
            &[
                panel("one point", vec![(1.0, 2.0)]),
                panel("line", vec![(1.0, 2.0), (2.0, f64::NAN), (3.0, 1.0)]),
                panel("empty", vec![]),
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(line_panels(&p, "t", &[]).is_err());
    }

    #[test]
    fn padded_range_degenerate() {
        assert_eq!(padded_range([2.0, 2.0].into_iter()), (1.5, 2.5));
        assert_eq!(padded_range(std::iter::empty()), (0.0, 1.0));
    }
}
