//! Renders a run's loss / acc1 / lr curves to a PNG with the `image` crate only: lines are
//! rasterised here and labels use a built-in 5×7 bitmap font, so no font files or plotting
//! library are needed.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};

use super::metrics::StepMetrics;

const WIDTH: u32 = 1000;
const PANEL_H: u32 = 300;
const LEFT: u32 = 100;
const RIGHT: u32 = 24;
const TOP: u32 = 34;
const BOTTOM: u32 = 44;
const SCALE: u32 = 2;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const RAW: Rgb<u8> = Rgb([160, 190, 230]);
const LINE: Rgb<u8> = Rgb([25, 80, 170]);
const CHANCE: Rgb<u8> = Rgb([200, 60, 40]);

/// One panel: a title, points (x = step) and optional horizontal reference line.
struct Panel<'a> {
    title: &'a str,
    points: Vec<(f64, f64)>,
    smooth: bool,
    hline: Option<(f64, String)>,
}

/// Draws loss, acc1 and lr against the step into `out`. `chance` (1/L) is drawn on the acc1 panel.
pub fn render(metrics: &[StepMetrics], chance: Option<f64>, out: &Path) -> Result<()> {
    let finite: Vec<&StepMetrics> = metrics.iter().filter(|m| m.loss.is_finite()).collect();
    if finite.is_empty() {
        bail!("no metrics to plot");
    }
    let series = |f: fn(&StepMetrics) -> f64| {
        finite
            .iter()
            .map(|m| (m.step as f64, f(m)))
            .collect::<Vec<_>>()
    };
    let panels = [
        Panel {
            title: "loss",
            points: series(|m| m.loss),
            smooth: true,
            hline: None,
        },
        Panel {
            title: "accuracy (acc1)",
            points: series(|m| m.acc1),
            smooth: true,
            hline: chance.map(|c| {
                // 1/L for the position task: name L when it is a whole number.
                let l = (1.0 / c).round();
                let label = if ((1.0 / l) - c).abs() < 1e-12 {
                    format!("chance 1/{l} ({c:.4})")
                } else {
                    format!("chance {c:.4}")
                };
                (c, label)
            }),
        },
        Panel {
            title: "learning rate",
            points: series(|m| m.lr),
            smooth: false,
            hline: None,
        },
    ];
    let mut img = RgbImage::from_pixel(WIDTH, PANEL_H * panels.len() as u32, WHITE);
    for (i, p) in panels.iter().enumerate() {
        draw_panel(&mut img, i as u32 * PANEL_H, p);
    }
    img.save(out)
        .with_context(|| format!("writing {}", out.display()))
}

fn draw_panel(img: &mut RgbImage, y0: u32, p: &Panel<'_>) {
    let (x_lo, x_hi) = bounds(p.points.iter().map(|q| q.0));
    let (mut y_lo, mut y_hi) = bounds(
        p.points
            .iter()
            .map(|q| q.1)
            .chain(p.hline.as_ref().map(|h| h.0)),
    );
    if y_lo > 0.0 && y_lo < 0.5 * y_hi {
        y_lo = 0.0; // anchor positive series at zero when that costs little
    }
    if y_hi == y_lo {
        y_hi = y_lo + 1.0;
    }
    let (px0, px1) = (LEFT as f64, (WIDTH - RIGHT) as f64);
    let (py0, py1) = ((y0 + PANEL_H - BOTTOM) as f64, (y0 + TOP) as f64);
    let x_of = |x: f64| px0 + (x - x_lo) / (x_hi - x_lo).max(1e-12) * (px1 - px0);
    let y_of = |y: f64| py0 + (y - y_lo) / (y_hi - y_lo) * (py1 - py0);

    for t in ticks(y_lo, y_hi) {
        let y = y_of(t).round() as i64;
        hline(img, LEFT as i64, (WIDTH - RIGHT) as i64, y, GRID);
        let label = fmt_tick(t);
        let w = text_width(&label) as i64;
        text(img, LEFT as i64 - 8 - w, y - 7, &label, BLACK);
    }
    for t in ticks(x_lo, x_hi) {
        let x = x_of(t).round() as i64;
        vline(img, x, py1 as i64, py0 as i64, GRID);
        let label = fmt_tick(t);
        text(
            img,
            x - text_width(&label) as i64 / 2,
            py0 as i64 + 8,
            &label,
            BLACK,
        );
    }
    // Axes and labels.
    hline(img, LEFT as i64, (WIDTH - RIGHT) as i64, py0 as i64, BLACK);
    vline(img, LEFT as i64, py1 as i64, py0 as i64, BLACK);
    text(img, LEFT as i64, y0 as i64 + 8, p.title, BLACK);
    let xl = "step";
    text(
        img,
        (WIDTH - RIGHT) as i64 - text_width(xl) as i64,
        py0 as i64 + 26,
        xl,
        BLACK,
    );

    if let Some((v, label)) = &p.hline {
        let (v, label) = (*v, label.as_str());
        let y = y_of(v).round() as i64;
        let mut x = LEFT as i64;
        while x < (WIDTH - RIGHT) as i64 {
            hline(img, x, (x + 8).min((WIDTH - RIGHT) as i64), y, CHANCE);
            x += 14;
        }
        text(
            img,
            (WIDTH - RIGHT) as i64 - text_width(label) as i64,
            // Below the line: a learning curve ends above chance.
            y + 6,
            label,
            CHANCE,
        );
    }

    let raw: Vec<(f64, f64)> = p.points.iter().map(|&(x, y)| (x_of(x), y_of(y))).collect();
    if p.smooth && p.points.len() > 20 {
        polyline(img, &raw, RAW);
        // Exponential moving average, as TensorBoard's smoothing.
        let mut ema = p.points[0].1;
        let smoothed: Vec<(f64, f64)> = p
            .points
            .iter()
            .map(|&(x, y)| {
                ema = 0.9 * ema + 0.1 * y;
                (x_of(x), y_of(ema))
            })
            .collect();
        polyline(img, &smoothed, LINE);
    } else {
        polyline(img, &raw, LINE);
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
}

/// About five "nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || span.is_infinite() {
        return vec![lo];
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}").replace(".0e", "e")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x0: i64, x1: i64, y: i64, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut RgbImage, x: i64, y0: i64, y1: i64, c: Rgb<u8>) {
    for y in y0.min(y1)..=y0.max(y1) {
        put(img, x, y, c);
    }
}

