//! A node's Istio metrics folded into the service graph's edges: each mesh-node serves its
//! own on `/graph/edges` (next to `/metrics`, on the same ports), and mesh-control sums the
//! nodes' reports into the graph. Folding where the metrics are keeps mesh-control's work per
//! node to a small JSON report instead of a page of several MiB; a node that serves no
//! `/graph/edges` (an older one) is scraped for its `/metrics` page and folded by
//! mesh-control with the same code.
//!
//! - [`exposition`]: the sample lines of a metrics page.
//! - [`edges`]: samples → per-edge totals.

pub mod edges;
pub mod exposition;

use std::collections::HashMap;

use edges::{EdgeKey, EdgeTotals};

/// Where a node serves its [`EdgeReport`].
pub const EDGES_PATH: &str = "/graph/edges";

/// What a node has counted on each edge since it started (`/graph/edges`, JSON).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EdgeReport {
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Edge {
    #[serde(flatten)]
    pub key: EdgeKey,
    pub totals: EdgeTotals,
}

impl EdgeReport {
    /// The report of a metrics page (OpenMetrics text); an error names the line that does not
    /// parse.
    pub fn of_page(page: &str) -> Result<EdgeReport, String> {
        let mut edges: Vec<Edge> =
            edges::fold(page)?.into_iter().map(|(key, totals)| Edge { key, totals }).collect();
        edges.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(EdgeReport { edges })
    }

    pub fn into_map(self) -> HashMap<EdgeKey, EdgeTotals> {
        self.edges.into_iter().map(|e| (e.key, e.totals)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"istio_requests_total{reporter="source",source_workload="a",source_workload_namespace="shop",destination_app="b",destination_workload_namespace="shop",response_code="200"} 3
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="a",source_workload_namespace="shop",destination_app="b",destination_workload_namespace="shop",le="10"} 2
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="a",source_workload_namespace="shop",destination_app="b",destination_workload_namespace="shop",le="+Inf"} 3
"#;

    #[test]
    fn a_report_goes_through_json_whole_with_its_infinite_bucket() {
        let report = EdgeReport::of_page(PAGE).unwrap();
        assert_eq!(report.edges.len(), 1);
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("[null,3.0]"), "+Inf is null on the wire: {json}");
        let back: EdgeReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert_eq!(back.into_map(), edges::fold(PAGE).unwrap());
    }
}
