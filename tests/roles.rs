//! Roles as real processes: config validation, `up` and `status`, a Worker answering SIP without
//! its Manager, mutual-TLS links and their refusal of a foreign CA.

mod common;

use common::{http_get, sip_request, siptg, wait_for, Proc, TestNode};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn certs(dir: &Path, args: &[&str]) {
    let out = Command::new(siptg())
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_section(dir: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\n",
        d = dir.display()
    )
}

fn worker_config(
    node: &TestNode,
    ca_dir: &Path,
    link: std::net::SocketAddr,
    managers: &str,
) -> std::path::PathBuf {
    node.write_config(
        "worker.toml",
        &format!(
            "[worker]\nname = \"worker-1\"\nlink_listen = \"{link}\"\nmanager_timeout = \"1s\"\nmanagers = {managers}\n{}",
            tls_section(ca_dir, "worker-1")
        ),
    )
}

/// A `siptg worker` with certificates from `ca_dir`, running and answering on its admin port.
fn start_worker(ca_dir: &Path, managers: &str) -> (TestNode, std::net::SocketAddr, Proc) {
    let wnode = TestNode::new();
    let link = common::free_tcp();
    let wcfg = worker_config(&wnode, ca_dir, link, managers);
    let worker = Proc::start(
        &["worker", "--config", wcfg.to_str().unwrap()],
        &wnode.path("w.log"),
    );
    wait_for(
        "the worker's admin endpoint",
        Duration::from_secs(20),
        || wnode.status(),
    );
    (wnode, link, worker)
}

fn manager_config(node: &TestNode, tls: &str, link: std::net::SocketAddr) -> std::path::PathBuf {
    node.write_config(
        "manager.toml",
        &format!(
            "[manager]\nname = \"manager-1\"\nheartbeat_interval = \"200ms\"\nlink_timeout = \"1s\"\n\
             workers = [{{ name = \"worker-1\", address = \"{link}\" }}]\n{tls}"
        ),
    )
}

