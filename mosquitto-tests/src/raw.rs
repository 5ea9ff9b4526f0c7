//! A raw MQTT 3.1.1 and 5 client over a plain `TcpStream`, for the conformance suite: it encodes
//! exactly the bytes a case asks for (malformed packets and protocol violations included), decodes
//! whatever the server answers, and bounds every wait with a timeout so a silent server is a
//! failure rather than a hang. It is deliberately not a general-purpose client: no retries, no
//! reconnects, no background task, so what the test sees is what the server sent.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    /// The Protocol Level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }

    /// How the conformance table names it.
    pub fn label(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }

    /// A short tag for client ids, topics and device ids (`[A-Za-z0-9_.-]` only).
    pub fn tag(self) -> &'static str {
        match self {
            Version::V311 => "v4",
            Version::V5 => "v5",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// MQTT 5 property identifiers (section 2.2.2.2) used by the suite.
pub mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// A property value, typed as section 2.2.2.2 lays it out on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

impl Value {
    /// The number a Byte, Two/Four Byte or Variable Byte Integer property carries.
    pub fn as_u32(&self) -> Option<u32> {
        match self {
            Value::Byte(v) => Some(u32::from(*v)),
            Value::U16(v) => Some(u32::from(*v)),
            Value::U32(v) | Value::VarInt(v) => Some(*v),
            _ => None,
        }
    }
}

/// Properties in wire order; a list rather than a map because order (user properties) and
/// repetition (subscription identifiers) both matter.
pub type Props = Vec<(u8, Value)>;

/// The first value of property `id`.
pub fn find(props: &Props, id: u8) -> Option<&Value> {
    props.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
}

/// The first value of numeric property `id`.
pub fn find_u32(props: &Props, id: u8) -> Option<u32> {
    find(props, id).and_then(Value::as_u32)
}

enum Kind {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

fn kind(id: u8) -> Option<Kind> {
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Kind::Byte,
        0x13 | 0x21 | 0x22 | 0x23 => Kind::U16,
        0x02 | 0x11 | 0x18 | 0x27 => Kind::U32,
        0x0B => Kind::VarInt,
        0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => Kind::Str,
        0x09 | 0x16 => Kind::Bin,
        0x26 => Kind::Pair,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding: what the client sends.

/// Appends a Variable Byte Integer (section 1.5.5 / 2.2.3).
pub fn put_varint(buf: &mut Vec<u8>, mut n: u32) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if n == 0 {
            return;
        }
    }
}

/// Appends a two-byte length and the bytes (UTF-8 strings and binary data alike).
pub fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    buf.extend_from_slice(bytes);
}

fn put_props(buf: &mut Vec<u8>, props: &Props) {
    let mut body = Vec::new();
    for (id, value) in props {
        body.push(*id);
        match value {
            Value::Byte(v) => body.push(*v),
            Value::U16(v) => body.extend_from_slice(&v.to_be_bytes()),
            Value::U32(v) => body.extend_from_slice(&v.to_be_bytes()),
            Value::VarInt(v) => put_varint(&mut body, *v),
            Value::Str(s) => put_bytes(&mut body, s.as_bytes()),
            Value::Bin(b) => put_bytes(&mut body, b),
            Value::Pair(k, v) => {
                put_bytes(&mut body, k.as_bytes());
                put_bytes(&mut body, v.as_bytes());
            }
        }
    }
    put_varint(buf, body.len() as u32);
    buf.extend_from_slice(&body);
}

/// A whole packet: the first byte, the remaining length and the body.
pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![byte1];
    put_varint(&mut packet, body.len() as u32);
    packet.extend_from_slice(body);
    packet
}

/// A Will Message carried by CONNECT.
#[derive(Clone, Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub props: Props,
}

/// A CONNECT packet. `flags_or` and `level` let a case break the packet on purpose.
#[derive(Clone, Debug)]
pub struct Connect {
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub props: Props,
    pub will: Option<Will>,
    /// OR-ed into the Connect Flags byte (e.g. `0x01`, the reserved bit).
    pub flags_or: u8,
    /// Overrides the Protocol Level byte.
    pub level: Option<u8>,
    /// Overrides the Protocol Name.
    pub protocol_name: Option<String>,
}

impl Connect {
    pub fn new(client_id: &str) -> Connect {
        Connect {
            client_id: client_id.to_string(),
            clean: true,
            keep_alive: 30,
            props: Vec::new(),
            will: None,
            flags_or: 0,
            level: None,
            protocol_name: None,
        }
    }

