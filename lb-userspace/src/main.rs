//! `lbctl`: runs the controller (`lbctl up`) and talks to it over its gRPC
//! API (every other subcommand), or attaches the decap program on a backend
//! host (`lbctl decap`). Each command group lives in its own module of `cli/`.

mod cli;

fn main() {
    let cli = <cli::Cli as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    if let Err(e) = runtime.block_on(cli::run(cli)) {
        eprintln!("error: {}", cli::error_text(&e));
        std::process::exit(1);
    }
}
