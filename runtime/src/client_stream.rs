//! The one type the connection code sees for a client's socket, plain or TLS. It lives
//! apart from [`crate::tls`] so the connection and session modules need nothing of TLS's
//! set-up (certificates, reloading) and the modules' dependencies point one way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A client's connection: plain TCP, or TLS over TCP. Counts the writes that reach it
/// (`sockhost_socket_writes_total`): against messages sent, that shows corking at work.
pub struct ClientStream {
    // The TLS side is boxed: a rustls connection is about 1.2 KB inline against 40 bytes
    // for a TCP stream, and every plain connection would otherwise carry that much unused
    // space.
    io: Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>,
    writes: Counter,
}

impl ClientStream {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream, writes: Counter) -> ClientStream {
        ClientStream { io: Either::Left(tcp), writes }
    }

    /// A TLS connection, after its handshake.
    pub fn tls(tls: tokio_rustls::server::TlsStream<TcpStream>, writes: Counter) -> ClientStream {
        ClientStream { io: Either::Right(Box::new(tls)), writes }
    }

    fn counted(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.writes.inc();
        }
        written
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.counted(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.counted(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
