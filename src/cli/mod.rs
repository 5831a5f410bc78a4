//! The `gbc` command line: argument definitions ([`args`]), one module per command group, and the
//! error and exit-code policy. This is the only module that prints to users.
//!
//! Exit codes: 0 success; 1 a check failed (the input was read but is invalid: a bad derivation,
//! NAR or narinfo, a mismatching path, a missing or untrusted signature); 2 a usage or I/O error.
//! Every error is one line: `gbc: error: <file>: <what is wrong>`.

mod agent;
pub mod args;
mod client;
mod coordinator;
mod demo;
mod drv;
mod keys;
mod machines;
mod man;
mod nar;
mod offload;
mod realise;
mod remote;
mod upload;

use std::io::{self, Write as _};
use std::process::ExitCode;

use clap::Parser as _;

use args::{CacheCommand, Cli, Command, DrvCommand, HooksCommand, MachinesCommand, NarCommand};

/// An error that means a check failed (exit 1) rather than a usage or I/O problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

/// Wrap a format error about `what` (usually a file name) as a failed check.
pub(crate) fn check_failed(what: impl std::fmt::Display, err: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(CheckFailed(format!("{what}: {err}")))
}

/// Standard output as a plain file, for bulk binary output: std's `Stdout` is line-buffered, which
/// splits every write of binary data at its last newline into several system calls. When it is a
/// pipe, the pipe is grown to 1 MiB: with the default 64 KiB, writer and reader take turns sixteen
/// times as often, which costs more than the copying on a busy machine.
pub(crate) fn raw_stdout() -> io::Result<std::fs::File> {
    let stdout = io::stdout();
    stdout.lock().flush()?;
    let fd = rustix::io::dup(&stdout)?;
    let is_pipe = rustix::fs::fstat(&fd)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo);
    if is_pipe {
        let _ = rustix::pipe::fcntl_setpipe_size(&fd, 1 << 20);
    }
    Ok(std::fs::File::from(fd))
}

/// Print a warning on stderr.
pub(crate) fn warn(msg: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "gbc: warning: {msg}");
}

/// Entry point of the `gbc` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            e.exit()
        }
        Err(e) => {
            // One line, as every error: clap's message without its advice line.
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            let line = line.join(" ");
            let _ = writeln!(io::stderr(), "gbc: {line}");
            return ExitCode::from(2);
        }
    };
    // The sandbox stages report through their exit code and error file, not through the CLI's errors.
    match &cli.command {
        Command::Sandbox { spec } => return crate::build::sandbox::stage1(spec),
        Command::SandboxInit { spec } => return crate::build::sandbox::stage2(spec),
        _ => {}
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if err.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
            {
                return ExitCode::SUCCESS;
            }
            let line = format!("{err:#}").replace('\n', " ");
            let _ = writeln!(io::stderr(), "gbc: error: {line}");
            let check = err.chain().any(|c| c.is::<CheckFailed>());
            ExitCode::from(if check { 1 } else { 2 })
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Nar { command } => match command {
            NarCommand::Dump { path } => nar::dump(&path),
            NarCommand::Restore { dest } => nar::restore(&dest),
            NarCommand::Hash { path } => nar::hash(&path),
        },
        Command::Drv { command } => match command {
            DrvCommand::Show { file } => drv::show(&file),
            DrvCommand::Path { file } => drv::path(&file),
        },
        Command::Keygen { format, args } => keys::keygen(format, &args),
        Command::Sign { key, host, narinfo } => keys::sign(&key, host, &narinfo),
        Command::Verify { trusted, narinfo } => keys::verify(&trusted, &narinfo),
        Command::Realise { file, store_root, cores, max_silent_time, timeout, sandbox_paths } => realise::run(
            &file,
            &realise::Options { store_root, cores, max_silent: max_silent_time, timeout, sandbox_paths },
        ),
        Command::Agent(opts) => agent::run(opts),
        Command::Coordinator(opts) => coordinator::run(*opts),
        Command::Cache { command: CacheCommand::PublicKey { state_dir, signing_key, format } } => match format {
            args::KeyFormat::Nix => keys::cache_public_key(state_dir, signing_key),
            args::KeyFormat::Guix => keys::cache_guix_public_key(state_dir, signing_key),
        },
        Command::Cache { command: CacheCommand::Gc { keep_since, client } } => client::cache_gc(&client, keep_since),
        Command::CheckConfig { file, state_dir } => machines::check_config(file, state_dir),
        Command::Submit { submit, json, client } => client::submit(&client, &submit, json),
        Command::Watch { json, uuids, client } => client::watch(&client, uuids, json),
        Command::Build { submit, json, wait_for_machine, client } => {
            client::build(&client, &submit, json, wait_for_machine)
        }
        Command::Builds { state, tags, limit, json, client } => client::builds(&client, state, tags, limit, json),
        Command::Show { uuid, json, client } => client::show(&client, &uuid, json),
        Command::Log { uuid, attempt, no_follow, client } => client::log(&client, &uuid, attempt, no_follow),
        Command::Cancel { uuids, client } => client::cancel(&client, &uuids),
        Command::Machines { command: None, json, client } => client::machines(&client, json),
        Command::Hooks { command: None, json, client } => client::hooks(&client, json),
        Command::Hooks { command: Some(HooksCommand::Retry { name, client }), .. } => {
            client::hooks_retry(&client, &name)
        }
        Command::Machines { command: Some(MachinesCommand::Test { name, machines, state_dir }), .. } => {
            machines::test(machines, state_dir, name)
        }
        Command::Machines { command: Some(MachinesCommand::Fetch { name, path, machines, state_dir }), .. } => {
            machines::fetch(machines, state_dir, &name, &path)
        }
        Command::Offload { daemon: args::OffloadDaemon::Nix { verbosity: _, postpone, client } } => {
            let postpone = postpone || std::env::var_os("GBC_OFFLOAD_POSTPONE").is_some_and(|v| v == "1");
            return offload::nix(&client, postpone).map(|code| ExitCode::from(code as u8));
        }
        Command::Offload { daemon: args::OffloadDaemon::Guix { import, postpone, client, .. } } => {
            let postpone = postpone || std::env::var_os("GBC_OFFLOAD_POSTPONE").is_some_and(|v| v == "1");
            let import = import.or_else(|| std::env::var_os("GBC_GUIX_IMPORT").map(std::path::PathBuf::from));
            let opts = offload::GuixOpts { import, postpone };
            return offload::guix(&client, &opts).map(|code| ExitCode::from(code as u8));
        }
        Command::Stats { reset, client } => client::stats(&client, reset),
        Command::Demo => demo::run(),
        Command::Sandbox { .. } | Command::SandboxInit { .. } => Ok(()),
        Command::GenerateMan { dir } => man::generate(&dir),
    }
    .map(|()| ExitCode::SUCCESS)
}
