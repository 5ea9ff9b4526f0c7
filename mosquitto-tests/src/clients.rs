//! What a device sees: rumqttc clients that answer with the CONNACK, PUBACK, SUBACK or
//! DISCONNECT codes a test asserts on, and the `messina devices` command that provisions them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::messina_bin;

/// MQTT 5 types, under one name.
pub mod v5 {
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, DisconnectReasonCode, LastWill, Packet, PubAckReason,
        SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{
        AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError,
    };
}

/// Options for an MQTT 5 client on loopback, with a username and password when given.
pub fn v5_options(
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> v5::MqttOptions {
    let mut o = v5::MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some((u, p)) = credentials {
        o.set_credentials(u, p);
    }
    o
}

/// Connects over MQTT 5: the CONNACK's assigned client id on success, the refusal code otherwise.
pub async fn connect_v5(
    options: v5::MqttOptions,
) -> Result<(v5::AsyncClient, v5::EventLoop, Option<String>), v5::ConnectReturnCode> {
    let (client, mut eventloop) = v5::AsyncClient::new(options, 100);
    let event = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
        .await
        .expect("a CONNACK within 10 s");
    match event {
        Ok(v5::Event::Incoming(v5::Packet::ConnAck(ack))) => {
            let assigned = ack.properties.and_then(|p| p.assigned_client_identifier);
            Ok((client, eventloop, assigned))
        }
        Err(v5::ConnectionError::ConnectionRefused(code)) => Err(code),
        other => panic!("expected a CONNACK, got {other:?}"),
    }
}

/// Connects a device over MQTT 5 with its id (as client id and username) and secret.
pub async fn connect_device_v5(
    port: u16,
    id: &str,
    secret: &str,
) -> Result<(v5::AsyncClient, v5::EventLoop), v5::ConnectReturnCode> {
    connect_v5(v5_options(port, id, Some((id, secret))))
        .await
        .map(|(client, eventloop, _)| (client, eventloop))
}

/// Connects over MQTT 3.1.1: the client on success, the refusal code otherwise.
pub async fn connect_v4(
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), rumqttc::ConnectReturnCode> {
    let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some((u, p)) = credentials {
        o.set_credentials(u, p);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 100);
    let event = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
        .await
        .expect("a CONNACK within 10 s");
    match event {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Ok((client, eventloop)),
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Err(code),
        other => panic!("expected a CONNACK, got {other:?}"),
    }
}

/// Polls until `pick` finds the packet it wants, or the connection ends (`None`).
pub async fn next_v5<T>(
    eventloop: &mut v5::EventLoop,
    mut pick: impl FnMut(&v5::Packet) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(v5::Event::Incoming(p)) => {
                    if let Some(t) = pick(&p) {
                        return Some(t);
                    }
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .expect("an answer within 10 s")
}

/// The reason of the next PUBACK, or `None` when the connection ends first.
pub async fn puback(eventloop: &mut v5::EventLoop) -> Option<v5::PubAckReason> {
    next_v5(eventloop, |p| match p {
        v5::Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await
}

/// The codes of the next SUBACK, or `None` when the connection ends first.
pub async fn suback(eventloop: &mut v5::EventLoop) -> Option<Vec<v5::SubscribeReasonCode>> {
    next_v5(eventloop, |p| match p {
        v5::Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await
}

/// How the connection ended, waiting up to `within`: the server's DISCONNECT reason when it
/// sent one.
pub async fn ended_v5(eventloop: &mut v5::EventLoop, within: Duration) -> v5::ConnectionError {
    tokio::time::timeout(within, async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the connection did not end within {within:?}"))
}

/// The DISCONNECT reason in a connection's end, if the server sent one.
pub fn disconnect_reason(end: &v5::ConnectionError) -> Option<v5::DisconnectReasonCode> {
    match end {
        v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code, ..
        }) => Some(*reason_code),
        _ => None,
    }
}

/// A config file for `messina devices` on the embedded store at `data` (which no running
/// server may hold open).
pub fn embedded_cli_config(data: &Path) -> PathBuf {
    let config = data.with_extension("cli.toml");
    std::fs::write(
        &config,
        format!("[storage.embedded]\npath = \"{}\"\n", data.display()),
    )
    .unwrap();
    config
}

/// Runs `messina devices …` with `config`, returning stdout (it must succeed).
pub fn messina_devices(config: &Path, args: &[&str]) -> String {
    let out = Command::new(messina_bin())
        .args(["devices", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "messina devices {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Adds a device with `messina devices add` and returns its secret (the one line it prints).
pub fn add_device(config: &Path, id: &str, extra: &[&str]) -> String {
    let mut args = vec!["add", id];
    args.extend_from_slice(extra);
    let out = messina_devices(config, &args);
    let secret = out.trim().to_string();
    assert_eq!(secret.len(), 43, "a 256-bit base64url secret: {out:?}");
    secret
}
