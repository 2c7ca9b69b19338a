//! SVG charts drawn with plotters: throughput by shard count, p99 latency against offered
//! load (one line per server), and the latency percentile distribution at half load.
//! Owns: turning results into series and series into SVG files. Must not touch: measuring.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::results::{Results, TargetKind};

#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct ChartError {
    pub path: String,
    pub message: String,
}

/// One point with its range over the repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pt {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Pt {
    pub fn exact(x: f64, y: f64) -> Pt {
        Pt { x, y, lo: y, hi: y }
    }
}

/// A named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Pt>,
    /// A reference level (drawn without markers).
    pub reference: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<Pt>) -> Series {
        Series {
            name: name.into(),
            points,
            reference: false,
        }
    }
}

const W: u32 = 960;
const H: u32 = 560;

fn err(path: &Path, e: impl std::fmt::Display) -> ChartError {
    ChartError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    C[i % C.len()]
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn bounds(series: &[Series], f: impl Fn(&Pt) -> [f64; 2]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for p in series.iter().flat_map(|s| &s.points) {
        for v in f(p) {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    if lo > hi { (0.0, 1.0) } else { (lo, hi) }
}

/// Lines with markers and vertical range bars, on a linear or log y axis.
fn draw_lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &[Series],
    path: &Path,
) -> Result<(), ChartError>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x, p.y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        // Markers where they help: measured points, not reference lines or dense curves.
        if !s.reference && pts.len() <= 40 {
            chart
                .draw_series(PointSeries::of_element(pts, 4, c, &|coord, size, style| {
                    EmptyElement::at(coord) + Circle::new((0, 0), size, style.filled())
                }))
                .map_err(|e| err(path, e))?;
        }
        for p in &s.points {
            if p.hi > p.lo {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(p.x, p.lo), (p.x, p.hi)],
                        c.stroke_width(1),
                    )))
                    .map_err(|e| err(path, e))?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    Ok(())
}

/// Throughput (closed-loop maximum, median with min..max bars) by shard count, one line per
/// dynauthd backend; `references` (echo ceiling, FreeRADIUS) as flat lines across.
pub fn throughput_by_shards(
    path: &Path,
    series: &[Series],
    references: &[(String, f64)],
) -> Result<(), ChartError> {
    let mut all: Vec<Series> = series.to_vec();
    let (xmin, xmax) = bounds(series, |p| [p.x, p.x]);
    let (xmin, xmax) = if xmin > xmax || !xmin.is_finite() {
        (1.0, 1.0)
    } else {
        (xmin, xmax)
    };
    for (name, v) in references {
        all.push(Series {
            name: name.clone(),
            points: vec![Pt::exact(xmin - 0.4, *v), Pt::exact(xmax + 0.4, *v)],
            reference: true,
        });
    }
    let (_, ymax) = bounds(&all, |p| [p.y, p.hi]);
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Maximum throughput by shard count (closed loop)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d((xmin - 0.5)..(xmax + 0.5), 0.0..(ymax * 1.15).max(1.0))
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("dynauthd shards")
        .y_desc("answers per second")
        .x_labels(((xmax - xmin) as usize + 3).min(20))
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-6 && *v >= 1.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| human(*v))
        .draw()
        .map_err(|e| err(path, e))?;
    draw_lines(&mut chart, &all, path)?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// p99 latency (log scale) against the offered rate, one line per server.
pub fn p99_vs_offered(path: &Path, series: &[Series]) -> Result<(), ChartError> {
    // Log scales on both axes: servers an order of magnitude apart stay readable.
    let (xmin, xmax) = bounds(series, |p| [p.x.max(1.0), p.x.max(1.0)]);
    let (ylo, yhi) = bounds(series, |p| [p.lo.max(1.0), p.hi.max(1.0)]);
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "p99 latency against offered load (open loop)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            ((xmin * 0.8).max(1.0)..(xmax * 1.25).max(10.0)).log_scale(),
            ((ylo * 0.8).max(1.0)..(yhi * 1.5).max(10.0)).log_scale(),
        )
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("offered requests per second")
        .y_desc("p99 latency (µs)")
        .x_label_formatter(&|v| human(*v))
        .y_label_formatter(&|v| human(*v))
        .draw()
        .map_err(|e| err(path, e))?;
    draw_lines(&mut chart, series, path)?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// A run's time series (loadgen's `time_series`): above, requests sent, answers and
