//! The `gbc` command line.
