// @ts-check
// switchboard.js — a small ES module (no build step) for the switchboard signaling protocol
// (docs/protocol.md): login, WebSocket, rooms, perfect negotiation with the roles the server
// assigns, automatic resume, and refreshed iceServers applied with setConfiguration.
//
// Who offers first: the peer already in the room offers when `peer-joined` arrives; the
// newcomer waits for that offer (a fresh Chromium that offers and then rolls back for a remote
// offer may never start gathering). Perfect negotiation still resolves renegotiation, ICE
// restarts and real collisions. A watchdog restarts ICE when a connection gathers nothing or
// stays in `new`/`checking`, a bounded number of times, then reports why it gave up.
//
// ICE restarts: only the impolite side restarts ICE. When the polite side's watchdog fires
// first, it asks the impolite side to restart (`{restartIce}` signal) rather than make a restart
// offer of its own, so two restart offers never cross (Chromium rejects a Firefox restart
// offer that collides with its own, and both sides then waited for an answer forever). The
// watchdog also acts on a negotiation stuck in `have-local-offer`/`have-remote-offer`: it rolls
// back and restarts (or asks for one). The side that gives up tells the other (`{iceFailed}`),
// so both pages end with the same named error within GIVE_UP_WITHIN_MS.
//
// Fresh connections: a restart after a failure (the connection reached "failed", or it is
// connected and no media arrives) does not ICE-restart that connection; the impolite side
// closes it and makes a fresh RTCPeerConnection (same tracks, same negotiated data channel),
// and the polite side replaces its own when the fresh offer arrives. SDP and candidates carry
// `gen`, the connection they belong to, so that those of a replaced one are dropped. Why:
// Firefox's connection whose DTLS failed before it ever connected (ICE failed while the relay
// was down) reconnects ICE and DTLS after later restarts, receives, and counts its RTP as sent,
// but puts none of it on the wire, restart after restart.

/**
 * The answer of `POST /v1/login` (docs/http-api.md).
 * @typedef {object} Session
 * @property {string} token Session token for the signaling WebSocket.
 * @property {number} expiresAt Unix time the token expires.
 * @property {string} signalingUrl The WebSocket URL.
 * @property {RTCIceServer[]} iceServers STUN and TURN servers with fresh TURN credentials.
 * @property {number} ttl Seconds the TURN credentials are valid.
 * @property {string} userId Who the server says we are.
 */

/**
 * Another peer of the room, as `joined` and `resumed` list it.
 * @typedef {object} PeerInfo
 * @property {string} peerId
 * @property {string} userId
 * @property {boolean} polite Our role towards this peer (perfect negotiation).
 * @property {string} [state]
 */

/**
 * The answer to `join` (docs/protocol.md).
 * @typedef {object} Joined
 * @property {string} room
 * @property {string} peerId Our peer id in the room.
 * @property {string} resumeToken Presented by `resume` after a dropped socket.
 * @property {PeerInfo[]} peers Everyone already in the room.
 */

/**
 * The `detail` of a `signal` event in signaling-only mode.
 * @typedef {object} SignalEvent
 * @property {string} from The sender's peer id, stamped by the server.
 * @property {unknown} data What the sender put in `data`.
 */

/** How often the watchdog looks at each connection. */
const WATCH_EVERY_MS = 1000;
/** Both descriptions set and no candidate gathered for this long: restart ICE. */
const NO_CANDIDATE_MS = 4000;
/** ICE still `new`/`checking` (or `disconnected`) this long after both descriptions are set:
 * restart. The polite side waits longer so that the two sides rarely restart at once. */
const STUCK_MS = { impolite: 5000, polite: 7000 };
/** ICE connected but no RTP packet received (while a transceiver receives) for this long:
 * restart ICE. */
const NO_MEDIA_MS = 5000;
/** A negotiation (an offer without its answer) unfinished this long counts as stuck: roll back
 * and restart ICE. */
