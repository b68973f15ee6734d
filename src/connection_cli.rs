//! `siptg connection list|show|add|set|reset-password|rm`: SIP connections through a running
//! siptg's control API. The Manager keeps them in its database and sends the ones a Worker
//! runs (outbound registrations, keep-alives) to it; connections of the config file are shown,
//! not changed. Settings are the config file's `[[connection]]` keys, written `key=value`.

use rand::Rng;
use siptg_control::admin;
use siptg_control::config::ConnectionConfig;
use std::net::SocketAddr;

/// `siptg connection …` actions.
#[derive(clap::Subcommand)]
pub enum ConnectionCmd {
    /// Every connection, with where it is defined (passwords hidden).
    List,
    /// One connection's settings (JSON, with its password).
    Show { name: String },
    /// Creates a connection of one of the three types: `pbx_registers` (the PBX registers to
    /// us; login defaults to the name and a password is made when none is given),
    /// `register_to_pbx` (we register to `server` with `login`/`password`), `ip` (a trunk at
    /// `server`). Further settings as `key=value` (e.g. `trusted_ips=10.0.0.0/24`,
    /// `codecs=PCMA,opus`, `dial_rules=^8=7`, `priority=2`, `dtmf=rfc2833,info`).
    Add {
        name: String,
        /// `pbx_registers`, `register_to_pbx` or `ip`.
        #[arg(long = "type")]
        kind: String,
        settings: Vec<String>,
    },
    /// Changes settings: `key=value`, keys as in `[[connection]]`; lists are comma-separated
    /// (`dial_rules` with `|`, as rules may hold commas); an empty value unsets an optional key.
    Set { name: String, changes: Vec<String> },
    /// Gives a `pbx_registers` connection a new random password and prints it (the PBX must
    /// then register with it).
    ResetPassword { name: String },
    /// Removes a connection (not while a gateway uses it).
    Rm { name: String },
}

async fn get(admin: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let body = admin::fetch(admin, path).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("bad answer: {e}"))
}

/// The saved settings of API connection `name`, as the config reads them.
async fn current(admin: SocketAddr, name: &str) -> Result<serde_json::Value, String> {
    let mut v = get(admin, &format!("/connections/{name}")).await?;
    if v["source"] == "config" {
        return Err(format!(
            "connection {name:?} is defined in the config file; change it there"
        ));
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("source");
    }
    Ok(v)
}

