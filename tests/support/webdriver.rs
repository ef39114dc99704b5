//! A small browser driver for the tests that use real browsers: Debian's Chromium through
//! chromedriver (W3C WebDriver over HTTP) and Debian's Firefox ESR over WebDriver BiDi (one
//! WebSocket, no geckodriver), behind one [`Browser`] API.
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
//! Used as `crate::support::webdriver`; not every test uses every helper.
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

/// An open page for failure screenshots: a WebDriver session URL, or a Firefox BiDi connection.
#[derive(Clone)]
enum Handle {
    Wd(String),
    Bidi(Arc<bidi::Conn>),
}

impl Handle {
    fn same(&self, other: &Handle) -> bool {
        match (self, other) {
            (Handle::Wd(a), Handle::Wd(b)) => a == b,
            (Handle::Bidi(a), Handle::Bidi(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

type Registry = Arc<Mutex<Vec<(String, Handle)>>>;

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
            .push((c.label.clone(), Handle::Wd(url.clone())));
        Browser {
            inner: Inner::Wd {
                http: self.http.clone(),
                url,
            },
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
        for (label, h) in open {
            let path = dir.join(format!("{name}-{label}.png"));
            let r = match h {
                Handle::Wd(url) => screenshot(&self.http, &url, &path).await,
                Handle::Bidi(c) => c.screenshot(&path).await,
            };
            match r {
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

/// Prefs every test Firefox gets (written to its fresh profile's `user.js`): fake camera and
/// microphone without a prompt, loopback STUN/TURN allowed (Firefox skips loopback candidates
/// by default), host candidates as real addresses rather than mDNS names, ICE kept on `lo` so
/// that a call stays on loopback, and no background traffic.
pub const FIREFOX_PREFS: &[(&str, &str)] = &[
    ("media.navigator.streams.fake", "true"),
    ("media.navigator.permission.disabled", "true"),
    ("media.peerconnection.ice.loopback", "true"),
    ("media.peerconnection.ice.obfuscate_host_addresses", "false"),
    ("media.peerconnection.ice.force_interface", "\"lo\""),
    ("media.autoplay.default", "0"),
    ("browser.shell.checkDefaultBrowser", "false"),
    ("browser.startup.homepage_override.mstone", "\"ignore\""),
    ("datareporting.policy.dataSubmissionEnabled", "false"),
    ("toolkit.telemetry.reportingpolicy.firstRun", "false"),
    ("app.update.disabledForTesting", "true"),
    ("network.captive-portal-service.enabled", "false"),
    ("network.connectivity-service.enabled", "false"),
    ("browser.safebrowsing.malware.enabled", "false"),
    ("browser.safebrowsing.phishing.enabled", "false"),
    ("extensions.update.enabled", "false"),
];

/// The prefs of the lab's Firefox: [`FIREFOX_PREFS`] without the loopback-only ones, plus the
/// camera on the lab's plain-HTTP demo origin.
pub const FIREFOX_LAB_PREFS: &[(&str, &str)] = &[
    ("media.navigator.streams.fake", "true"),
    ("media.navigator.permission.disabled", "true"),
    ("media.peerconnection.ice.obfuscate_host_addresses", "false"),
    ("media.devices.insecure.enabled", "true"),
    ("media.getusermedia.insecure.enabled", "true"),
    ("media.autoplay.default", "0"),
    ("browser.shell.checkDefaultBrowser", "false"),
    ("browser.startup.homepage_override.mstone", "\"ignore\""),
    ("datareporting.policy.dataSubmissionEnabled", "false"),
    ("toolkit.telemetry.reportingpolicy.firstRun", "false"),
    ("app.update.disabledForTesting", "true"),
    ("network.captive-portal-service.enabled", "false"),
    ("network.connectivity-service.enabled", "false"),
];

/// Write `prefs` as the `user.js` of a fresh Firefox profile directory.
pub fn firefox_profile(profile: &Path, prefs: &[(&str, &str)]) {
    let text: String = prefs
        .iter()
        .map(|(k, v)| format!("user_pref(\"{k}\", {v});\n"))
        .collect();
    std::fs::write(profile.join("user.js"), text).expect("write user.js");
}

/// Which engine a test page runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Chromium,
    Firefox,
}

impl Engine {
    /// A short name for labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Chromium => "chromium",
            Engine::Firefox => "firefox",
        }
    }
}

impl Driver {
    /// A new headless Firefox ESR instance (Debian's `firefox-esr`) with a fresh profile in
    /// `profile` holding [`FIREFOX_PREFS`], driven over WebDriver BiDi on a free loopback port.
    /// It is registered for [`Driver::screenshots_on_panic`] like a Chromium page, and killed
    /// with its process group when the returned [`Browser`] is dropped.
    pub async fn firefox(&self, label: &str, profile: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        firefox_profile(profile, FIREFOX_PREFS);
        let port = free_port();
        let child = Command::new("firefox-esr")
            .args(["--headless", "--no-remote", "--profile"])
            .arg(profile)
            .args(["--width", "1000", "--height", "800"])
            .arg(format!("--remote-debugging-port={port}"))
            .arg("about:blank")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start firefox-esr: {e} (firefox-esr: scripts/install-test-deps.sh)")
            });
        let proc = Proc(child);
        self.firefox_attach(
            label,
            &format!("ws://127.0.0.1:{port}/session"),
            None,
            Some(proc),
        )
        .await
    }

    /// Drive a Firefox that something else started (e.g. inside a lab namespace) through its
    /// BiDi endpoint `url` (`ws://host:port/session`), sending `host` as the Host header when
    /// given (a forwarded port); `proc`, if given, is killed on drop.
    pub async fn firefox_attach(
        &self,
        label: &str,
        url: &str,
        host: Option<&str>,
        proc: Option<Proc>,
    ) -> Browser {
        let mut conn = None;
        for _ in 0..300 {
            if let Ok(c) = bidi::Conn::connect(url, host).await {
                conn = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conn = conn.unwrap_or_else(|| panic!("Firefox {label}: no WebDriver BiDi at {url}"));
        conn.cmd("session.new", json!({"capabilities": {}}))
            .await
            .unwrap_or_else(|e| panic!("Firefox {label}: session.new: {e}"));
        let tree = conn
            .cmd("browsingContext.getTree", json!({}))
            .await
            .unwrap_or_else(|e| panic!("Firefox {label}: getTree: {e}"));
        let ctx = tree["contexts"][0]["context"]
            .as_str()
            .unwrap_or_else(|| panic!("Firefox {label}: no browsing context: {tree}"))
            .to_string();
        *conn.context.lock().unwrap() = ctx;
        let conn = Arc::new(conn);
        self.open
            .lock()
            .unwrap()
            .push((label.to_string(), Handle::Bidi(conn.clone())));
        Browser {
            inner: Inner::Bidi { conn, _proc: proc },
            label: label.into(),
            open: self.open.clone(),
        }
    }

    /// A page in `engine`: Chromium with [`CHROMIUM_FLAGS`] plus `chromium_extra`, or Firefox
    /// with [`FIREFOX_PREFS`].
    pub async fn open_engine(
        &self,
        engine: Engine,
        label: &str,
        profile: &Path,
        chromium_extra: &[&str],
    ) -> Browser {
        match engine {
            Engine::Chromium => self.browser(label, profile, chromium_extra).await,
            Engine::Firefox => self.firefox(label, profile).await,
        }
    }
}

/// A browser process started directly (Firefox): its whole process group is killed on drop, so
/// no browser outlives a test, also when it panicked.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal WebDriver BiDi client (JSON commands over one WebSocket), enough to drive a page.
pub mod bidi {
    use serde_json::{json, Value};
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

    /// One BiDi connection; commands are matched to answers by id, events are ignored.
    pub struct Conn {
        tx: mpsc::UnboundedSender<String>,
        waiting: Waiting,
        next: AtomicU64,
        /// The top-level browsing context the tests drive.
        pub context: Mutex<String>,
    }

    impl Conn {
        /// Connect to a BiDi endpoint such as `ws://127.0.0.1:9222/session`. `host` replaces
        /// the Host header (Firefox accepts only its own host and port there, which a
        /// forwarded port does not match).
        pub async fn connect(url: &str, host: Option<&str>) -> Result<Conn, String> {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            use tokio_tungstenite::tungstenite::Message;
            let mut req = url.into_client_request().map_err(|e| e.to_string())?;
            if let Some(h) = host {
                req.headers_mut()
                    .insert("host", h.parse().map_err(|_| format!("bad host {h}"))?);
            }
            let (ws, _) = tokio_tungstenite::connect_async(req)
                .await
                .map_err(|e| e.to_string())?;
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let waiting: Waiting = Arc::default();
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if sink.send(Message::Text(m.into())).await.is_err() {
                        break;
                    }
                }
            });
            let w = waiting.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    let Message::Text(t) = m else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        if let Some(s) = w.lock().unwrap().remove(&id) {
                            let _ = s.send(v);
                        }
                    }
                }
                w.lock().unwrap().clear();
            });
            Ok(Conn {
                tx,
                waiting,
                next: AtomicU64::new(1),
                context: Mutex::new(String::new()),
            })
        }

        /// Send one command and wait (at most 60 s) for its result; `Err` carries BiDi's error.
        pub async fn cmd(&self, method: &str, params: Value) -> Result<Value, String> {
            self.cmd_within(method, params, Duration::from_secs(60))
                .await
        }

        /// [`Conn::cmd`] with its own time limit.
        pub async fn cmd_within(
            &self,
            method: &str,
            params: Value,
            limit: Duration,
        ) -> Result<Value, String> {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let (s, r) = oneshot::channel();
            self.waiting.lock().unwrap().insert(id, s);
            let msg = json!({"id": id, "method": method, "params": params});
            self.tx
                .send(msg.to_string())
                .map_err(|_| format!("{method}: connection closed"))?;
            let v = tokio::time::timeout(limit, r)
                .await
                .map_err(|_| format!("{method}: no answer in {limit:?}"))?
                .map_err(|_| format!("{method}: connection closed"))?;
            if v["type"] == "error" {
                return Err(format!("{method}: {}: {}", v["error"], v["message"]));
            }
            Ok(v["result"].clone())
        }

        /// The driven browsing context.
        pub fn ctx(&self) -> String {
            self.context.lock().unwrap().clone()
        }

        /// Save a PNG of the viewport.
        pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
            use base64::Engine;
            let v = self
                .cmd_within(
                    "browsingContext.captureScreenshot",
                    json!({"context": self.ctx()}),
                    Duration::from_secs(15),
                )
                .await?;
            let b64 = v["data"]
                .as_str()
                .ok_or_else(|| format!("screenshot: {v}"))?;
            let png = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| e.to_string())?;
            std::fs::write(path, png).map_err(|e| e.to_string())
        }
    }
}