/// timeouts per second against time; below, p50 and p99 of the requests intended in each
/// bucket (log scale, timeouts included), so a storm's shape shows.
pub fn time_series(
    path: &Path,
    title: &str,
    ts: &dynauth_loadgen::series::TimeSeries,
) -> Result<(), ChartError> {
    let secs = ts.bucket_ms / 1e3;
    let at = |p: &dynauth_loadgen::series::SeriesPoint| (p.start_ms + ts.bucket_ms / 2.0) / 1e3;
    let line = |name: &str, f: &dyn Fn(&dynauth_loadgen::series::SeriesPoint) -> f64| {
        Series::new(
            name,
            ts.points.iter().map(|p| Pt::exact(at(p), f(p))).collect(),
        )
    };
    let rates = [
        line("sent/s", &|p| p.sent_rps),
        line("answered/s", &|p| p.answered_rps),
        line("timeouts/s", &|p| p.timeouts as f64 / secs.max(1e-9)),
    ];
    let latencies: Vec<Series> = [
        line("p50 (µs)", &|p| p.p50_us),
        line("p99 (µs)", &|p| p.p99_us),
    ]
    .into_iter()
    .map(|mut s| {
        // Buckets with no request intended have no latency: left out of the line.
        s.points.retain(|p| p.y > 0.0);
        s
    })
    .collect();
    let t_end = ts
        .points
        .last()
        .map_or(1.0, |p| (p.start_ms + ts.bucket_ms) / 1e3);
    let root = SVGBackend::new(path, (W, H + 240)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(path, e))?;
    let (top, bottom) = root.split_vertically((H + 200) / 2);
    let (_, rmax) = bounds(&rates, |p| [p.y, p.y]);
    let mut chart = ChartBuilder::on(&top)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..t_end, 0.0..(rmax * 1.15).max(1.0))
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(format!("seconds ({} ms buckets)", ts.bucket_ms))
        .y_desc("per second")
        .y_label_formatter(&|v| human(*v))
        .draw()
        .map_err(|e| err(path, e))?;
    draw_lines(&mut chart, &rates, path)?;
    let (ylo, yhi) = bounds(&latencies, |p| [p.y.max(1.0), p.y.max(1.0)]);
    let mut chart = ChartBuilder::on(&bottom)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0.0..t_end,
            ((ylo * 0.8).max(1.0)..(yhi * 1.5).max(10.0)).log_scale(),
        )
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("seconds (latency by intended send time)")
        .y_desc("latency (µs)")
        .y_label_formatter(&|v| human(*v))
        .draw()
        .map_err(|e| err(path, e))?;
    draw_lines(&mut chart, &latencies, path)?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// x position of a percentile: 1 / (1 - p), capped at 99.999%.
fn inv_tail(percentile: f64) -> f64 {
    1.0 / (1.0 - (percentile / 100.0).min(0.99999))
}

