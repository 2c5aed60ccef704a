//! What a request costs: the price of each token class and the sum.
//! Prices are USD per million tokens, as the providers publish them.

use crate::usage::Usage;

/// USD per million tokens of each class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_write: f64,
    pub cache_read: f64,
}

impl Price {
    /// USD for a usage at this price.
    pub fn cost(&self, u: &Usage) -> f64 {
        (u.input as f64 * self.input
            + u.output as f64 * self.output
            + u.cache_write as f64 * self.cache_write
            + u.cache_read as f64 * self.cache_read)
            / 1_000_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_sums_every_class_at_its_own_price() {
        let sonnet = Price {
            input: 3.0,
            output: 15.0,
            cache_write: 3.75,
            cache_read: 0.3,
        };
        let u = Usage {
            input: 1_000,
            output: 2_000,
            cache_write: 10_000,
            cache_read: 100_000,
        };
        // 0.003 + 0.030 + 0.0375 + 0.030
        assert!((sonnet.cost(&u) - 0.1005).abs() < 1e-12);
    }
}
