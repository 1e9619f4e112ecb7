//! Reading Prometheus text exposition, enough to assert on mesh-node's series.

use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Metrics { samples }
    }

    /// Sum of `name` over all series whose labels include every pair in `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut map = BTreeMap::new();
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once("=\"")?;
        map.insert(k.trim_start_matches(',').to_string(), v.trim_end_matches('"').to_string());
    }
    Some(Sample { name: name.to_string(), labels: map, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_and_bare_series() {
        let m = Metrics::parse(
            "# HELP x\nistio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"a\"} 3\nup 1\n",
        );
        assert_eq!(m.sum("istio_tcp_connections_opened_total", &[("source_workload", "a")]), 3.0);
        assert_eq!(m.sum("istio_tcp_connections_opened_total", &[("source_workload", "b")]), 0.0);
        assert_eq!(m.sum("up", &[]), 1.0);
    }
}
