//! What the monitoring tests compare: the tables of `docs/metrics.md`, the Prometheus
//! text the services export, and PromQL expressions taken apart just enough to query
//! what an alert watches.

use std::collections::{BTreeMap, BTreeSet};

/// One row of a `docs/metrics.md` table.
#[derive(Debug, Clone, PartialEq)]
pub struct DocMetric {
    /// The `## section` it is listed under (`gateway`, `presence`, `broker-bridge`).
    pub service: String,
    pub name: String,
    /// counter, gauge or histogram.
    pub kind: String,
    /// Each label and its values, in the order written.
    pub labels: Vec<(String, Vec<String>)>,
}

/// The metric tables of `docs/metrics.md`. Labels are written
/// `` `name`: value, value; `name`: value `` (or `—` for none); a label whose values
/// are not a plain list is an error, since every label comes from a closed set.
pub fn documented_metrics(md: &str) -> Result<Vec<DocMetric>, String> {
    let mut out = Vec::new();
    let mut service = String::new();
    for line in md.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            service = h.trim().to_owned();
            continue;
        }
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[0].starts_with('`') || !cells[0].contains("switchboard_") {
            continue;
        }
        let name = cells[0].trim_matches('`').to_owned();
        let mut labels = Vec::new();
        if cells[2] != "—" {
            for part in cells[2].split(';') {
                let (label, values) =
                    part.split_once(':').ok_or_else(|| format!("{name}: label without values: {part:?}"))?;
                let label = label.trim().trim_matches('`').to_owned();
                let values: Vec<String> = values.split(',').map(|v| v.trim().to_owned()).collect();
                if values.iter().any(|v| {
                    v.is_empty() || !v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                }) {
                    return Err(format!("{name}: `{label}` values are not a plain list: {values:?}"));
                }
                labels.push((label, values));
            }
        }
        out.push(DocMetric { service: service.clone(), name, kind: cells[1].to_owned(), labels });
    }
    Ok(out)
}

/// One sample line of Prometheus text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus text page: `# TYPE` of each family, and the samples.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = t.split_once(' ') {
                    e.types.insert(name.to_owned(), kind.trim().to_owned());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').expect("closing brace"))),
                None => (series, BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            e.samples.push(Sample { name: name.to_owned(), labels, value });
        }
        e
    }

    /// Sample names (exactly as exported: `x_bucket`, `x_sum`, `x_count` for histograms).
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }

    /// Values of `label` on the samples of `family` (for a histogram, its `_bucket`,
    /// `_sum` and `_count` samples), `le` and `quantile` aside.
    pub fn label_values(&self, family: &str) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in self.samples.iter().filter(|s| family_of(&s.name, &self.types) == family) {
            for (k, v) in &s.labels {
                if k != "le" && k != "quantile" {
                    out.entry(k.clone()).or_default().insert(v.clone());
                }
            }
        }
        out
    }
}

/// The family a sample belongs to: its name, or for a histogram's or summary's
/// `_bucket`/`_sum`/`_count` sample the declared family.
pub fn family_of<'a>(sample: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram" || t == "summary")
        {
            return base;
        }
    }
    sample
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    out
}

const COMPARISONS: [&str; 6] = ["==", "!=", ">=", "<=", ">", "<"];

