//! Renders `/status` JSON for people.

use serde_json::Value;
use std::fmt::Write;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn links(out: &mut String, links: &Value, indent: &str) {
    match links.as_array() {
        Some(l) if !l.is_empty() => {
            for link in l {
                let rtt = link["rtt_ms"]
                    .as_f64()
                    .map(|r| format!(", rtt {r:.2} ms"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{indent}{} ({}) up {}s{rtt}",
                    s(&link["peer"]),
                    s(&link["role"]),
                    s(&link["up_for_s"])
                );
            }
        }
        _ => {
            let _ = writeln!(
                out,
                "{indent}none (SIP requests get 503 No response from Manager)"
            );
        }
    }
}

fn worker(out: &mut String, w: &Value) {
    let _ = writeln!(out, "worker {}", s(&w["name"]));
    let _ = writeln!(out, "  SIP: {}", s(&w["sip_listen"]));
    let _ = writeln!(out, "  manager links:");
    links(out, &w["manager_links"], "    ");
    if let Some(regs) = w["outbound_registrations"]
        .as_array()
        .filter(|r| !r.is_empty())
    {
        let _ = writeln!(out, "  registrations at PBXs:");
        for r in regs {
            let detail = match r["state"].as_str() {
                Some("registered") => format!("registered, expires in {}s", s(&r["expires_in_s"])),
                Some("failed") => format!("FAILED: {} {}", s(&r["code"]), s(&r["reason"])),
                Some(other) => other.to_string(),
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "    {} at {}: {detail}",
                s(&r["name"]),
                s(&r["server"])
            );
        }
    }
    if let Some(peers) = w["pbx_options"].as_array().filter(|p| !p.is_empty()) {
        let _ = writeln!(out, "  PBXs watched by OPTIONS:");
        for p in peers {
            let detail = match p["state"].as_str() {
                Some("up") => match p["rtt_ms"].as_u64() {
                    Some(rtt) => format!("up for {}s, answers in {rtt} ms", s(&p["since_s"])),
                    None => format!("up for {}s", s(&p["since_s"])),
                },
                Some("down") => format!("DOWN for {}s (no answer to OPTIONS)", s(&p["since_s"])),
                Some(other) => other.to_string(),
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "    {} at {}: {detail}",
                s(&p["name"]),
                s(&p["target"])
            );
        }
    }
    let sup = &w["dataplane"]["supervisor"];
    let proc_ = &w["dataplane"]["process"];
    if sup["connected"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "  dataplane: running, pid {}, driver {}, socket {}, restarts {}, sessions tracked {} (orphaned {})",
            s(&proc_["pid"]),
            s(&proc_["driver"]),
            s(&sup["socket"]),
            s(&sup["restarts"]),
            s(&sup["tracked_sessions"]),
            s(&sup["orphaned_sessions"]),
        );
        for shard in proc_["shards"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "    core {}: {}, sessions {}, legs {}, ports {}-{} ({} pairs free), packets relayed {}",
                s(&shard["core"]),
                if shard["running"].as_bool() == Some(true) { "running" } else { "DOWN" },
                s(&shard["sessions"]),
                s(&shard["legs"]),
                s(&shard["port_min"]),
                s(&shard["port_max"]),
                s(&shard["ports_free"]),
                s(&shard["packets_relayed"]),
            );
        }
    } else {
        let _ = writeln!(
            out,
            "  dataplane: NOT CONNECTED ({}), socket {}",
            s(&sup["last_error"]),
            s(&sup["socket"])
        );
    }
}

/// The plan limits' use per gateway (only gateways that have limits are listed).
fn usage(out: &mut String, u: &Value) {
    let Some(gateways) = u.as_object().filter(|g| !g.is_empty()) else {
        return;
    };
    let _ = writeln!(out, "gateway plan limits:");
    for (name, g) in gateways {
        let secs = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1000.0;
        let talk = if g["monthly_ms"].as_u64().unwrap_or(0) > 0 {
            format!(
                "talk {:.1}s of {:.0}s in {}",
                secs(&g["talk_ms"]),
                secs(&g["monthly_ms"]),
                s(&g["month"])
            )
        } else {
            format!(
                "talk {:.1}s in {} (no limit)",
                secs(&g["talk_ms"]),
                s(&g["month"])
            )
        };
        let fails = match g["failed_calls_per_hour"].as_u64().unwrap_or(0) {
            0 => format!(
                "{} failed calls in the last hour (no limit)",
                s(&g["failed_last_hour"])
            ),
            n => format!(
                "{} of {n} failed calls in the last hour",
                s(&g["failed_last_hour"])
            ),
        };
        let _ = writeln!(out, "  {name}: {talk}, {fails}");
    }
}

/// Human-readable status.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let roles: Vec<String> = v["roles"]
        .as_array()
        .map(|r| r.iter().map(s).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "siptg {} (pid {}), up {}s, config: {}",
        s(&v["version"]),
        s(&v["pid"]),
        s(&v["uptime_s"]),
        s(&v["config"])
    );
    let _ = writeln!(out, "roles: {}", roles.join(", "));
    if !v["manager"].is_null() {
        let _ = writeln!(out, "manager links:");
        for p in v["manager"]["peers"].as_array().into_iter().flatten() {
            let err = if p["state"] == "up" {
                String::new()
            } else {
                format!(" — {}", s(&p["last_error"]))
            };
            let rtt = p["link"]["rtt_ms"]
                .as_f64()
                .map(|r| format!(", rtt {r:.2} ms"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} ({}) at {}: {}{rtt}{err}",
                s(&p["name"]),
                s(&p["role"]),
                s(&p["address"]),
                s(&p["state"])
            );
        }
        usage(&mut out, &v["manager"]["usage"]);
        if let Some(remote) = v["manager"]["remote"].as_object() {
            for (name, st) in remote {
                if st.get("dataplane").is_some() {
                    worker(&mut out, st);
                } else {
                    let _ = writeln!(out, "{name}: {st}");
                }
            }
        }
    }
    if !v["worker"].is_null() {
        worker(&mut out, &v["worker"]);
    }
    let st = &v["storage"];
    if !st.is_null() {
        storage(&mut out, st);
    }
    out
}

