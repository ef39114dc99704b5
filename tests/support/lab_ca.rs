//! A lab CA and a server certificate signed by it, made by `openssl`: for the network-lab
//! tests whose clients (Chromium through an NSS db, the server's ACME client) trust the CA.

use std::path::Path;
use std::process::Command;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `ca_name` (`ca.key`, `ca.crt`) and a server certificate for the DNS name `dns`
/// signed by it (`<leaf>.key`, `<leaf>.crt`), in `dir`: for a lab whose clients trust the CA.
pub fn ca_and_leaf(dir: &Path, ca_name: &str, dns: &str, leaf: &str) {
    let p = |f: &str| dir.join(f).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    let ca_subj = format!("/CN={ca_name}");
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-days", "2", "-subj", &ca_subj]);
    ca.extend_from_slice(&["-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend_from_slice(&["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    ca.extend_from_slice(&["-keyout", &ca_key, "-out", &ca_crt]);
    openssl(&ca);
    let (key, csr, crt, ext) = (
        p(&format!("{leaf}.key")),
        p(&format!("{leaf}.csr")),
        p(&format!("{leaf}.crt")),
        p("ext"),
    );
    let subj = format!("/CN={dns}");
    let mut req = vec!["req"];
    req.extend_from_slice(&ec);
    req.extend_from_slice(&["-subj", &subj, "-keyout", &key, "-out", &csr]);
    openssl(&req);
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:{dns}\nbasicConstraints=critical,CA:FALSE\n\
             extendedKeyUsage=serverAuth\n"
        ),
    )
    .expect("ext file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &crt,
    ]);
}
