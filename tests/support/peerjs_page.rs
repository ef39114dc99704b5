//! The PeerJS demo page (`/peerjs.html`) as the browser tests drive it: waiting on the page's
//! state, and a data connection exchanging messages both ways. Shared by the single-node and
//! the cluster PeerJS browser tests; each includes `support/webdriver.rs` as `webdriver`.
#![allow(dead_code)]

use serde_json::Value;
use std::time::Duration;

use super::webdriver::Browser;

/// The value `script` returns once it is truthy, within 60 s; panics naming `what`.
pub async fn wait_js(b: &Browser, what: &str, script: &str) -> Value {
    b.poll(script, Duration::from_secs(60))
        .await
        .unwrap_or_else(|last| {
            panic!(
                "{}: timed out waiting for {what}; last value: {last}",
                b.label()
            )
        })
}

/// `b` opens a data connection to the PeerJS id `to` (held by `a`); then each side sends
/// `n` messages and both must receive the other's, complete and in order.
pub async fn exchange_in_order(a: &Browser, b: &Browser, to: &str, n: usize) {
    b.js(&format!("return window.pj.connect({})", Value::from(to)))
        .await;
    for x in [a, b] {
        wait_js(
            x,
            "the data connection",
            "return window.pjState.dataOpen === true",
        )
        .await;
    }
    assert_eq!(
        b.js(&format!("return window.pj.sendMany({n}, 'b')")).await,
        n
    );
    assert_eq!(
        a.js(&format!("return window.pj.sendMany({n}, 'a')")).await,
        n
    );
    for (x, from) in [(a, "b"), (b, "a")] {
        let got = wait_js(
            x,
            &format!("{n} messages"),
            &format!("const r = window.pjState.received; return r.length >= {n} && r"),
        )
        .await;
        let want: Vec<Value> = (0..n).map(|i| Value::from(format!("{from}:{i}"))).collect();
        assert_eq!(
            got.as_array().unwrap(),
            &want,
            "{} got them out of order",
            x.label()
        );
    }
}
