//! Opens N idle MQTT 3.1.1 connections to a broker and holds them until killed, spreading them over
//! source addresses 127.0.0.2, 127.0.0.3, ... so more than one address's worth of ephemeral ports
//! can be used. Prints `connected N` once every CONNACK arrived. For the connection-scale benchmark.
//! Usage: `conn-hold PORT N [KEEPALIVE_S]`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// A CONNECT packet, protocol level 4, clean session, for `client_id`.
fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(Ok(port)), Some(Ok(n))) = (
        args.get(1).map(|a| a.parse::<u16>()),
        args.get(2).map(|a| a.parse::<usize>()),
    ) else {
        eprintln!("usage: conn-hold PORT N [KEEPALIVE_S]");
        std::process::exit(2);
    };
    let keep_alive: u16 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(600);
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::with_capacity(n);
    // A few hundred connects in flight at a time keeps the accept queue from overflowing.
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let (connected, failed) = (Arc::clone(&connected), Arc::clone(&failed));
            tasks.push(tokio::spawn(async move {
                let source = Ipv4Addr::new(127, 0, 0, (2 + i / 20_000) as u8);
                let socket = TcpSocket::new_v4().ok()?;
                socket.bind(SocketAddr::from((source, 0))).ok()?;
                let mut stream =
                    match tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            return None;
                        }
                    };
                stream
                    .write_all(&connect_packet(&format!("hold-{i}"), keep_alive))
                    .await
                    .ok()?;
                let mut connack = [0u8; 4];
                match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack))
                    .await
                {
                    Ok(Ok(_)) if connack[0] == 0x20 && connack[3] == 0 => {
                        connected.fetch_add(1, Ordering::Relaxed);
                        Some(stream)
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }));
        }
        for t in tasks {
            if let Ok(Some(s)) = t.await {
                streams.push(s);
            }
        }
        if streams.len() % 5000 < 500 {
            eprintln!(
                "conn-hold: {} connected, {} failed",
                connected.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed)
            );
        }
    }
    println!(
        "connected {} failed {}",
        connected.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    // Hold the connections; answer nothing (keep-alive is long). Ends when killed.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
