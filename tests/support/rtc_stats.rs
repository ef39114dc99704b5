//! Scripts that let a test read a page's real WebRTC connections through getStats instead of
//! trusting what the page says; shared by the tests that drive Chromium and Firefox.
//!
//! Used as `crate::support::rtc_stats`.

/// Wraps `RTCPeerConnection` before the page's scripts run: every connection the page makes is
/// kept in `window.__pcs`. With `window.__sbTest.badTurn`, TURN credentials are spoiled on the
/// way in, as a stale or mistyped credential would be; with `window.__sbTest.turnVia` (a port),
/// TURN URLs point at that port on the same host instead (a proxy the test can switch off).
/// Remote IPv6 candidates are dropped, so that every path stays on 127.0.0.1.
pub const PC_WRAPPER: &str = r#"(() => {
  const Orig = window.RTCPeerConnection;
  const via = (cfg) => (window.__sbTest || {}).turnVia && cfg && cfg.iceServers
    ? { ...cfg, iceServers: cfg.iceServers.map((s) => ({ ...s, urls: [].concat(s.urls)
        .map((u) => u.replace(/^(turns?:[^?]*):\d+/, "$1:" + window.__sbTest.turnVia)) })) }
    : cfg;
  const spoil = (cfg0) => { const cfg = via(cfg0); return (window.__sbTest || {}).badTurn && cfg && cfg.iceServers
    ? { ...cfg, iceServers: cfg.iceServers.map((s) => s.credential ? { ...s, credential: "not-the-password" } : s) }
    : cfg; };
  window.__pcs = [];
  window.RTCPeerConnection = class extends Orig {
    constructor(cfg, ...rest) {
      super(spoil(cfg), ...rest);
      window.__pcs.push(this);
      this.__cands = [];
      this.__sdp = []; // "local offer", "remote offer", "local answer", ... in order
      this.addEventListener("signalingstatechange", () => {
        const st = this.signalingState;
        if (st === "have-local-offer") this.__sdp.push("local offer");
        if (st === "have-remote-offer") this.__sdp.push("remote offer");
      });
      this.addEventListener("icecandidate", ({ candidate: c }) => {
        if (c) this.__cands.push({ type: c.type, address: c.address, relatedAddress: c.relatedAddress, line: c.candidate });
      });
    }
    setConfiguration(cfg) { return super.setConfiguration(spoil(cfg)); }
    setLocalDescription(d, ...rest) {
      if (d && d.type === "rollback") this.__sdp.push("rollback");
      return super.setLocalDescription(d, ...rest);
    }
    // IPv6 candidates are dropped: Firefox gathers the machine's global IPv6 address even with
    // ICE forced onto `lo`, and a call must stay on 127.0.0.1.
    addIceCandidate(c, ...rest) {
      const line = c && (typeof c === "string" ? c : c.candidate);
      const addr = line ? line.split(" ")[4] || "" : "";
      if (addr.includes(":")) return Promise.resolve();
      return super.addIceCandidate(c, ...rest);
    }
  };
})();"#;

/// The newest open connection on the page, read through getStats, with what the page shows.
pub const PC_STATS: &str = r#"
  const pcs = (window.__pcs || []).filter((p) => p.signalingState !== "closed");
  const pc = pcs[pcs.length - 1];
  const s = window.sbState || {};
  const page = { page: s.state, pagePath: s.path, error: s.error, notice: s.notice, restarts: s.restarts,
                 errorText: document.getElementById("error")?.textContent };
  if (!pc) return { ...page, pcs: 0 };
  const stats = await pc.getStats();
  let sel = null, frames = 0, sent = 0, received = 0;
  stats.forEach((r) => {
    if (r.type === "transport" && r.selectedCandidatePairId) sel = stats.get(r.selectedCandidatePairId);
    // Firefox has no transport stats; it marks the pair in use with `selected`.
    if (r.type === "candidate-pair" && r.selected && !sel) sel = r;
    if (r.type === "inbound-rtp" && r.kind === "video") { frames += r.framesDecoded || 0; received += r.packetsReceived || 0; }
    if (r.type === "outbound-rtp" && r.kind === "video") sent += r.packetsSent || 0;
  });
  const local = sel && stats.get(sel.localCandidateId);
  const remote = sel && stats.get(sel.remoteCandidateId);
  return { ...page, pcs: pcs.length, ice: pc.iceConnectionState, conn: pc.connectionState, signaling: pc.signalingState, frames,
           videoPacketsSent: sent, videoPacketsReceived: received,
           localType: local?.candidateType, relayProtocol: local?.relayProtocol,
           localAddress: local?.address, relatedAddress: local?.relatedAddress,
           remoteType: remote?.candidateType, remoteAddress: remote?.address,
           gathered: pc.__cands.length, sdp: pc.__sdp,
           receivers: pc.getTransceivers().map((t) => [t.mid, t.direction, t.currentDirection, t.receiver.track.kind, t.receiver.track.muted]),
           ufrag: pc.remoteDescription?.sdp.match(/a=ice-ufrag:(\S+)/)?.[1] ?? null };
"#;