/// A 2-pixel-wide line through the points.
fn polyline(img: &mut RgbImage, pts: &[(f64, f64)], c: Rgb<u8>) {
    if pts.len() == 1 {
        let (x, y) = (pts[0].0.round() as i64, pts[0].1.round() as i64);
        for d in -2..=2 {
            put(img, x + d, y, c);
            put(img, x, y + d, c);
        }
    }
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
            );
            put(img, x, y, c);
            put(img, x + 1, y, c);
            put(img, x, y + 1, c);
        }
    }
}

fn text_width(s: &str) -> u32 {
    s.chars().count() as u32 * 6 * SCALE
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let rows = glyph(ch);
        let gx = x + (i as u32 * 6 * SCALE) as i64;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            put(
                                img,
                                gx + (col * SCALE + dx) as i64,
                                y + (r as u32 * SCALE + dy) as i64,
                                c,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// 5×7 glyphs (rows top to bottom, bit 4 = leftmost column). Upper case draws as lower case;
/// unknown characters draw as a box.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        ' ' => [0; 7],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64, loss: f64, acc1: f64, lr: f64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0.0,
            loss,
            acc1,
            lr,
            sigma: Some(1.0),
            images_per_s: 1.0,
            step_time_s: 1.0,
            device_mem_mib: 1.0,
            skipped_samples: 0,
        }
    }

    #[test]
    fn renders_three_panels_with_curves() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("curves.png");
        let ms: Vec<_> = (1..=100)
            .map(|s| {
                m(
                    s,
                    3.0 / s as f64,
                    0.5 * (1.0 - 1.0 / s as f64),
                    1e-4 * s as f64 / 100.0,
                )
            })
            .collect();
        render(&ms, Some(1.0 / 16.0), &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (WIDTH, 3 * PANEL_H));
        // Each panel has curve pixels inside its plot area.
        for panel in 0..3 {
            let y0 = panel * PANEL_H + TOP;
            let curve = (y0..panel * PANEL_H + PANEL_H - BOTTOM)
                .flat_map(|y| (LEFT + 2..WIDTH - RIGHT).map(move |x| (x, y)))
                .filter(|&(x, y)| *img.get_pixel(x, y) == LINE)
                .count();
            assert!(curve > 200, "panel {panel}: {curve} curve pixels");
        }
        assert!(img.pixels().any(|p| *p == CHANCE));
    }

    #[test]
    fn empty_metrics_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(render(&[], None, &dir.path().join("x.png")).is_err());
    }

    #[test]
    fn tick_labels_are_readable() {
        assert_eq!(fmt_tick(0.0), "0");
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(200.0), "200");
        assert_eq!(fmt_tick(1.5e-4), "1.5e-4");
        assert_eq!(fmt_tick(1e-4), "1e-4");
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        for (i, v) in t.iter().enumerate() {
            assert!((v - 0.2 * i as f64).abs() < 1e-12, "{t:?}");
        }
        assert_eq!(ticks(3.0, 3.0), vec![3.0]);
    }
}
