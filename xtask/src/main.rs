//! Developer and CI entry points: `cargo xtask setup|build|test|package|...`.
//! Every command runs `setup` first; it is quick when nothing is missing.

mod bench;
mod demo;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and set up the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: nightly rust-src, bpf-linker,
    /// Debian packages; mount bpffs.
    Setup,
    /// Build the XDP objects and the userspace crates (release).
    Build,
    /// Run every test: unit tests, packet tests (BPF_PROG_TEST_RUN) and
    /// end-to-end tests in network namespaces. Needs root.
    Test {
        /// Extra arguments for `cargo test` (a test name filter, say).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks: per-packet cost against floors, Maglev builds, control
    /// latency, lab pps and HTTP rps against HAProxy. Prints a table.
    Bench {
        /// A shorter run (under 2 minutes once built).
        #[arg(long)]
        quick: bool,
        /// Also write every number to this JSON file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The offload checker: the offload flavor must pass the rules of the
    /// nfp XDP offload JIT, and the full balancer is shown refused.
    OffloadCheck,
    /// A Debian package of lbctl: target/lbctl_VERSION_ARCH.deb.
    Package,
    /// The demo: lab up, VIPs through lbctl, HTTP traffic, stats, a
    /// health-check failover, lab down.
    Demo,
    /// The lab: an edge site in network namespaces (client, router, two LB
    /// hosts, three backends) to experiment in.
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build lbctl and bring the lab up (it stays up until `lab down`).
    Up {
        /// Also run Prometheus in the router, scraping both LB hosts.
        #[arg(long)]
        with_prometheus: bool,
    },
    /// Remove every namespace, process and pin of the lab.
    Down,
    /// What of the lab is running.
    Status,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    setup::setup(&root)?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Build => step("build (eBPF objects and userspace, release)", || {
            run(Command::new("cargo").current_dir(&root).args(["build", "--workspace", "--release"]))?;
            Ok("done".into())
        })
        .map(|_| ()),
        Cmd::Bench { quick, json } => bench::bench(&root, quick, json.as_deref()),
        Cmd::Demo => {
            let lbctl = build_lbctl(&root)?;
            demo::demo(&root, &lbctl)
        }
        Cmd::Lab { command } => match command {
            LabCmd::Up { with_prometheus } => {
                let lbctl = build_lbctl(&root)?;
                step("lab up", || {
                    let lab = lb_lab::Lab::up(&lbctl, &mut lb_lab::print_step)?;
                    if with_prometheus {
                        let url = lab.start_prometheus()?;
                        println!(
                            "    Prometheus at {url}, scraping lb1 and lb2 every second: \
                             `ip netns exec lbl-client curl '{url}/api/v1/query?query=up'`"
                        );
                    }
                    lab.keep();
                    Ok("up: try `ip netns exec lbl-client curl http://203.0.113.10/`".into())
                })?;
                print!("{}", lb_lab::Lab::status()?);
                Ok(())
            }
            LabCmd::Down => step("lab down", || lb_lab::Lab::down().map(|()| "down".into())).map(|_| ()),
            LabCmd::Status => {
                print!("{}", lb_lab::Lab::status()?);
                Ok(())
            }
        },
        Cmd::Test { args } => {
            offload_check(&root)?;
            package::check(&root)?;
            // One test binary at a time; inside one, tests run in parallel.
            run(Command::new("cargo").current_dir(&root).args(["test", "--workspace"]).arg("--").args(&args))
        }
        Cmd::OffloadCheck => offload_check(&root),
        Cmd::Package => package::package(&root).map(|_| ()),
    }
}

/// `lbctl offload-check` on the flavor (must pass) and on the full
/// balancer (must be refused: the checker is not one that passes all).
fn offload_check(root: &Path) -> Result<()> {
    let lbctl = |object: &str| {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root).args([
            "run",
            "-q",
            "-p",
            "lb-userspace",
            "--bin",
            "lbctl",
            "--",
            "offload-check",
            object,
        ]);
        cmd
    };
    step("offload check: the offload flavor", || {
        run(&mut lbctl("offload"))?;
        Ok("offloadable".into())
    })?;
    step("offload check: the full balancer (must be refused)", || {
        let status = lbctl("balancer").status()?;
        anyhow::ensure!(!status.success(), "the checker passed the full balancer: it checks nothing");
        Ok("refused, as it must be".into())
    })?;
    Ok(())
}

/// Builds the release `lbctl` and returns its path.
fn build_lbctl(root: &Path) -> Result<PathBuf> {
    step("build lbctl (release)", || {
        run(Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "--bin",
            "lbctl",
        ]))?;
        Ok("done".into())
    })?;
    Ok(root.join("target/release/lbctl"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs one named step, printing its name, outcome and duration.
pub fn step(name: &str, f: impl FnOnce() -> Result<String>) -> Result<String> {
    println!("==> {name}");
    let start = Instant::now();
    let outcome = f().with_context(|| format!("step '{name}' failed"))?;
    println!("    {outcome} ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(outcome)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn capture(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot start {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}
