// The demo call page: give a name, start a call (or open a shared link and join it), see both
// videos, the call's real state and its path (direct, or relay over UDP/TCP/TLS) from
// getStats. URL switches: ?room=ID is a shared link, ?relay=1 forces TURN, ?name=N fills the
// name, ?auto=1 starts without a click, ?glare=1 makes both sides offer at once (to see
// collision handling at work).
import { Switchboard, MAX_ICE_RESTARTS } from "/switchboard.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const relayOnly = params.get("relay") === "1";
const invitedTo = params.get("room");
const glare = params.get("glare") === "1";
// Exposed for tests and for poking around in the console.
window.sbState = {
  state: "idle",
  room: null,
  link: null,
  path: null,
  connectionType: null,
  framesDecoded: 0,
  resumes: 0,
  restarts: 0,
  error: null,
  notice: null,
  messages: [],
};

let sb = null;
let stream = null; // the one camera stream; reused on a retry, stopped on leave or error
let ticker = null;
let busy = false;
let peerAway = false;

if (params.get("name")) $("name").value = params.get("name");
if (invitedTo) {
  $("invite").hidden = false;
  $("invite-room").textContent = invitedTo;
  $("go").textContent = "Join the call";
}

function setState(state) {
  window.sbState.state = state;
  $("state").textContent = state;
}

function notice(text) {
  window.sbState.notice = text;
  $("notice").textContent = text || "";
}

const WORDS = {
  room_full: "That room is full.",
  unknown_room: "No such room (it may have closed).",
  replaced: "This call continued in another window.",
  kicked: "You were removed from the room.",
  room_closed: "The room was closed.",
};

/** Show an error, hang up, and give the camera back. */
function fail(e) {
  const msg = WORDS[e.code] || e.message || String(e);
  window.sbState.error = e.code || msg;
  $("error").textContent = msg;
  end("error");
}

/** Leave the call (if any), stop the camera, and offer the form again. */
function end(state) {
  clearInterval(ticker);
  ticker = null;
  if (sb) sb.close();
  sb = null;
  window.sb = null;
  if (stream) for (const t of stream.getTracks()) t.stop();
  stream = null;
  $("local").srcObject = null;
  $("remote").srcObject = null;
  $("leave").hidden = true;
  $("start").hidden = false;
  $("go").textContent = invitedTo ? "Join the call" : "Start a call";
  $("path").textContent = "–";
  window.sbState.path = null;
  setState(state);
}

/** What the page says, from the client's state: never "in call" before media flows. */
function render() {
  if (!sb) return;
  const [st] = sb.peers.values();
  if (sb.resuming) return setState("reconnecting");
  if (!st) return setState(sb.room ? "waiting for a peer" : "joining");
  if (peerAway && st.phase !== "in call") return setState("the other person is reconnecting");
  setState(st.phase);
  if (st.phase === "in call") notice(null);
}

async function tick() {
  if (!sb) return;
  const [peerId] = sb.peers.keys();
  const s = window.sbState;
  s.peers = sb.peers.size;
  s.resumes = sb.resumes;
  if (peerId) {
    const st = sb.peers.get(peerId);
    const { pc } = st;
    s.signalingState = pc.signalingState;
    s.iceState = pc.iceConnectionState;
    s.gathering = pc.iceGatheringState;
    s.descriptions = [pc.localDescription?.type, pc.remoteDescription?.type];
    s.restarts = st.restarts;
    s.iceErrors = st.iceErrors;
    const [path, type, frames] = await Promise.all([sb.path(peerId), sb.connectionType(peerId), sb.framesDecoded(peerId)]);
    if (sb?.peers.get(peerId) !== st) return;
    s.path = path;
    s.connectionType = type;
    s.framesDecoded = frames;
    $("path").textContent = path || "–";
    $("frames").textContent = frames;
  } else {
    s.path = null;
    $("path").textContent = "–";
  }
  render();
}

async function start(roomToJoin) {
  if (busy) return;
  busy = true;
  $("error").textContent = "";
  window.sbState.error = null;
  notice(null);
  $("start").hidden = true;
  $("leave").hidden = false;
  try {
    setState("starting the camera");
    if (!stream || stream.getTracks().every((t) => t.readyState === "ended")) {
      stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
    }
    $("local").srcObject = stream;
    const name = $("name").value.trim() || "guest";
    $("local-label").textContent = `You (${name})`;
    sb = new Switchboard({ credentials: { name }, stream, relayOnly, offerOnJoin: glare });
    window.sb = sb;
    sb.addEventListener("peer", (ev) => {
      $("remote-label").textContent = ev.detail.userId || "The other person";
    });
    sb.addEventListener("track", (ev) => { $("remote").srcObject = ev.detail.stream; });
    sb.addEventListener("peer-left", () => {
      $("remote").srcObject = null;
      $("remote-label").textContent = "The other person";
      peerAway = false;
      render();
    });
    sb.addEventListener("peer-reconnecting", () => { peerAway = true; render(); });
    sb.addEventListener("peer-resumed", () => { peerAway = false; render(); });
    sb.addEventListener("peer-state", render);
    sb.addEventListener("disconnected", render);
    sb.addEventListener("resumed", () => { window.sbState.resumes = sb.resumes; render(); });
    sb.addEventListener("ice-error", (ev) => {
      const st = sb?.peers.get(ev.detail.peerId);
      if (st?.phase !== "in call") notice(`Network problem: ${ev.detail.message}`);
    });
    sb.addEventListener("ice-restart", (ev) => {
      window.sbState.restarts = ev.detail.attempt;
      notice(`Restarting the connection (attempt ${ev.detail.attempt} of ${MAX_ICE_RESTARTS}): ${ev.detail.reason}.`);
    });
    sb.addEventListener("error", (ev) => {
      if (["ice_failed", "replaced", "kicked", "room_closed"].includes(ev.detail.code)) fail(ev.detail);
      else notice(ev.detail.message || ev.detail.code);
    });
    sb.addEventListener("message", (ev) => window.sbState.messages.push(ev.detail.data));
    setState("logging in");
    await sb.connect();
    const room = roomToJoin || (await sb.createRoom());
    await sb.join(room);
    window.sbState.room = room;
    const link = `${location.origin}/?room=${encodeURIComponent(room)}${relayOnly ? "&relay=1" : ""}${glare ? "&glare=1" : ""}`;
    window.sbState.link = link;
    $("share").innerHTML = "";
    const a = document.createElement("a");
    a.id = "link";
    a.href = link;
    a.textContent = link;
    $("share").append("Share this link: ", a);
    render();
    ticker = setInterval(tick, 500);
  } catch (e) {
    fail(e);
  } finally {
    busy = false;
  }
}

$("start").onsubmit = (ev) => {
  ev.preventDefault();
  start(invitedTo);
};
$("leave").onclick = () => {
  $("share").innerHTML = "";
  end("left the call");
};
addEventListener("pagehide", () => { if (sb) sb.close(); });
if (params.get("auto") === "1") start(invitedTo);