/// Byte offsets of `expr` outside strings and comments, each with its nesting depth in
/// parentheses, braces and brackets (the depth before an opening one, after a closing one).
fn code_positions(expr: &str) -> Vec<(usize, i32)> {
    let b = expr.as_bytes();
    let (mut depth, mut i, mut out) = (0i32, 0, Vec::new());
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' && q != b'`' { 2 } else { 1 };
                }
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'{' | b'[' => {
                out.push((i, depth));
                depth += 1;
            }
            b')' | b'}' | b']' => {
                depth -= 1;
                out.push((i, depth));
            }
            _ => out.push((i, depth)),
        }
        i += 1;
    }
    out
}

/// Splits `expr` at its top-level comparison (outside parentheses, braces, brackets and
/// strings): `(left, operator, right)`, the operator with any `bool` modifier and
/// `on(…)`/`ignoring(…)`/`group_left(…)` left at the start of `right`. `None` when the
/// expression compares nothing at the top level.
pub fn split_comparison(expr: &str) -> Option<(&str, &str, &str)> {
    code_positions(expr).into_iter().filter(|(_, depth)| *depth == 0).find_map(|(i, _)| {
        let op = COMPARISONS.iter().find(|op| expr[i..].starts_with(**op))?;
        Some((expr[..i].trim(), *op, expr[i + op.len()..].trim()))
    })
}

/// Whether every bracket of `expr` closes after it opens and none is left open.
fn balanced(expr: &str) -> bool {
    let pos = code_positions(expr);
    let open_at_end = pos.last().map_or(0, |&(i, d)| d + i32::from(b"({[".contains(&expr.as_bytes()[i])));
    pos.iter().all(|(_, d)| *d >= 0) && open_at_end == 0
}

/// What an alert watches, as an expression that returns series while the system is
/// healthy: the left operand of its top-level comparison (the threshold cannot hold in a
/// healthy test), and for `absent(x)` the `x` whose vanishing it reports.
pub fn alert_operand(expr: &str) -> String {
    let expr = expr.trim();
    let left = split_comparison(expr).map_or(expr, |(l, _, _)| l);
    for f in ["absent", "absent_over_time"] {
        if let Some(inner) = left.strip_prefix(f).map(str::trim_start).and_then(|r| r.strip_prefix('('))
            && let Some(inner) = inner.trim_end().strip_suffix(')')
            && balanced(inner)
        {
            return inner.trim().to_owned();
        }
    }
    left.to_owned()
}

/// A dashboard query as Prometheus' own API takes it: Grafana's variables replaced by
/// fixed values.
pub fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "5m")
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as `-`.
pub fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Anchors of every heading of a Markdown page.
pub fn anchors(md: &str) -> BTreeSet<String> {
    md.lines().filter_map(|l| l.strip_prefix('#')).map(|h| heading_anchor(h.trim_start_matches('#'))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_split_respects_nesting_and_strings() {
        assert_eq!(split_comparison("max(x) > 0.9"), Some(("max(x)", ">", "0.9")));
        assert_eq!(split_comparison("up{job=~\"a|b\"} == 0"), Some(("up{job=~\"a|b\"}", "==", "0")));
        // Comparisons inside a function call, a selector or a string are not the top one.
        assert_eq!(
            split_comparison("sum(rate(x{le!=\"1\"}[5m]) > 2) >= bool 3"),
            Some(("sum(rate(x{le!=\"1\"}[5m]) > 2)", ">=", "bool 3"))
        );
        assert_eq!(split_comparison("count(x{a=\"<\"}) < 1"), Some(("count(x{a=\"<\"})", "<", "1")));
        assert_eq!(split_comparison("label_replace(x, \"d\", \"$1\", \"s\", \"(a)>b\")"), None);
        assert_eq!(split_comparison("sum(x)"), None);
        assert_eq!(split_comparison("a != on(pod) b"), Some(("a", "!=", "on(pod) b")));
        assert_eq!(split_comparison("x # a > comment\n"), None);
    }

    #[test]
    fn alert_operand_is_what_the_alert_watches() {
        assert_eq!(alert_operand("  max by (pod) (a / b) > 0.9\n"), "max by (pod) (a / b)");
        assert_eq!(alert_operand("absent(up{job=\"gateway\"})"), "up{job=\"gateway\"}");
        assert_eq!(alert_operand("absent(x) == 1"), "x");
        assert_eq!(alert_operand("absent_over_time(x[5m])"), "x[5m]");
        // Two calls side by side are not one absent(…).
        assert_eq!(alert_operand("absent(a) or absent(b)"), "absent(a) or absent(b)");
        assert!(balanced("f(a{b=\")\"}[1m])") && !balanced("a) or (b") && !balanced("f(") && balanced(""));
        assert_eq!(alert_operand("sum(x)"), "sum(x)");
    }

    #[test]
    fn docs_tables_parse_with_labels() {
        let md = "## gateway\n\n| metric | type | labels | meaning |\n|---|---|---|---|\n\
                  | `switchboard_a_total` | counter | `reason`: x, y_z; `outcome`: ok | a |\n\
                  | `switchboard_b` | gauge | — | b |\n## presence\n| `switchboard_c_seconds` | histogram | — | c |\n";
        let m = documented_metrics(md).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].service, "gateway");
        assert_eq!(
            m[0].labels,
            vec![
                ("reason".to_owned(), vec!["x".to_owned(), "y_z".to_owned()]),
                ("outcome".to_owned(), vec!["ok".to_owned()])
            ]
        );
        assert_eq!((m[2].service.as_str(), m[2].kind.as_str()), ("presence", "histogram"));
        assert!(documented_metrics("| `switchboard_a` | counter | `code`: the protocol's codes | x |").is_err());
        assert!(documented_metrics("| `switchboard_a` | counter | `method` | x |").is_err());
    }

    #[test]
    fn exposition_parses_families_and_labels() {
        let text = "# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n\
                    # TYPE c counter\nc{reason=\"a\\\"b\",k=\"v\"} 3\nc_count 1\n";
        let e = Exposition::parse(text);
        assert_eq!(e.samples.len(), 6);
        assert_eq!((e.samples[1].labels["le"].as_str(), e.samples[1].value), ("+Inf", 2.0));
        assert_eq!(e.samples[4].labels.get("reason").map(String::as_str), Some("a\"b"));
        assert_eq!(family_of("h_bucket", &e.types), "h");
        // c is a counter: c_count is its own name, not c's.
        assert_eq!(family_of("c_count", &e.types), "c_count");
        assert_eq!(e.label_values("c").get("k").unwrap().iter().collect::<Vec<_>>(), vec!["v"]);
        assert!(e.label_values("h").is_empty(), "le is not a label of the family");
    }

    #[test]
    fn anchors_and_encoding() {
        assert_eq!(heading_anchor(" Gateway near connection cap"), "gateway-near-connection-cap");
        assert_eq!(
            heading_anchor("Several gateways per host (SO_REUSEPORT)"),
            "several-gateways-per-host-so_reuseport"
        );
        assert!(anchors("# A\n## Target down\ntext # not\n").contains("target-down"));
        assert_eq!(url_encode("sum(x{a=\"b\"}[1m]) > 0"), "sum%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%20%3E%200");
        assert_eq!(without_grafana_variables("rate(x[$__rate_interval])"), "rate(x[1m])");
    }
}