async fn put(admin: SocketAddr, name: &str, v: &serde_json::Value) -> Result<(), String> {
    let body = serde_json::to_string(v).map_err(|e| e.to_string())?;
    match admin::send(admin, "PUT", &format!("/connections/{name}"), &body).await {
        Ok((200, _)) => Ok(()),
        Ok((_, msg)) => Err(msg.trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Applies one `key=value` to a connection's JSON, typed by the value it replaces.
fn apply(v: &mut serde_json::Value, change: &str) -> Result<(), String> {
    use serde_json::Value;
    let (k, val) = change
        .split_once('=')
        .ok_or_else(|| format!("{change:?}: want key=value"))?;
    let key = k.trim().replace('-', "_");
    let Some(obj) = v.as_object_mut() else {
        return Err("bad connection JSON".into());
    };
    if key == "name" || key == "type" {
        return Err(format!(
            "{key} cannot be changed; add a new connection and remove this one"
        ));
    }
    let Some(old) = obj.get(&key) else {
        let mut keys: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !["name", "type"].contains(k))
            .collect();
        keys.sort_unstable();
        return Err(format!(
            "unknown setting {key:?} (settings: {})",
            keys.join(", ")
        ));
    };
    let new = match old {
        Value::Array(_) => {
            let sep = if key == "dial_rules" { '|' } else { ',' };
            Value::Array(
                val.split(sep)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            )
        }
        Value::Number(_) => Value::Number(
            val.trim()
                .parse::<u64>()
                .map_err(|_| format!("{key}: {val:?} is not a number"))?
                .into(),
        ),
        Value::Bool(_) => Value::Bool(
            val.trim()
                .parse()
                .map_err(|_| format!("{key}: {val:?} is not true/false"))?,
        ),
        // Optional keys are null when unset: an empty value unsets them again.
        _ if val.is_empty() && (old.is_null() || is_optional(&key)) => Value::Null,
        _ => Value::String(val.to_string()),
    };
    obj.insert(key, new);
    Ok(())
}

/// Keys that may be absent (`Option` in [`ConnectionConfig`]).
fn is_optional(key: &str) -> bool {
    [
        "login", "password", "server", "domain", "proxy", "header", "tls_ca", "worker",
    ]
    .contains(&key)
}

/// A password a PBX registers with: 20 letters and digits (~119 bits).
fn new_password() -> String {
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    (0..20)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

fn text(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Runs a `siptg connection` action against the admin endpoint `admin`.
pub async fn run(admin: SocketAddr, cmd: ConnectionCmd) -> Result<(), String> {
    match cmd {
        ConnectionCmd::List => {
            let all = get(admin, "/connections").await?;
            let all = all.as_array().cloned().unwrap_or_default();
            if all.is_empty() {
                println!(
                    "no connections (add one with `siptg connection add NAME --type pbx_registers`)"
                );
            }
            for c in all {
                let at = match text(&c["type"]) {
                    "pbx_registers" => format!("login {}", text(&c["login"])),
                    "register_to_pbx" => {
                        format!("{}@{}", text(&c["login"]), text(&c["server"]))
                    }
                    _ => format!("server {}", text(&c["server"])),
                };
                println!(
                    "{:<16} {:<16} {:<32} priority {:<3} {}",
                    text(&c["name"]),
                    text(&c["type"]),
                    at,
                    c["priority"],
                    text(&c["source"]),
                );
            }
            Ok(())
        }
        ConnectionCmd::Show { name } => {
            let c = get(admin, &format!("/connections/{name}")).await?;
            println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
            Ok(())
        }
        ConnectionCmd::Add {
            name,
            kind,
            settings,
        } => {
            // The config's defaults for every key not given.
            let base: ConnectionConfig =
                toml::from_str(&format!("name = {name:?}\ntype = {kind:?}")).map_err(|e| {
                    format!(
                        "--type {kind:?}: {}",
                        e.message().trim_end_matches('\n').replace('\n', " ")
                    )
                })?;
            let mut v = serde_json::to_value(&base).map_err(|e| e.to_string())?;
            for s in &settings {
                apply(&mut v, s)?;
            }
            let mut made_password = None;
            if kind == "pbx_registers" {
                if v["login"].is_null() {
                    v["login"] = serde_json::json!(name);
                }
                if v["password"].is_null() {
                    let p = new_password();
                    v["password"] = serde_json::json!(p);
                    made_password = Some(p);
                }
            }
            put(admin, &name, &v).await?;
            println!("connection {name} saved");
            if let Some(p) = made_password {
                println!(
                    "the PBX registers with login {} password {p}",
                    text(&v["login"])
                );
            }
            Ok(())
        }
        ConnectionCmd::Set { name, changes } => {
            let mut v = current(admin, &name).await?;
            for c in &changes {
                apply(&mut v, c)?;
            }
            put(admin, &name, &v).await?;
            println!("connection {name} saved");
            Ok(())
        }
        ConnectionCmd::ResetPassword { name } => {
            let mut v = current(admin, &name).await?;
            if v["type"] != "pbx_registers" {
                return Err(format!(
                    "connection {name:?} is not pbx_registers; set its password with `siptg connection set {name} password=…`"
                ));
            }
            let p = new_password();
            v["password"] = serde_json::json!(p);
            put(admin, &name, &v).await?;
            println!(
                "connection {name}: the PBX registers with login {} password {p}",
                text(&v["login"])
            );
            Ok(())
        }
        ConnectionCmd::Rm { name } => {
            match admin::send(admin, "DELETE", &format!("/connections/{name}"), "").await {
                Ok((200, _)) => {
                    println!("connection {name} removed");
                    Ok(())
                }
                Ok((_, msg)) => Err(msg.trim().to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(kind: &str) -> serde_json::Value {
        let c: ConnectionConfig =
            toml::from_str(&format!("name = \"x\"\ntype = \"{kind}\"")).unwrap();
        serde_json::to_value(&c).unwrap()
    }

    #[test]
    fn settings_take_the_type_of_the_key() {
        let mut v = base("ip");
        apply(&mut v, "server=10.0.0.1:5060").unwrap();
        apply(&mut v, "codecs=PCMA, opus").unwrap();
        apply(&mut v, "dial_rules=^8=7|.*=").unwrap();
        apply(&mut v, "priority=3").unwrap();
        apply(&mut v, "tls-verify=false").unwrap();
        apply(&mut v, "keepalive=0s").unwrap();
        assert_eq!(v["server"], "10.0.0.1:5060");
        assert_eq!(v["codecs"], serde_json::json!(["PCMA", "opus"]));
        assert_eq!(v["dial_rules"], serde_json::json!(["^8=7", ".*="]));
        assert_eq!(v["priority"], 3);
        assert_eq!(v["tls_verify"], false);
        let c: ConnectionConfig = serde_json::from_value(v.clone()).unwrap();
        assert!(c.keepalive.is_zero());
        apply(&mut v, "server=").unwrap();
        assert!(v["server"].is_null());
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let mut v = base("ip");
        assert!(apply(&mut v, "priority=high")
            .unwrap_err()
            .contains("not a number"));
        assert!(apply(&mut v, "colour=red")
            .unwrap_err()
            .contains("unknown setting"));
        assert!(apply(&mut v, "type=ip")
            .unwrap_err()
            .contains("cannot be changed"));
        assert!(apply(&mut v, "server").unwrap_err().contains("key=value"));
    }

    #[test]
    fn made_passwords_are_long_and_differ() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
