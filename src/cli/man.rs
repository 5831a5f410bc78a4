//! Man pages generated from the clap definitions: `gbc.1` and one page per subcommand; and
//! machines.ron(5) and coordinator.ron(5), written by hand, with the example files included.

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::args::Cli;

pub fn generate(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    write_pages(&Cli::command(), "", dir)?;
    let pages = [
        ("machines.ron.5", include_str!("machines.ron.5.in"), include_str!("../../machines.example.ron")),
        ("coordinator.ron.5", include_str!("coordinator.ron.5.in"), include_str!("../../coordinator.example.ron")),
    ];
    for (name, page, example) in pages {
        let file = dir.join(name);
        fs::write(&file, file_page(page, example)).with_context(|| format!("{}", file.display()))?;
    }
    Ok(())
}

/// A hand-written page of a file format with its example file included, so that it can't go stale.
fn file_page(page: &str, example: &str) -> String {
    // In roff, a line starting with `.` or `'` is a request, and `\` starts an escape.
    let example: String = example
        .lines()
        .map(|l| {
            let l = l.replace('\\', "\\e");
            if l.starts_with('.') || l.starts_with('\'') { format!("\\&{l}") } else { l }
        })
        .collect::<Vec<_>>()
        .join("\n");
    page.replace("@VERSION@", env!("CARGO_PKG_VERSION")).replace("@EXAMPLE@", &example)
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
