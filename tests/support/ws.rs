//! WebSocket client helpers shared by the signaling and PeerJS tests: connect to a running
//! server's `/v1/ws`, send JSON frames, and read JSON frames with a deadline.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use switchboard::RunningServer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Open `/v1/ws` on `srv` with no token in the header (the test sends `hello`).
pub async fn connect(srv: &RunningServer) -> Ws {
    let url = format!("ws://{}/v1/ws", srv.http_addr());
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connects")
        .0
}

/// Send one JSON text frame.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON frame, skipping pings; panics after 5 s or on a close.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("socket open")
            .expect("frame ok");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed while waiting for a frame: {c:?}"),
            _ => continue,
        }
    }
}

/// The next JSON frame, or `None` when the socket closes (or fails); panics after `secs`. For
/// tests in which the server closing the socket is the answer.
pub async fn next_within(ws: &mut Ws, secs: u64) -> Option<Value> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(secs), ws.next())
            .await
            .expect("a message or a close in time");
        match m {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Next frame of `ty`, skipping others (e.g. ice-servers).
pub async fn recv_type(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = recv(ws).await;
        if v["type"] == ty {
            return v;
        }
    }
}