/// Latency (log) by percentile (x on a 1/(1-p) log scale, labelled 50%, 90%, 99%, ...).
pub fn latency_distribution(path: &Path, series: &[Series]) -> Result<(), ChartError> {
    let mapped: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            reference: s.reference,
            points: s
                .points
                .iter()
                .map(|p| Pt {
                    x: inv_tail(p.x),
                    ..*p
                })
                .collect(),
        })
        .collect();
    let (_, xmax) = bounds(&mapped, |p| [p.x, p.x]);
    let (ylo, yhi) = bounds(&mapped, |p| [p.lo.max(1.0), p.hi.max(1.0)]);
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency percentiles at half of each server's maximum",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1.0..(xmax * 1.2).max(10.0)).log_scale(),
            ((ylo * 0.8).max(1.0)..(yhi * 1.5).max(10.0)).log_scale(),
        )
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|v| {
            let p = 100.0 * (1.0 - 1.0 / v);
            let digits = if *v < 10.5 {
                0
            } else {
                ((v.log10().round() as usize).saturating_sub(2)).min(4)
            };
            format!("{p:.digits$}%")
        })
        .y_label_formatter(&|v| human(*v))
        .draw()
        .map_err(|e| err(path, e))?;
    draw_lines(&mut chart, &mapped, path)?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// The three charts of a results file, written beside the report as `<stem>-*.svg`;
