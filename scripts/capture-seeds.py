#!/usr/bin/env python3
"""Capture real STUN/TURN traffic as fuzz seeds.

coturn's turnutils_uclient (a client we did not write) talks to switchboard through a small
proxy on loopback that records what passes: every UDP datagram in either direction becomes a
`stun_parse` seed, and the byte stream of a TCP session, cut where the proxy happened to read
it, becomes `stream_framing` seeds. Run from the repository root after a release build:

    cargo build --release --bin switchboard
    python3 scripts/capture-seeds.py target/release/switchboard

Needs coturn's tools (scripts/install-test-deps.sh installs them). Writes
fuzz/corpus/stun_parse/capture-udp-NNN and fuzz/corpus/stream_framing/capture-tcp-NNN.
"""
import os
import select
import socket
import subprocess
import sys
import tempfile
import time

SERVER_PORT = 34780
PROXY_PORT = 34790
PEER_PORT = 34800
MAX_SEEDS = 40


def wait_port(port, kind):
    for _ in range(100):
        s = socket.socket(socket.AF_INET, kind)
        try:
            if kind == socket.SOCK_STREAM:
                s.connect(("127.0.0.1", port))
                return
            s.bind(("127.0.0.1", port))
        except OSError:
            if kind == socket.SOCK_DGRAM:
                return
        finally:
            s.close()
        time.sleep(0.1)
    sys.exit(f"port {port} never opened")


def keep(seeds, data):
    """Keep the first datagram of each distinct (first two bytes, length) shape."""
    key = (data[:2], len(data))
    if key not in seeds and len(seeds) < MAX_SEEDS:
        seeds[key] = data


def proxy_udp(deadline, seeds):
    """One server-side socket per client address, so each client's allocation stays its own."""
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", PROXY_PORT))
    backs = {}  # client address -> socket towards the server
    clients = {}  # that socket -> client address
    while time.time() < deadline:
        r, _, _ = select.select([front] + list(clients), [], [], 0.2)
        for s in r:
            data, addr = s.recvfrom(65535)
            keep(seeds, data)
            if s is front:
                if addr not in backs:
                    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    b.bind(("127.0.0.1", 0))
                    backs[addr] = b
                    clients[b] = addr
                backs[addr].sendto(data, ("127.0.0.1", SERVER_PORT))
            else:
                front.sendto(data, clients[s])


def proxy_tcp(deadline, chunks):
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", PROXY_PORT))
    lst.listen(4)
    pairs = {}
    while time.time() < deadline:
        socks = [lst] + list(pairs)
        r, _, _ = select.select(socks, [], [], 0.2)
        for s in r:
            if s is lst:
                c, _ = lst.accept()
                b = socket.create_connection(("127.0.0.1", SERVER_PORT))
                pairs[c] = b
                pairs[b] = c
                continue
            if s not in pairs:
                continue  # closed with its other half in this round
            try:
                data = s.recv(65535)
            except OSError:
                data = b""
            if not data:
                other = pairs.pop(s)
                pairs.pop(other, None)
                s.close()
                other.close()
                continue
            if len(chunks) < MAX_SEEDS:
                chunks.append(data)
            pairs[s].sendall(data)


def uclient(extra):
    return subprocess.Popen(
        ["turnutils_uclient", "-u", "alice", "-w", "wonder", "-e", "127.0.0.1",
         "-r", str(PEER_PORT), "-p", str(PROXY_PORT), "-n", "20", "-m", "2", "-l", "170",
         "-c", *extra, "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write(dir_, prefix, items):
    os.makedirs(dir_, exist_ok=True)
    for i, data in enumerate(items):
        with open(os.path.join(dir_, f"{prefix}-{i:03}"), "wb") as f:
            f.write(data)
    print(f"{dir_}: {len(items)} {prefix} seeds")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "switchboard.toml")
        with open(cfg, "w") as f:
            f.write(
                "[http]\nlisten = \"127.0.0.1:0\"\n"
                f"[turn]\nlisten = [\"127.0.0.1:{SERVER_PORT}\"]\n"
                "allow_peers = [\"127.0.0.1/32\"]\n"
                "[auth.turn_users]\nalice = \"wonder\"\n"
                "[log]\nlevel = \"warn\"\n")
        server = subprocess.Popen([binary, "--config", cfg])
        peer = subprocess.Popen(["turnutils_peer", "-p", str(PEER_PORT), "-L", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(SERVER_PORT, socket.SOCK_STREAM)
            seeds = {}
            c = uclient([])
            proxy_udp(time.time() + 8, seeds)
            c.kill()
            chunks = []
            c = uclient(["-t"])
            proxy_tcp(time.time() + 8, chunks)
            c.kill()
        finally:
            peer.kill()
            server.kill()
    write("fuzz/corpus/stun_parse", "capture-udp", list(seeds.values()))
    write("fuzz/corpus/stream_framing", "capture-tcp", chunks)


if __name__ == "__main__":
    main()
