//! Man pages generated from the clap definitions: `gbc.1` and one page per subcommand; and
//! machines.ron(5), written by hand, with the example file included.

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::args::Cli;

pub fn generate(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    write_pages(&Cli::command(), "", dir)?;
    let file = dir.join("machines.ron.5");
    fs::write(&file, machines_ron_5()).with_context(|| format!("{}", file.display()))
}

/// machines.ron(5): the hand-written page with the example file included, so that it can't go stale.
fn machines_ron_5() -> String {
    // In roff, a line starting with `.` or `'` is a request, and `\` starts an escape.
    let example: String = include_str!("../../machines.example.ron")
        .lines()
        .map(|l| {
            let l = l.replace('\\', "\\e");
            if l.starts_with('.') || l.starts_with('\'') { format!("\\&{l}") } else { l }
        })
        .collect::<Vec<_>>()
        .join("\n");
    include_str!("machines.ron.5.in").replace("@VERSION@", env!("CARGO_PKG_VERSION")).replace("@EXAMPLE@", &example)
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
