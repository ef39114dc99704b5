//! A small W3C WebDriver client for chromedriver and Debian's Chromium, shared by the tests
//! that drive real browsers.
//!
//! - [`Launch`] starts chromedriver, optionally behind a command prefix (for example
//!   `ip netns exec sblab-home1`) and with extra chromedriver flags; [`Driver::attach`] talks to
//!   one already running at a base URL.
//! - [`Driver::browser`] opens one Chromium instance (its own process and profile) with
//!   [`CHROMIUM_FLAGS`] plus whatever flags the caller adds.
//! - [`Browser`] drives a page: navigate, run scripts, add init scripts (CDP), find, type, click,
//!   screenshot.
//! - [`Driver::screenshots_on_panic`] runs a test body and, if it panics, saves a screenshot of
//!   every open page and prints where.
//!
//! Included with `#[path = "support/webdriver.rs"] mod webdriver;`; not every test uses every
//! helper.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Flags every test browser gets: headless, fake camera and microphone that need no prompt,
/// no background traffic, and real IP addresses in candidates instead of mDNS names.
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    // Background-tab throttling would slow the page that is not in front.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--window-size=1000,800",
];

/// Chromium binds UDP to the wildcard address instead of each non-loopback interface, so its
/// packets to a server on 127.0.0.1 come from 127.0.0.1 and a call stays on loopback.
pub const LOOPBACK_UDP_FLAG: &str = "--webrtc-ip-handling-policy=default_public_interface_only";

/// How to start chromedriver.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Program and arguments placed before `chromedriver`, e.g. `["ip", "netns", "exec",
    /// "sblab-home1"]`. The prefix must exec chromedriver (or stay in its process group).
    pub prefix: Vec<String>,
    /// Extra chromedriver flags, e.g. `--allowed-ips=` to accept a test outside the namespace.
    pub driver_args: Vec<String>,
    /// Host (IP) at which the test reaches chromedriver; default 127.0.0.1.
    pub host: Option<String>,
    /// Port chromedriver listens on; default a port free on this host's loopback.
    pub port: Option<u16>,
    /// Where chromedriver writes its log; default nowhere.
    pub log: Option<PathBuf>,
}

/// How to start one Chromium instance.
#[derive(Clone, Debug)]
pub struct Chromium {
    /// The browser binary (or a wrapper script that execs it).
    pub binary: String,
    /// Full flag list; `--user-data-dir` is added from `profile`.
    pub flags: Vec<String>,
    /// Profile directory; one per instance so that instances share nothing.
    pub profile: PathBuf,
    /// A label for screenshots and messages ("A", "B", ...).
    pub label: String,
}

impl Chromium {
    /// Debian's `/usr/bin/chromium` with [`CHROMIUM_FLAGS`] plus `extra`.
    pub fn new(label: &str, profile: &Path, extra: &[&str]) -> Chromium {
        Chromium {
            binary: "/usr/bin/chromium".into(),
            flags: CHROMIUM_FLAGS
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect(),
            profile: profile.to_path_buf(),
            label: label.into(),
        }
    }
}

type Registry = Arc<Mutex<Vec<(String, String)>>>;

/// A chromedriver process (or one started elsewhere) and an HTTP client for it.
pub struct Driver {
    child: Option<Child>,
    base: String,
    http: reqwest::Client,
    /// Open sessions (label, session URL), for screenshots on failure.
    open: Registry,
}

impl Drop for Driver {
    /// chromedriver runs in its own process group with every browser it started: end them
    /// all, even when a test panicked before quitting its sessions.
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port for chromedriver, a node or redis-server to bind later. It comes from below the
/// kernel's ephemeral range (32768–60999 by default), so no client socket of this busy test
/// process or its children can take it between this check and the child's bind; a
/// per-process counter keeps one test binary's parallel tests apart, and the process id
/// spreads different binaries over the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let p = base + NEXT.fetch_add(1, Ordering::Relaxed) % 2_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

impl Driver {
    /// chromedriver on a free loopback port, no prefix.
    pub async fn start() -> Driver {
        Driver::launch(&Launch::default()).await
    }