const NEGOTIATION_MS = 5000;
/** The newcomer offers itself if the first offer has not come after this long. */
const FIRST_OFFER_MS = 6000;
/** ICE restarts per outage before giving up with an error. */
export const MAX_ICE_RESTARTS = 3;
/** The watchdog's budget: a call that cannot connect ends with an `ice_failed` error on both
 * sides within this long of its connection being made (each restart waits at most a stuck
 * negotiation plus a stuck ICE check of the polite side, plus the first offer's wait). */
export const GIVE_UP_WITHIN_MS = FIRST_OFFER_MS + (MAX_ICE_RESTARTS + 1) * (NEGOTIATION_MS + STUCK_MS.polite);

/**
 * An `icecandidateerror` in words a person can act on.
 * @param {{url?: string, errorCode: number, errorText?: string}} e
 * @returns {string}
 */
export function describeIceError(e) {
  const where = e.url || "the ICE server";
  const text = e.errorText ? ` ${e.errorText}` : "";
  switch (e.errorCode) {
    case 401:
      return `${where} refused the TURN credentials (401 Unauthorized)`;
    case 403:
      return `${where} refused the request (403 Forbidden)`;
    case 437:
      return `${where} lost this relay allocation (437 Allocation Mismatch)`;
    case 486:
      return `${where} allows no more relays for this user (486 Allocation Quota Reached)`;
    case 508:
      return `${where} is out of relay capacity (508 Insufficient Capacity)`;
    case 701:
      return `${where} could not be reached (701${text})`;
    default:
      return `${where} answered ${e.errorCode}${text}`;
  }
}

