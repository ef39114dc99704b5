// The demo call page: log in, create or join a room, show local and remote video, and the
// live connection type from getStats. URL switches: ?room=ID joins, ?relay=1 forces TURN,
// ?name=N&auto=1 starts without clicks (used by the end-to-end test).
import { Switchboard } from "/switchboard.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const relayOnly = params.get("relay") === "1";
// Exposed for tests and for poking around in the console.
window.sbState = { state: "idle", room: null, connectionType: null, framesDecoded: 0, resumes: 0, error: null, messages: [] };

if (params.get("name")) $("name").value = params.get("name");
if (params.get("room")) $("room").value = params.get("room");

function show(state) {
  window.sbState.state = state;
  $("state").textContent = state;
}

function fail(e) {
  const msg = {
    room_full: "That room is full.",
    unknown_room: "No such room (it may have closed).",
  }[e.code] || e.message || String(e);
  window.sbState.error = e.code || msg;
  $("error").textContent = msg;
}

async function start(roomToJoin) {
  $("error").textContent = "";
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
    $("local").srcObject = stream;
    const sb = new Switchboard({ credentials: { name: $("name").value }, stream, relayOnly });
    window.sb = sb;
    sb.addEventListener("track", (ev) => { $("remote").srcObject = ev.detail.stream; });
    sb.addEventListener("peer-left", () => { $("remote").srcObject = null; show("waiting for a peer"); });
    sb.addEventListener("peer-reconnecting", () => show("peer reconnecting"));
    sb.addEventListener("disconnected", () => show("reconnecting"));
    sb.addEventListener("resumed", () => { window.sbState.resumes = sb.resumes; show("in call"); });
    sb.addEventListener("error", (ev) => fail(ev.detail));
    sb.addEventListener("message", (ev) => window.sbState.messages.push(ev.detail.data));
    show("logging in");
    await sb.connect();
    const room = roomToJoin || (await sb.createRoom());
    await sb.join(room);
    window.sbState.room = room;
    const link = `${location.origin}/?room=${encodeURIComponent(room)}${relayOnly ? "&relay=1" : ""}`;
    $("share").innerHTML = "";
    const a = document.createElement("a");
    a.href = link;
    a.textContent = link;
    $("share").append("Share this link: ", a);
    show(sb.peers.size ? "in call" : "waiting for a peer");
    setInterval(async () => {
      const [peerId] = sb.peers.keys();
      window.sbState.peers = sb.peers.size;
      if (!peerId) return;
      const { pc } = sb.peers.get(peerId);
      window.sbState.signalingState = pc.signalingState;
      window.sbState.iceState = pc.iceConnectionState;
      window.sbState.gathering = pc.iceGatheringState;
      window.sbState.descriptions = [pc.localDescription?.type, pc.remoteDescription?.type];
      const t = await sb.connectionType(peerId);
      const f = await sb.framesDecoded(peerId);
      window.sbState.connectionType = t;
      window.sbState.framesDecoded = f;
      $("ctype").textContent = t || "connecting";
      $("frames").textContent = f;
      if (t) show("in call");
    }, 500);
  } catch (e) {
    show("error");
    fail(e);
  }
}

$("create").onclick = () => start(null);
$("join").onclick = () => start($("room").value.trim());
if (params.get("auto") === "1") start(params.get("room"));
