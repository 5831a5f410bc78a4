//! Man pages generated from the clap definitions: `gbc.1` and one page per subcommand.

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::args::Cli;

pub fn generate(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    write_pages(&Cli::command(), "", dir)
}

fn write_pages(cmd: &clap::Command, prefix: &str, dir: &Path) -> anyhow::Result<()> {
    let name = if prefix.is_empty() { cmd.get_name().to_owned() } else { format!("{prefix}-{}", cmd.get_name()) };
    let page = cmd.clone().name(name.clone()).bin_name(name.replace('-', " "));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    let file = dir.join(format!("{name}.1"));
    fs::write(&file, out).with_context(|| format!("{}", file.display()))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, &name, dir)?;
    }
    Ok(())
}
