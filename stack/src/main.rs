//! `agent-fleet` — deploy, diff, destroy and inspect an agent-fleet stack.

use agent_fleet::cfn::{self, Pace};
use agent_fleet::config::{Sources, StackConfig};
use agent_fleet::{ami, status, token, vars};
use clap::{Parser, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Deploys and operates a fleet of Semaphore self-hosted agents on EC2.
///
/// Configuration comes from the same SEMAPHORE_* variables as Semaphore's agent-aws-stack,
/// or from the JSON file named by SEMAPHORE_AGENT_STACK_CONFIG (the environment wins).
/// AWS credentials and region come from the usual AWS environment and profiles.
#[derive(Parser, Debug)]
#[command(name = "agent-fleet", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How often to poll AWS while waiting, in milliseconds.
    #[arg(long, global = true, default_value_t = 2000, hide = true)]
    poll_interval_ms: u64,
    /// Quiet time before a progress line while waiting, in seconds.
    #[arg(long, global = true, default_value_t = 15, hide = true)]
    progress_secs: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates or updates the stack through a change set, following it to the end.
    Deploy,
    /// Shows what a deploy would change (added, modified, replaced, removed) and changes nothing.
    Diff,
    /// Deletes the stack and the leader-lease parameters; asks for the stack name back.
    Destroy {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Groups, instances (state, age), leader and term, last scaling decision, jobs.
    Status,
    /// The registration token.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The AMI: build it with Packer and record it where stacks look it up.
    Ami {
        #[command(subcommand)]
        command: AmiCommand,
    },
    /// Checks the configuration and prints the parameters a deploy would use.
    Check,
    /// The configuration variables.
    Vars {
        /// As the README's Markdown table.
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AmiCommand {
    /// Runs `packer build` for one OS and arch, then records the new AMI in
    /// /agent-fleet/ami/<os>/<arch>, which stacks resolve at every launch (no redeploy).
    Build {
        /// ubuntu-noble or ubuntu-jammy (default: SEMAPHORE_AGENT_OS, else ubuntu-noble).
        #[arg(long)]
        os: Option<String>,
        /// x86_64 or arm64 (default: SEMAPHORE_AGENT_ARCH, else x86_64).
        #[arg(long)]
        arch: Option<String>,
        /// Extra template variable, NAME=VALUE (repeatable), e.g. agent_version=v2.3.0.
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// The Packer template: a file or a folder of them.
        #[arg(long, default_value_os_t = ami::default_template())]
        template: PathBuf,
        #[arg(long, default_value = "packer")]
        packer: PathBuf,
    },
    /// Records an existing AMI for one OS and arch.
    Record {
        #[arg(long)]
        os: Option<String>,
        #[arg(long)]
        arch: Option<String>,
        /// ami-…
        ami: String,
    },
    /// Shows the recorded AMIs.
    Show,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Stores or rotates the token (read from stdin, never from arguments) as a
    /// SecureString named by SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME, encrypted with
    /// SEMAPHORE_AGENT_TOKEN_KMS_KEY.
    Set {
        /// Refused: a token on the command line lands in shell history and `ps`.
        #[arg(hide = true)]
        refused: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent-fleet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agent-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code for refused configuration (nothing was touched).
const BAD_CONFIG: u8 = 2;

fn load_config() -> Result<StackConfig, ExitCode> {
    let src = Sources::from_process_env();
    match StackConfig::load(&src) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            Ok(cfg)
        }
        Err(problems) => {
            for w in &src.warnings {
                eprintln!("warning: {w}");
            }
            eprint!("agent-fleet: {problems}");
            Err(ExitCode::from(BAD_CONFIG))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let pace = Pace {
        poll: Duration::from_millis(cli.poll_interval_ms.max(50)),
        progress_every: Duration::from_secs(cli.progress_secs.max(1)),
    };
    let mut out = std::io::stdout();
    match cli.command {
        Command::Vars { markdown } => {
            if markdown {
                print!("{}", vars::markdown_table());
            } else {
                for v in vars::VARS {
                    println!(
                        "{:<55} {}",
                        v.name,
                        v.default
                            .map_or("(unset)".to_string(), |d| format!("default {d}"))
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ami { command } => {
            let env_or = |v: Option<String>, var: &str, default: &str| {
                v.or_else(|| std::env::var(var).ok().filter(|s| !s.is_empty()))
                    .unwrap_or_else(|| default.to_string())
            };
            let sdk = agent_fleet::sdk_config().await?;
            let ssm = aws_sdk_ssm::Client::new(&sdk);
            let (os, arch, id) = match command {
                AmiCommand::Show => {
                    ami::show(&ssm, &mut out).await?;
                    return Ok(ExitCode::SUCCESS);
                }
                AmiCommand::Record { os, arch, ami: id } => (
                    env_or(os, "SEMAPHORE_AGENT_OS", "ubuntu-noble"),
                    env_or(arch, "SEMAPHORE_AGENT_ARCH", "x86_64"),
                    id,
                ),
                AmiCommand::Build {
                    os,
                    arch,
                    vars,
                    template,
                    packer,
                } => {
                    let os = env_or(os, "SEMAPHORE_AGENT_OS", "ubuntu-noble");
                    let arch = env_or(arch, "SEMAPHORE_AGENT_ARCH", "x86_64");
                    let region = sdk
                        .region()
                        .map(|r| r.as_ref().to_string())
                        .unwrap_or_default();
                    let manifest = std::env::temp_dir().join(format!(
                        "agent-fleet-packer-manifest-{}.json",
                        std::process::id()
                    ));
                    let build = ami::Build {
                        packer,
                        template,
                        os: os.clone(),
                        arch: arch.clone(),
                        region,
                        vars,
                        manifest: manifest.clone(),
                    };
                    println!(
                        "building the {os} {arch} AMI with Packer (this takes 15-30 minutes) …"
                    );
                    let id = build.run().await;
                    let _ = std::fs::remove_file(&manifest);
                    (os, arch, id?)
                }
            };
            ami::check_target(&os, &arch)?;
            let version = ami::record(&ssm, &os, &arch, &id).await?;
            println!(
                "recorded {id} in {} (version {version}); stacks with SEMAPHORE_AGENT_OS={os} SEMAPHORE_AGENT_ARCH={arch} and no SEMAPHORE_AGENT_AMI launch it from now on",
                ami::parameter(&os, &arch)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let cfg = match load_config() {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            println!("stack {}: configuration is valid", cfg.stack_name);
            for (k, v) in &cfg.parameters {
                println!("  {k} = {v}");
            }
            for (k, v) in &cfg.tags {
                println!("  tag {k} = {v}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Deploy | Command::Diff => {
            let mut cfg = match load_config() {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let sdk = agent_fleet::sdk_config().await?;
            if !cfg.managed_policy_names.is_empty() {
                let me = aws_sdk_sts::Client::new(&sdk)
                    .get_caller_identity()
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot find the AWS account for SEMAPHORE_AGENT_MANAGED_POLICY_NAMES: {}",
                            agent_fleet::describe(&e)
                        )
                    })?;
                let arn = me.arn().unwrap_or_default();
                let partition = arn.split(':').nth(1).unwrap_or("aws").to_string();
                cfg.resolve_policies(&partition, me.account().unwrap_or_default());
            }
            let cf = aws_sdk_cloudformation::Client::new(&sdk);
            if matches!(cli.command, Command::Diff) {
                cfn::diff(&cf, &cfg, pace, &mut out).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let ssm = aws_sdk_ssm::Client::new(&sdk);
            status::require_token(&ssm, cfg.param("TokenParameterName")).await?;
            cfn::deploy(&cf, &cfg, pace, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Destroy { yes } => {
            let stack = match stack_name_only() {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            if !yes && !confirm(&stack)? {
                eprintln!("agent-fleet: not destroying {stack}");
                return Ok(ExitCode::FAILURE);
            }
            let sdk = agent_fleet::sdk_config().await?;
            let cf = aws_sdk_cloudformation::Client::new(&sdk);
            let ssm = aws_sdk_ssm::Client::new(&sdk);
            cfn::destroy(&cf, &ssm, &stack, pace, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let stack = match stack_name_only() {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let sdk = agent_fleet::sdk_config().await?;
            status::print(&sdk, &stack, &mut out).await?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::Set { refused },
        } => {
            if refused.is_some() {
                eprintln!("agent-fleet: the token is read from stdin, never from arguments (it would land in your shell history and in `ps`): run `agent-fleet token set < token.txt`, or `agent-fleet token set` and paste it at the prompt");
                return Ok(ExitCode::from(BAD_CONFIG));
            }
            let src = Sources::from_process_env();
            let mut problems = vec![];
            let mut get = |name: &str| -> Option<String> {
                let var = vars::lookup(name)?;
                match src.checked(var) {
                    Ok(v) => v.or(var.default).map(str::to_string),
                    Err(p) => {
                        problems.push(p.to_string());
                        None
                    }
                }
            };
            let name = get("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME");
            let key = get("SEMAPHORE_AGENT_TOKEN_KMS_KEY");
            if name.is_none() && problems.is_empty() {
                problems.push("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME: is required: set it to the SSM parameter name to store the token in, e.g. /semaphore/ci-agents/token".into());
            }
            let (Some(name), Some(key)) = (name, key) else {
                for p in problems {
                    eprintln!("agent-fleet: {p}");
                }
                return Ok(ExitCode::from(BAD_CONFIG));
            };
            let token = token::read_token_from_stdin()?;
            let sdk = agent_fleet::sdk_config().await?;
            let ssm = aws_sdk_ssm::Client::new(&sdk);
            let version = token::store(&ssm, &name, &key, &token).await?;
            drop(token);
            println!(
                "stored the registration token in {name} (SecureString, key {key}), version {version}"
            );
            if version > 1 {
                println!("rotated: running agents keep working; new instances and the scaler use the new token");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// For commands that need only the stack name.
fn stack_name_only() -> Result<String, ExitCode> {
    let src = Sources::from_process_env();
    let Some(var) = vars::lookup("SEMAPHORE_AGENT_STACK_NAME") else {
        return Err(ExitCode::FAILURE);
    };
    match src.checked(var) {
        Ok(Some(v)) => Ok(v.to_string()),
        Ok(None) => {
            eprintln!(
                "agent-fleet: SEMAPHORE_AGENT_STACK_NAME: is required: set it to the stack's name"
            );
            Err(ExitCode::from(BAD_CONFIG))
        }
        Err(p) => {
            eprintln!("agent-fleet: {p}");
            Err(ExitCode::from(BAD_CONFIG))
        }
    }
}

/// Asks for the stack name back.
fn confirm(stack: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    eprint!(
        "This deletes stack {stack}: its groups and their instances (each waits in its termination hook until its running job ends, up to the hook's limit), launch templates, roles and config.\nType the stack name to confirm: "
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    if !stdin.is_terminal() {
        eprintln!();
    }
    Ok(line.trim() == stack)
}
