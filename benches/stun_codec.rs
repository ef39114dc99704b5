//! Binding request decode + response encode: switchboard's codec next to webrtc-rs `stun`
//! in the same run, so the ratio is meaningful on a noisy machine.
//!
//! Run: `cargo bench --bench stun_codec`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::SocketAddr;
use stun::agent::TransactionId;
use stun::fingerprint::FINGERPRINT;
use stun::message::{Message as WMessage, BINDING_REQUEST, BINDING_SUCCESS};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use switchboard::stun::{binding, Message};

fn request_bytes() -> Vec<u8> {
    let mut req = Vec::new();
    binding::request(&[7u8; 12], true, &mut req);
    req
}

fn bench(c: &mut Criterion) {
    let req = request_bytes();
    let src: SocketAddr = "203.0.113.9:54321".parse().unwrap();
    let local: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut g = c.benchmark_group("binding_decode_respond");

    let mut out = Vec::with_capacity(256);
    g.bench_function("switchboard", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).unwrap();
            out.clear();
            binding::respond(&m, src, Some(local), "switchboard", true, &mut out);
            black_box(out.len())
        })
    });

    g.bench_function("webrtc_rs_stun", |b| {
        b.iter(|| {
            let mut m = WMessage::new();
            m.raw = black_box(&req).clone();
            m.decode().unwrap();
            assert_eq!(m.typ, BINDING_REQUEST);
            let mut resp = WMessage::new();
            resp.build(&[
                Box::new(TransactionId(m.transaction_id.0)),
                Box::new(BINDING_SUCCESS),
                Box::new(XorMappedAddress {
                    ip: src.ip(),
                    port: src.port(),
                }),
                Box::new(TextAttribute::new(
                    stun::attributes::ATTR_SOFTWARE,
                    "switchboard".into(),
                )),
                Box::new(FINGERPRINT),
            ])
            .unwrap();
            black_box(resp.raw.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
