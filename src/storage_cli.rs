//! `siptg storage login|logout|list` (accounts of the Session Storage, on its database) and
//! `siptg tgsim` (the simulated Telegram cloud on its own).

use siptg_control::config::Loaded;
use siptg_control::storage::open_accounts;
use siptg_control::store::Store;
use siptg_control::telegram::account::LoginStep;
use siptg_control::telegram::accounts::Accounts;
use siptg_control::tgsim::{load_world, TgSim};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `siptg storage …` actions.
#[derive(clap::Subcommand)]
pub enum StorageCmd {
    /// Log a Telegram account in: phone → code → 2FA password, or --qr; a bot (a gateway's
    /// `keypad_bot`) with --bot-token.
    Login {
        /// The account's name in this Storage (used by gateways).
        name: String,
        /// International phone number, e.g. +79991234567.
        #[arg(long, required_unless_present_any = ["qr", "bot_token"])]
        phone: Option<String>,
        /// Log a bot in with the token @BotFather gave (`<id>:<secret>`; prefer
        /// SIPTG_BOT_TOKEN to keep it out of shell history).
        #[arg(long, env = "SIPTG_BOT_TOKEN", hide_env_values = true, conflicts_with_all = ["phone", "qr"])]
        bot_token: Option<String>,
        /// The login code (asked on the terminal when missing).
        #[arg(long)]
        code: Option<String>,
        /// The 2FA password, if the account has one (asked when missing; prefer
        /// SIPTG_2FA_PASSWORD to keep it out of shell history).
        #[arg(long, env = "SIPTG_2FA_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Log in by QR code instead: scan tg://login?token=… in an app (Settings → Devices).
        #[arg(long)]
        qr: bool,
    },
    /// Log an account out at Telegram and forget its session.
    Logout { name: String },
    /// List accounts and their states.
    List,
}

fn ask(prompt: &str) -> Result<String, String> {
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the terminal: {e}"))?;
    Ok(line.trim().to_string())
}

async fn accounts(loaded: &Loaded) -> Result<Arc<Accounts>, String> {
    let cfg = &loaded.config;
    let store = Store::open(&cfg.database, &loaded.base).await.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("already open") || msg.contains("lock") {
            format!("{msg}: a running siptg holds the database; stop it, or use PostgreSQL for shared state")
        } else {
            msg
        }
    })?;
    let scfg = cfg.storage.clone().unwrap_or_default();
    open_accounts(cfg, &scfg, &loaded.base, store).map_err(|e| e.to_string())
}

/// Runs a `siptg storage` action.
pub async fn run(loaded: Loaded, cmd: StorageCmd) -> Result<(), String> {
    let accounts = accounts(&loaded).await?;
    match cmd {
        StorageCmd::List => {
            let list = accounts.list().await.map_err(|e| e.to_string())?;
            if list.is_empty() {
                println!(
                    "no Telegram accounts (add one with `siptg storage login NAME --phone +…`)"
                );
            }
            for r in list {
                let who =
                    r.me.as_ref()
                        .map(|m| {
                            format!(
                                "{} {}{}",
                                if m.bot { "bot" } else { "user" },
                                m.user_id,
                                m.username
                                    .as_ref()
                                    .map(|u| format!(" @{u}"))
                                    .unwrap_or_default()
                            )
                        })
                        .unwrap_or_default();
                println!(
                    "{:<20} {:<11} {} {}",
                    r.name,
                    serde_json::to_value(r.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    r.phone.map(|p| format!("+{p}")).unwrap_or_default(),
                    who
                );
            }
            Ok(())
        }
        StorageCmd::Logout { name } => {
            // Connect first so Telegram is told (the session stops working there too).
            let _ = accounts.connect(&name).await;
            accounts.log_out(&name).await.map_err(|e| e.to_string())?;
            println!("{name}: logged out, session deleted");
            Ok(())
        }
        StorageCmd::Login {
            name,
            phone,
            code,
            password,
            qr,
            bot_token,
        } => {
            if let Some(token) = bot_token {
                let me = accounts
                    .bot_login(&name, &token)
                    .await
                    .map_err(|e| e.to_string())?;
                println!(
                    "{name}: logged in as bot {}{}",
                    me.user_id,
                    me.username.map(|u| format!(" @{u}")).unwrap_or_default()
                );
                return Ok(());
            }
            let step = if qr {
                let a = accounts.connect(&name).await.map_err(|e| e.to_string())?;
                let mut shown = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                loop {
                    let step = a.qr_login().await.map_err(|e| e.to_string())?;
                    match step {
                        LoginStep::QrToken { token, .. } => {
                            if token != shown {
                                use base64::Engine;
                                let t =
                                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token);
                                eprintln!("scan in a Telegram app (Settings → Devices → Link Desktop Device):\n  tg://login?token={t}");
                                shown = token;
                            }
                            if tokio::time::Instant::now() > deadline {
                                return Err(
                                    "QR login: nobody scanned the code within 5 minutes".into()
                                );
                            }
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        other => break other,
                    }
                }
            } else {
                let phone = phone.ok_or("--phone is required")?;
                let sent = accounts
                    .begin_phone_login(&name, &phone)
                    .await
                    .map_err(|e| e.to_string())?;
                let code = match code {
                    Some(c) => c,
                    None => ask("login code (sent to your Telegram apps): ")?,
                };
                let a = accounts.get(&name).map_err(|e| e.to_string())?;
                a.sign_in(&sent, &code).await.map_err(|e| e.to_string())?
            };
            let step = match step {
                LoginStep::PasswordNeeded { hint } => {
                    let pw = match password {
                        Some(p) => p,
                        None => ask(&format!(
                            "2FA password{}: ",
                            hint.map(|h| format!(" (hint: {h})")).unwrap_or_default()
                        ))?,
                    };
                    let a = accounts.get(&name).map_err(|e| e.to_string())?;
                    a.check_password(&pw).await.map_err(|e| e.to_string())?
                }
                other => other,
            };
            let report = accounts
                .finish_step(&name, &step)
                .await
                .map_err(|e| e.to_string())?;
            match step {
                LoginStep::Done(me) => {
                    println!(
                        "{name}: logged in as user {}{}",
                        me.user_id,
                        me.username.map(|u| format!(" @{u}")).unwrap_or_default()
                    );
                    if let Some(r) = report {
                        println!(
                            "  hygiene: calls disabled on {} other device(s); privacy set: {}",
                            r.devices_calls_disabled,
                            r.privacy_set.join(", ")
                        );
                    }
                    Ok(())
                }
                other => Err(format!("login did not finish: {other:?}")),
            }
        }
    }
}

/// `siptg tgsim`: the simulated Telegram cloud alone, until Ctrl-C.
pub async fn tgsim(listen: SocketAddr, world: Option<PathBuf>) -> Result<(), String> {
    let world = load_world(world.as_deref()).map_err(|e| e.to_string())?;
    let users = world.users.len();
    let sim = TgSim::start(world, listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!(
        "tgsim: simulated Telegram cloud on {} with {users} users",
        sim.addr()
    );
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}
