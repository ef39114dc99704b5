/**
 * An `icecandidateerror` in words a person can act on.
 * @param {{url?: string, errorCode: number, errorText?: string}} e
 * @returns {string}
 */
export function describeIceError(e: {
    url?: string;
    errorCode: number;
    errorText?: string;
}): string;
/** ICE restarts per outage before giving up with an error. */
export const MAX_ICE_RESTARTS: 3;
/** The watchdog's budget: a call that cannot connect ends with an `ice_failed` error on both
 * sides within this long of its connection being made (each restart waits at most a stuck
 * negotiation plus a stuck ICE check of the polite side, plus the first offer's wait). */
export const GIVE_UP_WITHIN_MS: number;
/** A refusal from the server, with its error `code` (docs/protocol.md, docs/http-api.md). */
export class SwitchboardError extends Error {
    /**
     * @param {string} code
     * @param {string} message
     */
    constructor(code: string, message: string);
    code: string;
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
    constructor({ base, credentials, stream, relayOnly, offerOnJoin, peerConnections, }: {
        base?: string;
        credentials: object;
        stream?: MediaStream;
        relayOnly?: boolean;
        offerOnJoin?: boolean;
        peerConnections?: boolean;
    });
    base: string;
    peerConnections: boolean;
    credentials: any;
    stream: MediaStream;
    relayOnly: boolean;
    offerOnJoin: boolean;
    peers: Map<any, any>;
    pending: Map<any, any>;
    nextId: number;
    lastSeq: number;
    outbox: any[];
    resumes: number;
    resuming: boolean;
    closed: boolean;
    /** @type {Session | null} The last login answer. */
    session: Session | null;
    /** @type {string | null} The session token (renewed by `ice-servers` pushes). */
    token: string | null;
    /** @type {RTCIceServer[]} The newest STUN/TURN servers and credentials. */
    iceServers: RTCIceServer[];
    /** @type {string | null} */
    userId: string | null;
    /** @type {string | null} The room we are in. */
    room: string | null;
    /** @type {string | null} Our peer id in the room. */
    peerId: string | null;
    /** @type {string | null} */
    resumeToken: string | null;
    /** @type {WebSocket | null} */
    ws: WebSocket | null;
    /**
     * Log in with the constructor's credentials.
     * @returns {Promise<Session>}
     */
    login(): Promise<Session>;
    /** Log in (if needed) and open the signaling socket. */
    connect(): Promise<void>;
    /** @private */
    private _open;
    /** @private */
    private _send;
    /** @private */
    private _request;
    /**
     * Create a room; it does not join it (call `join`).
     * @param {string} [name] A room name; the server picks one when omitted.
     * @param {number} [capacity] At most `signaling.room_capacity`.
     * @returns {Promise<string>} The room id.
     */
    createRoom(name?: string, capacity?: number): Promise<string>;
    /**
     * Join a room; every peer already there offers to us.
     * @param {string} room
     * @returns {Promise<Joined>}
     */
    join(room: string): Promise<Joined>;
    leave(): void;
    /** Leave the room (if in one) and close the signaling socket. */
    close(): void;
    /** Send an app message to every peer over the data channels that are open. */
    sendMessage(data: any): number;
    /**
     * Send a signal to one peer, or to every peer of the room when `to` is omitted; kept and sent
     * after the resume when the socket is down. The client sends its own SDP and candidates; this
     * is for apps in signaling-only mode (`peerConnections: false`) and app-level messages.
     * @param {string | undefined} to
     * @param {unknown} data
     */
    signal(to: string | undefined, data: unknown): void;
    /** Drop the socket without leaving, as a network failure would (used by tests and demos). */
    dropSocket(): void;
    /** @private */
    private _emit;
    /** @private */
    private _onFrame;
    /** @private */
    private _onClose;
    /** @private */
    private _resume;
    /** @returns {RTCConfiguration} @private */
    private _config;
    /**
     * The connection to one peer. `initiator`: we make the first offer (we were in the room
     * first); otherwise we wait for the peer's offer.
     * @private
     */
    private _peer;
    /**
     * Make the RTCPeerConnection to a peer (the first, or a fresh one that replaces a failed
     * connection at `st.gen`), with our tracks and the data channel, and reset what describes
     * one connection's progress.
     * @private
     */
    private _connect;
    /**
     * Replace a peer's connection with a fresh one at generation `gen`: the offerer (impolite)
     * side when it restarts after a failure, the other side when that fresh offer arrives.
     * @private
     */
    private _renew;
    /** @private */
    private _negotiate;
    /** Watchdog tick: restart ICE on a connection that is not getting anywhere. @private */
    private _watch;
    /**
     * Restart ICE (impolite side) or ask the other side to (polite side); after MAX_ICE_RESTARTS
     * give up, tell the other side, and report `ice_failed`. After a failure (`fresh`: this
     * connection reached "failed", or it carried no media although connected) the impolite side
     * makes a fresh connection instead: Firefox's connection whose DTLS failed before it ever
     * connected sends no RTP on the wire after later ICE restarts, although it counts it as sent.
     * @private
     */
    private _restartIce;
    /** Stop trying to reach a peer and report why. @private */
    private _giveUp;
    /** Recompute a peer's phase: connecting, in call, reconnecting or failed. @private */
    private _updatePhase;
    /** @private */
    private _onSignal;
    /** @private */
    private _closePeer;
    /** The selected candidate pair's local type for a peer: host, srflx, prflx or relay. */
    connectionType(peerId: any): Promise<any>;
    /**
     * The selected path to a peer in words: "direct", "relay over UDP", "relay over TCP" or
     * "relay over TLS" (null before a pair is selected).
     */
    path(peerId: any): Promise<string>;
    /** Frames decoded from a peer's video, for health displays and tests. */
    framesDecoded(peerId: any): Promise<number>;
}
/**
 * The answer of `POST /v1/login` (docs/http-api.md).
 */
export type Session = {
    /**
     * Session token for the signaling WebSocket.
     */
    token: string;
    /**
     * Unix time the token expires.
     */
    expiresAt: number;
    /**
     * The WebSocket URL.
     */
    signalingUrl: string;
    /**
     * STUN and TURN servers with fresh TURN credentials.
     */
    iceServers: RTCIceServer[];
    /**
     * Seconds the TURN credentials are valid.
     */
    ttl: number;
    /**
     * Who the server says we are.
     */
    userId: string;
};
/**
 * Another peer of the room, as `joined` and `resumed` list it.
 */
export type PeerInfo = {
    peerId: string;
    userId: string;
    /**
     * Our role towards this peer (perfect negotiation).
     */
    polite: boolean;
    state?: string;
};
/**
 * The answer to `join` (docs/protocol.md).
 */
export type Joined = {
    room: string;
    /**
     * Our peer id in the room.
     */
    peerId: string;
    /**
     * Presented by `resume` after a dropped socket.
     */
    resumeToken: string;
    /**
     * Everyone already in the room.
     */
    peers: PeerInfo[];
};
/**
 * The `detail` of a `signal` event in signaling-only mode.
 */
export type SignalEvent = {
    /**
     * The sender's peer id, stamped by the server.
     */
    from: string;
    /**
     * What the sender put in `data`.
     */
    data: unknown;
};
