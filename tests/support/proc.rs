//! The server binary as a child process, for tests that signal it (SIGTERM, SIGHUP), read its
//! log and wait for its exit. Stdout goes to a file, so a test can also fill the disk under it.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a log line or an exit is waited for before the test fails.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A running `switchboard --config …`, killed when dropped.
pub struct Proc {
    child: Child,
    /// The HTTP listener's address, from the start-up log.
    pub http: SocketAddr,
    /// The STUN/TURN UDP port's address.
    pub udp: SocketAddr,
    /// The `turns:` listener's address, when one is configured.
    pub tls: Option<SocketAddr>,
    log: PathBuf,
    /// Lines of the log already consumed by [`Proc::next_log`].
    seen: usize,
}

/// How the process ended.
pub struct Exit {
    pub code: Option<i32>,
    /// From the call of [`Proc::wait_exit`] to the exit.
    pub took: Duration,
    pub stderr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_in(line: &str) -> Option<SocketAddr> {
    let i = line.find("addr=")? + 5;
    line[i..].split_whitespace().next()?.parse().ok()
}

impl Proc {
    /// Starts the binary with `RUST_LOG=info`, logging to `switchboard.log` next to `config`,
    /// and waits until it is ready.
    pub fn start(config: &Path) -> Proc {
        let log = config.with_file_name("switchboard.log");
        Proc::start_logging_to(config, &log, "info")
    }

    /// Starts the binary with its stdout in `log` and waits until it is ready.
    pub fn start_logging_to(config: &Path, log: &Path, rust_log: &str) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let unset: SocketAddr = "0.0.0.0:0".parse().expect("address");
        let mut p = Proc {
            child,
            http: unset,
            udp: unset,
            tls: None,
            log: log.to_path_buf(),
            seen: 0,
        };
        p.next_log("switchboard ready");
        for l in p.log_text().lines() {
            if l.contains("HTTP listening") {
                p.http = addr_in(l).expect("http addr");
            }
            if l.contains("listening on UDP") {
                p.udp = addr_in(l).expect("udp addr");
            }
            if l.contains("listening on TLS") {
                p.tls = addr_in(l);
            }
        }
        p
    }

    /// The log file (to watch its size).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a line with `needle` anywhere in the log, from its start.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_line(needle, 0).1
    }

    /// Waits for a line with `needle` after the line the previous call matched, so the same
    /// message logged twice (two reloads) is waited for twice.
    pub fn next_log(&mut self, needle: &str) -> String {
        let (i, l) = self.wait_line(needle, self.seen);
        self.seen = i + 1;
        l
    }

    fn wait_line(&self, needle: &str, from: usize) -> (usize, String) {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let text = self.log_text();
            // A line still being written has no newline yet: only whole lines count.
            let whole = text.rfind('\n').map_or("", |end| &text[..end]);
            if let Some((i, l)) = whole
                .lines()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
            {
                return (i, l.to_string());
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} after line {from}; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (`"-TERM"`, `"-HUP"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(st.success(), "kill {sig} failed");
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Waits for the process to exit within `budget`, and collects its stderr.
    pub fn wait_exit(&mut self, budget: Duration) -> Exit {
        let t0 = Instant::now();
        while t0.elapsed() < budget {
            if let Some(st) = self.child.try_wait().expect("wait") {
                let took = t0.elapsed();
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return Exit {
                    code: st.code(),
                    took,
                    stderr,
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process did not exit within {budget:?}");
    }
}
