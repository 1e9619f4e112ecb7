//! Smooth weighted round robin (the nginx algorithm), shared by HTTP routes (per request) and
//! tcp/tls routes (per connection): a 90/10 split is exactly 90/10 over every 100 picks and
//! interleaved (at most 9 in a row to the larger side), not 90/10 on average.

use std::sync::Mutex;

pub struct SmoothWeights {
    weights: Vec<u32>,
    /// All weights together (0: always the first choice).
    total: u64,
    /// Each choice's current credit.
    credit: Mutex<Vec<i64>>,
}

impl SmoothWeights {
    /// Fails when there are several choices whose weights are all 0.
    pub fn new(weights: Vec<u32>) -> Result<SmoothWeights, String> {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        if weights.len() > 1 && total == 0 {
            return Err("weighted destinations whose weights are all 0".into());
        }
        let credit = Mutex::new(vec![0; weights.len()]);
        Ok(SmoothWeights { weights, total, credit })
    }

    /// The index of the next choice: every choice gains its weight in credit, the richest is
    /// picked and pays the total.
    pub fn pick(&self) -> usize {
        if self.weights.len() <= 1 || self.total == 0 {
            return 0;
        }
        let choices = self.weights.iter().map(|w| i64::from(*w)).enumerate();
        step(&mut self.credit.lock().expect("weights lock"), choices)
    }
}

/// One step over `choices` (an index into `credit`, and its weight): every choice gains its
/// weight in credit, the richest is picked and pays the total. Choices may be a subset of
/// the credited items (endpoints left after ejections, say).
pub fn step(credit: &mut [i64], choices: impl Iterator<Item = (usize, i64)> + Clone) -> usize {
    let total: i64 = choices.clone().map(|(_, w)| w).sum();
    let mut best = None;
    for (i, w) in choices {
        credit[i] += w;
        if best.is_none_or(|b: usize| credit[i] > credit[b]) {
            best = Some(i);
        }
    }
    let best = best.expect("at least one choice");
    credit[best] -= total;
    best
}