/// The Session Storage and its Telegram accounts.
fn storage(out: &mut String, st: &Value) {
    let accounts = st["accounts"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "storage {}: database {}, Telegram backend {}, {} account(s)",
        s(&st["name"]),
        s(&st["database"]),
        s(&st["telegram_backend"]),
        accounts.len()
    );
    for a in accounts {
        if !a["error"].is_null() {
            let _ = writeln!(out, "  accounts: {}", s(&a["error"]));
            continue;
        }
        let who = match (a["user_id"].as_i64(), a["username"].as_str()) {
            (Some(id), Some(u)) => format!("user {id} @{u}"),
            (Some(id), None) => format!("user {id}"),
            _ => String::new(),
        };
        let waits: Vec<String> = a["flood_waits"]
            .as_array()
            .map(|w| {
                w.iter()
                    .map(|p| format!("{} {}s", s(&p[0]), s(&p[1])))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  account {:<16} {:<10} {}{}{}",
            s(&a["name"]),
            s(&a["state"]),
            who,
            if a["connected"].as_bool() == Some(true) {
                ""
            } else {
                " (not connected)"
            },
            if waits.is_empty() {
                String::new()
            } else {
                format!(", flood waits: {}", waits.join(", "))
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn storage_accounts_are_listed_with_state_and_flood_waits() {
        let mut out = String::new();
        storage(
            &mut out,
            &json!({"name": "storage-1", "database": "redb", "telegram_backend": "sim (127.0.0.1:50003)",
                    "accounts": [
                        {"name": "gw", "state": "active", "user_id": 5, "username": "gw_tg",
                         "connected": true, "flood_waits": [["phone.requestCall", 30]]},
                        {"name": "old", "state": "inactive", "user_id": null, "username": null,
                         "connected": false, "flood_waits": []}]}),
        );
        assert!(out.contains("storage storage-1: database redb, Telegram backend sim (127.0.0.1:50003), 2 account(s)"), "{out}");
        assert!(
            out.contains("user 5 @gw_tg, flood waits: phone.requestCall 30s"),
            "{out}"
        );
        assert!(
            out.contains("old") && out.contains("(not connected)"),
            "{out}"
        );
    }

    #[test]
    fn gateway_plan_usage_is_shown_against_its_limits() {
        let out = render(&json!({
            "version": "x", "roles": ["manager"],
            "manager": {"peers": [], "usage": {
                "month": {"month": "2026-11", "talk_ms": 2950, "monthly_ms": 3000,
                          "failed_last_hour": 0, "failed_calls_per_hour": 0},
                "fails": {"month": "2026-11", "talk_ms": 0, "monthly_ms": 0,
                          "failed_last_hour": 2, "failed_calls_per_hour": 2}}},
            "worker": null, "storage": null
        }));
        assert!(out.contains("gateway plan limits:"), "{out}");
        assert!(
            out.contains(
                "month: talk 3.0s of 3s in 2026-11, 0 failed calls in the last hour (no limit)"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "fails: talk 0.0s in 2026-11 (no limit), 2 of 2 failed calls in the last hour"
            ),
            "{out}"
        );
    }

    #[test]
    fn outbound_registrations_are_shown_with_their_state() {
        let mut out = String::new();
        worker(
            &mut out,
            &json!({
                "name": "worker-1",
                "sip_listen": ["udp:127.0.0.1:5060"],
                "manager_links": [],
                "outbound_registrations": [
                    {"name": "asterisk", "server": "192.0.2.10:5060", "state": "registered", "expires_in_s": 570},
                    {"name": "kam", "server": "192.0.2.11:5060", "state": "failed", "code": 403, "reason": "Wrong password"}
                ],
                "dataplane": {"supervisor": {"connected": false, "last_error": "x", "socket": "s"}}
            }),
        );
        assert!(out.contains("registrations at PBXs:"), "{out}");
        assert!(
            out.contains("asterisk at 192.0.2.10:5060: registered, expires in 570s"),
            "{out}"
        );
        assert!(
            out.contains("kam at 192.0.2.11:5060: FAILED: 403 Wrong password"),
            "{out}"
        );
    }

    #[test]
    fn peers_watched_by_options_are_shown_up_or_down() {
        let mut out = String::new();
        worker(
            &mut out,
            &json!({
                "name": "worker-1",
                "sip_listen": [],
                "manager_links": [],
                "pbx_options": [
                    {"name": "provider", "target": "192.0.2.20:5060", "state": "up", "since_s": 120, "rtt_ms": 14},
                    {"name": "asterisk", "target": "192.0.2.10:5060", "state": "down", "since_s": 35}
                ],
                "dataplane": {"supervisor": {"connected": false, "last_error": "x", "socket": "s"}}
            }),
        );
        assert!(out.contains("PBXs watched by OPTIONS:"), "{out}");
        assert!(
            out.contains("provider at 192.0.2.20:5060: up for 120s, answers in 14 ms"),
            "{out}"
        );
        assert!(
            out.contains("asterisk at 192.0.2.10:5060: DOWN for 35s (no answer to OPTIONS)"),
            "{out}"
        );
    }
}
