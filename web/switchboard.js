// switchboard.js — a small ES module (no build step) for the switchboard signaling protocol
// (docs/protocol.md): login, WebSocket, rooms, perfect negotiation with the roles the server
// assigns, automatic resume, and refreshed iceServers applied with setConfiguration.

export class SwitchboardError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class Switchboard extends EventTarget {
  /**
   * @param {object} opts
   * @param {string} [opts.base] HTTP base URL of the server (default: this page's origin).
   * @param {object} opts.credentials Login body, e.g. {name} or {username, password}.
   * @param {MediaStream} [opts.stream] Local media to send.
   * @param {boolean} [opts.relayOnly] iceTransportPolicy 'relay'.
   */
  constructor({ base = "", credentials, stream = null, relayOnly = false }) {
    super();
    this.base = base;
    this.credentials = credentials;
    this.stream = stream;
    this.relayOnly = relayOnly;
    this.peers = new Map(); // peerId -> {pc, polite, makingOffer, ignoreOffer}
    this.pending = new Map(); // request id -> {resolve, reject}
    this.nextId = 1;
    this.lastSeq = 0;
    this.outbox = []; // signals made while the socket is down, sent after the resume
    this.resumes = 0;
    this.closed = false;
  }

  async login() {
    const r = await fetch(`${this.base}/v1/login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(this.credentials),
    });
    const body = await r.json();
    if (!r.ok) throw new SwitchboardError(body.error?.code, body.error?.message);
    this.session = body;
    this.token = body.token;
    this.iceServers = body.iceServers;
    this.userId = body.userId;
    return body;
  }

  /** Log in (if needed) and open the signaling socket. */
  async connect() {
    if (!this.session) await this.login();
    await this._open();
  }

  _open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.session.signalingUrl, ["switchboard.v1", this.token]);
      this.ws = ws;
      let welcomed = false;
      ws.onmessage = (ev) => {
        const msg = JSON.parse(ev.data);
        if (msg.type === "welcome" && !welcomed) {
          welcomed = true;
          resolve();
        }
        if (msg.type === "error" && !welcomed) reject(new SwitchboardError(msg.code, msg.message));
        this._onFrame(msg);
      };
      ws.onclose = (ev) => {
        if (!welcomed) reject(new SwitchboardError("closed", "signaling socket closed"));
        this._onClose(ws, ev.code);
      };
    });
  }

  _send(frame) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    // An offer or candidate made during a signaling drop must not be lost: keep it for the
    // resume (bounded; beyond that ICE restarts on failure).
    else if (frame.type === "signal" && this.room && !this.closed && this.outbox.length < 500) this.outbox.push(frame);
  }

  _request(frame) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this._send({ ...frame, id });
    });
  }

  async createRoom(name, capacity) {
    const r = await this._request({ type: "create", name, capacity });
    return r.room;
  }

  async join(room) {
    const j = await this._request({ type: "join", room });
    this.room = j.room;
    this.peerId = j.peerId;
    this.resumeToken = j.resumeToken;
    for (const p of j.peers) this._peer(p.peerId, p.polite);
    this._emit("joined", j);
    return j;
  }

  leave() {
    this.closed = true;
    this._send({ type: "leave" });
    for (const id of [...this.peers.keys()]) this._closePeer(id);
  }

  /** Send an app message to every peer over the data channels that are open. */
  sendMessage(data) {
    let n = 0;
    for (const { channel } of this.peers.values()) {
      if (channel?.readyState === "open") {
        channel.send(data);
        n++;
      }
    }
    return n;
  }

  /** Drop the socket without leaving, as a network failure would (used by tests and demos). */
  dropSocket() {
    this.ws?.close();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _onFrame(msg) {
    if (typeof msg.seq === "number") this.lastSeq = Math.max(this.lastSeq, msg.seq);
    if (msg.id !== undefined && this.pending.has(msg.id)) {
      const p = this.pending.get(msg.id);
      this.pending.delete(msg.id);
      if (msg.type === "error") p.reject(new SwitchboardError(msg.code, msg.message));
      else p.resolve(msg);
      if (msg.type !== "resumed") return;
    }
    switch (msg.type) {
      case "ice-servers":
        this.iceServers = msg.iceServers;
        if (msg.token) this.token = msg.token;
        for (const { pc } of this.peers.values()) {
          pc.setConfiguration({ ...pc.getConfiguration(), iceServers: msg.iceServers });
        }
        break;
      case "peer-joined":
        this._peer(msg.peerId, msg.polite);
        this._emit("peer-joined", msg);
        break;
      case "peer-left":
        this._closePeer(msg.peerId);
        this._emit("peer-left", msg);
        break;
      case "peer-reconnecting":
      case "peer-resumed":
        this._emit(msg.type, msg);
        break;
      case "resumed":
        this.resumes++;
        // Some frames were evicted from the server's buffer: candidates may be missing, so
        // renegotiate ICE rather than trust a partial exchange.
        if (msg.complete === false) for (const { pc } of this.peers.values()) pc.restartIce();
        this._emit("resumed", msg);
        break;
      case "signal":
        this._onSignal(msg.from, msg.data);
        break;
      case "error":
        this._emit("error", msg);
        break;
    }
  }

  _onClose(ws, code) {
    if (ws !== this.ws || this.closed) return;
    if (code === 4001) {
      // Replaced by a newer connection of the same user: resuming would fight it.
      this.closed = true;
      for (const id of [...this.peers.keys()]) this._closePeer(id);
      this._emit("error", { code: "replaced", message: "this call continued in another window" });
      return;
    }
    this._emit("disconnected", {});
    if (this.room) setTimeout(() => this._resume(), 300);
  }

  async _resume(attempt = 0) {
    try {
      await this._open();
      const r = await this._request({ type: "resume", resumeToken: this.resumeToken, lastSeq: this.lastSeq });
      const queued = this.outbox.splice(0);
      for (const f of queued) if (!f.to || this.peers.has(f.to)) this._send(f);
      return r;
    } catch (e) {
      if (e.code === "bad_resume") {
        // Window closed: start over as a new peer.
        for (const id of [...this.peers.keys()]) this._closePeer(id);
        this.outbox = [];
        const room = this.room;
        this.room = null;
        return this.join(room);
      }
      if (attempt < 20) setTimeout(() => this._resume(attempt + 1), Math.min(5000, 300 * 2 ** attempt));
    }
  }

  _config() {
    return { iceServers: this.iceServers, iceTransportPolicy: this.relayOnly ? "relay" : "all" };
  }

  _peer(peerId, polite) {
    if (this.peers.has(peerId)) return this.peers.get(peerId);
    const pc = new RTCPeerConnection(this._config());
    const st = { pc, polite, makingOffer: false, ignoreOffer: false, early: [] };
    this.peers.set(peerId, st);
    if (this.stream) for (const t of this.stream.getTracks()) pc.addTrack(t, this.stream);
    // A pre-negotiated data channel (same id on both sides) for app messages.
    st.channel = pc.createDataChannel("switchboard", { negotiated: true, id: 0 });
    st.channel.onmessage = (ev) => this._emit("message", { peerId, data: ev.data });
    st.channel.onopen = () => this._emit("channel-open", { peerId });
    pc.onnegotiationneeded = async () => {
      try {
        st.makingOffer = true;
        await pc.setLocalDescription();
        this._send({ type: "signal", to: peerId, data: { description: pc.localDescription } });
      } catch (e) {
        this._emit("error", { code: "negotiation", message: String(e) });
      } finally {
        st.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate) this._send({ type: "signal", to: peerId, data: { candidate } });
    };
    pc.ontrack = ({ streams }) => this._emit("track", { peerId, stream: streams[0] });
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === "failed") pc.restartIce();
      this._emit("ice-state", { peerId, state: pc.iceConnectionState });
    };
    this._emit("peer", { peerId, pc, polite });
    return st;
  }

  async _onSignal(from, data) {
    const st = this.peers.get(from) ?? this._peer(from, true);
    const { pc } = st;
    try {
      if (data.description) {
        const d = data.description;
        const collision = d.type === "offer" && (st.makingOffer || pc.signalingState !== "stable");
        st.ignoreOffer = !st.polite && collision;
        if (st.ignoreOffer) return;
        await pc.setRemoteDescription(d);
        // Candidates that came with an offer we ignored in a glare still name the peer's
        // addresses (the polite side keeps its ICE agent through the rollback). With relay
        // only they are the sole way our TURN allocation learns whom to permit, so add them now.
        for (const c of st.early.splice(0)) pc.addIceCandidate(c).catch(() => {});
        if (d.type === "offer") {
          await pc.setLocalDescription();
          this._send({ type: "signal", to: from, data: { description: pc.localDescription } });
        }
      } else if (data.candidate) {
        if (!pc.remoteDescription || st.ignoreOffer) {
          if (st.early.length < 100) st.early.push(data.candidate);
          return;
        }
        try {
          await pc.addIceCandidate(data.candidate);
        } catch (e) {
          if (!st.ignoreOffer) throw e;
        }
      }
    } catch (e) {
      this._emit("error", { code: "negotiation", message: String(e) });
    }
  }

  _closePeer(peerId) {
    const st = this.peers.get(peerId);
    if (!st) return;
    st.pc.close();
    this.peers.delete(peerId);
  }

  /** The selected candidate pair's local type for a peer: host, srflx, prflx or relay. */
  async connectionType(peerId) {
    const st = this.peers.get(peerId);
    if (!st) return null;
    const stats = await st.pc.getStats();
    let pair = null;
    stats.forEach((r) => {
      if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    });
    if (!pair) stats.forEach((r) => { if (r.type === "candidate-pair" && r.state === "succeeded" && r.nominated) pair = r; });
    if (!pair) return null;
    const local = stats.get(pair.localCandidateId);
    return local ? local.candidateType : null;
  }

  /** Frames decoded from a peer's video, for health displays and tests. */
  async framesDecoded(peerId) {
    const st = this.peers.get(peerId);
    if (!st) return 0;
    let n = 0;
    (await st.pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") n += r.framesDecoded || 0;
    });
    return n;
  }
}