enum Inner {
    /// A chromedriver session.
    Wd { http: reqwest::Client, url: String },
    /// A Firefox over BiDi, with its process.
    Bidi {
        conn: Arc<bidi::Conn>,
        _proc: Option<Proc>,
    },
}

/// One browser instance (a Chromium WebDriver session or a Firefox over BiDi) and its page;
/// the same calls drive both.
pub struct Browser {
    inner: Inner,
    label: String,
    open: Registry,
}

/// Runs a WebDriver-style script body (`arguments` holds the arguments; it may `await`) and
/// hands its value back as JSON text, for BiDi's `script.callFunction`.
const BIDI_WRAP: &str = "async function(__json) {\n  const __f = async function() {\n";
const BIDI_WRAP_END: &str = "\n  };\n  const __r = await __f.apply(window, JSON.parse(__json));\n  return JSON.stringify(__r === undefined ? null : __r);\n}";

impl Browser {
    /// The label given at launch.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Which engine this page runs in.
    pub fn engine(&self) -> Engine {
        match self.inner {
            Inner::Wd { .. } => Engine::Chromium,
            Inner::Bidi { .. } => Engine::Firefox,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let Inner::Wd { http, url } = &self.inner else {
            panic!("page {}: {path} is a WebDriver command", self.label)
        };
        call(http, method, &format!("{url}{path}"), body)
            .await
            .unwrap_or_else(|e| panic!("page {}: {path}: {e}", self.label))
    }

    async fn bidi(&self, method: &str, params: Value) -> Value {
        let Inner::Bidi { conn, .. } = &self.inner else {
            panic!("page {}: {method} is a BiDi command", self.label)
        };
        conn.cmd(method, params)
            .await
            .unwrap_or_else(|e| panic!("page {}: {e}", self.label))
    }

    fn ctx(&self) -> String {
        match &self.inner {
            Inner::Bidi { conn, .. } => conn.ctx(),
            Inner::Wd { .. } => String::new(),
        }
    }

    /// Navigate and wait for the load event.
    pub async fn go(&self, url: &str) {
        match &self.inner {
            Inner::Wd { .. } => {
                self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
                    .await;
            }
            Inner::Bidi { .. } => {
                self.bidi(
                    "browsingContext.navigate",
                    json!({"context": self.ctx(), "url": url, "wait": "complete"}),
                )
                .await;
            }
        }
    }

    /// The page's current URL.
    pub async fn current_url(&self) -> String {
        match &self.inner {
            Inner::Wd { .. } => self
                .cmd(reqwest::Method::GET, "/url", None)
                .await
                .as_str()
                .unwrap_or_default()
                .to_string(),
            Inner::Bidi { .. } => self
                .js("return location.href")
                .await
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// Run `script` (a function body; `arguments` holds `args`) and return its value. A promise
    /// returned by the script is awaited.
    pub async fn js_args(&self, script: &str, args: Value) -> Value {
        match &self.inner {
            Inner::Wd { .. } => {
                self.cmd(
                    reqwest::Method::POST,
                    "/execute/sync",
                    Some(json!({"script": script, "args": args})),
                )
                .await
            }
            Inner::Bidi { .. } => {
                let r = self
                    .bidi(
                        "script.callFunction",
                        json!({
                            "functionDeclaration": format!("{BIDI_WRAP}{script}{BIDI_WRAP_END}"),
                            "arguments": [{"type": "string", "value": args.to_string()}],
                            "target": {"context": self.ctx()},
                            "awaitPromise": true,
                            "resultOwnership": "none",
                        }),
                    )
                    .await;
                if r["type"] == "exception" {
                    panic!(
                        "page {}: script threw: {}",
                        self.label, r["exceptionDetails"]["text"]
                    );
                }
                let text = r["result"]["value"].as_str().unwrap_or("null");
                serde_json::from_str(text).unwrap_or(Value::Null)
            }
        }
    }

    /// [`Browser::js_args`] without arguments.
    pub async fn js(&self, script: &str) -> Value {
        self.js_args(script, json!([])).await
    }

    /// Run `source` in every document this page loads from now on, before the page's own
    /// scripts (Chromium's `Page.addScriptToEvaluateOnNewDocument`, BiDi's preload scripts).
    pub async fn add_init_script(&self, source: &str) {
        match &self.inner {
            Inner::Wd { .. } => {
                self.cmd(
                    reqwest::Method::POST,
                    "/goog/cdp/execute",
                    Some(json!({"cmd": "Page.addScriptToEvaluateOnNewDocument",
                                "params": {"source": source}})),
                )
                .await;
            }
            Inner::Bidi { .. } => {
                self.bidi(
                    "script.addPreloadScript",
                    json!({"functionDeclaration": format!("() => {{\n{source}\n}}")}),
                )
                .await;
            }
        }
    }

    /// The WebDriver element id (BiDi: shared id) for the first match of a CSS selector.
    pub async fn find(&self, css: &str) -> String {
        match &self.inner {
            Inner::Wd { .. } => {
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
            Inner::Bidi { .. } => {
                let r = self
                    .bidi(
                        "script.callFunction",
                        json!({
                            "functionDeclaration": "(css) => document.querySelector(css)",
                            "arguments": [{"type": "string", "value": css}],
                            "target": {"context": self.ctx()},
                            "awaitPromise": false,
                        }),
                    )
                    .await;
                r["result"]["sharedId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("page {}: no element {css}: {r}", self.label))
                    .to_string()
            }
        }
    }

    /// Click the element matching `css`, as a user would (it must be visible).
    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        match &self.inner {
            Inner::Wd { .. } => {
                self.cmd(
                    reqwest::Method::POST,
                    &format!("/element/{e}/click"),
                    Some(json!({})),
                )
                .await;
            }
            Inner::Bidi { .. } => {
                self.bidi(
                    "input.performActions",
                    json!({"context": self.ctx(), "actions": [{
                    "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                    "actions": [
                        {"type": "pointerMove", "x": 0, "y": 0,
                         "origin": {"type": "element", "element": {"sharedId": e}}},
                        {"type": "pointerDown", "button": 0},
                        {"type": "pointerUp", "button": 0}
                    ]}]}),
                )
                .await;
            }
        }
    }

    /// Clear the input matching `css` and type `text` into it key by key.
    pub async fn type_into(&self, css: &str, text: &str) {
        match &self.inner {
            Inner::Wd { .. } => {
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
            Inner::Bidi { .. } => {
                self.js_args(
                    "const e = document.querySelector(arguments[0]); e.value = ''; e.focus(); return true",
                    json!([css]),
                )
                .await;
                let keys: Vec<Value> = text
                    .chars()
                    .flat_map(|c| {
                        let c = c.to_string();
                        [
                            json!({"type": "keyDown", "value": c}),
                            json!({"type": "keyUp", "value": c}),
                        ]
                    })
                    .collect();
                self.bidi(
                    "input.performActions",
                    json!({"context": self.ctx(), "actions": [
                        {"type": "key", "id": "keyboard", "actions": keys}]}),
                )
                .await;
            }
        }
    }

    /// The visible text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        match &self.inner {
            Inner::Wd { .. } => {
                let e = self.find(css).await;
                self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
                    .await
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
            Inner::Bidi { .. } => self
                .js_args(
                    "return document.querySelector(arguments[0]).innerText",
                    json!([css]),
                )
                .await
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// Save a PNG of the page's viewport.
    pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
        match &self.inner {
            Inner::Wd { http, url } => screenshot(http, url, path).await,
            Inner::Bidi { conn, .. } => conn.screenshot(path).await,
        }
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

    /// End the session, which closes this browser instance.
    pub async fn quit(self) {
        let mine = match &self.inner {
            Inner::Wd { http, url } => {
                let _ = call(http, reqwest::Method::DELETE, url, None).await;
                Handle::Wd(url.clone())
            }
            Inner::Bidi { conn, .. } => {
                let _ = conn
                    .cmd_within("browser.close", json!({}), Duration::from_secs(5))
                    .await;
                Handle::Bidi(conn.clone())
            }
        };
        self.open.lock().unwrap().retain(|(_, h)| !h.same(&mine));
        // A Firefox's process group is killed when `self` drops here.
    }
}
