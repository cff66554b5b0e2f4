//! Double HBONE, the client's inner half: an HBONE connection of its own
//! (mTLS with the destination, then one CONNECT) carried inside a CONNECT
//! stream that another network's gateway terminates. The gateway sees
//! only ciphertext; the destination sees the client's identity.
//!
//! The inner connection carries one stream and is not pooled: each one
//! may reach a different endpoint, whichever the gateway picks.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use rustls::ClientConfig;
use tracing::{debug, Instrument};

use super::stream::StreamIo;
use super::{tls, H2Settings, H2Stream, PoolError};

/// Opens the inner tunnel inside `outer`: TLS with `tls` (which verifies
/// the destination's identity), HTTP/2, and `request`'s CONNECT, which
/// must be answered 200. The inner connection is driven by a task of its
/// own and closes with its one stream.
pub async fn connect_inner(
    outer: H2Stream,
    tls: Arc<ClientConfig>,
    request: Request<()>,
    h2: H2Settings,
) -> Result<H2Stream, PoolError> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let conn = connector
        .connect(tls::placeholder_server_name(), StreamIo::new(outer))
        .await
        .map_err(PoolError::InnerHandshake)?;
    if conn.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
        return Err(PoolError::InnerNoH2);
    }
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .handshake::<_, Bytes>(conn)
        .await?;
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "inner HBONE connection ended with an error");
            }
        }
        .in_current_span(),
    );
    let mut send = send.ready().await?;
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        debug!(status = %response.status(), "inner CONNECT refused");
        return Err(PoolError::Status(response.status()));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}
