//! A fresh self-signed certificate for `localhost` / 127.0.0.1, made by `openssl`
//! (installed by scripts/install-test-deps.sh), shared by the TLS tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Write `<name>.crt` and `<name>.key` into `dir` and return their paths.
pub fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs (scripts/install-test-deps.sh installs it)");
    assert!(st.success(), "openssl made a certificate");
    (cert, key)
}
