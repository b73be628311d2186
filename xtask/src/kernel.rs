use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct KernelArgs {}

pub fn build(_args: &KernelArgs) -> Result<PathBuf> {
    anyhow::bail!("not yet")
}
