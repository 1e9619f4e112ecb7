//! The sample lines of a Prometheus/OpenMetrics text page: `name{label="value",…} value`.
//!
//! The graph needs only samples of a few metric families, so metadata lines (`# TYPE`,
//! `# HELP`, `# EOF`) are skipped and exemplars and timestamps after the value are ignored.
//! A line that does not parse is an error naming its line number: a node that serves a broken
//! page is reported on the graph page instead of being drawn from half its numbers.

use std::borrow::Cow;

/// One sample: the metric's name as written (`istio_requests_total`), its labels and value,
/// borrowed from the page (a value is copied only if it has escapes): a busy node's page has
/// thousands of lines of some twenty labels each, parsed on every scrape of every node.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Labels<'a>,
    pub value: f64,
}

/// Label names and values, in the page's order.
pub type Labels<'a> = Vec<(&'a str, Cow<'a, str>)>;

impl Sample<'_> {
    /// The label's value, or "" when absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v.as_ref())
    }
}

/// Calls `each` with every sample of `page` whose metric name `wanted` accepts (others are
/// not parsed further); stops at the first line that does not parse.
pub fn for_each_sample<'a>(
    page: &'a str,
    wanted: impl Fn(&str) -> bool,
    mut each: impl FnMut(Sample<'a>),
) -> Result<(), String> {
    for (i, line) in page.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| format!("line {}: no value", i + 1))?;
        let name = &line[..name_end];
        if !wanted(name) {
            continue;
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            labels(&line[name_end + 1..]).map_err(|e| format!("line {}: {e}", i + 1))?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let value = rest.split_whitespace().next().ok_or_else(|| format!("line {}: no value", i + 1))?;
        let value =
            parse_value(value).ok_or_else(|| format!("line {}: value `{value}` is not a number", i + 1))?;
        each(Sample { name, labels, value });
    }
    Ok(())
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

/// `a="x",b="y"} rest` → the labels and `rest`. Values use the format's escapes: `\\`, `\"`,
/// `\n`.
fn labels(mut text: &str) -> Result<(Labels<'_>, &str), String> {
    let mut labels = Vec::with_capacity(24);
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (name, after) = text.split_once("=\"").ok_or("a label without =\"value\"")?;
        let end = after.find(['"', '\\']).ok_or_else(|| format!("label {name}: unterminated value"))?;
        if after.as_bytes()[end] == b'"' {
            labels.push((name.trim(), Cow::Borrowed(&after[..end])));
            text = &after[end + 1..];
            continue;
        }
        // Escapes: the value is rebuilt.
        let mut value = String::from(&after[..end]);
        let mut chars = after[end..].char_indices();
        let close = loop {
            match chars.next() {
                Some((i, '"')) => break end + i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("an escape at the end of the line".into()),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("label {name}: unterminated value")),
            }
        };
        labels.push((name.trim(), Cow::Owned(value)));
        text = &after[close + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples<'a>(page: &'a str, wanted: impl Fn(&str) -> bool) -> Result<Vec<Sample<'a>>, String> {
        let mut all = Vec::new();
        for_each_sample(page, wanted, |s| all.push(s))?;
        Ok(all)
    }

    #[test]
    fn samples_of_an_openmetrics_page_with_escapes_and_exemplars() {
        let page = "# TYPE istio_requests counter\n\
            istio_requests_total{reporter=\"source\",path=\"a\\\"b\\\\c\"} 12 # {trace_id=\"x\"} 1\n\
            istio_request_duration_milliseconds_bucket{le=\"+Inf\"} 3\n\
            other_total 5\n\
            up 1 1700000000\n\
            # EOF\n";
        let all = samples(page, |n| n != "other_total").unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].name, "istio_requests_total");
        assert_eq!(all[0].label("path"), "a\"b\\c");
        assert_eq!(all[0].value, 12.0);
        assert_eq!(all[1].label("le"), "+Inf");
        assert_eq!(all[2].value, 1.0);
    }

    #[test]
    fn a_broken_line_is_named() {
        let err = samples("ok 1\nbad{a=\"x} 2\n", |_| true).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = samples("x{a=\"1\"} nope\n", |_| true).unwrap_err();
        assert!(err.contains("`nope` is not a number"), "{err}");
    }
}
