//! `native-echo`: the upper bound of the benchmark suite. A minimal WebSocket echo server
//! written directly on tokio-tungstenite, with no sandbox and nothing else in the path.
//!
//! It is configured like sockhost where that matters for the figures: the same 1 KiB read
//! buffer, `TCP_NODELAY`, a multi-threaded tokio runtime (one worker when pinned with
//! `taskset -c 0`), one task per connection and one flushed write per frame. What sockhost
//! costs above this server is what its addon host (routing, the wasm instance, the calls
//! across the sandbox) costs.
//!
//! Every path is served the same way:
//! - default: each text or binary message is sent back unchanged;
//! - `--stream N`: each text message is answered with N text frames `"<i>:<message>"`,
//!   i = 0..N-1, each flushed on its own (like an addon calling `send-text` N times), which
//!   is the reply of the streamer test addon.
//!
//! ```text
//! native-echo --port 9001 [--stream 10] [--listen 127.0.0.1]
//! ```
//!
//! It prints `native-echo: listening on <addr>` on stderr once it accepts connections.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use sockhost_bench::{chunk, ws_config};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(about = "Minimal native tokio-tungstenite echo server: the benchmark's upper bound")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, short = 'p', default_value_t = 9001)]
    port: u16,
    /// Answer each text message with this many frames "<i>:<message>" (1: plain echo).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    stream: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind((args.listen, args.port)).await?;
    eprintln!("native-echo: listening on {} (stream {})", listener.local_addr()?, args.stream);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, args.stream as usize));
            }
            Err(err) => {
                // Out of file descriptors, usually: back off instead of spinning.
                eprintln!("native-echo: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, frames: usize) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        let sent = match message {
            Message::Text(text) if frames > 1 => {
                let mut sent = Ok(());
                for index in 0..frames {
                    sent = ws.send(Message::text(chunk(index, text.as_str()))).await;
                    if sent.is_err() {
                        break;
                    }
                }
                sent
            }
            Message::Text(_) | Message::Binary(_) => ws.send(message).await,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = ws.close(None).await;
}