/// returns (title, path) of each drawn.
pub fn draw_all(
    results: &Results,
    dir: &Path,
    stem: &str,
) -> Result<Vec<(String, PathBuf)>, ChartError> {
    let mut out = Vec::new();
    let measured = || {
        results
            .targets
            .iter()
            .filter(|t| t.skipped.is_none() && !t.closed.is_empty())
    };

    // Throughput by shard count: one line per (backend, main batch).
    let mut lines: Vec<Series> = Vec::new();
    let mut refs = Vec::new();
    let main_batch = results
        .targets
        .iter()
        .find(|t| t.kind == TargetKind::Dynauthd && t.primary)
        .and_then(|t| t.batch);
    for t in measured() {
        match t.kind {
            TargetKind::Echo | TargetKind::Freeradius => {
                if let Some(s) = t.max_rps() {
                    refs.push((t.series_name(), s.median));
                }
            }
            TargetKind::Dynauthd => {
                if t.batch != main_batch {
                    continue;
                }
                let Some(s) = t.max_rps() else { continue };
                let name = format!(
                    "dynauthd {} (batch {})",
                    t.io.as_deref().unwrap_or("?"),
                    t.batch.unwrap_or(0)
                );
                let pt = Pt {
                    x: t.shards.unwrap_or(1) as f64,
                    y: s.median,
                    lo: s.min,
                    hi: s.max,
                };
                match lines.iter_mut().find(|l| l.name == name) {
                    Some(l) => l.points.push(pt),
                    None => lines.push(Series::new(name, vec![pt])),
                }
            }
        }
    }
    for l in &mut lines {
        l.points.sort_by(|a, b| a.x.total_cmp(&b.x));
    }
    if !lines.is_empty() || !refs.is_empty() {
        let p = dir.join(format!("{stem}-throughput-by-shards.svg"));
        throughput_by_shards(&p, &lines, &refs)?;
        out.push(("Maximum throughput by shard count".to_string(), p));
    }

    // p99 against offered load, and the half-load distribution: primary targets.
    let mut p99 = Vec::new();
    let mut dist = Vec::new();
    for t in measured().filter(|t| t.primary) {
        let points: Vec<Pt> = t
            .sweep
            .iter()
            .filter_map(|sp| {
                sp.p99().map(|s| Pt {
                    x: sp.offered_rps,
                    y: s.median,
                    lo: s.min,
                    hi: s.max,
                })
            })
            .collect();
        if !points.is_empty() {
            p99.push(Series {
                name: t.series_name(),
                reference: false,
                points,
            });
        }
        if !t.half_load_distribution.is_empty() {
            dist.push(Series {
                name: t.series_name(),
                reference: false,
                points: t
                    .half_load_distribution
                    .iter()
                    .map(|d| Pt::exact(d.percentile, d.latency_us))
                    .collect(),
            });
        }
    }
    if !p99.is_empty() {
        let p = dir.join(format!("{stem}-p99-vs-offered.svg"));
        p99_vs_offered(&p, &p99)?;
        out.push(("p99 latency against offered load".to_string(), p));
    }
    if !dist.is_empty() {
        let p = dir.join(format!("{stem}-latency-at-half-load.svg"));
        latency_distribution(&p, &dist)?;
        out.push(("Latency percentiles at half load".to_string(), p));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bh-charts-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn time_series_chart_draws_rates_and_latency_over_time() {
        use dynauth_loadgen::series::{SeriesPoint, TimeSeries};
        let p = tmp("series.svg");
        let ts = TimeSeries {
            bucket_ms: 100.0,
            points: (0..20)
                .map(|i| SeriesPoint {
                    start_ms: i as f64 * 100.0,
                    sent_rps: 1000.0,
                    answered_rps: if (5..8).contains(&i) { 0.0 } else { 1000.0 },
                    samples: 100,
                    timeouts: if (5..8).contains(&i) { 100 } else { 0 },
                    p50_us: if (5..8).contains(&i) { 1e6 } else { 200.0 },
                    p99_us: if (5..8).contains(&i) { 1e6 } else { 900.0 },
                })
                .collect(),
        };
        time_series(&p, "storm: mass disconnect", &ts).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        for want in [
            "storm: mass disconnect",
            "answered/s",
            "timeouts/s",
            "p99 (µs)",
            "100 ms buckets",
        ] {
            assert!(svg.contains(want), "{want} missing");
        }
        // An empty series still draws (a run that sent nothing).
        time_series(&p, "empty", &TimeSeries::default()).unwrap();
    }

    #[test]
    fn shard_chart_names_every_series_and_reference() {
        let p = tmp("shards.svg");
        let series = vec![
            Series {
                name: "dynauthd mmsg (batch 64)".into(),
                reference: false,
                points: vec![
                    Pt {
                        x: 1.0,
                        y: 100_000.0,
                        lo: 90_000.0,
                        hi: 110_000.0,
                    },
                    Pt::exact(2.0, 180_000.0),
                ],
            },
            Series {
                name: "dynauthd uring (batch 64)".into(),
                reference: false,
                points: vec![Pt::exact(1.0, 120_000.0)],
            },
        ];
        throughput_by_shards(
            &p,
            &series,
            &[
                ("echo ceiling".into(), 300_000.0),
                ("FreeRADIUS".into(), 40_000.0),
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        for name in [
            "dynauthd mmsg (batch 64)",
            "dynauthd uring (batch 64)",
            "echo ceiling",
            "FreeRADIUS",
            "shards",
        ] {
            assert!(svg.contains(name), "missing {name}");
        }
        // one marker per measured point; the reference levels have none
        assert_eq!(svg.matches("<circle").count(), 3);
    }

    #[test]
    fn latency_charts_are_drawn_on_log_scales() {
        let p = tmp("p99.svg");
        let s = vec![
            Series {
                name: "echo ceiling".into(),
                reference: false,
                points: vec![
                    Pt::exact(10_000.0, 50.0),
                    Pt::exact(100_000.0, 80.0),
                    Pt::exact(300_000.0, 9000.0),
                ],
            },
            Series {
                name: "FreeRADIUS".into(),
                reference: false,
                points: vec![Pt::exact(5000.0, 400.0), Pt::exact(50_000.0, 600_000.0)],
            },
        ];
        p99_vs_offered(&p, &s).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("echo ceiling") && svg.contains("FreeRADIUS"));
        assert!(svg.contains("p99 latency"));

        let p = tmp("dist.svg");
        let d = vec![Series {
            name: "dynauthd mmsg s1 b64".into(),
            reference: false,
            points: vec![
                Pt::exact(0.0, 20.0),
                Pt::exact(50.0, 40.0),
                Pt::exact(99.0, 90.0),
                Pt::exact(100.0, 500.0),
            ],
        }];
        latency_distribution(&p, &d).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("dynauthd mmsg s1 b64"));
        assert!(
            svg.contains("90%") || svg.contains("99%"),
            "percentile labels"
        );
        assert_eq!(inv_tail(50.0), 2.0);
        assert!((inv_tail(99.0) - 100.0).abs() < 1e-9);
    }
}