    pub fn clean(mut self, clean: bool) -> Connect {
        self.clean = clean;
        self
    }

    pub fn keep_alive(mut self, seconds: u16) -> Connect {
        self.keep_alive = seconds;
        self
    }

    pub fn prop(mut self, id: u8, value: Value) -> Connect {
        self.props.push((id, value));
        self
    }

    pub fn will(mut self, will: Will) -> Connect {
        self.will = Some(will);
        self
    }

    pub fn encode(&self, v: Version) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(
            &mut body,
            self.protocol_name.as_deref().unwrap_or("MQTT").as_bytes(),
        );
        body.push(self.level.unwrap_or(v.level()));
        let mut flags = self.flags_or;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v == Version::V5 {
            put_props(&mut body, &self.props);
        }
        put_bytes(&mut body, self.client_id.as_bytes());
        if let Some(will) = &self.will {
            if v == Version::V5 {
                put_props(&mut body, &will.props);
            }
            put_bytes(&mut body, will.topic.as_bytes());
            put_bytes(&mut body, &will.payload);
        }
        frame(0x10, &body)
    }
}

/// A PUBLISH packet, in either direction. The topic is bytes so a case can send ill-formed UTF-8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub topic: Vec<u8>,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub props: Props,
}

impl Publish {
    pub fn new(topic: &str, payload: &[u8]) -> Publish {
        Publish {
            topic: topic.as_bytes().to_vec(),
            payload: payload.to_vec(),
            qos: 0,
            retain: false,
            dup: false,
            pkid: 0,
            props: Vec::new(),
        }
    }

    pub fn qos(mut self, qos: u8) -> Publish {
        self.qos = qos;
        self
    }

    pub fn retain(mut self, retain: bool) -> Publish {
        self.retain = retain;
        self
    }

    pub fn pkid(mut self, pkid: u16) -> Publish {
        self.pkid = pkid;
        self
    }

    pub fn dup(mut self, dup: bool) -> Publish {
        self.dup = dup;
        self
    }

    pub fn prop(mut self, id: u8, value: Value) -> Publish {
        self.props.push((id, value));
        self
    }

    /// The topic as text (lossy), for messages and comparisons.
    pub fn topic_str(&self) -> String {
        String::from_utf8_lossy(&self.topic).into_owned()
    }

    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn encode(&self, v: Version) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, &self.topic);
        if self.qos > 0 {
            body.extend_from_slice(&self.pkid.to_be_bytes());
        }
        if v == Version::V5 {
            put_props(&mut body, &self.props);
        }
        body.extend_from_slice(&self.payload);
        let byte1 = 0x30 | (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain);
        frame(byte1, &body)
    }
}

/// Subscription Options (section 3.8.3.1); for 3.1.1 only the QoS bits are sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct SubOpts {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

impl SubOpts {
    pub fn qos(qos: u8) -> SubOpts {
        SubOpts {
            qos,
            ..SubOpts::default()
        }
    }

    fn byte(self, v: Version) -> u8 {
        match v {
            Version::V311 => self.qos,
            Version::V5 => {
                self.qos
                    | (u8::from(self.no_local) << 2)
                    | (u8::from(self.retain_as_published) << 3)
                    | (self.retain_handling << 4)
            }
        }
    }
}

/// A SUBSCRIBE packet; `byte1` is normally `0x82`.
pub fn subscribe(
    v: Version,
    byte1: u8,
    pkid: u16,
    filters: &[(&str, SubOpts)],
    props: &Props,
) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == Version::V5 {
        put_props(&mut body, props);
    }
    for (filter, opts) in filters {
        put_bytes(&mut body, filter.as_bytes());
        body.push(opts.byte(v));
    }
    frame(byte1, &body)
}

/// An UNSUBSCRIBE packet.
pub fn unsubscribe(v: Version, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == Version::V5 {
        put_props(&mut body, &Vec::new());
    }
    for filter in filters {
        put_bytes(&mut body, filter.as_bytes());
    }
    frame(0xA2, &body)
}

