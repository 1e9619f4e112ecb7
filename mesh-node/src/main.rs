use std::process::ExitCode;

use clap::Parser;
use hyper::Method;
use mesh_node::{
    api,
    config::{Cli, Command, Config, EXIT_BAD_CONFIG, WorkloadAction},
};
use nodemesh_api::workload::WorkloadSpec;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    nodemesh_api::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => match Config::from_args(args, mesh_node::cgroup2_mount) {
            Ok(config) => runtime.block_on(mesh_node::run::run(config)),
            Err(errors) => {
                eprintln!("mesh-node: bad configuration:");
                for e in errors {
                    eprintln!("  - {e}");
                }
                return ExitCode::from(EXIT_BAD_CONFIG as u8);
            }
        },
        Command::Precheck { cgroup_root, bpffs } => {
            let root = match cgroup_root.map_or_else(mesh_node::cgroup2_mount, Ok) {
                Ok(root) => root,
                Err(e) => {
                    eprintln!("mesh-node precheck: --cgroup-root not given and {e}");
                    return ExitCode::FAILURE;
                }
            };
            let checks = runtime.block_on(mesh_node::precheck::run(&root, &bpffs));
            return ExitCode::from(mesh_node::precheck::report(&root, &bpffs, &checks));
        }
        Command::Uninstall { bpf_pin_dir } => match mesh_node::capture::uninstall(&bpf_pin_dir) {
            Ok(true) => {
                println!("capture removed from {}: meshed pods connect directly", bpf_pin_dir.display());
                return ExitCode::SUCCESS;
            }
            Ok(false) => {
                println!("no capture pinned at {}", bpf_pin_dir.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("mesh-node uninstall: {e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Workload { api_socket, action } => runtime.block_on(async {
            let (method, path, body) = match action {
                WorkloadAction::List => (Method::GET, "/v1/workloads".to_string(), None),
                WorkloadAction::Remove { key } => (Method::DELETE, format!("/v1/workloads/{key}"), None),
                WorkloadAction::Add(a) => {
                    let spec = WorkloadSpec {
                        name: a.name,
                        namespace: a.namespace,
                        service_account: a.service_account,
                        cgroup: a.cgroup,
                        netns: a.netns,
                        ips: a.ips,
                        labels: a.labels.into_iter().collect(),
                        namespace_labels: a.namespace_labels.into_iter().collect(),
                    };
                    (Method::POST, "/v1/workloads".to_string(), Some(serde_json::to_vec(&spec)?))
                }
            };
            let out = api::client::call(&api_socket, method, &path, body).await?;
            if !out.is_empty() {
                println!("{out}");
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}
