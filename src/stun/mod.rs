//! STUN: the message codec and the Binding responder (RFC 8489), both sans-IO.

pub mod binding;
pub mod codec;
pub mod reflect;

pub use codec::{attr, method, Class, DecodeError, Encoder, Message};
