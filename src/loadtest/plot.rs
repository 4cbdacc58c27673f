//! Plots of load-test reports: the latency distribution (a CDF on a log latency axis, p50, p99
//! and p99.9 marked) and deliveries/s over the run, for one report (`--report FILE.svg`) or
//! several on the same axes (`replhub loadtest plot`). An HTML page is the same SVG inline plus
//! the reports' figures as a table, in one self-contained file.
//!
//! Drawn with `plotters`' SVG backend alone, built without its font features: the SVG holds
//! text as `<text>` elements that the viewer renders with its own fonts, and plotters lays out
//! axis labels with a size estimate, so no font file or system font library is needed.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::Report;

/// The figure's size in pixels.
const WIDTH: u32 = 900;
const HEIGHT: u32 = 820;
/// Series colours, in the order the reports are given (one colour per report on both charts).
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(110, 110, 110),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];
const FONT: &str = "sans-serif";
/// A last, partial interval shorter than this fraction of an interval is left out of the
/// deliveries/s chart: its rate would be a count over a sliver of time.
const MIN_PARTIAL: f64 = 0.25;

/// What a report file is, by its name's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    /// `.json`: the report's JSON form.
    Json,
    /// `.svg`: the plots.
    Svg,
    /// `.html`/`.htm`: the plots and a table of the figures.
    Html,
}

impl Format {
    /// The format a path's extension names.
    pub(super) fn of(path: &Path) -> anyhow::Result<Self> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("json") => Ok(Self::Json),
            Some("svg") => Ok(Self::Svg),
            Some("html" | "htm") => Ok(Self::Html),
            _ => anyhow::bail!("{}: expected a name ending in .json, .svg or .html", path.display()),
        }
    }
}

/// A report and the name it goes by in legends and table headings.
#[derive(Clone, Debug)]
pub(super) struct Labelled {
    /// The legend.
    pub(super) label: String,
    /// The figures.
    pub(super) report: Report,
}

/// What a report is called: its target, with the backend for replhub (`replhub uring`,
/// `replhub epoll`, `redis`, `ideal`).
pub(super) fn label(r: &Report) -> String {
    match r.target.as_str() {
        "replhub" if !r.backend.is_empty() => format!("replhub {}", r.backend),
        "" => "report".to_owned(),
        t => t.to_owned(),
    }
}

/// Labels the reports read from `paths`; two with the same label get their file names added.
pub(super) fn label_all(reports: Vec<(PathBuf, Report)>) -> Vec<Labelled> {
    let labels: Vec<String> = reports.iter().map(|(_, r)| label(r)).collect();
    reports
        .into_iter()
        .zip(&labels)
        .map(|((path, report), l)| {
            let label = if labels.iter().filter(|m| *m == l).count() > 1 {
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                format!("{l} ({stem})")
            } else {
                l.clone()
            };
            Labelled { label, report }
        })
        .collect()
}

/// Reads a JSON report (`--report FILE.json`, or `--json` output).
pub(super) fn read_report(path: &Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Report::from_json(&text).with_context(|| format!("{}: not a load-test JSON report", path.display()))
}

/// Writes `reports` to `path` in the format its extension names (JSON: exactly one report).
pub(super) fn write(path: &Path, reports: &[Labelled]) -> anyhow::Result<()> {
    let text = match Format::of(path)? {
        Format::Json => match reports {
            [one] => one.report.to_json() + "\n",
            _ => anyhow::bail!("{}: a JSON report holds one run", path.display()),
        },
        Format::Svg => svg(reports)?,
        Format::Html => html(reports)?,
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The figure: a title, the latency CDF, and deliveries/s over time, as one SVG document.
pub(super) fn svg(reports: &[Labelled]) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&title(reports), (FONT, 20))?;
        let (top, bottom) = root.split_vertically(HEIGHT / 2 - 15);
        latency_chart(&top, reports)?;
        rate_chart(&bottom, reports)?;
        root.present()?;
    }
    Ok(out)
}

