//! What a request costs: the price of every class the providers bill, the
//! multipliers of the tier and region the response says served it, and the
//! sum. Token prices are USD per million tokens and web searches USD per
//! 1,000, as the providers publish them (`docs/metering.md` has the sources
//! and a worked example per class).
//!
//! The rule, written once ([`Price::quote`]):
//! 1. Above `long_context.above_input_tokens` of prompt (input + cache
//!    writes + cache reads) the long-context prices apply to the *whole*
//!    request, every token class.
//! 2. Token costs are multiplied by the `tiers` entry of the response's
//!    `service_tier` and the `regions` entry of its `inference_geo` (1 when
//!    the response names none or the price lists none).
//! 3. Web searches are added at their own price, never multiplied.
//!
//! [`table`] is the price table Tollgate ships, used for models the policy
//! does not price.

pub mod table;

use crate::usage::Usage;

/// USD per million tokens of each token class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub input: f64,
    pub output: f64,
    /// 5-minute cache writes (and writes whose lifetime is not reported).
    pub cache_write: f64,
    pub cache_write_1h: f64,
    pub cache_read: f64,
}

impl Rates {
    /// USD for the token classes of a usage at these rates.
    pub fn cost(&self, u: &Usage) -> f64 {
        (u.input as f64 * self.input
            + u.output as f64 * self.output
            + u.cache_write as f64 * self.cache_write
            + u.cache_write_1h as f64 * self.cache_write_1h
            + u.cache_read as f64 * self.cache_read)
            / 1_000_000.0
    }
}

/// Prices for the whole request once its prompt passes a size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongContext {
    /// Strictly more prompt tokens than this (input + cache writes + cache
    /// reads) switch every class to `rates`.
    pub above_input_tokens: u64,
    pub rates: Rates,
}

/// The price of one model: base rates, web searches, long context and the
/// multipliers by served tier and region.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_write: f64,
    pub cache_write_1h: f64,
    pub cache_read: f64,
    /// USD per 1,000 web searches.
    pub web_search_per_thousand: f64,
    pub long_context: Option<LongContext>,
    /// Multiplier of token costs by the `service_tier` the response reports.
    pub tiers: Vec<(String, f64)>,
    /// Multiplier of token costs by the `inference_geo` the response reports.
    pub regions: Vec<(String, f64)>,
}

/// What a usage costs at a price, and what decided it (for the audit record).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quote {
    pub usd: f64,
    /// The long-context rates applied.
    pub long_context: bool,
    /// Tier × region multiplier applied to the token classes.
    pub multiplier: f64,
}

impl Price {
    /// A price with only token rates (no long context, no multipliers) and
    /// the providers' published web-search price.
    pub fn from_rates(r: Rates) -> Price {
        Price {
            input: r.input,
            output: r.output,
            cache_write: r.cache_write,
            cache_write_1h: r.cache_write_1h,
            cache_read: r.cache_read,
            web_search_per_thousand: DEFAULT_WEB_SEARCH_PER_THOUSAND,
            long_context: None,
            tiers: Vec::new(),
            regions: Vec::new(),
        }
    }

    pub fn rates(&self) -> Rates {
        Rates {
            input: self.input,
            output: self.output,
            cache_write: self.cache_write,
            cache_write_1h: self.cache_write_1h,
            cache_read: self.cache_read,
        }
    }

    /// USD for a usage at this price.
    pub fn cost(&self, u: &Usage) -> f64 {
        self.quote(u).usd
    }

    /// The cost of a usage and what priced it (see the module's rule).
    pub fn quote(&self, u: &Usage) -> Quote {
        let long = self
            .long_context
            .filter(|l| u.prompt() > l.above_input_tokens);
        let rates = long.map_or_else(|| self.rates(), |l| l.rates);
        let multiplier = factor(&self.tiers, u.service_tier.as_deref())
            * factor(&self.regions, u.inference_geo.as_deref());
        let searches = u.web_search_requests as f64 * self.web_search_per_thousand / 1_000.0;
        Quote {
            usd: rates.cost(u) * multiplier + searches,
            long_context: long.is_some(),
            multiplier,
        }
    }
}

/// USD per 1,000 web searches when a price does not say: both Anthropic and
/// OpenAI publish $10 (`docs/metering.md`).
pub const DEFAULT_WEB_SEARCH_PER_THOUSAND: f64 = 10.0;

/// The multiplier a list gives a reported value; 1 for none or unlisted.
fn factor(list: &[(String, f64)], reported: Option<&str>) -> f64 {
    reported
        .and_then(|r| list.iter().find(|(name, _)| name == r))
        .map_or(1.0, |(_, m)| *m)
}

#[cfg(test)]
mod tests;
