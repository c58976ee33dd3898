//! What a run's samples say: medians over repetitions, ratios measured pairwise (each dataplane
//! against the direct path and kube-proxy iptables of the same repetition, then the median of
//! those ratios), the markdown section of docs/BENCHMARKS.md and the connection-rate plot.
use std::{collections::BTreeSet, fmt::Write as _, path::Path as FsPath};

use anyhow::Context as _;
use plotters::prelude::*;

use crate::{
    dataplane::Dataplane,
    run::{Results, Sample},
    scenario::Path,
};

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn samples(
    r: &Results,
    services: usize,
    path: Path,
    dp: Dataplane,
) -> impl Iterator<Item = &Sample> {
    r.samples
        .iter()
        .filter(move |s| s.services == services && s.path == path && s.dataplane == dp)
}

/// The median over repetitions of `figure`.
pub fn median_of(
    r: &Results,
    services: usize,
    path: Path,
    dp: Dataplane,
    figure: impl Fn(&Sample) -> f64,
) -> Option<f64> {
    median(samples(r, services, path, dp).map(figure).collect())
}

/// The median over repetitions of `figure(dp) / figure(base)`, each pair from one repetition.
pub fn ratio(
    r: &Results,
    services: usize,
    path: Path,
    dp: Dataplane,
    base: Dataplane,
    figure: impl Fn(&Sample) -> f64,
) -> Option<f64> {
    let ratios = samples(r, services, path, dp)
        .filter_map(|s| {
            let b = samples(r, services, path, base).find(|b| b.rep == s.rep)?;
            let d = figure(b);
            (d > 0.0).then(|| figure(s) / d)
        })
        .collect();
    median(ratios)
}

