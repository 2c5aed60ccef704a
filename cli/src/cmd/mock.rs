//! `tollgate mock`: the mock provider on its own (cargo feature `mock`).

use crate::output::status;
use crate::shutdown;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use tollgate_mock::{MockConfig, DEFAULT_ADMIN_KEY, DEFAULT_ANTHROPIC_KEY, DEFAULT_OPENAI_KEY};

#[derive(clap::Args, Debug)]
pub struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:9612")]
    pub listen: SocketAddr,
    /// The x-api-key the mock expects on Anthropic routes.
    #[arg(long, default_value = DEFAULT_ANTHROPIC_KEY)]
    pub anthropic_key: String,
    /// The bearer token the mock expects on OpenAI routes.
    #[arg(long, default_value = DEFAULT_OPENAI_KEY)]
    pub openai_key: String,
    /// The admin key the mock's Admin API (Rate Limits) expects.
    #[arg(long, default_value = DEFAULT_ADMIN_KEY)]
    pub admin_key: String,
    /// Delay between streamed events.
    #[arg(long, default_value_t = 20)]
    pub event_delay_ms: u64,
}

pub fn run(args: MockArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        status(format_args!(
            "mock provider listening on {}",
            listener.local_addr()?
        ));
        let config = MockConfig {
            anthropic_key: args.anthropic_key,
            failover_anthropic_keys: Vec::new(),
            openai_key: args.openai_key,
            admin_key: args.admin_key,
            event_delay_ms: args.event_delay_ms,
        };
        tollgate_mock::serve(listener, config, shutdown::signal()).await
    })
}