/// The four acknowledgements of the QoS 1 and 2 flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl AckKind {
    fn byte1(self) -> u8 {
        match self {
            AckKind::PubAck => 0x40,
            AckKind::PubRec => 0x50,
            AckKind::PubRel => 0x62,
            AckKind::PubComp => 0x70,
        }
    }
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP; MQTT 5 omits a Success reason code (section 3.4.2.1).
pub fn ack(v: Version, kind: AckKind, pkid: u16, reason: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v == Version::V5 && reason != 0 {
        body.push(reason);
    }
    frame(kind.byte1(), &body)
}

pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}

/// A DISCONNECT; in MQTT 5 with a reason code and empty properties.
pub fn disconnect(v: Version, reason: u8) -> Vec<u8> {
    match v {
        Version::V311 => vec![0xE0, 0x00],
        Version::V5 => frame(0xE0, &[reason, 0x00]),
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding: what the server sends.

/// A packet from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    ConnAck {
        session_present: bool,
        code: u8,
        props: Props,
    },
    Publish(Publish),
    Ack {
        kind: AckKind,
        pkid: u16,
        reason: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    Disconnect {
        reason: u8,
        props: Props,
    },
}

impl Packet {
    /// A one-line description for failure details.
    pub fn brief(&self) -> String {
        match self {
            Packet::ConnAck {
                session_present,
                code,
                ..
            } => format!("CONNACK(code 0x{code:02X}, session present {session_present})"),
            Packet::Publish(p) => format!(
                "PUBLISH({} {:?} qos {} retain {})",
                p.topic_str(),
                p.payload_str(),
                p.qos,
                p.retain
            ),
            Packet::Ack { kind, pkid, reason } => {
                format!("{kind:?}({pkid}, reason 0x{reason:02X})")
            }
            Packet::SubAck { pkid, codes } => format!("SUBACK({pkid}, {codes:02X?})"),
            Packet::UnsubAck { pkid, codes } => format!("UNSUBACK({pkid}, {codes:02X?})"),
            Packet::PingResp => "PINGRESP".to_string(),
            Packet::Disconnect { reason, .. } => format!("DISCONNECT(0x{reason:02X})"),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!("packet ends {n} bytes too early"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u32, String> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("variable byte integer longer than 4 bytes".to_string())
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u16()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "ill-formed UTF-8 string".to_string())
    }

    fn props(&mut self) -> Result<Props, String> {
        let len = self.varint()? as usize;
        let mut inner = Reader {
            bytes: self.take(len)?,
        };
        let mut props = Vec::new();
        while !inner.bytes.is_empty() {
            let id = inner.u8()?;
            let value = match kind(id).ok_or(format!("unknown property 0x{id:02X}"))? {
                Kind::Byte => Value::Byte(inner.u8()?),
                Kind::U16 => Value::U16(inner.u16()?),
                Kind::U32 => Value::U32(inner.u32()?),
                Kind::VarInt => Value::VarInt(inner.varint()?),
                Kind::Str => Value::Str(inner.string()?),
                Kind::Bin => Value::Bin(inner.bytes()?),
                Kind::Pair => Value::Pair(inner.string()?, inner.string()?),
            };
            props.push((id, value));
        }
        Ok(props)
    }
}

/// Decodes one packet body (everything after the remaining length).
pub fn decode(v: Version, byte1: u8, body: &[u8]) -> Result<Packet, String> {
    let mut r = Reader { bytes: body };
    let v5 = v == Version::V5;
    let packet = match byte1 >> 4 {
        2 => {
            let flags = r.u8()?;
            let code = r.u8()?;
            let props = if v5 && !r.bytes.is_empty() {
                r.props()?
            } else {
                Vec::new()
            };
            Packet::ConnAck {
                session_present: flags & 1 == 1,
                code,
                props,
            }
        }
        3 => {
            let qos = (byte1 >> 1) & 3;
            let topic = r.bytes()?;
            let pkid = if qos > 0 { r.u16()? } else { 0 };
            let props = if v5 { r.props()? } else { Vec::new() };
            Packet::Publish(Publish {
                topic,
                payload: r.bytes.to_vec(),
                qos,
                retain: byte1 & 1 == 1,
                dup: byte1 & 8 == 8,
                pkid,
                props,
            })
        }
        4..=7 => {
            let kind = match byte1 >> 4 {
                4 => AckKind::PubAck,
                5 => AckKind::PubRec,
                6 => AckKind::PubRel,
                _ => AckKind::PubComp,
            };
            let pkid = r.u16()?;
            let reason = if v5 && !r.bytes.is_empty() {
                r.u8()?
            } else {
                0
            };
            Packet::Ack { kind, pkid, reason }
        }
        9 | 11 => {
            let pkid = r.u16()?;
            if v5 {
                r.props()?;
            }
            let codes = r.bytes.to_vec();
            if byte1 >> 4 == 9 {
                Packet::SubAck { pkid, codes }
            } else {
                Packet::UnsubAck { pkid, codes }
            }
        }
        13 => Packet::PingResp,
        14 => {
            let reason = if r.bytes.is_empty() { 0 } else { r.u8()? };
            let props = if v5 && !r.bytes.is_empty() {
                r.props()?
            } else {
                Vec::new()
            };
            Packet::Disconnect { reason, props }
        }
        t => return Err(format!("unexpected packet type {t} from the server")),
    };
    Ok(packet)
}

// ---------------------------------------------------------------------------------------------
// The connection.

/// Why no packet came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived in time.
    Timeout,
    /// The server sent bytes that do not decode.
    Malformed(String),
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Closed => f.write_str("connection closed by the server"),
            RecvError::Timeout => f.write_str("nothing received in time"),
            RecvError::Malformed(e) => write!(f, "malformed packet from the server: {e}"),
        }
    }
}