    /// Start chromedriver as `launch` says and wait until it answers `/status`.
    pub async fn launch(launch: &Launch) -> Driver {
        use std::os::unix::process::CommandExt;
        let port = launch.port.unwrap_or_else(free_port);
        let mut argv: Vec<String> = launch.prefix.clone();
        argv.push("chromedriver".into());
        argv.push(format!("--port={port}"));
        argv.extend(launch.driver_args.iter().cloned());
        if let Some(log) = &launch.log {
            argv.push(format!("--log-path={}", log.display()));
        }
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start {argv:?}: {e} (chromedriver: scripts/install-test-deps.sh)")
            });
        let host = launch.host.as_deref().unwrap_or("127.0.0.1");
        let mut d = Driver::new(format!("http://{host}:{port}"));
        d.child = Some(child);
        d.wait_ready().await;
        d
    }

    /// A chromedriver that something else started, at `base` (e.g. `http://10.0.0.2:9515`).
    pub async fn attach(base: &str) -> Driver {
        let d = Driver::new(base.trim_end_matches('/').to_string());
        d.wait_ready().await;
        d
    }

    fn new(base: String) -> Driver {
        Driver {
            child: None,
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            open: Registry::default(),
        }
    }

    async fn wait_ready(&self) {
        for _ in 0..150 {
            if let Ok(r) = self.http.get(format!("{}/status", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver at {} did not answer", self.base);
    }

    /// The WebDriver base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A new Chromium instance with [`CHROMIUM_FLAGS`] plus `extra`, using `profile`.
    pub async fn browser(&self, label: &str, profile: &Path, extra: &[&str]) -> Browser {
        self.browser_with(&Chromium::new(label, profile, extra))
            .await
    }

    /// A new Chromium instance as `c` says.
    pub async fn browser_with(&self, c: &Chromium) -> Browser {
        let mut args = c.flags.clone();
        args.push(format!("--user-data-dir={}", c.profile.display()));
        let v = call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/session", self.base),
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": c.binary, "args": args}
            }}})),
        )
        .await
        .unwrap_or_else(|e| panic!("new Chromium session {}: {e}", c.label));
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session: {v}"));
        let url = format!("{}/session/{id}", self.base);
        self.open
            .lock()
            .unwrap()
            .push((c.label.clone(), url.clone()));
        Browser {
            http: self.http.clone(),
            url,
            label: c.label.clone(),
            open: self.open.clone(),
        }
    }

    /// Run `body`; if it panics, save a screenshot of every open page (under the test's
    /// target temp dir) and print the paths before passing the panic on.
    pub async fn screenshots_on_panic<T>(
        &self,
        name: &str,
        body: impl std::future::Future<Output = T>,
    ) -> T {
        use futures_util::FutureExt;
        match std::panic::AssertUnwindSafe(body).catch_unwind().await {
            Ok(v) => v,
            Err(p) => {
                self.screenshot_all(name).await;
                std::panic::resume_unwind(p)
            }
        }
    }

    /// Save a screenshot of every open page as `<dir>/<name>-<label>.png`.
    pub async fn screenshot_all(&self, name: &str) {
        let dir = screenshot_dir();
        let open = self.open.lock().unwrap().clone();
        for (label, url) in open {
            let path = dir.join(format!("{name}-{label}.png"));
            match screenshot(&self.http, &url, &path).await {
                Ok(()) => eprintln!("screenshot of page {label}: {}", path.display()),
                Err(e) => eprintln!("no screenshot of page {label}: {e}"),
            }
        }
    }
}

/// Where failure screenshots go: `target/tmp/browser-screenshots` (Cargo's per-project temp dir
/// for integration tests).
pub fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

async fn screenshot(http: &reqwest::Client, session: &str, path: &Path) -> Result<(), String> {
    use base64::Engine;
    let v = call(
        http,
        reqwest::Method::GET,
        &format!("{session}/screenshot"),
        None,
    )
    .await?;
    let b64 = v.as_str().ok_or_else(|| format!("screenshot: {v}"))?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| e.to_string())?;
    std::fs::write(path, png).map_err(|e| e.to_string())
}

/// One WebDriver command; `Err` carries WebDriver's error and message.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut r = http.request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r
        .send()
        .await
        .map_err(|e| format!("webdriver {url}: {e}"))?;
    let ok = resp.status().is_success();
    let v: Value = resp
        .json()
        .await
        .map_err(|e| format!("webdriver {url}: {e}"))?;
    let value = v["value"].clone();
    if !ok {
        return Err(format!("{}: {}", value["error"], value["message"]));
    }
    Ok(value)
}

/// One Chromium instance (a WebDriver session) and its page.
pub struct Browser {
    http: reqwest::Client,
    url: String,
    label: String,
    open: Registry,
}

impl Browser {
    /// The label given at launch.
    pub fn label(&self) -> &str {
        &self.label
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        call(&self.http, method, &format!("{}{path}", self.url), body)
            .await
            .unwrap_or_else(|e| panic!("page {}: {path}: {e}", self.label))
    }

    /// Navigate and wait for the load event.
    pub async fn go(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The page's current URL.
    pub async fn current_url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Run `script` (a function body; `arguments` holds `args`) and return its value. A promise
    /// returned by the script is awaited.
    pub async fn js_args(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// [`Browser::js_args`] without arguments.
    pub async fn js(&self, script: &str) -> Value {
        self.js_args(script, json!([])).await
    }

    /// Run `source` in every document this page loads from now on, before the page's own
    /// scripts (Chromium's `Page.addScriptToEvaluateOnNewDocument`).
    pub async fn add_init_script(&self, source: &str) {
        self.cmd(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            Some(json!({"cmd": "Page.addScriptToEvaluateOnNewDocument",
                        "params": {"source": source}})),
        )
        .await;
    }

    /// The WebDriver element id for the first match of a CSS selector.
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("page {}: no element {css}: {v}", self.label))
            .to_string()
    }

    /// Click the element matching `css`, as a user would (it must be visible).
    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Clear the input matching `css` and type `text` into it key by key.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The visible text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Save a PNG of the page's viewport.
    pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
        screenshot(&self.http, &self.url, path).await
    }

    /// Poll `script` every 100 ms until it returns something other than null or false, for
    /// at most `budget`; `Err` carries the last value.
    pub async fn poll(&self, script: &str, budget: Duration) -> Result<Value, Value> {
        let end = tokio::time::Instant::now() + budget;
        loop {
            let v = self.js(script).await;
            if !v.is_null() && v != Value::Bool(false) {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= end {
                return Err(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// End the session, which closes this Chromium instance.
    pub async fn quit(self) {
        let _ = call(&self.http, reqwest::Method::DELETE, &self.url, None).await;
        self.open.lock().unwrap().retain(|(_, u)| u != &self.url);
    }
}
