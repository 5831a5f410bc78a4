fn main() -> std::process::ExitCode {
    gbc::cli::main()
}
