//! The deploy kit is checked by the tools operators use: `systemd-analyze` for the unit,
//! a YAML parser plus cross-checks for the Kubernetes manifests, `promtool` for the scrape
//! config, and a real `/metrics` scrape for every metric the Grafana dashboard queries.

use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use switchboard::{Config, Server};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(root().join("deploy/systemd/switchboard.service")).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit.replace(
        "/usr/local/bin/switchboard",
        env!("CARGO_BIN_EXE_switchboard"),
    );
    let path = dir.path().join("switchboard.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (scripts/install-test-deps.sh)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{text}"));
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    assert!(
        line.contains(" OK") || line.contains(" SAFE"),
        "exposure must be OK or better: {line}"
    );
    assert!(score < 2.5, "{line}");
}

#[test]
fn kernel_offload_drop_in_verifies_and_stays_hardened() {
    // The unit plus deploy/systemd/kernel-offload.conf as an operator installs it.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(root().join("deploy/systemd/switchboard.service")).unwrap();
    let unit = unit.replace(
        "/usr/local/bin/switchboard",
        env!("CARGO_BIN_EXE_switchboard"),
    );
    let path = dir.path().join("switchboard.service");
    std::fs::write(&path, unit).unwrap();
    let d = dir.path().join("switchboard.service.d");
    std::fs::create_dir(&d).unwrap();
    let drop_in =
        std::fs::read_to_string(root().join("deploy/systemd/kernel-offload.conf")).unwrap();
    for cap in ["CAP_BPF", "CAP_NET_ADMIN"] {
        assert!(drop_in.contains(cap), "the drop-in grants {cap}");
    }
    std::fs::write(d.join("kernel-offload.conf"), drop_in).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (scripts/install-test-deps.sh)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify with the drop-in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // The drop-in is in force: the report sees the capabilities and the bpf() call.
    assert!(
        text.contains("CapabilityBoundingSet=~CAP_BPF") && text.contains("bpf is allowed"),
        "the drop-in was not applied:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{text}"));
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    assert!(
        line.contains(" OK") || line.contains(" SAFE"),
        "exposure with the offload drop-in must stay OK: {line}"
    );
    assert!(score < 2.5, "{line}");
}

fn manifests() -> Vec<Yaml> {
    let mut docs = Vec::new();
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Yaml::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(
                v["apiVersion"].is_string() && v["kind"].is_string(),
                "{}",
                f.display()
            );
            assert!(v["metadata"]["name"].is_string(), "{}", f.display());
            docs.push(v);
        }
    }
    docs
}

fn kind<'a>(docs: &'a [Yaml], k: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"] == k)
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let docs = manifests();
    let ds = kind(&docs, "DaemonSet");
    let cm = kind(&docs, "ConfigMap");
    let secret = kind(&docs, "Secret");
    kind(&docs, "Service");
    kind(&docs, "PodMonitor");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], Yaml::Bool(true));

    // The ConfigMap's TOML is a valid config once the Secret's values are applied as env.
    let toml = cm["data"]["switchboard.toml"].as_str().unwrap();
    let c = &spec["containers"][0];
    let mut env = Vec::new();
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        // Downward API values differ per node; stand in a node name.
        if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            env.push((name, "node-a".to_string()));
            continue;
        }
        let key = e["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
        let v = secret["stringData"][key]
            .as_str()
            .unwrap_or_else(|| panic!("secret key {key} missing"));
        env.push((name, v.to_string()));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("switchboard.toml");
    std::fs::write(&f, toml).unwrap();
    let cfg = Config::load(Some(&f), env).expect("ConfigMap + Secret form a valid config");
    assert!(!cfg.auth.turn_secrets.is_empty());
    // One ConfigMap for every node: addresses are learnt, names come from the node.
    assert!(cfg.turn.relay_auto(), "relay_ip = \"auto\"");
    assert!(!cfg.public.discover_stun.is_empty());
    assert!(
        cfg.cluster.enabled(),
        "the Secret's redis-url turns cluster mode on"
    );
    assert_eq!(
        cfg.cluster.node_id, "node-a",
        "node id from the downward API"
    );
    assert!(cfg
        .public
        .node_host
        .as_deref()
        .is_some_and(|h| h.contains("{node}")));

    // Probes hit the right endpoints on the configured HTTP port.
    let http_port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap();
    assert_eq!(http_port, u64::from(cfg.http.listen.port()));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let turn_port = u64::from(cfg.turn.listen[0].port());
    assert!(c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["containerPort"].as_u64() == Some(turn_port) && p["protocol"] == "UDP"));

    // The grace period covers preStop plus the drain, and preStop only waits.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre = &c["lifecycle"]["preStop"];
    assert!(
        pre["exec"].is_null(),
        "preStop must not signal or kill the process"
    );
    let sleep = pre["sleep"]["seconds"].as_u64().unwrap_or(0);
    assert!(
        grace >= sleep + cfg.server.drain_timeout_secs + 5,
        "grace {grace} < preStop {sleep} + drain {} + margin",
        cfg.server.drain_timeout_secs
    );
    // The PodMonitor scrapes /metrics on the named HTTP port.
    let pm = kind(&docs, "PodMonitor");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "http");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
}

#[test]
fn prometheus_scrape_config_passes_promtool() {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(root().join("deploy/prometheus/scrape.yml"))
        .output()
        .expect("promtool is installed (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn every_dashboard_metric_exists_in_a_real_scrape() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/switchboard.json")).unwrap(),
    )
    .expect("dashboard is valid JSON");
    let mut wanted = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("switchboard_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                wanted.insert(name);
            }
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");
    let srv = Server::new(
        Config::from_toml("[http]\nlisten = \"127.0.0.1:0\"\n[turn]\nlisten = [\"127.0.0.1:0\"]\n")
            .unwrap(),
    )
    .start()
    .await
    .unwrap();
    let text = reqwest::get(format!("http://{}/metrics", srv.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for w in &wanted {
        let family = w.strip_suffix("_bucket").unwrap_or(w);
        assert!(
            families.contains(family),
            "dashboard queries {w}, which /metrics does not export"
        );
    }
    srv.shutdown();
    srv.wait().await;
}
