//! The server API on a public (namespace) address across SIGHUP: turning it off by reload must
//! never open it. The routes are mounted once at start, so a reload that changes
//! `http.admin_api` (or a listen address) is refused, and an empty token list never means
//! "open" for a client that is not on loopback.

use crate::support::lab;

use lab::{sa, Host, Lab, SERVER};

const TOKEN: &str = "lab-admin-token-0123456789";

fn config(admin: bool, tokens: &[&str]) -> String {
    let tokens: Vec<String> = tokens.iter().map(|t| format!("{t:?}")).collect();
    format!(
        r#"
[http]
listen = "{SERVER}:8080"
admin_api = {admin}
[turn]
listen = ["{SERVER}:3478"]
[auth]
backends = ["open"]
allow_open_on_public = true
admin_tokens = [{}]
"#,
        tokens.join(", ")
    )
}

#[test]
fn reloading_with_the_api_off_and_no_tokens_does_not_open_it() {
    let Some(mut lab) = Lab::start("admin_api_off_by_reload") else {
        return;
    };
    let http = sa(SERVER, 8080);
    lab.start_switchboard(&config(true, &[TOKEN]), &[], http);
    let bearer = format!("Bearer {TOKEN}");
    let rooms = |lab: &Lab, auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        lab.http(Host::Peer, http, "GET", "/v1/admin/rooms", &h, "")
    };
    assert_eq!(
        rooms(&lab, Some(&bearer)).0,
        200,
        "the API works with its token"
    );
    assert_eq!(rooms(&lab, None).0, 401, "and refuses without one");

    // The operator turns the API off and removes the tokens, then reloads.
    let path = lab.dir.path().join("switchboard.toml");
    std::fs::write(&path, config(false, &[])).unwrap();
    lab.signal("switchboard", nix::sys::signal::Signal::SIGHUP);
    let log = lab.wait_log("switchboard", "SIGHUP: ");
    for i in 0..3 {
        let (status, resp) = rooms(&lab, None);
        assert!(
            status == 401 || status == 404,
            "request {i} without a token from the public segment: {resp}\n{log}"
        );
    }
    assert!(
        log.contains("http.admin_api"),
        "the refusal names the key:\n{log}"
    );
}
