//! `lbctl`: runs the controller (`lbctl up`) and talks to it over its gRPC
//! API (every other subcommand), or attaches the decap program on a backend
//! host (`lbctl decap`). Each command group lives in its own module of `cli/`.

mod cli;

fn main() {
    let cli = <cli::Cli as clap::Parser>::parse();
    if !cli.is_controller() {
        // A reader that goes away (`lbctl stats | head`) ends the command
        // quietly, as for other Unix tools, instead of a panic on EPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    if let Err(e) = runtime.block_on(cli::run(cli)) {
        eprintln!("error: {}", cli::error_text(&e));
        std::process::exit(1);
    }
}