/// A self-contained HTML page: the figure inline, then the reports' figures as a table.
pub(super) fn html(reports: &[Labelled]) -> anyhow::Result<String> {
    let figure = svg(reports)?;
    let title = title(reports);
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>{}</title>\n\
         <style>body{{font-family:sans-serif;margin:1em 2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}\
         </style>\n</head>\n<body>\n<h1>{}</h1>\n<figure>\n{}\n</figure>\n",
        escape(&title),
        escape(&title),
        figure.trim()
    );
    s.push_str("<table>\n<thead><tr><th></th>");
    for r in reports {
        let _ = write!(s, "<th>{}</th>", escape(&r.label));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    let rows: Vec<Vec<(String, String)>> = reports.iter().map(|r| table_rows(&r.report)).collect();
    if let Some(first) = rows.first() {
        for (i, (key, _)) in first.iter().enumerate() {
            let _ = write!(s, "<tr><td>{}</td>", escape(key));
            for row in &rows {
                let v = row.get(i).map_or("", |(_, v)| v.as_str());
                let _ = write!(s, "<td>{}</td>", escape(v));
            }
            s.push_str("</tr>\n");
        }
    }
    s.push_str("</tbody>\n</table>\n</body>\n</html>\n");
    Ok(s)
}

/// The report's JSON fields as (name, value) rows: nested objects flattened (`latency_ns.p99`),
/// the plotted series left out (the figure shows them), errors joined.
fn table_rows(r: &Report) -> Vec<(String, String)> {
    let serde_json::Value::Object(map) = serde_json::to_value(r).unwrap_or_default() else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for (k, v) in map {
        match v {
            serde_json::Value::Object(inner) => {
                for (k2, v2) in inner {
                    rows.push((format!("{k}.{k2}"), cell(&v2)));
                }
            }
            serde_json::Value::Array(items) if k == "errors" => {
                let texts: Vec<String> = items.iter().map(cell).collect();
                rows.push((k, texts.join("; ")));
            }
            serde_json::Value::Array(_) => {}
            other => rows.push((k, cell(&other))),
        }
    }
    rows
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "–".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The workload in a few words.
fn workload(r: &Report) -> String {
    let rate = if r.rate == 0 { "max rate".to_owned() } else { format!("{}/s", si(r.rate as f64)) };
    format!(
        "{} subscribers, streams {}, {}-byte lines, {rate}, check {}",
        r.subscribers, r.streams, r.message_size, r.check
    )
}

fn title(reports: &[Labelled]) -> String {
    match reports {
        [] => "load test".to_owned(),
        [one] => format!("{}: {}", one.label, workload(&one.report)),
        [first, rest @ ..] => {
            let names: Vec<&str> = reports.iter().map(|r| r.label.as_str()).collect();
            let w = workload(&first.report);
            if rest.iter().all(|r| workload(&r.report) == w) {
                format!("{}: {w}", names.join(" vs "))
            } else {
                names.join(" vs ")
            }
        }
    }
}

/// The latency CDF of every report, on a log latency axis, with p50, p99 and p99.9 marked.
fn latency_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    reports: &[Labelled],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    // The axis spans every report's distribution, in µs.
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for r in reports {
        if let (Some(first), Some(last)) = (r.report.latency_cdf_ns.first(), r.report.latency_cdf_ns.last()) {
            lo = lo.min(first.0 as f64 / 1e3);
            hi = hi.max(last.0 as f64 / 1e3);
        }
    }
    if hi <= 0.0 {
        (lo, hi) = (1.0, 1000.0);
    }
    let (lo, mut hi) = ((lo / 1.3).max(0.01), (hi * 1.3).max(lo * 10.0));
    let single = reports.len() == 1;
    if single {
        // Room on the right of the largest mark for its name: it sits at 78% of the axis.
        hi = hi.max(lo * (hi / lo).powf(1.0 / 0.78));
    }
    let mut chart = ChartBuilder::on(area)
        .caption("latency, publish to receipt: CDF", (FONT, 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (log scale)")
        .y_desc("fraction of lines")
        .x_label_formatter(&|us| latency_text(us * 1e3))
        .y_label_formatter(&|f| format!("{f:.1}"))
        .max_light_lines(4)
        .label_style((FONT, 12))
        .draw()?;
    for (i, r) in reports.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let rep = &r.report;
        let n = rep.latency.samples.max(1) as f64;
        let points = rep.latency_cdf_ns.iter().map(|&(ns, c)| (ns as f64 / 1e3, c as f64 / n));
        let l = &rep.latency;
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(format!(
                "{}: p50 {}, p99 {}, p99.9 {}",
                r.label,
                latency_text(l.p50 as f64),
                latency_text(l.p99 as f64),
                latency_text(l.p999 as f64)
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        if l.samples == 0 {
            continue;
        }
        // The marked percentiles; with one report each is named beside its mark, stacked
        // downwards so that close p99 and p99.9 labels do not overlap.
        let marks =
            [("p50", l.p50, 0.5, (8, -16)), ("p99", l.p99, 0.99, (8, 4)), ("p99.9", l.p999, 0.999, (8, 20))];
        let at = |ns: u64, q: f64| ((ns as f64 / 1e3).max(lo), q);
        chart.draw_series(marks.iter().map(|&(_, ns, q, _)| Circle::new(at(ns, q), 4, colour.filled())))?;
        if single {
            chart.draw_series(marks.iter().map(|&(name, ns, q, offset)| {
                EmptyElement::at(at(ns, q))
                    + Text::new(
                        format!("{name} {}", latency_text(ns as f64)),
                        offset,
                        (FONT, 12).into_font().color(&colour),
                    )
            }))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// One point per interval of a report's series: (seconds since the start of publishing at
/// the middle of the interval, deliveries/s over it).
pub(super) fn rate_points(r: &Report) -> Vec<(f64, f64)> {
    let interval = r.deliveries_interval_ms as f64 / 1e3;
    if interval <= 0.0 {
        return Vec::new();
    }
    let n = r.deliveries_per_interval.len();
    let end = if r.elapsed_seconds > 0.0 { r.elapsed_seconds } else { n as f64 * interval };
    r.deliveries_per_interval
        .iter()
        .enumerate()
        .filter_map(|(k, &c)| {
            let start = k as f64 * interval;
            // Only the last interval may be partial; it ends with the run.
            let stop = if k + 1 == n { end.clamp(start, start + interval) } else { start + interval };
            let len = stop - start;
            (len >= interval * MIN_PARTIAL).then(|| ((start + stop) / 2.0, c as f64 / len))
        })
        .collect()
}

/// Deliveries/s over the run, every report on the same axes.
fn rate_chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, reports: &[Labelled]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let series: Vec<Vec<(f64, f64)>> = reports.iter().map(|r| rate_points(&r.report)).collect();
    let t_max = reports
        .iter()
        .map(|r| r.report.elapsed_seconds)
        .chain(series.iter().flatten().map(|p| p.0))
        .fold(0f64, f64::max)
        .max(0.1);
    // Headroom above the highest point for the legend, one line per report.
    let headroom = 1.15 + 0.12 * reports.len() as f64;
    let y_max = series.iter().flatten().map(|p| p.1).fold(0f64, f64::max).max(1.0) * headroom;
    let mut chart = ChartBuilder::on(area)
        .caption("deliveries per second over the run", (FONT, 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing started")
        .y_desc("deliveries/s")
        .y_label_formatter(&|v| si(*v))
        .max_light_lines(2)
        .label_style((FONT, 12))
        .draw()?;
    for (i, (r, points)) in reports.iter().zip(series).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let interval = r.report.deliveries_interval_ms;
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(format!(
                "{}: {}/s over the run (per {interval} ms)",
                r.label,
                si(r.report.deliveries_per_sec)
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// Nanoseconds as ns, µs, ms or s, three significant digits.
fn latency_text(ns: f64) -> String {
    if ns >= 1e9 {
        trim(format!("{:.2}", ns / 1e9)) + " s"
    } else if ns >= 1e6 {
        sig3(ns / 1e6) + " ms"
    } else if ns >= 1e3 {
        sig3(ns / 1e3) + " µs"
    } else {
        format!("{ns:.0} ns")
    }
}

/// Three significant digits at most (for values from 1 to 999): 167.77 → "168",
/// 1.5 → "1.5", 12.34 → "12.3".
fn sig3(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    trim(format!("{v:.decimals$}"))
}

/// "12.50" → "12.5", "3.0" → "3".
fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// 1234567 → "1.23M".
fn si(v: f64) -> String {
    if v >= 1e9 {
        trim(format!("{:.2}", v / 1e9)) + "G"
    } else if v >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if v >= 1e3 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadtest::Latency;

    /// A report as a run would make it: `intervals` whole intervals of 100 ms and a latency
    /// distribution from 20 µs to 5 ms.
    fn report(backend: &str, intervals: usize, per_interval: u64) -> Report {
        let mut hist = crate::loadtest::Histogram::new();
        for i in 0..10_000u64 {
            hist.record(20_000 + i * i / 20);
        }
        Report {
            target: "replhub".into(),
            backend: backend.into(),
            subscribers: 100,
            streams: "one".into(),
            check: "full".into(),
            message_size: 300,
            delivered: per_interval * intervals as u64,
            elapsed_seconds: intervals as f64 * 0.1,
            deliveries_per_sec: per_interval as f64 * 10.0,
            latency: Latency::of(&hist),
            latency_cdf_ns: hist.cdf(1.05),
            deliveries_interval_ms: 100,
            deliveries_per_interval: vec![per_interval; intervals],
            ..Report::default()
        }
    }

    fn labelled(r: Report) -> Labelled {
        Labelled { label: label(&r), report: r }
    }

    /// The number of points of every `<polyline>` drawn in `colour`.
    fn polylines(doc: &roxmltree::Document<'_>, colour: RGBColor) -> Vec<usize> {
        let stroke = format!("#{:02X}{:02X}{:02X}", colour.0, colour.1, colour.2);
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(stroke.as_str()))
            .map(|n| n.attribute("points").unwrap_or("").split_whitespace().count())
            .collect()
    }

    fn texts(doc: &roxmltree::Document<'_>) -> String {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn one_report_is_well_formed_svg_with_both_series_and_the_percentiles() {
        let r = report("uring", 37, 50_000);
        let cdf_points = r.latency_cdf_ns.len();
        let svg = svg(&[labelled(r)]).expect("drawn");
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert!(doc.root_element().has_tag_name("svg"));
        // The CDF, the deliveries series (one point per interval), and two 2-point legend marks.
        let mut lines = polylines(&doc, COLOURS[0]);
        lines.sort_unstable();
        assert_eq!(lines, [2, 2, 37, cdf_points], "{lines:?}");
        assert!(cdf_points > 20, "{cdf_points}");
        let text = texts(&doc);
        for want in ["replhub uring", "p50 ", "p99 ", "p99.9 ", "deliveries/s", "100 subscribers"] {
            assert!(text.contains(want), "no {want:?} in {text}");
        }
        // Three percentile marks.
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("circle")).count(), 3);
        assert!(svg.len() < 60_000, "{} bytes", svg.len());
    }

    #[test]
    fn two_reports_share_the_axes_with_two_legends() {
        let reports = label_all(vec![
            (PathBuf::from("a.json"), report("uring", 20, 50_000)),
            (PathBuf::from("b.json"), Report { target: "redis".into(), ..report("redis", 30, 20_000) }),
        ]);
        let svg = svg(&reports).expect("drawn");
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        let text = texts(&doc);
        assert!(text.contains("replhub uring: p50"), "{text}");
        assert!(text.contains("redis: p50"), "{text}");
        assert!(text.contains("replhub uring: 500k/s"), "{text}");
        assert!(text.contains("redis: 200k/s"), "{text}");
        assert!(text.contains("replhub uring vs redis"), "{text}");
        assert!(polylines(&doc, COLOURS[0]).contains(&20));
        assert!(polylines(&doc, COLOURS[1]).contains(&30));
        // Several reports: the marks are not named one by one (the legends give the values).
        assert!(!text.lines().any(|l| l.starts_with("p99")), "{text}");
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("circle")).count(), 6);
    }

    #[test]
    fn the_same_target_twice_is_told_apart_by_file_name() {
        let reports = label_all(vec![
            (PathBuf::from("x/run1.json"), report("epoll", 3, 1)),
            (PathBuf::from("x/run2.json"), report("epoll", 3, 1)),
            (PathBuf::from("ideal.json"), Report { target: "ideal".into(), ..report("ideal", 3, 1) }),
        ]);
        let labels: Vec<&str> = reports.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["replhub epoll (run1)", "replhub epoll (run2)", "ideal"]);
    }

    #[test]
    fn html_is_one_well_formed_page_with_the_figure_and_the_table() {
        let reports = [labelled(report("uring", 10, 1000)), labelled(report("epoll", 10, 900))];
        let page = html(&reports).expect("drawn");
        let opt = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
        let doc = roxmltree::Document::parse_with_options(&page, opt).expect("well-formed XHTML");
        assert!(doc.root_element().has_tag_name("html"));
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("svg")).count(), 1);
        let headings: Vec<&str> =
            doc.descendants().filter(|n| n.has_tag_name("th")).filter_map(|n| n.text()).collect();
        assert_eq!(headings, ["replhub uring", "replhub epoll"]);
        let row = |key: &str| -> Vec<String> {
            let tr = doc
                .descendants()
                .find(|n| n.has_tag_name("tr") && n.first_element_child().and_then(|c| c.text()) == Some(key))
                .unwrap_or_else(|| panic!("no row {key}"));
            tr.children()
                .filter(|c| c.is_element())
                .skip(1)
                .map(|c| c.text().unwrap_or("").to_owned())
                .collect()
        };
        assert_eq!(row("delivered"), ["10000", "9000"]);
        assert_eq!(
            row("latency_ns.p99"),
            [reports[0].report.latency.p99.to_string(), reports[1].report.latency.p99.to_string()]
        );
        assert_eq!(row("rss_end_bytes"), ["–", "–"]);
        // Nothing is fetched: no external reference.
        assert!(!page.contains("src=") && !page.contains("href="), "self-contained");
    }

    #[test]
    fn rate_points_use_the_real_length_of_the_last_interval() {
        let mut r = report("uring", 4, 1000);
        r.elapsed_seconds = 0.35;
        let p = rate_points(&r);
        assert_eq!(p.len(), 4);
        assert!((p[0].0 - 0.05).abs() < 1e-9 && (p[0].1 - 10_000.0).abs() < 1e-6, "{p:?}");
        // 1000 lines in the last 50 ms.
        assert!((p[3].0 - 0.325).abs() < 1e-9 && (p[3].1 - 20_000.0).abs() < 1e-6, "{p:?}");
        // A sliver of an interval is left out.
        r.elapsed_seconds = 0.31;
        assert_eq!(rate_points(&r).len(), 3);
    }

    #[test]
    fn a_report_reads_back_from_its_json() {
        let r = Report { loadgen_cpu_ns_per_delivery: 12.5, ..report("uring", 5, 7) };
        let back = Report::from_json(&(r.to_json() + "\n")).expect("parses");
        assert_eq!(back.deliveries_per_interval, [7; 5]);
        assert_eq!(back.latency_cdf_ns, r.latency_cdf_ns);
        assert_eq!(back.latency.p99, r.latency.p99);
        assert_eq!(back.loadgen_cpu_ns_per_delivery, 12.5);
        // An older report, without the series, and with a null where a number was not finite.
        let old = Report::from_json(
            r#"{"target":"redis","delivered":3,"mean_x":1,"loadgen_cpu_ns_per_delivery":null}"#,
        )
        .expect("parses");
        assert_eq!((old.target.as_str(), old.delivered), ("redis", 3));
        assert!(old.loadgen_cpu_ns_per_delivery.is_nan() && old.deliveries_per_interval.is_empty());
        assert!(svg(&[labelled(old)]).is_ok(), "an old report still draws");
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(latency_text(167_770_000.0), "168 ms");
        assert_eq!(latency_text(1_500_000.0), "1.5 ms");
        assert_eq!(latency_text(12_340.0), "12.3 µs");
        assert_eq!(latency_text(999.0), "999 ns");
        assert_eq!(latency_text(1e10), "10 s");
        assert_eq!(si(299_800.0), "299.8k");
        assert_eq!(si(2_000_000.0), "2M");
    }

    #[test]
    fn formats_by_extension() {
        assert_eq!(Format::of(Path::new("a/b.SVG")).ok(), Some(Format::Svg));
        assert_eq!(Format::of(Path::new("r.html")).ok(), Some(Format::Html));
        assert_eq!(Format::of(Path::new("r.json")).ok(), Some(Format::Json));
        assert!(Format::of(Path::new("r.png")).is_err());
        assert!(Format::of(Path::new("svg")).is_err());
    }
}
