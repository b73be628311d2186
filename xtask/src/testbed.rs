use anyhow::Result;

#[derive(clap::Args)]
pub struct TestbedArgs {}

pub fn run(_args: &TestbedArgs) -> Result<i32> {
    anyhow::bail!("not yet")
}
