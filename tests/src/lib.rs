//! End-to-end harness (see e2e/).
