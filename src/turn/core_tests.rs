//! Method dispatch and dropping the table.

use super::test_support::*;

#[test]
fn unknown_method_and_non_requests() {
    let mut h = harness(cfg());
    let r = h.send(client(1), 0x0123, [1; 12], None, &[], &[]);
    assert_eq!(r.code(), Some(400));
    let mut buf = Vec::new();
    Encoder::new(&mut buf, method::ALLOCATE, Class::Success, &[1; 12]).finish();
    let m = Message::parse(&buf).unwrap();
    let mut out = Vec::new();
    let env = h.env;
    let mut b = h.bind();
    assert_eq!(
        h.t.handle_request(env, client(1), &m, &mut out, &mut b),
        Outcome::Ignored
    );
    assert!(out.is_empty());
}

#[test]
fn dropping_the_table_frees_everything() {
    let mut h = harness(cfg());
    let c = rest(&h, 3600);
    h.allocate(client(1), &c, 1);
    h.permit(client(1), &c, 2, peer(1));
    let open = h.open.clone();
    let metrics = h.metrics.clone();
    drop(h);
    assert!(open.lock().unwrap().is_empty());
    let text = metrics.render();
    assert!(text.contains("switchboard_turn_allocations_deleted_total{reason=\"shutdown\"} 1"));
    assert!(text.contains("switchboard_turn_permissions_active 0"));
}
