// The package against a real switchboard (the debug binary the cargo tests built, or
// SWITCHBOARD_BIN), for everything that needs no browser: login, rooms, signals in order,
// resume with replay, and errors. Run: npm test (node --experimental-websocket --test test/).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";

import { Switchboard, SwitchboardError, describeIceError } from "../switchboard.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const bin = process.env.SWITCHBOARD_BIN || path.join(here, "../../../target/debug/switchboard");

let server;
let base;

before(async () => {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SWITCHBOARD_")));
  env.SWITCHBOARD_HTTP__LISTEN = "127.0.0.1:0";
  env.SWITCHBOARD_TURN__LISTEN = '["127.0.0.1:0"]';
  server = spawn(bin, ["--log-format", "json"], { env, stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: server.stdout });
  base = await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("switchboard did not report its HTTP address")), 20000);
    server.once("exit", (code) => reject(new Error(`switchboard exited with ${code}`)));
    lines.on("line", (line) => {
      let rec;
      try {
        rec = JSON.parse(line);
      } catch {
        return;
      }
      if (rec.fields?.message?.startsWith("HTTP listening")) {
        clearTimeout(t);
        resolve(`http://${rec.fields.addr}`);
      }
    });
  });
});

after(() => server?.kill());

/** A client in signaling-only mode (Node.js has no RTCPeerConnection). */
function client(name) {
  return new Switchboard({ base, credentials: { name }, peerConnections: false });
}

/** Resolves with the `detail` of the next `type` event that `pred` accepts. */
function next(c, type, pred = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${type} event within ${ms} ms`)), ms);
    const on = (ev) => {
      if (!pred(ev.detail)) return;
      clearTimeout(t);
      c.removeEventListener(type, on);
      resolve(ev.detail);
    };
    c.addEventListener(type, on);
  });
}

/** Collects the `data` of the next `n` signals. */
function signals(c, n, ms = 10000) {
  return new Promise((resolve, reject) => {
    const got = [];
    const t = setTimeout(() => reject(new Error(`${got.length} of ${n} signals within ${ms} ms`)), ms);
    const on = (ev) => {
      got.push(ev.detail);
      if (got.length === n) {
        clearTimeout(t);
        c.removeEventListener("signal", on);
        resolve(got);
      }
    };
    c.addEventListener("signal", on);
  });
}

test("login hands out a session token, the signaling URL and STUN/TURN servers with credentials", async () => {
  const c = client("Ann");
  const s = await c.login();
  assert.match(s.token, /^sb1\./);
  assert.match(s.signalingUrl, /^ws:\/\/127\.0\.0\.1:\d+\/v1\/ws$/);
  assert.ok(s.userId.startsWith("Ann"));
  const urls = s.iceServers.flatMap((x) => (Array.isArray(x.urls) ? x.urls : [x.urls]));
  assert.ok(urls.some((u) => u.startsWith("stun:")), urls.join(" "));
  const turn = s.iceServers.find((x) => [x.urls].flat().some((u) => u.startsWith("turn:")));
  assert.ok(turn, "a turn: server");
  assert.match(turn.username, /^\d+:Ann/);
  assert.ok(turn.credential.length > 10);
  assert.ok(s.expiresAt > Date.now() / 1000);
});

test("a refused login is a SwitchboardError with the server's code", async () => {
  const c = new Switchboard({ base, credentials: { name: "" }, peerConnections: false });
  await assert.rejects(c.login(), (e) => e instanceof SwitchboardError && typeof e.code === "string" && e.code.length > 0);
});

test("two peers meet in a room and their signals arrive in order, stamped with the sender", async () => {
  const a = client("Ann");
  const b = client("Bob");
  await a.connect();
  const room = await a.createRoom();
  assert.equal(typeof room, "string");
  // create does not join
  assert.equal(a.room, null);
  const ja = await a.join(room);
  assert.deepEqual(ja.peers, []);
  await b.connect();
  const joinedA = next(a, "peer-joined");
  const jb = await b.join(room);
  assert.equal(jb.peers.length, 1);
  assert.equal(jb.peers[0].peerId, ja.peerId);
  const pj = await joinedA;
  assert.equal(pj.peerId, jb.peerId);
  // The two sides get opposite perfect-negotiation roles.
  assert.notEqual(pj.polite, jb.peers[0].polite);

  const atB = signals(b, 50);
  for (let i = 0; i < 50; i++) a.signal(jb.peerId, { n: i });
  const got = await atB;
  assert.deepEqual(got.map((s) => s.data.n), [...Array(50).keys()]);
  assert.ok(got.every((s) => s.from === ja.peerId));

  const left = next(a, "peer-left");
  b.close();
  assert.equal((await left).peerId, jb.peerId);
  a.close();
});

test("a dropped socket resumes and the signals sent meanwhile are replayed in order", async () => {
  const a = client("Ann");
  const b = client("Bob");
  await a.connect();
  const room = await a.createRoom();
  const ja = await a.join(room);
  await b.connect();
  await b.join(room);

  const reconnecting = next(b, "peer-reconnecting");
  const resumed = next(a, "resumed");
  const peerResumed = next(b, "peer-resumed");
  a.dropSocket();
  assert.equal((await reconnecting).peerId, ja.peerId);
  // B signals into the gap; A gets them after its resume.
  const atA = signals(a, 20);
  for (let i = 0; i < 20; i++) b.signal(ja.peerId, { n: i });
  await resumed;
  assert.equal((await peerResumed).peerId, ja.peerId);
  assert.deepEqual((await atA).map((s) => s.data.n), [...Array(20).keys()]);
  assert.equal(a.peerId, ja.peerId, "the same seat");
  a.close();
  b.close();
});

test("joining an unknown room is refused with unknown_room, and the socket keeps serving", async () => {
  const c = client("Cy");
  await c.connect();
  await assert.rejects(c.join("no-such-room"), (e) => e instanceof SwitchboardError && e.code === "unknown_room");
  const room = await c.createRoom();
  const j = await c.join(room);
  assert.equal(j.room, room);
  c.close();
});

test("ICE errors read as words", () => {
  assert.match(describeIceError({ url: "turn:x", errorCode: 486 }), /486 Allocation Quota Reached/);
  assert.match(describeIceError({ errorCode: 999, errorText: "odd" }), /the ICE server answered 999 odd/);
});