/// Service counts as measured (ascending).
pub fn counts(r: &Results) -> Vec<usize> {
    r.samples
        .iter()
        .map(|s| s.services)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn cps(s: &Sample) -> f64 {
    s.conn.per_sec
}
fn rps(s: &Sample) -> f64 {
    s.keep_alive.per_sec
}
fn gbps(s: &Sample) -> f64 {
    s.bulk.gbit_per_sec
}

fn fmt_ratio(x: Option<f64>) -> String {
    x.map(|x| format!("{:.0}%", x * 100.0))
        .unwrap_or_else(|| "–".into())
}

fn fmt_ms(us: Option<f64>) -> String {
    match us {
        Some(us) if us >= 100_000.0 => format!("{:.0}", us / 1000.0),
        Some(us) => format!("{:.2}", us / 1000.0),
        None => "–".into(),
    }
}

/// The results table for one path, markdown.
pub fn table(r: &Results, path: Path) -> String {
    let mut t = String::new();
    t.push_str("| services | dataplane | new conn/s | vs direct | vs iptables | conn p50 / p99 ms | SYN retx / failed | kept-alive req/s | vs direct | req p50 / p99 ms | bulk Gbit/s | vs direct |\n");
    t.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for count in counts(r) {
        for &dp in &r.dataplanes {
            let m = |f: &dyn Fn(&Sample) -> f64| median_of(r, count, path, dp, f);
            let Some(conn) = m(&cps) else { continue };
            let retx: u64 = samples(r, count, path, dp)
                .map(|s| s.conn.syn_retransmits)
                .sum();
            let failed: u64 = samples(r, count, path, dp).map(|s| s.conn.failed).sum();
            let _ = writeln!(
                t,
                "| {count} | {} | {conn:.0} | {} | {} | {} / {} | {retx} / {failed} | {:.0} | {} | {} / {} | {:.2} | {} |",
                dp.label(),
                fmt_ratio(ratio(r, count, path, dp, Dataplane::Direct, cps)),
                fmt_ratio(ratio(r, count, path, dp, Dataplane::KubeProxyIptables, cps)),
                fmt_ms(m(&|s| s.conn.p50_us as f64)),
                fmt_ms(m(&|s| s.conn.p99_us as f64)),
                m(&rps).unwrap_or_default(),
                fmt_ratio(ratio(r, count, path, dp, Dataplane::Direct, rps)),
                fmt_ms(m(&|s| s.keep_alive.p50_us as f64)),
                fmt_ms(m(&|s| s.keep_alive.p99_us as f64)),
                m(&gbps).unwrap_or_default(),
                fmt_ratio(ratio(r, count, path, dp, Dataplane::Direct, gbps)),
            );
        }
    }
    t
}

/// The whole section of docs/BENCHMARKS.md for this run, ready to paste: how it was run, both
/// tables and the plot. The reading (where we lose and why) is written by a person.
pub fn section(r: &Results, plot: &str) -> String {
    let mut s = String::new();
    let reps: Vec<String> = counts(r)
        .into_iter()
        .map(|c| {
            let n = r
                .samples
                .iter()
                .filter(|s| s.services == c)
                .map(|s| s.rep + 1)
                .max()
                .unwrap_or(0);
            format!("{n} at {c} services")
        })
        .collect();
    let _ = writeln!(
        s,
        "Run of {} (`{}`, {:.0} min): repetitions {}, dataplanes in rotating order within each repetition, {:.0} s per figure, {} concurrent connections{}; medians over repetitions, ratios taken pairwise within a repetition, then their median. SYN retx counts completed connections whose connect took over 900 ms (a dropped SYN, retransmitted after 1 s), summed over repetitions; failed ones did not complete within 4 s.\n",
        r.date,
        r.command,
        r.wall_s / 60.0,
        reps.join(", "),
        r.duration_s,
        r.workers,
        if r.clients > 1 {
            format!(
                ", new connections from {} client addresses in turn",
                r.clients
            )
        } else {
            String::new()
        }
    );
    for path in Path::ALL {
        let _ = writeln!(s, "Client → nodeIP:nodePort → pod, {}:\n", path.label());
        s.push_str(&table(r, path));
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "![New connections per second against the number of services]({plot})\n"
    );
    s
}

/// New connections per second against the service count, one line per dataplane, one panel per
/// path (SVG; text is left to the viewer's fonts).
pub fn plot(r: &Results, out: &FsPath) -> anyhow::Result<()> {
    let counts = counts(r);
    let x_max = counts.iter().copied().max().unwrap_or(1).max(10) as f64 * 2.0;
    let y_max = r
        .samples
        .iter()
        .map(|s| s.conn.per_sec)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let root = SVGBackend::new(out, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    let colors = [BLACK, BLUE, CYAN, RED, MAGENTA];
    for (area, path) in panels.iter().zip(Path::ALL) {
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("New TCP connections/s, {}", path.label()),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..y_max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("services (log scale)")
            .y_desc("connections/s (median)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, &dp) in r.dataplanes.iter().enumerate() {
            let color = colors[Dataplane::ALL.iter().position(|d| *d == dp).unwrap_or(i) % 5];
            let points: Vec<(f64, f64)> = counts
                .iter()
                .filter_map(|&c| Some((c as f64, median_of(r, c, path, dp, cps)?)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(dp.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{BulkFigures, ConnFigures, KeepAliveFigures};

    fn sample(rep: usize, dp: Dataplane, cps: f64) -> Sample {
        Sample {
            services: 2,
            rep,
            dataplane: dp,
            path: Path::SameNode,
            conn: ConnFigures {
                per_sec: cps,
                completed: cps as u64,
                ..Default::default()
            },
            keep_alive: KeepAliveFigures {
                per_sec: 2.0 * cps,
                ..Default::default()
            },
            bulk: BulkFigures {
                gbit_per_sec: 1.0,
                bytes: 1,
            },
        }
    }

    #[test]
    fn ratios_pair_samples_of_the_same_repetition() {
        let r = Results {
            date: String::new(),
            command: String::new(),
            services: vec![1],
            reps: 3,
            duration_s: 1.0,
            workers: 1,
            clients: 1,
            dataplanes: vec![Dataplane::Direct, Dataplane::KubeProxyIptables],
            samples: vec![
                sample(0, Dataplane::Direct, 100.0),
                sample(0, Dataplane::KubeProxyIptables, 50.0),
                sample(1, Dataplane::Direct, 1000.0),
                sample(1, Dataplane::KubeProxyIptables, 100.0),
                sample(2, Dataplane::Direct, 200.0),
                sample(2, Dataplane::KubeProxyIptables, 40.0),
            ],
            wall_s: 1.0,
        };
        let ipt = Dataplane::KubeProxyIptables;
        // Pairwise: 0.5, 0.1, 0.2 -> median 0.2; medians of each (200 / 50 = 0.25) would differ.
        let x = ratio(&r, 2, Path::SameNode, ipt, Dataplane::Direct, cps).unwrap();
        assert!((x - 0.2).abs() < 1e-9, "{x}");
        assert_eq!(median_of(&r, 2, Path::SameNode, ipt, cps), Some(50.0));
        let t = table(&r, Path::SameNode);
        assert!(
            t.contains("| 2 | kube-proxy iptables | 50 | 20% | 100% |"),
            "{t}"
        );
        let dir = std::env::temp_dir().join(format!("npb-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("plot.svg");
        plot(&r, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("kube-proxy iptables"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
