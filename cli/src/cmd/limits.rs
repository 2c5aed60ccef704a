//! `tollgate limits pull`: the provider's own limits (Anthropic's Rate
//! Limits API) written as provider pools into a file the policy includes.

use crate::output::status;
use crate::provider_limits::{self, Source, Written};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct LimitsArgs {
    #[command(subcommand)]
    command: LimitsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum LimitsCommand {
    /// Read the organization's rate limits (and a workspace's overrides) with the Admin API key in
    /// ANTHROPIC_ADMIN_KEY, and write them as provider pools for the policy to include
    /// (`"include": ["provider-limits.json"]`).
    Pull {
        #[command(flatten)]
        api: AdminApiArgs,
        /// The file to write (only when a limit changed).
        #[arg(long, default_value = "provider-limits.json")]
        out: PathBuf,
    },
}

/// Where the Rate Limits API is; shared with `tollgate run --provider-limits-refresh`.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminApiArgs {
    /// Base URL of the Admin API.
    #[arg(long, default_value = "https://api.anthropic.com")]
    pub admin_url: String,
    /// Merge this workspace's overrides over the organization's limits (a limit the workspace
    /// does not override is the organization's).
    #[arg(long)]
    pub workspace: Option<String>,
    /// Entries per page of the API (1 to 1000); default: the API's single page.
    #[arg(long)]
    pub page_size: Option<u32>,
}

impl AdminApiArgs {
    pub fn source(&self) -> Result<Source> {
        Source::from_env(&self.admin_url, self.workspace.clone(), self.page_size)
    }
}

pub fn run(args: LimitsArgs) -> Result<()> {
    match args.command {
        LimitsCommand::Pull { api, out } => {
            let source = api.source()?;
            let rt = tokio::runtime::Runtime::new()?;
            let pulled = rt.block_on(provider_limits::pull(&source))?;
            let written = provider_limits::write(&out, &provider_limits::render(&pulled))?;
            status(format_args!(
                "{} {}: {}",
                match written {
                    Written::Changed => "wrote",
                    Written::Unchanged => "unchanged",
                },
                out.display(),
                provider_limits::summary(&pulled, &source)
            ));
            Ok(())
        }
    }
}
