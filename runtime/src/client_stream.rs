//! The one type the connection code sees for a client's socket, plain or TLS. It lives
//! apart from [`crate::tls`] so the connection and session modules need nothing of TLS's
//! set-up (certificates, reloading) and the modules' dependencies point one way.

use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A client's connection: plain TCP, or TLS over TCP.
// The TLS side is boxed: a rustls connection is about 1.2 KB inline against 40 bytes for a
// TCP stream, and every plain connection would otherwise carry that much unused space.
pub type ClientStream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;
