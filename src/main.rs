//! The `replhub` binary: parse the command line, set up logging, run the subcommand
//! (see [`cli`]). Everything else lives in the library.
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
