// The demo call page: give a name, start a call (or open a shared link and join it), see every
// other person's video in its own tile with their name, the call's real state and the path
// (direct, or relay over UDP/TCP/TLS) from getStats. A call is a mesh: one RTCPeerConnection per
// other person. URL switches: ?room=ID is a shared link, ?max=N makes a room for up to N people
// (2 to 16; without it the server's default), ?relay=1 forces TURN, ?name=N fills the name, ?auto=1 starts without a
// click, ?glare=1 makes both sides offer at once (to see collision handling at work).
import { Switchboard, MAX_ICE_RESTARTS } from "/switchboard.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const relayOnly = params.get("relay") === "1";
const invitedTo = params.get("room");
const glare = params.get("glare") === "1";
const max = Math.min(16, Math.max(2, Number(params.get("max")) || 2));
// Exposed for tests and for poking around in the console. The single-peer fields (path,
// connectionType, framesDecoded, restarts) describe the first other person; `tiles` has all.
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
  tiles: [],
  muted: false,
  cameraOff: false,
};

let sb = null;
let stream = null; // the one camera stream; reused on a retry, stopped on leave or error
let ticker = null;
let busy = false;
const away = new Set(); // peers whose signaling socket dropped (peer-reconnecting)

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

/** The tile (a figure with the video, the name, the path and the state) of one peer. */
function tile(peerId, name) {
  let t = document.querySelector(`figure.tile[data-peer="${CSS.escape(peerId)}"]`);
  if (!t) {
    t = document.createElement("figure");
    t.className = "tile";
    t.dataset.peer = peerId;
    t.innerHTML = '<figcaption><span class="name"></span> · <span class="phase">connecting</span>' +
      ' · <span class="path">–</span></figcaption><video autoplay muted playsinline></video>';
    $("tiles").append(t);
  }
  if (name) t.querySelector(".name").textContent = name;
  return t;
}

function dropTile(peerId) {
  document.querySelector(`figure.tile[data-peer="${CSS.escape(peerId)}"]`)?.remove();
  away.delete(peerId);
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
  $("tiles").replaceChildren();
  away.clear();
  window.sbState.tiles = [];
  $("leave").hidden = true;
  $("toggles").hidden = true;
  $("start").hidden = false;
  $("go").textContent = invitedTo ? "Join the call" : "Start a call";
  $("path").textContent = "–";
  window.sbState.path = null;
  setState(state);
}

/** What the page says, from the client's state: never "in call" before media flows to and
 * from everyone who is still reachable. */
function render() {
  if (!sb) return;
  if (sb.resuming) return setState("reconnecting");
  const live = [...sb.peers.entries()].filter(([, st]) => !st.failed);
  for (const [peerId, st] of sb.peers) tile(peerId).querySelector(".phase").textContent = away.has(peerId) && st.phase !== "in call" ? "reconnecting" : st.phase;
  if (!live.length) return setState(sb.room ? "waiting for a peer" : "joining");
  const phases = live.map(([peerId, st]) => (away.has(peerId) && st.phase !== "in call" ? "away" : st.phase));
  if (phases.every((p) => p === "in call")) {
    setState("in call");
    notice(null);
  } else if (phases.includes("away")) setState(live.length === 1 ? "the other person is reconnecting" : "someone is reconnecting");
  else if (phases.includes("reconnecting")) setState("reconnecting");
  else setState("connecting");
}

async function tick() {
  if (!sb) return;
  const s = window.sbState;
  s.peers = sb.peers.size;
  s.resumes = sb.resumes;
  const tiles = [];
  for (const [peerId, st] of [...sb.peers]) {
    const [path, type, frames] = await Promise.all([sb.path(peerId), sb.connectionType(peerId), sb.framesDecoded(peerId)]);
    if (sb?.peers.get(peerId) !== st) continue;
    tile(peerId).querySelector(".path").textContent = path || "–";
    tiles.push({ peerId, name: st.userId, phase: st.phase, path, connectionType: type, framesDecoded: frames });
  }
  if (!sb) return;
  s.tiles = tiles;
  const [first] = sb.peers.values();
  if (first) {
    const { pc } = first;
    s.signalingState = pc.signalingState;
    s.iceState = pc.iceConnectionState;
    s.gathering = pc.iceGatheringState;
    s.descriptions = [pc.localDescription?.type, pc.remoteDescription?.type];
    s.restarts = first.restarts;
    s.iceErrors = first.iceErrors;
    s.path = tiles[0]?.path ?? null;
    s.connectionType = tiles[0]?.connectionType ?? null;
    s.framesDecoded = tiles[0]?.framesDecoded ?? 0;
  } else {
    s.path = null;
    s.connectionType = null;
  }
  $("path").textContent = s.path || "–";
  $("frames").textContent = tiles.map((t) => t.framesDecoded).join(" / ") || "0";
  render();
}

/** Mute the microphone, or turn the camera off (the tracks stay, sending silence/black). */
function toggle(kind) {
  if (!stream) return;
  const tracks = kind === "audio" ? stream.getAudioTracks() : stream.getVideoTracks();
  const off = tracks.some((t) => t.enabled);
  for (const t of tracks) t.enabled = !off;
  if (kind === "audio") {
    window.sbState.muted = off;
    $("mute").textContent = off ? "Unmute" : "Mute";
  } else {
    window.sbState.cameraOff = off;
    $("camera").textContent = off ? "Camera on" : "Camera off";
  }
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
    $("toggles").hidden = false;
    $("mute").textContent = "Mute";
    $("camera").textContent = "Camera off";
    window.sbState.muted = false;
    window.sbState.cameraOff = false;
    const name = $("name").value.trim() || "guest";
    $("local-label").textContent = `You (${name})`;
    sb = new Switchboard({ credentials: { name }, stream, relayOnly, offerOnJoin: glare });
    window.sb = sb;
    sb.addEventListener("peer", (ev) => { tile(ev.detail.peerId, ev.detail.userId || "guest"); render(); });
    sb.addEventListener("track", (ev) => { tile(ev.detail.peerId).querySelector("video").srcObject = ev.detail.stream; });
    sb.addEventListener("peer-left", (ev) => {
      dropTile(ev.detail.peerId);
      if (!sb?.peers.size) notice(null);
      render();
    });
    sb.addEventListener("peer-reconnecting", (ev) => { away.add(ev.detail.peerId); render(); });
    sb.addEventListener("peer-resumed", (ev) => { away.delete(ev.detail.peerId); render(); });
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
      const d = ev.detail;
      if (d.code === "ice_failed" && [...sb.peers.values()].some((st) => !st.failed)) {
        // One person of a group cannot be reached: say so, drop their tile, stay with the rest.
        $("error").textContent = d.message;
        window.sbState.error = d.code;
        dropTile(d.peerId);
        render();
      } else if (["ice_failed", "replaced", "kicked", "room_closed"].includes(d.code)) fail(d);
      else notice(d.message || d.code);
    });
    sb.addEventListener("message", (ev) => window.sbState.messages.push(ev.detail.data));
    setState("logging in");
    await sb.connect();
    const room = roomToJoin || (await sb.createRoom(undefined, params.has("max") ? max : undefined));
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
$("mute").onclick = () => toggle("audio");
$("camera").onclick = () => toggle("video");
addEventListener("pagehide", () => { if (sb) sb.close(); });
if (params.get("auto") === "1") start(invitedTo);