/** A refusal from the server, with its error `code` (docs/protocol.md, docs/http-api.md). */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
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
   * @param {boolean} [opts.offerOnJoin] Also offer as the newcomer, so that both sides offer
   *   at once (a deliberate glare, to exercise collision handling; off in normal use).
   * @param {boolean} [opts.peerConnections] false: signaling only. No RTCPeerConnection is
   *   made; `signal` events carry what peers send, and `signal()` sends (for apps with their
   *   own WebRTC stack, and for Node.js, which has none).
   */
  constructor({
    base = "",
    credentials,
    stream = null,
    relayOnly = false,
    offerOnJoin = false,
    peerConnections = true,
  }) {
    super();
    this.base = base;
    this.peerConnections = peerConnections;
    this.credentials = credentials;
    this.stream = stream;
    this.relayOnly = relayOnly;
    this.offerOnJoin = offerOnJoin;
    this.peers = new Map(); // peerId -> {pc, polite, makingOffer, ignoreOffer}
    this.pending = new Map(); // request id -> {resolve, reject}
    this.nextId = 1;
    this.lastSeq = 0;
    this.outbox = []; // signals made while the socket is down, sent after the resume
    this.resumes = 0;
    this.resuming = false;
    this.closed = false;
    /** @type {Session | null} The last login answer. */
    this.session = null;
    /** @type {string | null} The session token (renewed by `ice-servers` pushes). */
    this.token = null;
    /** @type {RTCIceServer[]} The newest STUN/TURN servers and credentials. */
    this.iceServers = [];
    /** @type {string | null} */
    this.userId = null;
    /** @type {string | null} The room we are in. */
    this.room = null;
    /** @type {string | null} Our peer id in the room. */
    this.peerId = null;
    /** @type {string | null} */
    this.resumeToken = null;
    /** @type {WebSocket | null} */
    this.ws = null;
  }

  /**
   * Log in with the constructor's credentials.
   * @returns {Promise<Session>}
   */
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

  /** @private */
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

  /** @private */
  _send(frame) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    // An offer or candidate made during a signaling drop must not be lost: keep it for the
    // resume (bounded; beyond that ICE restarts on failure).
    else if (frame.type === "signal" && this.room && !this.closed && this.outbox.length < 500) this.outbox.push(frame);
  }

  /** @private */
  _request(frame) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this._send({ ...frame, id });
    });
  }

  /**
   * Create a room; it does not join it (call `join`).
   * @param {string} [name] A room name; the server picks one when omitted.
   * @param {number} [capacity] At most `signaling.room_capacity`.
   * @returns {Promise<string>} The room id.
   */
  async createRoom(name, capacity) {
    const r = await this._request({ type: "create", name, capacity });
    return r.room;
  }

  /**
   * Join a room; every peer already there offers to us.
   * @param {string} room
   * @returns {Promise<Joined>}
   */
  async join(room) {
    const j = await this._request({ type: "join", room });
    this.room = j.room;
    this.peerId = j.peerId;
    this.resumeToken = j.resumeToken;
    // We are the newcomer: every peer already here offers to us.
    for (const p of j.peers) this._peer(p.peerId, p.polite, { initiator: this.offerOnJoin, userId: p.userId });
    this._emit("joined", j);
    return j;
  }

  leave() {
    this.closed = true;
    this._send({ type: "leave" });
    for (const id of [...this.peers.keys()]) this._closePeer(id);
  }

  /** Leave the room (if in one) and close the signaling socket. */
  close() {
    if (!this.closed && this.room) this.leave();
    this.closed = true;
    for (const id of [...this.peers.keys()]) this._closePeer(id);
    this.ws?.close();
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

  /**
   * Send a signal to one peer, or to every peer of the room when `to` is omitted; kept and sent
   * after the resume when the socket is down. The client sends its own SDP and candidates; this
   * is for apps in signaling-only mode (`peerConnections: false`) and app-level messages.
   * @param {string | undefined} to
   * @param {unknown} data
   */
  signal(to, data) {
    this._send(to === undefined ? { type: "signal", data } : { type: "signal", to, data });
  }

  /** Drop the socket without leaving, as a network failure would (used by tests and demos). */
  dropSocket() {
    this.ws?.close();
  }

  /** @private */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** @private */
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
        // We were here first: we make the first offer.
        this._peer(msg.peerId, msg.polite, { initiator: true, userId: msg.userId });
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
        this.resuming = false;
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

  /** @private */
  _onClose(ws, code) {
    if (ws !== this.ws || this.closed) return;
    const ended = {
      // Replaced by a newer connection of the same user: resuming would fight it.
      4001: { code: "replaced", message: "this call continued in another window" },
      // The login reached auth.max_session_age_secs: a resume would be refused; log in again.
      4003: { code: "expired_token", message: "your login expired; log in again" },
      // Removed by the app's backend (kicked, or the user was revoked): the seat is gone.
      4005: { code: "kicked", message: "removed from the room" },
      // The app's backend closed the room.
      4006: { code: "room_closed", message: "the room was closed" },
    }[code];
    if (ended) {
      this.closed = true;
      for (const id of [...this.peers.keys()]) this._closePeer(id);
      this._emit("error", ended);
      return;
    }
    if (this.room) this.resuming = true;
    this._emit("disconnected", {});
    if (this.room) setTimeout(() => this._resume(), 300);
  }

  /** @private */
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
        this.resuming = false;
        return this.join(room);
      }
      if (attempt < 20) setTimeout(() => this._resume(attempt + 1), Math.min(5000, 300 * 2 ** attempt));
    }
  }

  /** @returns {RTCConfiguration} @private */
  _config() {
    return { iceServers: this.iceServers, iceTransportPolicy: this.relayOnly ? "relay" : "all" };
  }

  /**
   * The connection to one peer. `initiator`: we make the first offer (we were in the room
   * first); otherwise we wait for the peer's offer.
   * @private
   */
  _peer(peerId, polite, { initiator = false, userId = null } = {}) {
    if (!this.peerConnections) return null;
    if (this.peers.has(peerId)) return this.peers.get(peerId);
    const st = {
      pc: null,
      gen: 0, // which connection to this peer: a fresh one (after a failure) is the next
      polite,
      userId,
      restarts: 0, // ICE restarts (or fresh connections) in this outage
      restarting: false,
      lastRestart: 0, // when we last restarted (impolite) or asked for a restart (polite)
      iceErrors: [], // recent icecandidateerror texts, newest last
      failed: false,
      phase: "connecting",
    };
    this.peers.set(peerId, st);
    this._connect(peerId, st, initiator);
    st.watch = setInterval(() => this._watch(peerId, st), WATCH_EVERY_MS);
    this._emit("peer", { peerId, pc: st.pc, polite, userId });
    return st;
  }

  /**
   * Make the RTCPeerConnection to a peer (the first, or a fresh one that replaces a failed
   * connection at `st.gen`), with our tracks and the data channel, and reset what describes
   * one connection's progress.
   * @private
   */
  _connect(peerId, st, initiator) {
    const pc = new RTCPeerConnection(this._config());
    const gen = st.gen;
    Object.assign(st, {
      pc,
      makingOffer: false,
      ignoreOffer: false,
      early: [],
      mayOffer: initiator,
      created: performance.now(),
      gathered: 0, // candidates gathered since the last (re)start of ICE
      stuckSince: null,
      unsettledSince: null, // when the current offer/answer exchange began
      pcFailed: false, // this connection reached "failed" (ICE or DTLS)
      packets: undefined,
      packetsFlowing: false,
      silentSince: null,
    });
    if (this.stream) for (const t of this.stream.getTracks()) pc.addTrack(t, this.stream);
    // A pre-negotiated data channel (same id on both sides) for app messages.
    st.channel = pc.createDataChannel("switchboard", { negotiated: true, id: 0 });
    st.channel.onmessage = (ev) => this._emit("message", { peerId, data: ev.data });
    st.channel.onopen = () => this._emit("channel-open", { peerId });
    pc.onnegotiationneeded = () => {
      // The newcomer's own tracks go into its answer to the first offer.
      if (st.pc === pc && st.mayOffer) this._negotiate(peerId, st);
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && st.pc === pc) {
        st.gathered++;
        this._send({ type: "signal", to: peerId, data: { candidate, gen } });
      }
    };
    pc.onicecandidateerror = (e) => {
      if (st.pc !== pc) return;
      const message = describeIceError(e);
      if (!st.iceErrors.includes(message)) st.iceErrors = [...st.iceErrors.slice(-4), message];
      this._emit("ice-error", { peerId, code: e.errorCode, url: e.url, message });
    };
    pc.ontrack = ({ track, streams }) => {
      if (st.pc !== pc) return;
      track.onunmute = () => this._updatePhase(peerId, st);
      track.onmute = () => this._updatePhase(peerId, st);
      this._emit("track", { peerId, stream: streams[0] });
    };
    pc.onconnectionstatechange = () => {
      if (st.pc === pc && pc.connectionState === "failed") st.pcFailed = true;
    };
    pc.oniceconnectionstatechange = () => {
      if (st.pc !== pc) return;
      const ice = pc.iceConnectionState;
      if (ice === "connected" || ice === "completed") {
        // A connection that carries media counts as recovered once packets arrive (the
        // watchdog's stats), not merely when ICE connects.
        if (!expectsMedia(pc)) st.restarts = 0;
        st.iceErrors = []; // errors of earlier attempts no longer explain a failure
        st.restarting = false;
        st.stuckSince = null;
      } else if (ice === "failed") {
        st.pcFailed = true;
        this._restartIce(peerId, st, "the connectivity checks failed");
      }
      this._emit("ice-state", { peerId, state: ice });
      this._updatePhase(peerId, st);
    };
  }

  /**
   * Replace a peer's connection with a fresh one at generation `gen`: the offerer (impolite)
   * side when it restarts after a failure, the other side when that fresh offer arrives.
   * @private
   */
  _renew(peerId, st, gen, initiator) {
    const old = st.pc;
    st.gen = gen;
    old.close();
    this._connect(peerId, st, initiator);
    this._emit("peer", { peerId, pc: st.pc, polite: st.polite, userId: st.userId, renewed: true });
  }

  /** @private */
  async _negotiate(peerId, st) {
    const { pc } = st;
    try {
      st.makingOffer = true;
      await pc.setLocalDescription();
      if (st.pc !== pc) return;
      this._send({ type: "signal", to: peerId, data: { description: pc.localDescription, gen: st.gen } });
    } catch (e) {
      if (st.pc !== pc) return; // replaced meanwhile
      this._emit("error", { code: "negotiation", message: String(e) });
    } finally {
      if (st.pc === pc) st.makingOffer = false;
    }
  }

  /** Watchdog tick: restart ICE on a connection that is not getting anywhere. @private */
  _watch(peerId, st) {
    const { pc } = st;
    if (st.failed || pc.signalingState === "closed") return;
    // Chromium can leave a remote track muted for good after a rollback (a glare) while media
    // flows: count inbound RTP packets as well, and recheck the phase on every tick.
    const ice = pc.iceConnectionState;
    if (ice === "connected" || ice === "completed") {
      pc.getStats().then((stats) => {
        if (st.pc !== pc) return;
        let n = 0;
        stats.forEach((r) => { if (r.type === "inbound-rtp") n += r.packetsReceived || 0; });
        st.packetsFlowing = n > (st.packets ?? n);
        st.packets = n;
        if (st.packetsFlowing) st.restarts = 0;
        if (expectsMedia(pc) && !st.packetsFlowing) st.silentSince ??= performance.now();
        else st.silentSince = null;
        this._updatePhase(peerId, st);
      }, () => {});
    } else {
      st.packetsFlowing = false;
      st.silentSince = null;
      this._updatePhase(peerId, st);
    }
    const now = performance.now();
    if (!st.mayOffer && !pc.remoteDescription && now - st.created > FIRST_OFFER_MS) {
      // The first offer never came (lost, or the other side is an older client): offer.
      st.mayOffer = true;
      this._negotiate(peerId, st);
      return;
    }
    const connected = ice === "connected" || ice === "completed";
    if (pc.signalingState === "stable") st.unsettledSince = null;
    else st.unsettledSince ??= now;
    if (!connected && st.unsettledSince !== null && now - st.unsettledSince >= NEGOTIATION_MS) {
      // An offer whose answer never came (lost, or refused by the other side): roll it back and
      // start over, counted as an ICE restart.
      st.unsettledSince = null;
      const was = pc.signalingState;
      pc.setLocalDescription({ type: "rollback" }).catch(() => {});
      this._restartIce(peerId, st, `the negotiation stayed in "${was}"`);
      return;
    }
    if (connected && pc.signalingState === "stable" && st.silentSince !== null && now - st.silentSince >= NO_MEDIA_MS) {
      // ICE and DTLS are up but no media arrives (seen in Firefox after restarts while the
      // relay was down): restart rather than show "connecting" forever.
      st.silentSince = null;
      this._restartIce(peerId, st, "no media arrived over the connection", true);
      return;
    }
    const settled = pc.signalingState === "stable" && pc.localDescription && pc.remoteDescription;
    if (!settled || connected) {
      st.stuckSince = null;
      return;
    }
    st.stuckSince ??= now;
    const waited = now - st.stuckSince;
    if (st.gathered === 0 && pc.iceGatheringState === "complete" && waited >= WATCH_EVERY_MS) {
      this._restartIce(peerId, st, "no ICE candidate was gathered");
    } else if (st.gathered === 0 && waited >= NO_CANDIDATE_MS) {
      this._restartIce(peerId, st, "no ICE candidate was gathered");
    } else if (waited >= (st.polite ? STUCK_MS.polite : STUCK_MS.impolite)) {
      this._restartIce(peerId, st, `ICE stayed "${ice}"`);
    }
  }

  /**
   * Restart ICE (impolite side) or ask the other side to (polite side); after MAX_ICE_RESTARTS
   * give up, tell the other side, and report `ice_failed`. After a failure (`fresh`: this
   * connection reached "failed", or it carried no media although connected) the impolite side
   * makes a fresh connection instead: Firefox's connection whose DTLS failed before it ever
   * connected sends no RTP on the wire after later ICE restarts, although it counts it as sent.
   * @private
   */
  _restartIce(peerId, st, reason, fresh = st.pcFailed) {
    if (st.failed) return;
    if (st.restarts >= MAX_ICE_RESTARTS) {
      const why = st.iceErrors.length ? st.iceErrors.join("; ") : reason;
      this._send({ type: "signal", to: peerId, data: { iceFailed: { why, restarts: st.restarts } } });
      this._giveUp(peerId, st, why, st.restarts);
      return;
    }
    // The polite side waits for its request to be served before it asks again.
    if (st.polite && performance.now() - st.lastRestart < STUCK_MS.polite) return;
    st.restarts++;
    st.restarting = true;
    st.lastRestart = performance.now();
    st.stuckSince = null;
    st.gathered = 0;
    st.mayOffer = true;
    this._emit("ice-restart", { peerId, attempt: st.restarts, reason });
    this._updatePhase(peerId, st);
    const why = st.iceErrors.length ? st.iceErrors.join("; ") : reason;
    if (st.polite) this._send({ type: "signal", to: peerId, data: { restartIce: st.restarts, why, fresh } });
    else if (fresh) this._renew(peerId, st, st.gen + 1, true);
    else st.pc.restartIce();
  }

  /** Stop trying to reach a peer and report why. @private */
  _giveUp(peerId, st, why, restarts) {
    if (st.failed) return;
    st.failed = true;
    clearInterval(st.watch);
    const message = `Could not connect to ${st.userId || "the other person"}: ${why} (after ${restarts} ICE restarts).`;
    this._updatePhase(peerId, st);
    this._emit("error", { code: "ice_failed", message, peerId });
  }

  /** Recompute a peer's phase: connecting, in call, reconnecting or failed. @private */
  _updatePhase(peerId, st) {
    const { pc } = st;
    const ice = pc.iceConnectionState;
    const receivers = pc.getReceivers().map((r) => r.track);
    const video = receivers.filter((t) => t.kind === "video");
    const unmuted = (video.length ? video : receivers).some((t) => !t.muted && t.readyState === "live");
    const flowing = unmuted || st.packetsFlowing;
    let phase;
    if (st.failed) phase = "failed";
    else if ((ice === "connected" || ice === "completed") && flowing) phase = "in call";
    else if (st.restarting || ice === "disconnected" || ((ice === "connected" || ice === "completed") && st.wasInCall))
      phase = "reconnecting";
    else phase = "connecting";
    if (phase === "in call") st.wasInCall = true;
    if (phase !== st.phase) {
      st.phase = phase;
      this._emit("peer-state", { peerId, phase });
    }
  }

  /** @private */
  async _onSignal(from, data) {
    if (!this.peerConnections) {
      this._emit("signal", { from, data });
      return;
    }
    const st = this.peers.get(from) ?? this._peer(from, true);
    if (st.failed) return;
    let { pc } = st;
    try {
      if (data.iceFailed) {
        // The other side gave up: end here too, with the same reason, rather than wait alone.
        // Our own ICE errors (a TURN 401 here) explain it best; else the other side's reason.
        const { why, restarts } = data.iceFailed;
        const mine = st.iceErrors.join("; ");
        this._giveUp(from, st, mine || `${why} (the other side gave up)`, restarts);
        return;
      }
      if (data.restartIce) {
        // The polite side asks: restart unless our own restart is still being negotiated.
        const busy = st.makingOffer || pc.signalingState !== "stable";
        const why = data.why ? ` (${data.why})` : "";
        const fresh = st.pcFailed || data.fresh === true;
        if (!st.polite && !busy) this._restartIce(from, st, `the other side asked for an ICE restart${why}`, fresh);
        return;
      }
      // SDP and candidates name the connection they belong to (`gen`; 0 from a client that
      // never replaces one). Those of an earlier connection are stale; an offer for a newer
      // one means the other side made a fresh connection: make ours fresh too, then answer.
      const gen = typeof data.gen === "number" ? data.gen : 0;
      if ((data.description || data.candidate) && gen < st.gen) return;
      if (data.description && gen > st.gen) {
        if (data.description.type !== "offer") return;
        this._renew(from, st, gen, false);
        pc = st.pc;
      }
      if (data.description) {
        const d = data.description;
        const collision = d.type === "offer" && (st.makingOffer || pc.signalingState !== "stable");
        st.ignoreOffer = !st.polite && collision;
        if (st.ignoreOffer) return;
        // The polite side rolls its own offer back explicitly before taking the other's.
        if (collision && pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
        await pc.setRemoteDescription(d);
        // Candidates that came with an offer we ignored in a glare still name the peer's
        // addresses (the polite side keeps its ICE agent through the rollback). With relay
        // only they are the sole way our TURN allocation learns whom to permit, so add them now.
        for (const c of st.early.splice(0)) pc.addIceCandidate(c).catch(() => {});
        if (d.type === "offer") {
          await pc.setLocalDescription();
          if (st.pc !== pc) return;
          this._send({ type: "signal", to: from, data: { description: pc.localDescription, gen: st.gen } });
          // Our answer carried our tracks; from now on we renegotiate like any peer.
          st.mayOffer = true;
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
      // A connection replaced meanwhile was closed under the exchange: not an error.
      if (st.pc === pc) this._emit("error", { code: "negotiation", message: String(e) });
    }
  }

  /** @private */
  _closePeer(peerId) {
    const st = this.peers.get(peerId);
    if (!st) return;
    clearInterval(st.watch);
    st.pc.close();
    this.peers.delete(peerId);
  }

  /** The selected candidate pair's local type for a peer: host, srflx, prflx or relay. */
  async connectionType(peerId) {
    const st = this.peers.get(peerId);
    if (!st) return null;
    const stats = await st.pc.getStats();
    const pair = selectedPair(stats, true);
    if (!pair) return null;
    const local = stats.get(pair.localCandidateId);
    return local ? local.candidateType : null;
  }

  /**
   * The selected path to a peer in words: "direct", "relay over UDP", "relay over TCP" or
   * "relay over TLS" (null before a pair is selected).
   */
  async path(peerId) {
    const st = this.peers.get(peerId);
    if (!st) return null;
    const stats = await st.pc.getStats();
    const pair = selectedPair(stats, false);
    if (!pair) return null;
    const local = stats.get(pair.localCandidateId);
    const remote = stats.get(pair.remoteCandidateId);
    if (local?.candidateType === "relay") return `relay over ${(local.relayProtocol || "udp").toUpperCase()}`;
    if (remote?.candidateType === "relay") return "relay (the other side's)";
    return "direct";
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

/**
 * Whether a connection should be receiving RTP: some transceiver receives.
 * @param {RTCPeerConnection} pc
 * @returns {boolean}
 */
function expectsMedia(pc) {
  return pc.getTransceivers().some((t) => t.currentDirection === "sendrecv" || t.currentDirection === "recvonly");
}

/**
 * The candidate pair ICE selected, from the transport's report; with `orNominated`, a
 * succeeded nominated pair where the browser names no selected pair.
 * @param {RTCStatsReport} stats
 * @param {boolean} orNominated
 * @returns {any}
 */
function selectedPair(stats, orNominated) {
  let pair = null;
  stats.forEach((r) => {
    if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
  });
  // Firefox has no transport stats: it marks the pair in use with a non-standard `selected`.
  if (!pair)
    stats.forEach((r) => {
      if (r.type === "candidate-pair" && r.selected) pair = r;
    });
  if (!pair && orNominated)
    stats.forEach((r) => {
      if (r.type === "candidate-pair" && r.state === "succeeded" && r.nominated) pair = r;
    });
  return pair;
}
