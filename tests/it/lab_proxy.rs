//! Login behind a reverse proxy in the network lab: nginx (Debian's) on the proxy host forwards
//! to switchboard, which believes X-Forwarded-For only from that proxy. Two NATed homes behind
//! the proxy get separate login rate limits; a header spoofed by a direct client is ignored.

use crate::support::lab;

use lab::{sa, Host, Lab, PEER, PROXY, SERVER};

const CONFIG: &str = r#"
[http]
listen = "0.0.0.0:8080"
trusted_proxies = ["203.0.113.40/32"]
[turn]
listen = ["0.0.0.0:3478"]
[auth]
backends = ["open"]
allow_open_on_public = true
login_rate_per_minute = 3
"#;

fn nginx_conf(dir: &std::path::Path) -> String {
    let d = dir.display();
    format!(
        r#"
user root;
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp;
    proxy_temp_path {d}/nginx-tmp;
    fastcgi_temp_path {d}/nginx-tmp;
    uwsgi_temp_path {d}/nginx-tmp;
    scgi_temp_path {d}/nginx-tmp;
    server {{
        listen {PROXY}:80;
        location / {{
            proxy_pass http://{SERVER}:8080;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"#
    )
}

fn login(lab: &Lab, h: Host, to: std::net::SocketAddr, xff: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = xff.map(|v| ("X-Forwarded-For", v)).into_iter().collect();
    let (status, resp) = lab.http(h, to, "POST", "/v1/login", &headers, r#"{"name":"dee"}"#);
    assert!(status == 200 || status == 429, "login: {resp}");
    status
}

#[test]
fn clients_behind_a_trusted_proxy_are_limited_separately_and_spoofing_is_ignored() {
    let Some(mut lab) = Lab::start("reverse_proxy_login_limits") else {
        return;
    };
    lab.start_switchboard(CONFIG, &[], sa(SERVER, 8080));
    let conf = lab.dir.path().join("nginx.conf");
    std::fs::create_dir_all(lab.dir.path().join("nginx-tmp")).unwrap();
    std::fs::write(&conf, nginx_conf(lab.dir.path())).unwrap();
    let conf = conf.display().to_string();
    lab.spawn(Host::Proxy, "nginx", "nginx", &["-c", &conf]);
    let proxy = sa(PROXY, 80);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lab.tcp(Host::Proxy, proxy).is_err() {
        assert!(
            lab.running("nginx") && std::time::Instant::now() < deadline,
            "nginx did not start: {}",
            lab.log("nginx")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Home 1 spends its three logins through the proxy, and is then refused...
    for i in 0..3 {
        assert_eq!(
            login(&lab, Host::Home1, proxy, None),
            200,
            "home 1 login {i}"
        );
    }
    assert_eq!(
        login(&lab, Host::Home1, proxy, None),
        429,
        "home 1 is limited"
    );
    // ...even when it claims to be someone else: the proxy appends the real address.
    assert_eq!(
        login(&lab, Host::Home1, proxy, Some("198.51.100.77")),
        429,
        "a prepended X-Forwarded-For does not pick a fresh bucket"
    );
    // Home 2 behind the same proxy has its own bucket.
    assert_eq!(
        login(&lab, Host::Home2, proxy, None),
        200,
        "home 2 is separate"
    );

    // A direct client (not a trusted proxy) cannot pick its bucket with the header.
    for i in 0..3 {
        let fake = format!("198.51.100.{i}");
        assert_eq!(
            login(&lab, Host::Peer, sa(SERVER, 8080), Some(&fake)),
            200,
            "direct login {i}"
        );
    }
    assert_eq!(
        login(&lab, Host::Peer, sa(SERVER, 8080), Some("198.51.100.200")),
        429,
        "X-Forwarded-For from {PEER} (untrusted) is ignored"
    );
    // And the proxy's own address is not a shared bucket: home 2 still has logins left.
    assert_eq!(login(&lab, Host::Home2, proxy, None), 200);
}
