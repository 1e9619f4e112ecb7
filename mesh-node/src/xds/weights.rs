//! Smooth weighted round robin (the nginx algorithm), shared by HTTP routes (per request) and
//! tcp/tls routes (per connection): a 90/10 split is exactly 90/10 over every 100 picks and
//! interleaved (at most 9 in a row to the larger side), not 90/10 on average.

use std::sync::Mutex;

pub struct SmoothWeights {
    weights: Vec<u32>,
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
        let mut credit = self.credit.lock().expect("weights lock");
        let mut best = 0;
        for (i, w) in self.weights.iter().enumerate() {
            credit[i] += i64::from(*w);
            if credit[i] > credit[best] {
                best = i;
            }
        }
        credit[best] -= self.total as i64;
        best
    }
}
