//! The `forge` binary: everything lives in `forge-cli`.
fn main() {
    std::process::exit(forge_cli::run());
}
