//! One module per subcommand: its clap arguments and one `run()` that turns
//! them into calls to the libraries. Nothing outside `cmd` imports from here.

pub mod audit;
pub mod collector;
pub mod key;
pub mod limits;
#[cfg(feature = "mock")]
pub mod mock;
pub mod package;
pub mod policy;
pub mod prices;
pub mod quota;
pub mod run;
pub mod usage;
