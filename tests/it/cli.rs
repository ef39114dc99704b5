//! The binary's command line: config errors exit 2 naming the key, --print-config shows
//! the effective configuration including environment overrides.

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    // Keep the developer's environment from leaking overrides into the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            c.env_remove(k);
        }
    }
    c
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn invalid_configs_exit_2_and_name_the_key() {
    for (text, key) in [
        ("[turn]\nrelay_port_max = 70000\n", "turn.relay_port_max"),
        ("[http]\nlisten = \"not an address\"\n", "http.listen"),
        ("[turn]\nno_such_key = 1\n", "no_such_key"),
        ("[nonsense]\n", "nonsense"),
        ("[turn\n", "line 1"),
        // Cluster mode: nodes must share session keys and TURN secrets.
        (
            "[cluster]\nredis_url = \"redis://127.0.0.1:1\"\n",
            "auth.session_keys",
        ),
        (
            "[cluster]\nredis_url = \"redis://127.0.0.1:1\"\n\
             [auth]\nsession_keys = [\"0123456789abcdef0123\"]\n",
            "auth.turn_secrets",
        ),
        ("[cluster]\nredis_url = \"http://x\"\n", "cluster.redis_url"),
        (
            "[cluster]\nredis_url = \"redis://127.0.0.1:1\"\npublish_queue_bytes = 1000\n\
             [auth]\nsession_keys = [\"0123456789abcdef0123\"]\nturn_secrets = [\"s\"]\n",
            "cluster.publish_queue_bytes",
        ),
        (
            "[http]\nlisten = \"0.0.0.0:0\"\nadmin_api = true\n[auth]\nallow_open_on_public = true\n",
            "auth.admin_tokens",
        ),
        (
            "[webhooks]\nurls = [\"http://127.0.0.1:9/hook\"]\n",
            "webhooks.secret",
        ),
        (
            "[turn]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [webhooks]\nurls = [\"http://127.0.0.1:9/hook\"]\n\
             secret_file = \"/nonexistent/webhook-secret\"\n",
            "webhooks.secret_file",
        ),
        (
            "[turn]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [auth]\nadmin_tokens_file = \"/nonexistent/admin-tokens\"\n",
            "auth.admin_tokens_file",
        ),
    ] {
        let f = config_file(text);
        let out = bin().arg("--config").arg(f.path()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?} → {err}");
        assert!(
            err.contains(key),
            "{text:?}: stderr should name {key}: {err}"
        );
    }
    let out = bin()
        .arg("--config")
        .arg("/nonexistent/switchboard.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchboard.toml"));
}

#[test]
fn env_override_errors_exit_2() {
    let out = bin()
        .env("SWITCHBOARD_TURN__RELAY_PORT_MIN", "seventy")
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("turn.relay_port_min"));
}

#[test]
fn print_config_shows_file_and_env_layers() {
    let f = config_file("[turn]\nrealm = \"from-file\"\nrelay_port_min = 50000\n");
    let out = bin()
        .arg("--config")
        .arg(f.path())
        .env("SWITCHBOARD_TURN__RELAY_PORT_MIN", "51000")
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let cfg = switchboard::Config::from_toml(&text).expect("printed config parses back");
    assert_eq!(cfg.turn.realm, "from-file");
    assert_eq!(cfg.turn.relay_port_min, 51000);
    assert_eq!(cfg.http.listen, "127.0.0.1:8080".parse().unwrap());
}
