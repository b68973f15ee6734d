//! `siptg gateway list|show|add|set|rm`: gateways through a running siptg's control API (the
//! Manager keeps them in its database; gateways of the config file are shown, not changed).

use siptg_control::admin;
use siptg_control::config::GatewayConfig;
use std::net::SocketAddr;

/// `siptg gateway …` actions.
#[derive(clap::Subcommand)]
pub enum GatewayCmd {
    /// Every gateway, with where it is defined.
    List,
    /// One gateway's settings (JSON).
    Show { name: String },
    /// Creates a gateway: a Telegram account and its SIP connections.
    Add {
        name: String,
        /// The Telegram account (`siptg storage list`).
        #[arg(long)]
        account: String,
        /// A SIP connection of the gateway (repeat for several).
        #[arg(long = "connection", required = true)]
        connections: Vec<String>,
        /// The Session Storage of the account (default: the Manager's only one).
        #[arg(long)]
        storage: Option<String>,
        /// Where a Telegram user's call rings on the PBX.
        #[arg(long)]
        pbx_number: Option<String>,
        /// A Telegram user allowed to reach the PBX (`+phone`, `@username`, `id:N`; repeat).
        #[arg(long = "allowed-caller")]
        allowed_callers: Vec<String>,
        /// Concurrent calls.
        #[arg(long, default_value_t = 10)]
        lines: u32,
    },
    /// Changes settings: `key=value` (`account`, `storage`, `pbx_number`, `lines`, `enabled`,
    /// `messages` (Telegram texts ⇄ SIP MESSAGE),
    /// `connections=a,b`, `allowed_callers=@x,+1…`, `caller_id=…|…`, `caller_name=…|…`,
    /// `max_call_duration=2h`, `monthly_duration=30h`, `failed_calls_per_hour=10`,
    /// `allowed_workers=worker-1,…`, `keypad_bot=ACCOUNT` (a bot of the Storage that puts a
    /// keypad into the chat during calls); an empty value or 0 lifts a limit).
    Set { name: String, changes: Vec<String> },
    /// Removes a gateway.
    Rm { name: String },
}

async fn gateways(admin: SocketAddr) -> Result<Vec<serde_json::Value>, String> {
    let body = admin::fetch(admin, "/gateways")
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("bad answer: {e}"))
}

async fn put(admin: SocketAddr, g: &GatewayConfig) -> Result<(), String> {
    let body = serde_json::to_string(g).map_err(|e| e.to_string())?;
    match admin::send(admin, "PUT", &format!("/gateways/{}", g.name), &body).await {
        Ok((200, _)) => Ok(()),
        Ok((_, msg)) => Err(msg.trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration setting (`"90s"`, `"30m"`, `"2h"`); empty or `0` is no limit.
fn duration(key: &str, v: &str, month: bool) -> Result<std::time::Duration, String> {
    use siptg_control::config::{parse_duration, parse_month_duration};
    if v.is_empty() || v == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let parse = if month {
        parse_month_duration
    } else {
        parse_duration
    };
    parse(v).map_err(|e| format!("{key}: {e}"))
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Runs a `siptg gateway` action against the admin endpoint `admin`.
pub async fn run(admin: SocketAddr, cmd: GatewayCmd) -> Result<(), String> {
    match cmd {
        GatewayCmd::List => {
            let all = gateways(admin).await?;
            if all.is_empty() {
                println!("no gateways (add one with `siptg gateway add NAME --account A --connection C`)");
            }
            for g in all {
                println!(
                    "{:<16} account {:<14} connections {:<20} lines {:<3} {}{}",
                    g["name"].as_str().unwrap_or("?"),
                    g["account"].as_str().unwrap_or("?"),
                    g["connections"]
                        .as_array()
                        .map(|c| c
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default(),
                    g["lines"],
                    g["source"].as_str().unwrap_or("?"),
                    if g["enabled"].as_bool() == Some(false) {
                        " (disabled)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        GatewayCmd::Show { name } => {
            let g = gateways(admin)
                .await?
                .into_iter()
                .find(|g| g["name"] == name.as_str())
                .ok_or_else(|| format!("no gateway {name:?}"))?;
            println!("{}", serde_json::to_string_pretty(&g).unwrap_or_default());
            Ok(())
        }
        GatewayCmd::Add {
            name,
            account,
            connections,
            storage,
            pbx_number,
            allowed_callers,
            lines,
        } => {
            let mut g: GatewayConfig = toml::from_str(&format!(
                "name = {name:?}\naccount = {account:?}\nconnections = []"
            ))
            .map_err(|e| e.to_string())?;
            g.connections = connections;
            g.storage = storage;
            g.pbx_number = pbx_number;
            g.allowed_callers = allowed_callers;
            g.lines = lines;
            put(admin, &g).await?;
            println!("gateway {name} saved");
            Ok(())
        }
        GatewayCmd::Set { name, changes } => {
            let mut current = gateways(admin)
                .await?
                .into_iter()
                .find(|g| g["name"] == name.as_str())
                .ok_or_else(|| format!("no gateway {name:?}"))?;
            // `source` is the list's annotation, not a setting.
            if let Some(o) = current.as_object_mut() {
                o.remove("source");
            }
            let mut g: GatewayConfig =
                serde_json::from_value(current).map_err(|e| e.to_string())?;
            for change in changes {
                let (k, v) = change
                    .split_once('=')
                    .ok_or_else(|| format!("{change:?}: want key=value"))?;
                match k.trim() {
                    "account" => g.account = v.into(),
                    "storage" => g.storage = (!v.is_empty()).then(|| v.into()),
                    "pbx_number" => g.pbx_number = (!v.is_empty()).then(|| v.into()),
                    "lines" => {
                        g.lines = v
                            .parse()
                            .map_err(|_| format!("lines: {v:?} is not a number"))?
                    }
                    "enabled" => {
                        g.enabled = v
                            .parse()
                            .map_err(|_| format!("enabled: {v:?} is not true/false"))?
                    }
                    "messages" => {
                        g.messages = v
                            .parse()
                            .map_err(|_| format!("messages: {v:?} is not true/false"))?
                    }
                    "connections" => g.connections = list(v),
                    "allowed_callers" => g.allowed_callers = list(v),
                    "caller_id" => g.caller_id = v.split('|').map(str::to_string).collect(),
                    "caller_name" => g.caller_name = v.split('|').map(str::to_string).collect(),
                    "max_call_duration" => g.max_call_duration = duration(k, v, false)?,
                    "monthly_duration" => g.monthly_duration = duration(k, v, true)?,
                    "failed_calls_per_hour" => {
                        g.failed_calls_per_hour = if v.is_empty() {
                            0
                        } else {
                            v.parse().map_err(|_| {
                                format!("failed_calls_per_hour: {v:?} is not a number")
                            })?
                        }
                    }
                    "allowed_workers" => g.allowed_workers = list(v),
                    "keypad_bot" => g.keypad_bot = (!v.is_empty()).then(|| v.into()),
                    other => return Err(format!("unknown setting {other:?}")),
                }
            }
            put(admin, &g).await?;
            println!("gateway {name} saved");
            Ok(())
        }
        GatewayCmd::Rm { name } => {
            match admin::send(admin, "DELETE", &format!("/gateways/{name}"), "").await {
                Ok((200, _)) => {
                    println!("gateway {name} removed");
                    Ok(())
                }
                Ok((_, msg)) => Err(msg.trim().to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}
