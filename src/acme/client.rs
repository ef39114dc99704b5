//! instant-acme's HTTP requests over the project's one outgoing client shape
//! ([`crate::https_client`]): ring TLS, the configured CA file or the system roots.

use bytes::Bytes;
use http_body_util::BodyExt;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use std::future::Future;
use std::pin::Pin;

/// Most bytes read from one ACME answer (a certificate chain is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// An [`HttpClient`] for instant-acme on a reqwest client.
pub struct Client(pub reqwest::Client);

/// The error with its causes ("error sending request" alone does not say "connection
/// refused" or "certificate unknown").
fn other(e: impl std::error::Error + Send + Sync + 'static) -> instant_acme::Error {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    instant_acme::Error::Other(text.into())
}

impl HttpClient for Client {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(never) => match never {},
            };
            let mut resp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(other)?;
            let mut answer = http::Response::builder().status(resp.status());
            if let Some(h) = answer.headers_mut() {
                *h = resp.headers().clone();
            }
            let mut buf = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(other)? {
                if buf.len() + chunk.len() > MAX_BODY {
                    return Err(instant_acme::Error::Other(
                        "ACME answer larger than 1 MiB".into(),
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            let (parts, ()) = answer.body(())?.into_parts();
            Ok(BytesResponse {
                parts,
                body: Box::new(Bytes::from(buf)),
            })
        })
    }
}