#[test]
fn check_config_rejects_a_broken_config_naming_key_and_line() {
    let node = TestNode::new();
    let bad = node.path("bad.toml");
    std::fs::write(
        &bad,
        "[node]\nstate_dir = \"x\"\n[dataplane]\ncores = \"many\"\n",
    )
    .unwrap();
    let out = Command::new(siptg())
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4: `dataplane.cores`"), "{err}");

    let out = Command::new(siptg())
        .args(["check-config", "--config"])
        .arg(node.write_config("good.toml", ""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn the_example_config_checks_clean() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/siptg.example.toml");
    let out = Command::new(siptg())
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn up_starts_every_role_and_status_shows_a_shard_per_core() {
    let node = TestNode::new();
    let cfg = node.write_config("siptg.toml", "");
    let _up = Proc::start(
        &["up", "--config", cfg.to_str().unwrap()],
        &node.path("up.log"),
    );
    let cores = siptg_control::config::available_cores();
    wait_for("every shard running", Duration::from_secs(20), || {
        let st = node.status()?;
        let shards = st["worker"]["dataplane"]["process"]["shards"]
            .as_array()?
            .clone();
        let links_up = st["manager"]["peers"]
            .as_array()?
            .iter()
            .filter(|p| p["state"] == "up")
            .count();
        (shards.len() == cores.len() && links_up == 2).then_some(())
    });
    let out = Command::new(siptg())
        .args(["status", "--admin", &node.admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("roles: manager, worker, storage"), "{text}");
    for core in &cores {
        assert!(text.contains(&format!("core {core}: running")), "{text}");
    }
    let metrics = http_get(node.admin, "/metrics").unwrap();
    assert!(
        metrics.contains("siptg_dataplane_shard_running{core=\"0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("siptg_link_up{peer=\"worker-1\",role=\"worker\"} 1"),
        "{metrics}"
    );
    // With its in-process Manager, a Worker answers OPTIONS itself and asks the Manager to route.
    assert_eq!(sip_request(node.sip, "OPTIONS").unwrap(), "SIP/2.0 200 OK");
    assert_eq!(
        sip_request(node.sip, "REGISTER").unwrap(),
        "SIP/2.0 404 Route not found"
    );
}

#[test]
fn worker_without_manager_answers_503_until_the_mtls_link_is_back() {
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["init"]);
    certs(ca.path(), &["issue", "worker-1"]);
    certs(ca.path(), &["issue", "manager-1"]);
    let (wnode, link, worker) = start_worker(ca.path(), "[]");

    for method in ["OPTIONS", "REGISTER", "INVITE"] {
        assert_eq!(
            sip_request(wnode.sip, method).as_deref(),
            Some("SIP/2.0 503 No response from Manager"),
            "{method}"
        );
    }

    let mnode = TestNode::new();
    let mcfg = manager_config(&mnode, &tls_section(ca.path(), "manager-1"), link);
    let manager = Proc::start(
        &["manager", "--config", mcfg.to_str().unwrap()],
        &mnode.path("m.log"),
    );
    wait_for("the mTLS link", Duration::from_secs(20), || {
        let st = mnode.status()?;
        (st["manager"]["peers"][0]["state"] == "up").then_some(())
    });
    assert_eq!(
        sip_request(wnode.sip, "OPTIONS").as_deref(),
        Some("SIP/2.0 200 OK")
    );
    assert_eq!(
        sip_request(wnode.sip, "REGISTER").as_deref(),
        Some("SIP/2.0 404 Route not found")
    );
    let st = mnode.status().unwrap();
    assert_eq!(
        st["manager"]["remote"]["worker-1"]["name"], "worker-1",
        "{st}"
    );

    drop(manager);
    wait_for(
        "503 again once the Manager is gone",
        Duration::from_secs(10),
        || {
            (sip_request(wnode.sip, "OPTIONS")? == "SIP/2.0 503 No response from Manager")
                .then_some(())
        },
    );
    assert!(worker.log().contains("link down"), "{}", worker.log());
}

#[test]
fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["init"]);
    certs(ca.path(), &["issue", "worker-1"]);
    let rogue = tempfile::tempdir().unwrap();
    certs(rogue.path(), &["init", "--name", "rogue CA"]);
    certs(rogue.path(), &["issue", "manager-1"]);

    let (wnode, link, worker) = start_worker(ca.path(), "[]");

    // The rogue Manager trusts the real CA (so it would accept the Worker) but presents a
    // certificate from its own CA: the Worker must refuse it.
    let mnode = TestNode::new();
    let tls = format!(
        "[tls]\nca = \"{}/ca.pem\"\ncert = \"{r}/manager-1.pem\"\nkey = \"{r}/manager-1.key\"\n",
        ca.path().display(),
        r = rogue.path().display()
    );
    let mcfg = manager_config(&mnode, &tls, link);
    let _manager = Proc::start(
        &["manager", "--config", mcfg.to_str().unwrap()],
        &mnode.path("m.log"),
    );
    wait_for(
        "the worker to refuse the rogue manager",
        Duration::from_secs(20),
        || {
            worker
                .log()
                .contains("link refused: TLS handshake failed")
                .then_some(())
        },
    );
    let st = mnode.status().unwrap();
    assert_eq!(st["manager"]["peers"][0]["state"], "down", "{st}");
    assert!(wnode.status().unwrap()["worker"]["manager_links"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        sip_request(wnode.sip, "OPTIONS").as_deref(),
        Some("SIP/2.0 503 No response from Manager")
    );
}

#[test]
fn a_manager_missing_from_the_allow_list_is_refused() {
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["init"]);
    certs(ca.path(), &["issue", "worker-1"]);
    certs(ca.path(), &["issue", "manager-1"]);
    let (wnode, link, worker) = start_worker(ca.path(), "[\"manager-2\"]");
    let mnode = TestNode::new();
    let mcfg = manager_config(&mnode, &tls_section(ca.path(), "manager-1"), link);
    let _manager = Proc::start(
        &["manager", "--config", mcfg.to_str().unwrap()],
        &mnode.path("m.log"),
    );
    wait_for("the refusal", Duration::from_secs(20), || {
        worker
            .log()
            .contains("is not in this worker's allowed managers")
            .then_some(())
    });
    assert_eq!(
        sip_request(wnode.sip, "OPTIONS").as_deref(),
        Some("SIP/2.0 503 No response from Manager")
    );
}
