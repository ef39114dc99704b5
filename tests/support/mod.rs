//! Helpers shared by the integration tests (`tests/it/`), one module a concern, so that a
//! helper is written once and every test file gets the same fixes.

pub mod cert;
pub mod http;
pub mod lab;
pub mod lab_ca;
pub mod peerjs_page;
pub mod proc;
pub mod redis;
pub mod rtc_stats;
pub mod stream_turn;
pub mod turn_common;
pub mod webdriver;
pub mod ws;

/// One browser pair at a time in the whole test binary: two cores cannot encode video for more,
/// and a starved browser's call fails its deadlines. Every test that launches a browser holds
/// this guard for as long as its browsers run.
static BROWSERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the browser slot (see [`BROWSERS`]); drop the guard when the browsers are gone.
pub async fn browser_slot() -> tokio::sync::MutexGuard<'static, ()> {
    BROWSERS.lock().await
}