/// What the server did after an offending packet.
#[derive(Debug, Default)]
pub struct Ending {
    /// Packets received before the end (or before the time ran out).
    pub packets: Vec<Packet>,
    /// Whether the server closed the connection in time.
    pub closed: bool,
    /// When it closed, from the start of the wait.
    pub after: Duration,
}

impl Ending {
    /// The reason code of a DISCONNECT the server sent, if it sent one.
    pub fn disconnect_reason(&self) -> Option<u8> {
        self.packets.iter().find_map(|p| match p {
            Packet::Disconnect { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    pub fn connack(&self) -> Option<u8> {
        self.packets.iter().find_map(|p| match p {
            Packet::ConnAck { code, .. } => Some(*code),
            _ => None,
        })
    }

    pub fn brief(&self) -> String {
        let packets: Vec<String> = self.packets.iter().map(Packet::brief).collect();
        format!(
            "{} after [{}]",
            if self.closed { "closed" } else { "still open" },
            packets.join(", ")
        )
    }
}

/// How long a single expected packet may take. Loopback answers in microseconds; this only
/// bounds a server that never answers.
pub const WAIT: Duration = Duration::from_secs(3);

/// One MQTT connection.
pub struct Client {
    pub v: Version,
    stream: TcpStream,
    buf: Vec<u8>,
    /// Packets read while waiting for something else, returned first by [`Client::recv`].
    queued: VecDeque<Packet>,
    /// Server-to-client Topic Aliases (section 3.3.2.3.4), resolved as a client must.
    aliases: HashMap<u16, Vec<u8>>,
    next_pkid: u16,
}

impl Client {
    /// Opens a TCP connection without sending anything.
    pub async fn open(port: u16, v: Version) -> Result<Client, String> {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .map_err(|_| format!("TCP connect to port {port} timed out"))?
            .map_err(|e| format!("TCP connect to port {port}: {e}"))?;
        stream.set_nodelay(true).ok();
        Ok(Client {
            v,
            stream,
            buf: Vec::new(),
            queued: VecDeque::new(),
            aliases: HashMap::new(),
            next_pkid: 0,
        })
    }

    /// Connects and returns the CONNACK's session present flag and properties; any CONNACK
    /// other than success, or none, is an error.
    pub async fn connect(
        port: u16,
        v: Version,
        connect: &Connect,
    ) -> Result<(Client, bool, Props), String> {
        let mut c = Client::open(port, v).await?;
        c.send(&connect.encode(v)).await?;
        match c.recv(WAIT).await {
            Ok(Packet::ConnAck {
                session_present,
                code: 0,
                props,
            }) => Ok((c, session_present, props)),
            Ok(other) => Err(format!(
                "CONNECT of {:?} answered with {}",
                connect.client_id,
                other.brief()
            )),
            Err(e) => Err(format!(
                "CONNECT of {:?} not answered: {e}",
                connect.client_id
            )),
        }
    }

    /// Connects a clean session with a 30 s keep-alive.
    pub async fn start(port: u16, v: Version, client_id: &str) -> Result<Client, String> {
        Ok(Client::connect(port, v, &Connect::new(client_id)).await?.0)
    }

    /// A fresh non-zero packet identifier.
    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % 60_000 + 1;
        self.next_pkid
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .map_err(|_| "send timed out".to_string())?
            .map_err(|e| format!("send failed: {e}"))
    }

    /// The next packet within `within`.
    pub async fn recv(&mut self, within: Duration) -> Result<Packet, RecvError> {
        if let Some(p) = self.queued.pop_front() {
            return Ok(p);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(packet) = self.parse()? {
                return Ok(packet);
            }
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            match read {
                Err(_) => return Err(RecvError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(RecvError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames and decodes one packet from the buffer, if a whole one is there.
    fn parse(&mut self) -> Result<Option<Packet>, RecvError> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let Some(&byte) = self.buf.get(i) else {
                return Ok(None);
            };
            len |= usize::from(byte & 0x7F) << (7 * (i - 1));
            i += 1;
            if byte & 0x80 == 0 {
                break;
            }
            if i > 4 {
                return Err(RecvError::Malformed("remaining length too long".into()));
            }
        }
        if self.buf.len() < i + len {
            return Ok(None);
        }
        let byte1 = self.buf[0];
        let body: Vec<u8> = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        let mut packet = decode(self.v, byte1, &body).map_err(RecvError::Malformed)?;
        if let Packet::Publish(p) = &mut packet {
            self.resolve_alias(p);
        }
        Ok(Some(packet))
    }

    fn resolve_alias(&mut self, p: &mut Publish) {
        let Some(alias) = find_u32(&p.props, prop::TOPIC_ALIAS) else {
            return;
        };
        let alias = alias as u16;
        if p.topic.is_empty() {
            if let Some(topic) = self.aliases.get(&alias) {
                p.topic = topic.clone();
            }
        } else {
            self.aliases.insert(alias, p.topic.clone());
        }
    }

    /// The next packet that `pick` accepts, queueing the others for later; `what` names it in
    /// the error.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut pick: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + within;
        let mut skipped = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ok(p) => match pick(&p) {
                    Some(t) => break Ok(t),
                    None => skipped.push(p),
                },
                Err(e) => {
                    let seen: Vec<String> = skipped.iter().map(Packet::brief).collect();
                    break Err(format!(
                        "waiting for {what}: {e} (received [{}])",
                        seen.join(", ")
                    ));
                }
            }
        };
        // Keep the order the server sent them in, ahead of anything read later.
        for p in skipped.into_iter().rev() {
            self.queued.push_front(p);
        }
        result
    }

    /// Sends a SUBSCRIBE and returns the SUBACK's codes.
    pub async fn subscribe_with(
        &mut self,
        filters: &[(&str, SubOpts)],
        props: &Props,
    ) -> Result<Vec<u8>, String> {
        let pkid = self.pkid();
        self.send(&subscribe(self.v, 0x82, pkid, filters, props))
            .await?;
        self.expect("SUBACK", WAIT, |p| match p {
            Packet::SubAck { pkid: id, codes } if *id == pkid => Some(codes.clone()),
            _ => None,
        })
        .await
    }

    /// Subscribes to one filter and checks the granted QoS.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<(), String> {
        self.subscribe_opts(filter, SubOpts::qos(qos)).await
    }

    pub async fn subscribe_opts(&mut self, filter: &str, opts: SubOpts) -> Result<(), String> {
        let codes = self.subscribe_with(&[(filter, opts)], &Vec::new()).await?;
        if codes != [opts.qos] {
            return Err(format!(
                "SUBSCRIBE {filter} at QoS {} answered with codes {codes:02X?}",
                opts.qos
            ));
        }
        Ok(())
    }

    /// Publishes and completes the QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP). A packet
    /// identifier of 0 in `p` is replaced by a fresh one.
    pub async fn publish(&mut self, p: Publish) -> Result<(), String> {
        let mut p = p;
        if p.qos > 0 && p.pkid == 0 {
            p.pkid = self.pkid();
        }
        self.send(&p.encode(self.v)).await?;
        let pkid = p.pkid;
        match p.qos {
            0 => Ok(()),
            1 => {
                let reason = self.wait_ack(AckKind::PubAck, pkid).await?;
                check_ok_reason("PUBACK", reason)
            }
            _ => {
                let reason = self.wait_ack(AckKind::PubRec, pkid).await?;
                check_ok_reason("PUBREC", reason)?;
                self.send(&ack(self.v, AckKind::PubRel, pkid, 0)).await?;
                let reason = self.wait_ack(AckKind::PubComp, pkid).await?;
                check_ok_reason("PUBCOMP", reason)
            }
        }
    }

    /// Waits for the acknowledgement `kind` of `pkid` and returns its reason code.
    pub async fn wait_ack(&mut self, kind: AckKind, pkid: u16) -> Result<u8, String> {
        self.expect(&format!("{kind:?}({pkid})"), WAIT, |p| match p {
            Packet::Ack {
                kind: k,
                pkid: id,
                reason,
            } if *k == kind && *id == pkid => Some(*reason),
            _ => None,
        })
        .await
    }

    /// The next PUBLISH within `within`, not acknowledged.
    pub async fn next_publish(&mut self, within: Duration) -> Result<Publish, String> {
        self.expect("a PUBLISH", within, |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// The next PUBLISH, acknowledged as its QoS requires (the whole QoS 2 flow included).
    pub async fn message(&mut self) -> Result<Publish, String> {
        self.message_within(WAIT).await
    }

    pub async fn message_within(&mut self, within: Duration) -> Result<Publish, String> {
        let p = self.next_publish(within).await?;
        self.acknowledge(&p).await?;
        Ok(p)
    }

    /// Acknowledges a received PUBLISH as a well-behaved client does.
    pub async fn acknowledge(&mut self, p: &Publish) -> Result<(), String> {
        match p.qos {
            0 => Ok(()),
            1 => self.send(&ack(self.v, AckKind::PubAck, p.pkid, 0)).await,
            _ => {
                self.send(&ack(self.v, AckKind::PubRec, p.pkid, 0)).await?;
                self.wait_ack(AckKind::PubRel, p.pkid).await?;
                self.send(&ack(self.v, AckKind::PubComp, p.pkid, 0)).await
            }
        }
    }

    /// Receives (and acknowledges) messages until one with payload `marker` arrives, returning
    /// the payloads that came before it.
    pub async fn until_marker(&mut self, marker: &str) -> Result<Vec<Publish>, String> {
        let mut before = Vec::new();
        loop {
            let p = self
                .message()
                .await
                .map_err(|e| format!("{e}; before the marker: {}", payloads(&before)))?;
            if p.payload == marker.as_bytes() {
                return Ok(before);
            }
            before.push(p);
        }
    }

    /// Succeeds when no PUBLISH arrives within `within`; anything else is queued.
    pub async fn quiet(&mut self, within: Duration) -> Result<(), String> {
        match self.next_publish(within).await {
            Ok(p) => Err(format!("unexpected {}", Packet::Publish(p.clone()).brief())),
            Err(_) => Ok(()),
        }
    }

    /// A PINGREQ answered by a PINGRESP: the connection is open and served.
    pub async fn ping(&mut self) -> Result<(), String> {
        self.send(&pingreq()).await?;
        self.expect("PINGRESP", WAIT, |p| (*p == Packet::PingResp).then_some(()))
            .await
    }

    /// Reads until the server closes the connection or `within` runs out.
    pub async fn ending(&mut self, within: Duration) -> Ending {
        let start = Instant::now();
        let mut ending = Ending::default();
        ending.packets.extend(self.queued.drain(..));
        loop {
            let left = within.saturating_sub(start.elapsed());
            match self.recv(left).await {
                Ok(p) => ending.packets.push(p),
                Err(RecvError::Closed) | Err(RecvError::Malformed(_)) => {
                    ending.closed = true;
                    ending.after = start.elapsed();
                    return ending;
                }
                Err(RecvError::Timeout) => return ending,
            }
        }
    }

    /// Sends DISCONNECT (reason 0) and waits for the server to close.
    pub async fn disconnect(mut self) {
        let bytes = disconnect(self.v, 0);
        if self.send(&bytes).await.is_ok() {
            self.ending(WAIT).await;
        }
    }
}

fn check_ok_reason(what: &str, reason: u8) -> Result<(), String> {
    // 0x10 is "No matching subscribers", still a success (section 3.4.2.1).
    if reason < 0x80 {
        Ok(())
    } else {
        Err(format!("{what} with failure reason 0x{reason:02X}"))
    }
}

/// Payloads as text, for failure details.
pub fn payloads(ps: &[Publish]) -> String {
    let texts: Vec<String> = ps
        .iter()
        .map(|p| format!("{}={:?}", p.topic_str(), p.payload_str()))
        .collect();
    format!("[{}]", texts.join(", "))
}
