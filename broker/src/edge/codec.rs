//! The edge's MQTT codec: a version-neutral model of control packets for a server, and a
//! `tokio_util` codec that serves MQTT 3.1.1 and MQTT 5 on one port on top of `rmqtt-codec`.
//!
//! The connection task uses `Framed<stream, EdgeCodec>` and matches on [`Frame`]. The protocol
//! version is taken from the first CONNECT. Every inbound error is a [`CodecError`] that says
//! what to send before closing: [`CodecError::reply`] gives the CONNACK or v5 DISCONNECT frame,
//! or `None` when the connection must simply be closed.
//!
//! `rmqtt-codec` parses the packets. It already checks, among other things: the exact first byte
//! of every fixed header (reserved flags), QoS 3 in PUBLISH and in the Will, the CONNECT reserved
//! flag, Will flag consistency on 3.1.1, an empty client id without clean start, valid UTF-8 in
//! every string, packet identifier 0, duplicate and unknown v5 properties, v5 subscription option
//! reserved bits, empty filter lists, and trailing bytes in acks and v5 DISCONNECT/CONNACK. This
//! adapter does its own framing (size limit from the fixed header alone, minimal remaining length
//! encoding, client-to-server packet types only) and adds the checks that crate lacks: U+0000 in
//! strings, wildcards in topic names, topic filter syntax including `$share`, Will topic validity,
//! v5 Will flag consistency, 3.1.1 password without user name, 3.1.1 subscription option reserved
//! bits, trailing bytes in CONNECT, PINGREQ and 3.1.1 DISCONNECT, DUP on QoS 0, Subscription
//! Identifiers sent by a client, No Local on shared subscriptions, the Payload Format Indicator,
//! and exact enforcement of the client's Maximum Packet Size on the way out.

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::{DecodeError, EncodeError};
use rmqtt_codec::types as rt;
use rmqtt_codec::{v3, v5};
use tokio_util::codec::{Decoder, Encoder};

/// The largest Remaining Length a four-byte Variable Byte Integer can carry.
const MAX_REMAINING: u32 = 268_435_455;
/// The largest possible MQTT packet: one type byte, four length bytes and the largest body.
const MAX_PACKET: u32 = MAX_REMAINING + 5;

/// How far ahead of the received bytes the decoder grows its buffer for a packet in progress.
const RESERVE_AHEAD: usize = 64 * 1024;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// The MQTT protocol version a connection speaks, fixed by its first CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// Quality of Service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// QoS 0: at most once.
    AtMostOnce = 0,
    /// QoS 1: at least once.
    AtLeastOnce = 1,
    /// QoS 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The QoS for a wire value; 3 and above are not QoS levels.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 Retain Handling subscription option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// 2: do not send retained messages.
    DoNotSend = 2,
}

/// Every MQTT 5 reason code, by its MQTT 5 name.
///
/// One enum serves every packet; each packet accepts only its own subset (MQTT 5 section 2.4), and
/// encoding a code a packet does not allow is [`CodecError::Unencodable`]. The aliases
/// `NormalDisconnection` and `GrantedQoS0` are constants equal to `Success` (all three are 0x00),
/// usable in patterns. On 3.1.1 CONNACK the code is mapped by [`ReasonCode::v311_connack_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReasonCode {
    /// 0x00 Success / Normal disconnection / Granted QoS 0.
    Success = 0x00,
    /// 0x01 Granted QoS 1.
    GrantedQoS1 = 0x01,
    /// 0x02 Granted QoS 2.
    GrantedQoS2 = 0x02,
    /// 0x04 Disconnect with Will Message.
    DisconnectWithWillMessage = 0x04,
    /// 0x10 No matching subscribers.
    NoMatchingSubscribers = 0x10,
    /// 0x11 No subscription existed.
    NoSubscriptionExisted = 0x11,
    /// 0x18 Continue authentication.
    ContinueAuthentication = 0x18,
    /// 0x19 Re-authenticate.
    ReAuthenticate = 0x19,
    /// 0x80 Unspecified error.
    UnspecifiedError = 0x80,
    /// 0x81 Malformed Packet.
    MalformedPacket = 0x81,
    /// 0x82 Protocol Error.
    ProtocolError = 0x82,
    /// 0x83 Implementation specific error.
    ImplementationSpecificError = 0x83,
    /// 0x84 Unsupported Protocol Version.
    UnsupportedProtocolVersion = 0x84,
    /// 0x85 Client Identifier not valid.
    ClientIdentifierNotValid = 0x85,
    /// 0x86 Bad User Name or Password.
    BadUserNameOrPassword = 0x86,
    /// 0x87 Not authorized.
    NotAuthorized = 0x87,
    /// 0x88 Server unavailable.
    ServerUnavailable = 0x88,
    /// 0x89 Server busy.
    ServerBusy = 0x89,
    /// 0x8A Banned.
    Banned = 0x8A,
    /// 0x8B Server shutting down.
    ServerShuttingDown = 0x8B,
    /// 0x8C Bad authentication method.
    BadAuthenticationMethod = 0x8C,
    /// 0x8D Keep Alive timeout.
    KeepAliveTimeout = 0x8D,
    /// 0x8E Session taken over.
    SessionTakenOver = 0x8E,
    /// 0x8F Topic Filter invalid.
    TopicFilterInvalid = 0x8F,
    /// 0x90 Topic Name invalid.
    TopicNameInvalid = 0x90,
    /// 0x91 Packet Identifier in use.
    PacketIdentifierInUse = 0x91,
    /// 0x92 Packet Identifier not found.
    PacketIdentifierNotFound = 0x92,
    /// 0x93 Receive Maximum exceeded.
    ReceiveMaximumExceeded = 0x93,
    /// 0x94 Topic Alias invalid.
    TopicAliasInvalid = 0x94,
    /// 0x95 Packet too large.
    PacketTooLarge = 0x95,
    /// 0x96 Message rate too high.
    MessageRateTooHigh = 0x96,
    /// 0x97 Quota exceeded.
    QuotaExceeded = 0x97,
    /// 0x98 Administrative action.
    AdministrativeAction = 0x98,
    /// 0x99 Payload format invalid.
    PayloadFormatInvalid = 0x99,
    /// 0x9A Retain not supported.
    RetainNotSupported = 0x9A,
    /// 0x9B QoS not supported.
    QoSNotSupported = 0x9B,
    /// 0x9C Use another server.
    UseAnotherServer = 0x9C,
    /// 0x9D Server moved.
    ServerMoved = 0x9D,
    /// 0x9E Shared Subscriptions not supported.
    SharedSubscriptionsNotSupported = 0x9E,
    /// 0x9F Connection rate exceeded.
    ConnectionRateExceeded = 0x9F,
    /// 0xA0 Maximum connect time.
    MaximumConnectTime = 0xA0,
    /// 0xA1 Subscription Identifiers not supported.
    SubscriptionIdentifiersNotSupported = 0xA1,
    /// 0xA2 Wildcard Subscriptions not supported.
    WildcardSubscriptionsNotSupported = 0xA2,
}

#[allow(non_upper_case_globals)]
impl ReasonCode {
    /// 0x00 in DISCONNECT.
    pub const NormalDisconnection: ReasonCode = ReasonCode::Success;
    /// 0x00 in SUBACK.
    pub const GrantedQoS0: ReasonCode = ReasonCode::Success;

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The reason code for a wire value, if MQTT 5 defines one.
    pub fn from_u8(v: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match v {
            0x00 => Success,
            0x01 => GrantedQoS1,
            0x02 => GrantedQoS2,
            0x04 => DisconnectWithWillMessage,
            0x10 => NoMatchingSubscribers,
            0x11 => NoSubscriptionExisted,
            0x18 => ContinueAuthentication,
            0x19 => ReAuthenticate,
            0x80 => UnspecifiedError,
            0x81 => MalformedPacket,
            0x82 => ProtocolError,
            0x83 => ImplementationSpecificError,
            0x84 => UnsupportedProtocolVersion,
            0x85 => ClientIdentifierNotValid,
            0x86 => BadUserNameOrPassword,
            0x87 => NotAuthorized,
            0x88 => ServerUnavailable,
            0x89 => ServerBusy,
            0x8A => Banned,
            0x8B => ServerShuttingDown,
            0x8C => BadAuthenticationMethod,
            0x8D => KeepAliveTimeout,
            0x8E => SessionTakenOver,
            0x8F => TopicFilterInvalid,
            0x90 => TopicNameInvalid,
            0x91 => PacketIdentifierInUse,
            0x92 => PacketIdentifierNotFound,
            0x93 => ReceiveMaximumExceeded,
            0x94 => TopicAliasInvalid,
            0x95 => PacketTooLarge,
            0x96 => MessageRateTooHigh,
            0x97 => QuotaExceeded,
            0x98 => AdministrativeAction,
            0x99 => PayloadFormatInvalid,
            0x9A => RetainNotSupported,
            0x9B => QoSNotSupported,
            0x9C => UseAnotherServer,
            0x9D => ServerMoved,
            0x9E => SharedSubscriptionsNotSupported,
            0x9F => ConnectionRateExceeded,
            0xA0 => MaximumConnectTime,
            0xA1 => SubscriptionIdentifiersNotSupported,
            0xA2 => WildcardSubscriptionsNotSupported,
            _ => return None,
        })
    }

    /// Whether this code reports a failure (MQTT 5 section 2.4: 0x80 and above).
    pub fn is_error(self) -> bool {
        self.as_u8() >= 0x80
    }

    /// The 3.1.1 CONNACK return code this code is sent as, or `None` when 3.1.1 has no way to
    /// say it (then the server closes the connection without a CONNACK, MQTT-3.1.4-1).
    ///
    /// 3.1.1 has six return codes, so refusals are folded into the closest one: server-side
    /// trouble and redirects become 0x03, authentication failures 0x04, bans 0x05.
    pub fn v311_connack_code(self) -> Option<u8> {
        use ReasonCode::*;
        match self {
            Success => Some(0x00),
            UnsupportedProtocolVersion => Some(0x01),
            ClientIdentifierNotValid => Some(0x02),
            UnspecifiedError
            | ImplementationSpecificError
            | ServerUnavailable
            | ServerBusy
            | QuotaExceeded
            | UseAnotherServer
            | ServerMoved
            | ConnectionRateExceeded => Some(0x03),
            BadUserNameOrPassword | BadAuthenticationMethod => Some(0x04),
            NotAuthorized | Banned => Some(0x05),
            _ => None,
        }
    }
}

/// MQTT 5 User Properties, in the order they appear on the wire (MQTT-3.3.2-18 keeps it).
pub type UserProperties = Vec<(ByteString, ByteString)>;

/// Every MQTT control packet, in both directions.
///
/// Decoding yields only what a client may send (CONNECT, PUBLISH, the four publish acks,
/// SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH); the server-to-client variants exist so the
/// same type can be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// CONNECT; boxed because it is large and arrives once per connection.
    Connect(Box<Connect>),
    /// CONNACK; boxed for the same reason.
    ConnAck(Box<ConnAck>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK (QoS 1 acknowledgement).
    PubAck(Ack),
    /// PUBREC (QoS 2, part 1).
    PubRec(Ack),
    /// PUBREL (QoS 2, part 2).
    PubRel(Ack),
    /// PUBCOMP (QoS 2, part 3).
    PubComp(Ack),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK.
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT. On 3.1.1 only the client sends it, so the encoder refuses it there.
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only).
    Auth(Auth),
}

/// CONNECT.
///
/// Fields 3.1.1 does not have hold their MQTT 5 defaults when decoded from 3.1.1.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol version of this CONNECT (the codec adopts it from the first one).
    pub version: ProtocolVersion,
    /// Client Identifier; may be empty (then the server assigns one or refuses).
    pub client_id: ByteString,
    /// Clean Start (MQTT 5) or Clean Session (3.1.1).
    pub clean_start: bool,
    /// Keep Alive in seconds; 0 turns it off.
    pub keep_alive: u16,
    /// User Name.
    pub username: Option<ByteString>,
    /// Password, binary in both versions.
    pub password: Option<Bytes>,
    /// The Will Message.
    pub will: Option<Will>,
    /// Session Expiry Interval in seconds; 0 when absent and always 0 on 3.1.1, where the
    /// connection derives session lifetime from Clean Session instead.
    pub session_expiry_interval: u32,
    /// Receive Maximum; 65535 when absent (never 0: the decoder rejects 0).
    pub receive_maximum: u16,
    /// Maximum Packet Size the client accepts; `None` means no limit but the protocol's.
    pub maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum; 0 when absent.
    pub topic_alias_maximum: u16,
    /// Request Problem Information; `true` when absent.
    pub request_problem_information: bool,
    /// Request Response Information; `false` when absent.
    pub request_response_information: bool,
    /// User Properties.
    pub user_properties: UserProperties,
    /// Authentication Method (enhanced authentication).
    pub authentication_method: Option<ByteString>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
}

impl Connect {
    /// A CONNECT with every optional field at its default, as a minimal client would send it.
    pub fn new(version: ProtocolVersion, client_id: impl Into<ByteString>) -> Connect {
        Connect {
            version,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 0,
            username: None,
            password: None,
            will: None,
            session_expiry_interval: 0,
            receive_maximum: 65535,
            maximum_packet_size: None,
            topic_alias_maximum: 0,
            request_problem_information: true,
            request_response_information: false,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }
    }
}

impl fmt::Debug for Connect {
    // The password is left out so that logging a frame never leaks a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("will", &self.will)
            .field("session_expiry_interval", &self.session_expiry_interval)
            .field("receive_maximum", &self.receive_maximum)
            .field("maximum_packet_size", &self.maximum_packet_size)
            .field("topic_alias_maximum", &self.topic_alias_maximum)
            .field(
                "request_problem_information",
                &self.request_problem_information,
            )
            .field(
                "request_response_information",
                &self.request_response_information,
            )
            .field("user_properties", &self.user_properties)
            .field("authentication_method", &self.authentication_method)
            .field(
                "authentication_data",
                &self.authentication_data.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The Will Message of a CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic: a valid topic name (checked by the decoder).
    pub topic: ByteString,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// Will Delay Interval in seconds; 0 when absent.
    pub delay_interval: u32,
    /// Message Expiry Interval in seconds.
    pub message_expiry: Option<u32>,
    /// Content Type.
    pub content_type: Option<ByteString>,
    /// Response Topic.
    pub response_topic: Option<ByteString>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// Payload Format Indicator is 1 (the decoder has checked the payload is UTF-8).
    pub payload_format_utf8: bool,
    /// User Properties.
    pub user_properties: UserProperties,
}

impl Will {
    /// A Will with no MQTT 5 properties.
    pub fn new(
        topic: impl Into<ByteString>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Will {
        Will {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            delay_interval: 0,
            message_expiry: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            payload_format_utf8: false,
            user_properties: Vec::new(),
        }
    }
}

impl fmt::Debug for Will {
    // Payloads can be large and private, so only their length is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Will")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("delay_interval", &self.delay_interval)
            .field("message_expiry", &self.message_expiry)
            .field("content_type", &self.content_type)
            .field("response_topic", &self.response_topic)
            .field("correlation_data", &self.correlation_data)
            .field("payload_format_utf8", &self.payload_format_utf8)
            .field("user_properties", &self.user_properties)
            .finish()
    }
}

/// CONNACK. On 3.1.1 only `session_present` and `reason` are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present; the encoder sends 0 whenever `reason` is not Success (MQTT-3.2.2-4 on
    /// 3.1.1, MQTT-3.2.2-6 on 5).
    pub session_present: bool,
    /// The reason code; on 3.1.1 mapped by [`ReasonCode::v311_connack_code`].
    pub reason: ReasonCode,
    /// Session Expiry Interval the server chose, if different from the client's.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum of the server; 65535 is not sent (it is the default).
    pub receive_maximum: u16,
    /// Maximum QoS; ExactlyOnce is not sent (it is the default).
    pub maximum_qos: QoS,
    /// Retain Available; `true` is not sent.
    pub retain_available: bool,
    /// Maximum Packet Size the server accepts.
    pub maximum_packet_size: Option<u32>,
    /// Assigned Client Identifier (for an empty client id).
    pub assigned_client_identifier: Option<ByteString>,
    /// Topic Alias Maximum of the server; 0 is not sent.
    pub topic_alias_maximum: u16,
    /// Reason String; dropped if it would exceed the client's Maximum Packet Size.
    pub reason_string: Option<ByteString>,
    /// Wildcard Subscription Available; `true` is not sent.
    pub wildcard_subscription_available: bool,
    /// Subscription Identifiers Available; `true` is not sent.
    pub subscription_identifiers_available: bool,
    /// Shared Subscription Available; `true` is not sent.
    pub shared_subscription_available: bool,
    /// Server Keep Alive, overriding the client's.
    pub server_keep_alive: Option<u16>,
    /// Response Information.
    pub response_information: Option<ByteString>,
    /// Server Reference.
    pub server_reference: Option<ByteString>,
    /// Authentication Method.
    pub authentication_method: Option<ByteString>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
    /// User Properties; dropped if they would exceed the client's Maximum Packet Size.
    pub user_properties: UserProperties,
}

impl ConnAck {
    /// An accepting CONNACK with every property at its default.
    pub fn accepted(session_present: bool) -> ConnAck {
        ConnAck {
            session_present,
            ..ConnAck::refused(ReasonCode::Success)
        }
    }

    /// A refusing CONNACK with the given reason and no properties.
    pub fn refused(reason: ReasonCode) -> ConnAck {
        ConnAck {
            session_present: false,
            reason,
            session_expiry_interval: None,
            receive_maximum: 65535,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            maximum_packet_size: None,
            assigned_client_identifier: None,
            topic_alias_maximum: 0,
            reason_string: None,
            wildcard_subscription_available: true,
            subscription_identifiers_available: true,
            shared_subscription_available: true,
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
            user_properties: Vec::new(),
        }
    }
}

/// PUBLISH, in either direction.
#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag; never set with QoS 0 (MQTT-3.3.1-2).
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic Name; empty on v5 only when `properties.topic_alias` is set, in which case the
    /// connection resolves the alias.
    pub topic: ByteString,
    /// Packet Identifier: `Some` exactly when QoS > 0.
    pub packet_id: Option<NonZeroU16>,
    /// The Application Message.
    pub payload: Bytes,
    /// MQTT 5 properties; left out on 3.1.1.
    pub properties: PublishProperties,
}

impl Publish {
    /// A QoS 0, non-retained PUBLISH without properties.
    pub fn new(topic: impl Into<ByteString>, payload: impl Into<Bytes>) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            payload: payload.into(),
            properties: PublishProperties::default(),
        }
    }
}

impl fmt::Debug for Publish {
    // Payloads can be large and private, so only their length is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("dup", &self.dup)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("topic", &self.topic)
            .field("packet_id", &self.packet_id)
            .field("payload_len", &self.payload.len())
            .field("properties", &self.properties)
            .finish()
    }
}

/// MQTT 5 PUBLISH properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishProperties {
    /// Topic Alias (never 0).
    pub topic_alias: Option<NonZeroU16>,
    /// Message Expiry Interval in seconds; `Some(0)` cannot be encoded.
    pub message_expiry_interval: Option<u32>,
    /// Payload Format Indicator is 1; inbound, the decoder has checked the payload is UTF-8.
    pub payload_format_utf8: bool,
    /// Content Type.
    pub content_type: Option<ByteString>,
    /// Response Topic.
    pub response_topic: Option<ByteString>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// Subscription Identifiers (server to client only; a client must not send them,
    /// MQTT-3.3.4-6). At most 268,435,455 each.
    pub subscription_identifiers: Vec<NonZeroU32>,
    /// User Properties, in order.
    pub user_properties: UserProperties,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
///
/// On 3.1.1 only the packet identifier is sent, and any reason other than Success cannot be
/// encoded: a 3.1.1 server that refuses a message either acks it or closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Packet Identifier.
    pub packet_id: NonZeroU16,
    /// Reason code: PUBACK/PUBREC allow Success, NoMatchingSubscribers, UnspecifiedError,
    /// ImplementationSpecificError, NotAuthorized, TopicNameInvalid, PacketIdentifierInUse,
    /// QuotaExceeded, PayloadFormatInvalid; PUBREL/PUBCOMP allow Success and
    /// PacketIdentifierNotFound.
    pub reason: ReasonCode,
    /// Reason String (MQTT 5).
    pub reason_string: Option<ByteString>,
    /// User Properties (MQTT 5).
    pub user_properties: UserProperties,
}

impl Ack {
    /// A successful ack without properties.
    pub fn new(packet_id: NonZeroU16) -> Ack {
        Ack::with_reason(packet_id, ReasonCode::Success)
    }

    /// An ack with a reason code and no properties.
    pub fn with_reason(packet_id: NonZeroU16, reason: ReasonCode) -> Ack {
        Ack {
            packet_id,
            reason,
            reason_string: None,
            user_properties: Vec::new(),
        }
    }
}

/// Subscription Options of one SUBSCRIBE filter; only `qos` exists on 3.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local (MQTT 5).
    pub no_local: bool,
    /// Retain As Published (MQTT 5).
    pub retain_as_published: bool,
    /// Retain Handling (MQTT 5).
    pub retain_handling: RetainHandling,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions::qos(QoS::AtMostOnce)
    }
}

impl SubscriptionOptions {
    /// Options with the given QoS and every MQTT 5 option at its default.
    pub fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier.
    pub packet_id: NonZeroU16,
    /// Subscription Identifier (MQTT 5), at most 268,435,455.
    pub subscription_identifier: Option<NonZeroU32>,
    /// User Properties (MQTT 5).
    pub user_properties: UserProperties,
    /// Topic filters with their options; at least one (checked by the decoder), each a valid
    /// filter, possibly `$share/{name}/{filter}`.
    pub filters: Vec<(ByteString, SubscriptionOptions)>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet Identifier of the SUBSCRIBE.
    pub packet_id: NonZeroU16,
    /// One code per filter: GrantedQoS0/1/2 or a failure. On 3.1.1 every failure is sent as
    /// 0x80, the only failure code 3.1.1 has.
    pub reason_codes: Vec<ReasonCode>,
    /// Reason String (MQTT 5).
    pub reason_string: Option<ByteString>,
    /// User Properties (MQTT 5).
    pub user_properties: UserProperties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier.
    pub packet_id: NonZeroU16,
    /// User Properties (MQTT 5).
    pub user_properties: UserProperties,
    /// Topic filters; at least one (checked by the decoder).
    pub filters: Vec<ByteString>,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet Identifier of the UNSUBSCRIBE.
    pub packet_id: NonZeroU16,
    /// One code per filter (MQTT 5: Success, NoSubscriptionExisted or a failure); 3.1.1 has none,
    /// so they are left out there.
    pub reason_codes: Vec<ReasonCode>,
    /// Reason String (MQTT 5).
    pub reason_string: Option<ByteString>,
    /// User Properties (MQTT 5).
    pub user_properties: UserProperties,
}

/// DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Reason code; a zero-length v5 DISCONNECT and every 3.1.1 DISCONNECT decode as
    /// NormalDisconnection.
    pub reason: ReasonCode,
    /// Session Expiry Interval (client to server only; the connection checks MQTT-3.14.2-2).
    pub session_expiry_interval: Option<u32>,
    /// Reason String.
    pub reason_string: Option<ByteString>,
    /// Server Reference (server to client, with UseAnotherServer or ServerMoved).
    pub server_reference: Option<ByteString>,
    /// User Properties.
    pub user_properties: UserProperties,
}

impl Disconnect {
    /// A DISCONNECT with a reason code and no properties.
    pub fn new(reason: ReasonCode) -> Disconnect {
        Disconnect {
            reason,
            session_expiry_interval: None,
            reason_string: None,
            server_reference: None,
            user_properties: Vec::new(),
        }
    }
}

/// AUTH (MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Success, ContinueAuthentication or ReAuthenticate.
    pub reason: ReasonCode,
    /// Authentication Method.
    pub method: Option<ByteString>,
    /// Authentication Data.
    pub data: Option<Bytes>,
    /// Reason String.
    pub reason_string: Option<ByteString>,
    /// User Properties.
    pub user_properties: UserProperties,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What went wrong, and what the connection must do about it.
///
/// Inbound errors ([`Violation`](CodecError::Violation), [`InboundTooLarge`](CodecError::InboundTooLarge))
/// end the connection: send [`reply`](CodecError::reply) if it is `Some`, then close. Outbound
/// errors ([`OutboundTooLarge`](CodecError::OutboundTooLarge),
/// [`Unencodable`](CodecError::Unencodable)) write nothing and leave the stream usable.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer broke the protocol.
    #[error("MQTT protocol violation by the peer ({version:?}): {detail} (reason {reason:?})")]
    Violation {
        /// The version to answer in, when known (after the first CONNECT was read far enough).
        version: Option<ProtocolVersion>,
        /// The MQTT 5 reason code that describes the violation.
        reason: ReasonCode,
        /// The CONNACK to send before closing, for a rejected first CONNECT.
        connack: Option<(ProtocolVersion, ReasonCode)>,
        /// What was wrong, for logs.
        detail: &'static str,
    },
    /// The peer announced a packet larger than the server accepts; the body was not buffered.
    #[error("inbound packet of {size} bytes exceeds the server's maximum of {max} bytes")]
    InboundTooLarge {
        /// The version to answer in, when known.
        version: Option<ProtocolVersion>,
        /// The whole packet's size as announced by its fixed header.
        size: u64,
        /// The server's limit.
        max: u32,
        /// The CONNACK to send before closing, for an oversized first v5 CONNECT.
        connack: Option<(ProtocolVersion, ReasonCode)>,
    },
    /// The frame is larger than the client's Maximum Packet Size: drop this message for this
    /// client (MQTT-3.1.2-25); nothing was written.
    #[error(
        "outbound packet of {size} bytes exceeds the client's Maximum Packet Size of {max} bytes"
    )]
    OutboundTooLarge {
        /// The packet's size.
        size: u64,
        /// The limit in force.
        max: u32,
    },
    /// The frame cannot be expressed in the negotiated version (a caller bug); nothing was
    /// written.
    #[error("frame cannot be encoded for {version:?}: {detail}")]
    Unencodable {
        /// The version the frame was meant for.
        version: Option<ProtocolVersion>,
        /// Why.
        detail: &'static str,
    },
    /// The transport failed.
    #[error("i/o error on the MQTT stream: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The protocol version the error happened under, if known.
    pub fn version(&self) -> Option<ProtocolVersion> {
        match self {
            CodecError::Violation { version, .. }
            | CodecError::InboundTooLarge { version, .. }
            | CodecError::Unencodable { version, .. } => *version,
            CodecError::OutboundTooLarge { .. } | CodecError::Io(_) => None,
        }
    }

    /// The MQTT 5 DISCONNECT reason code that describes this error.
    pub fn disconnect_reason(&self) -> ReasonCode {
        match self {
            CodecError::Violation { reason, .. } => *reason,
            CodecError::InboundTooLarge { .. } | CodecError::OutboundTooLarge { .. } => {
                ReasonCode::PacketTooLarge
            }
            CodecError::Unencodable { .. } => ReasonCode::ImplementationSpecificError,
            CodecError::Io(_) => ReasonCode::UnspecifiedError,
        }
    }

    /// The CONNACK that must (3.1.1) or may (5) be sent before closing, when the first CONNECT
    /// was refused: an unsupported protocol level (MQTT-3.1.2-2: 3.1.1 code 0x01 for levels
    /// below 4, v5 0x84 above 5), a refused client identifier (MQTT-3.1.3-9 on 3.1.1: 0x02; v5:
    /// 0x85), or any other v5 CONNECT error with its own code (MQTT 5 section 4.13.1).
    pub fn connack(&self) -> Option<(ProtocolVersion, ReasonCode)> {
        match self {
            CodecError::Violation { connack, .. } | CodecError::InboundTooLarge { connack, .. } => {
                *connack
            }
            _ => None,
        }
    }

    /// Whether the stream is still usable: true for outbound errors, which wrote nothing.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            CodecError::OutboundTooLarge { .. } | CodecError::Unencodable { .. }
        )
    }

    /// The frame to send before closing after an inbound error: the refusing CONNACK, or on
    /// MQTT 5 a DISCONNECT with [`disconnect_reason`](Self::disconnect_reason). `None` means
    /// close without sending anything (3.1.1 has no server DISCONNECT, and a server must not
    /// send DISCONNECT before CONNACK, MQTT-3.14.0-1). The codec has adopted the CONNACK's
    /// version, so it can encode the reply.
    pub fn reply(&self) -> Option<Frame> {
        if let Some((_, code)) = self.connack() {
            return Some(Frame::ConnAck(Box::new(ConnAck::refused(code))));
        }
        match self {
            CodecError::Violation {
                version: Some(ProtocolVersion::V5),
                connack: None,
                ..
            }
            | CodecError::InboundTooLarge {
                version: Some(ProtocolVersion::V5),
                connack: None,
                ..
            } => Some(Frame::Disconnect(Disconnect::new(self.disconnect_reason()))),
            _ => None,
        }
    }
}

/// An inbound problem before it is placed in a [`CodecError`]: a reason code and a description.
type Bad = (ReasonCode, &'static str);

const TRUNCATED: Bad = (
    ReasonCode::MalformedPacket,
    "a field runs past the end of the packet",
);

// ---------------------------------------------------------------------------------------------
// The codec
// ---------------------------------------------------------------------------------------------

/// The server-side MQTT codec for one connection.
#[derive(Debug, Clone)]
pub struct EdgeCodec {
    version: Option<ProtocolVersion>,
    max_inbound: u32,
    max_outbound: u32,
    problem_information: bool,
    failed: bool,
}

impl EdgeCodec {
    /// A codec for a new connection that accepts packets of at most `max_inbound_packet` bytes
    /// (the whole packet, fixed header included, as MQTT 5 Maximum Packet Size counts). 0 means
    /// the protocol's own limit of 268,435,460 bytes.
    pub fn new(max_inbound_packet: u32) -> EdgeCodec {
        let max_inbound = if max_inbound_packet == 0 {
            MAX_PACKET
        } else {
            max_inbound_packet.min(MAX_PACKET)
        };
        EdgeCodec {
            version: None,
            max_inbound,
            max_outbound: MAX_PACKET,
            problem_information: true,
            failed: false,
        }
    }

    /// The version negotiated by the first CONNECT, or `None` before it.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The inbound limit in bytes.
    pub fn max_inbound_packet(&self) -> u32 {
        self.max_inbound
    }

    /// The outbound limit in bytes.
    pub fn max_outbound_packet(&self) -> u32 {
        self.max_outbound
    }

    /// Sets the largest packet the client accepts. The first CONNECT's Maximum Packet Size is
    /// adopted automatically; this overrides it. 0 means the protocol's own limit.
    pub fn set_max_outbound_packet(&mut self, n: u32) {
        self.max_outbound = if n == 0 {
            MAX_PACKET
        } else {
            n.min(MAX_PACKET)
        };
    }

    fn violation(&self, (reason, detail): Bad) -> CodecError {
        CodecError::Violation {
            version: self.version,
            reason,
            connack: None,
            detail,
        }
    }

    fn decode_inner(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if self.failed {
            return Err(self.violation((
                ReasonCode::ProtocolError,
                "decoder used again after an error",
            )));
        }
        let Some(header) = parse_fixed_header(src)
            .map_err(|detail| self.violation((ReasonCode::MalformedPacket, detail)))?
        else {
            return Ok(None);
        };
        let ptype = header.first_byte >> 4;
        let total = header.len + header.remaining as usize;
        let first_connect = self.version.is_none();

        // The size is judged from the fixed header alone so that a peer cannot make us buffer
        // a body we will refuse anyway.
        if total as u64 > u64::from(self.max_inbound) {
            let version = match self.version {
                Some(v) => Some(v),
                None if ptype == CONNECT => connect_version(&src[header.len..]).ok(),
                None => None,
            };
            let connack = match version {
                Some(ProtocolVersion::V5) if first_connect => {
                    Some((ProtocolVersion::V5, ReasonCode::PacketTooLarge))
                }
                _ => None,
            };
            return Err(CodecError::InboundTooLarge {
                version,
                size: total as u64,
                max: self.max_inbound,
                connack,
            });
        }

        check_fixed_header(self.version, header).map_err(|bad| self.violation(bad))?;

        if src.len() < total {
            // Room for the rest is made a bounded step at a time, so memory follows the bytes
            // that actually arrive rather than the length a peer announces.
            src.reserve((total - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }

        if ptype == CONNECT {
            return self.decode_connect(src, header).map(Some);
        }
        let Some(version) = self.version else {
            // check_fixed_header refuses everything but CONNECT before the version is known.
            return Err(self.violation((
                ReasonCode::ProtocolError,
                "first packet is not CONNECT (MQTT-3.1.0-1)",
            )));
        };
        precheck(header.first_byte, &src[header.len..total], version)
            .map_err(|bad| self.violation(bad))?;
        let frame = decode_with_rmqtt(version, src).map_err(|bad| self.violation(bad))?;
        validate_inbound(&frame, version).map_err(|bad| self.violation(bad))?;
        Ok(Some(frame))
    }

    fn decode_connect(
        &mut self,
        src: &mut BytesMut,
        header: FixedHeader,
    ) -> Result<Frame, CodecError> {
        let first = self.version.is_none();
        let total = header.len + header.remaining as usize;
        let version = match connect_version(&src[header.len..total]) {
            Ok(v) => v,
            Err(ConnectVersionError::Truncated) => return Err(self.violation(TRUNCATED)),
            Err(ConnectVersionError::NotMqtt) => {
                return Err(self.violation((
                    ReasonCode::ProtocolError,
                    "protocol name is not MQTT (MQTT-3.1.2-1)",
                )))
            }
            Err(ConnectVersionError::Unsupported(reply_as)) => {
                return Err(connect_error(
                    reply_as,
                    first,
                    (
                        ReasonCode::UnsupportedProtocolVersion,
                        "unsupported protocol level (MQTT-3.1.2-2)",
                    ),
                ))
            }
        };
        check_connect_layout(&src[header.len..total], version)
            .map_err(|bad| connect_error(version, first, bad))?;
        let frame =
            decode_with_rmqtt(version, src).map_err(|bad| connect_error(version, first, bad))?;
        let Frame::Connect(connect) = frame else {
            return Err(connect_error(
                version,
                first,
                (
                    ReasonCode::ProtocolError,
                    "CONNECT decoded as another packet",
                ),
            ));
        };
        validate_connect(&connect).map_err(|bad| connect_error(version, first, bad))?;
        if first {
            self.version = Some(version);
            self.problem_information = connect.request_problem_information;
            if let Some(max) = connect.maximum_packet_size {
                self.set_max_outbound_packet(max);
            }
        }
        Ok(Frame::Connect(connect))
    }

    fn encode_inner(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let version = match (&frame, self.version) {
            (Frame::Connect(c), _) => c.version,
            (_, Some(v)) => v,
            (_, None) => {
                return Err(CodecError::Unencodable {
                    version: None,
                    detail: "no CONNECT has been decoded, so the protocol version is unknown",
                })
            }
        };
        let limit = self.max_outbound;
        // A PUBLISH is measured before anything is written so that an oversized payload is not
        // copied into the buffer only to be cut off again.
        if let Frame::Publish(p) = &frame {
            let size = publish_packet_size(p, version);
            if size > u64::from(limit) {
                return Err(CodecError::OutboundTooLarge { size, max: limit });
            }
        }
        match version {
            ProtocolVersion::V311 => encode_v3(frame, dst, limit),
            ProtocolVersion::V5 => encode_v5(frame, dst, limit, self.problem_information),
        }
    }
}

impl Decoder for EdgeCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let result = self.decode_inner(src);
        if let Err(e) = &result {
            self.failed = true;
            // Adopting the refusal's version lets the caller encode the CONNACK of `reply()`.
            if self.version.is_none() {
                if let Some((v, _)) = e.connack() {
                    self.version = Some(v);
                }
            }
        }
        result
    }
}

impl Encoder<Frame> for EdgeCodec {
    type Error = CodecError;

    /// Encodes in the negotiated version. On 3.1.1 properties are left out silently; what 3.1.1
    /// cannot say is [`CodecError::Unencodable`]: a PUBACK/PUBREC/PUBREL/PUBCOMP reason other
    /// than Success, a CONNACK reason without a 3.1.1 return code, DISCONNECT, AUTH, and an
    /// empty PUBLISH topic. On both versions a frame over the client's Maximum Packet Size is
    /// [`CodecError::OutboundTooLarge`] after Reason String and User Properties were dropped
    /// from non-PUBLISH packets (MQTT-3.1.2-25 and the per-packet rules such as MQTT-3.4.2-2).
    /// When the client sent Request Problem Information 0, Reason String and User Properties
    /// are left out of everything but PUBLISH, CONNACK and DISCONNECT (MQTT-3.1.2-29).
    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        let result = self.encode_inner(frame, dst);
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Framing and raw checks
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct FixedHeader {
    first_byte: u8,
    remaining: u32,
    /// Bytes taken by the type byte and the Remaining Length.
    len: usize,
}

/// Reads a fixed header, or `None` while it is incomplete.
fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, &'static str> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    let mut remaining: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err("remaining length is not minimally encoded (MQTT-1.5.5-1)");
            }
            return Ok(Some(FixedHeader {
                first_byte,
                remaining,
                len: 2 + i,
            }));
        }
    }
    Err("remaining length longer than four bytes (MQTT 5 section 1.5.5, 3.1.1 section 2.2.3)")
}

/// Checks the packet type, its flags and the lengths fixed by the type, before the body is
/// buffered, so that garbage is refused as early as possible.
fn check_fixed_header(version: Option<ProtocolVersion>, h: FixedHeader) -> Result<(), Bad> {
    let ptype = h.first_byte >> 4;
    let flags = h.first_byte & 0x0f;
    const BAD_FLAGS: Bad = (
        ReasonCode::MalformedPacket,
        "reserved fixed header flags are wrong (MQTT-2.2.2-2, MQTT 5 section 2.1.3)",
    );
    if version.is_none() && ptype != CONNECT {
        return Err((
            ReasonCode::ProtocolError,
            "first packet is not CONNECT (MQTT-3.1.0-1)",
        ));
    }
    match ptype {
        CONNECT | PUBACK | PUBREC | PUBCOMP if flags != 0 => Err(BAD_FLAGS),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags != 0b0010 => Err(BAD_FLAGS),
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                Err((
                    ReasonCode::MalformedPacket,
                    "PUBLISH with QoS 3 (MQTT-3.3.1-4)",
                ))
            } else if qos == 0 && flags & 0b1000 != 0 {
                Err((
                    ReasonCode::MalformedPacket,
                    "PUBLISH with QoS 0 and DUP set (MQTT-3.3.1-2)",
                ))
            } else {
                Ok(())
            }
        }
        PINGREQ if flags != 0 => Err(BAD_FLAGS),
        PINGREQ if h.remaining != 0 => Err((ReasonCode::MalformedPacket, "PINGREQ with a body")),
        DISCONNECT if flags != 0 => Err(BAD_FLAGS),
        DISCONNECT if version == Some(ProtocolVersion::V311) && h.remaining != 0 => {
            Err((ReasonCode::MalformedPacket, "3.1.1 DISCONNECT with a body"))
        }
        AUTH if version == Some(ProtocolVersion::V311) => Err((
            ReasonCode::MalformedPacket,
            "packet type 15 is reserved in 3.1.1",
        )),
        AUTH if flags != 0 => Err(BAD_FLAGS),
        CONNACK | SUBACK | UNSUBACK | PINGRESP => Err((
            ReasonCode::ProtocolError,
            "client sent a packet only a server may send",
        )),
        0 => Err((ReasonCode::MalformedPacket, "packet type 0 is reserved")),
        _ => Ok(()),
    }
}

/// A read-only walk over a packet body, to check layout that `rmqtt-codec` does not.
struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Walker<'a> {
    fn new(buf: &'a [u8]) -> Walker<'a> {
        Walker { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let hi = self.u8()?;
        let lo = self.u8()?;
        Some(u16::from_be_bytes([hi, lo]))
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        let end = self.pos.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        self.pos = end;
        Some(())
    }

    /// Skips a two-byte-length-prefixed string or binary field.
    fn skip_prefixed(&mut self) -> Option<()> {
        let n = self.u16()?;
        self.skip(usize::from(n))
    }

    fn varint(&mut self) -> Option<u32> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn skip_properties(&mut self) -> Option<()> {
        let n = self.varint()?;
        self.skip(n as usize)
    }
}

enum ConnectVersionError {
    Truncated,
    NotMqtt,
    /// An unsupported level, with the version whose CONNACK layout to refuse it in.
    Unsupported(ProtocolVersion),
}

/// Reads the protocol name and level at the start of a CONNECT body.
fn connect_version(body: &[u8]) -> Result<ProtocolVersion, ConnectVersionError> {
    let mut w = Walker::new(body);
    let name_len = w.u16().ok_or(ConnectVersionError::Truncated)?;
    let name = body
        .get(2..2 + usize::from(name_len))
        .ok_or(ConnectVersionError::Truncated)?;
    let level = *body
        .get(2 + usize::from(name_len))
        .ok_or(ConnectVersionError::Truncated)?;
    match (name, level) {
        (b"MQTT", 4) => Ok(ProtocolVersion::V311),
        (b"MQTT", 5) => Ok(ProtocolVersion::V5),
        // A level above 5 comes from a client newer than MQTT 5, which is likelier to read the
        // MQTT 5 CONNACK layout; older levels get the 3.1.1 one (MQTT-3.1.2-2 in both).
        (b"MQTT", l) if l > 5 => Err(ConnectVersionError::Unsupported(ProtocolVersion::V5)),
        (b"MQTT", _) | (b"MQIsdp", _) => {
            Err(ConnectVersionError::Unsupported(ProtocolVersion::V311))
        }
        _ => Err(ConnectVersionError::NotMqtt),
    }
}

/// Builds the error for a refused CONNECT; only the first CONNECT earns a CONNACK, because a
/// second one is a protocol error after a CONNACK was already sent.
fn connect_error(version: ProtocolVersion, first: bool, (reason, detail): Bad) -> CodecError {
    let connack = match (first, version) {
        (false, _) => None,
        (true, ProtocolVersion::V5) => Some((ProtocolVersion::V5, reason)),
        // 3.1.1 closes without CONNACK on a malformed CONNECT (MQTT-3.1.4-1), except for the two
        // cases it has return codes for.
        (true, ProtocolVersion::V311) => match reason {
            ReasonCode::UnsupportedProtocolVersion | ReasonCode::ClientIdentifierNotValid => {
                Some((ProtocolVersion::V311, reason))
            }
            _ => None,
        },
    };
    CodecError::Violation {
        version: Some(version),
        reason,
        connack,
        detail,
    }
}

const CF_USERNAME: u8 = 0b1000_0000;
const CF_PASSWORD: u8 = 0b0100_0000;
const CF_WILL_RETAIN: u8 = 0b0010_0000;
const CF_WILL_QOS: u8 = 0b0001_1000;
const CF_WILL: u8 = 0b0000_0100;
const CF_RESERVED: u8 = 0b0000_0001;

/// Checks the CONNECT flags and that the fields fill the packet exactly, which `rmqtt-codec`
/// does not (it ignores trailing bytes after the payload).
fn check_connect_layout(body: &[u8], version: ProtocolVersion) -> Result<(), Bad> {
    let mut w = Walker::new(body);
    w.skip_prefixed().ok_or(TRUNCATED)?;
    w.u8().ok_or(TRUNCATED)?;
    let flags = w.u8().ok_or(TRUNCATED)?;
    if flags & CF_RESERVED != 0 {
        return Err((
            ReasonCode::MalformedPacket,
            "CONNECT reserved flag is set (MQTT-3.1.2-3)",
        ));
    }
    if flags & CF_WILL == 0 && flags & (CF_WILL_QOS | CF_WILL_RETAIN) != 0 {
        return Err((
            ReasonCode::MalformedPacket,
            "Will QoS or Will Retain set without the Will Flag (MQTT-3.1.2-11/13/15)",
        ));
    }
    if flags & CF_WILL_QOS == CF_WILL_QOS {
        return Err((ReasonCode::MalformedPacket, "Will QoS 3 (MQTT-3.1.2-14)"));
    }
    if version == ProtocolVersion::V311 && flags & CF_PASSWORD != 0 && flags & CF_USERNAME == 0 {
        return Err((
            ReasonCode::MalformedPacket,
            "password without user name (MQTT-3.1.2-22)",
        ));
    }
    w.u16().ok_or(TRUNCATED)?;
    if version == ProtocolVersion::V5 {
        w.skip_properties().ok_or(TRUNCATED)?;
    }
    w.skip_prefixed().ok_or(TRUNCATED)?;
    if flags & CF_WILL != 0 {
        if version == ProtocolVersion::V5 {
            w.skip_properties().ok_or(TRUNCATED)?;
        }
        w.skip_prefixed().ok_or(TRUNCATED)?;
        w.skip_prefixed().ok_or(TRUNCATED)?;
    }
    if flags & CF_USERNAME != 0 {
        w.skip_prefixed().ok_or(TRUNCATED)?;
    }
    if flags & CF_PASSWORD != 0 {
        w.skip_prefixed().ok_or(TRUNCATED)?;
    }
    if !w.done() {
        return Err((
            ReasonCode::MalformedPacket,
            "bytes after the end of the CONNECT payload",
        ));
    }
    Ok(())
}

/// Raw checks on a complete body that must run before `rmqtt-codec` sees it, because that crate
/// would report them with a less precise error.
fn precheck(first_byte: u8, body: &[u8], version: ProtocolVersion) -> Result<(), Bad> {
    let ptype = first_byte >> 4;
    if version == ProtocolVersion::V5 {
        zero_identifiers(first_byte, body)?;
    }
    match ptype {
        PUBLISH if version == ProtocolVersion::V311 && body.starts_with(&[0, 0]) => Err((
            ReasonCode::MalformedPacket,
            "empty topic name (MQTT-4.7.3-1)",
        )),
        SUBSCRIBE => {
            let mut w = Walker::new(body);
            w.skip(2).ok_or(TRUNCATED)?;
            if version == ProtocolVersion::V5 {
                w.skip_properties().ok_or(TRUNCATED)?;
            }
            if w.done() {
                return Err((
                    ReasonCode::ProtocolError,
                    "SUBSCRIBE without topic filters (MQTT-3.8.3-3)",
                ));
            }
            if version == ProtocolVersion::V311 {
                // rmqtt-codec masks the requested QoS byte, so its reserved bits are checked here.
                while !w.done() {
                    w.skip_prefixed().ok_or(TRUNCATED)?;
                    let options = w.u8().ok_or(TRUNCATED)?;
                    if options & 0b1111_1100 != 0 {
                        return Err((
                            ReasonCode::MalformedPacket,
                            "reserved bits set in a requested QoS byte (MQTT-3.8.3-4)",
                        ));
                    }
                }
            }
            Ok(())
        }
        UNSUBSCRIBE => {
            let mut w = Walker::new(body);
            w.skip(2).ok_or(TRUNCATED)?;
            if version == ProtocolVersion::V5 {
                w.skip_properties().ok_or(TRUNCATED)?;
            }
            if w.done() {
                return Err((
                    ReasonCode::ProtocolError,
                    "UNSUBSCRIBE without topic filters (MQTT-3.10.3-2)",
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// MQTT 5 gives a Topic Alias of 0 (MQTT-3.3.2-8: 0x94) and a Subscription Identifier of 0
/// (3.8.2.1.2: a Protocol Error) their own reason codes, where `rmqtt-codec` reports both as
/// malformed; this finds them before it does. Anything it cannot walk is left to `rmqtt-codec`.
fn zero_identifiers(first_byte: u8, body: &[u8]) -> Result<(), Bad> {
    let mut w = Walker::new(body);
    let (wanted, bad) = match first_byte >> 4 {
        PUBLISH => {
            if w.skip_prefixed().is_none() {
                return Ok(());
            }
            if (first_byte >> 1) & 0b11 != 0 && w.skip(2).is_none() {
                return Ok(());
            }
            (
                0x23u8,
                (
                    ReasonCode::TopicAliasInvalid,
                    "Topic Alias 0 (MQTT-3.3.2-8)",
                ),
            )
        }
        SUBSCRIBE => {
            if w.skip(2).is_none() {
                return Ok(());
            }
            (
                0x0B,
                (
                    ReasonCode::ProtocolError,
                    "Subscription Identifier 0 (MQTT 5 section 3.8.2.1.2)",
                ),
            )
        }
        _ => return Ok(()),
    };
    let Some(len) = w.varint() else { return Ok(()) };
    let Some(props) = body.get(w.pos..).and_then(|r| r.get(..len as usize)) else {
        return Ok(());
    };
    let mut p = Walker::new(props);
    while !p.done() {
        let Some(id) = p.varint() else { return Ok(()) };
        let value = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => p.u8().map(u32::from),
            0x13 | 0x21 | 0x22 | 0x23 => p.u16().map(u32::from),
            0x02 | 0x11 | 0x18 | 0x27 => p.skip(4).map(|_| 1),
            0x0B => p.varint(),
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                p.skip_prefixed().map(|_| 1)
            }
            0x26 => p.skip_prefixed().and_then(|_| p.skip_prefixed()).map(|_| 1),
            _ => return Ok(()),
        };
        match value {
            None => return Ok(()),
            Some(0) if id == u32::from(wanted) => return Err(bad),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Lets `rmqtt-codec` parse one complete packet at the front of `src`. A fresh inner codec is
/// used each time: the whole packet is buffered, so it never keeps state between calls.
fn decode_with_rmqtt(version: ProtocolVersion, src: &mut BytesMut) -> Result<Frame, Bad> {
    const INCOMPLETE: Bad = (
        ReasonCode::ImplementationSpecificError,
        "rmqtt-codec asked for more bytes of a complete packet",
    );
    match version {
        ProtocolVersion::V311 => match v3::Codec::new(0).decode(src) {
            Ok(Some((packet, _))) => Ok(frame_from_v3(packet)),
            Ok(None) => Err(INCOMPLETE),
            Err(e) => Err(map_decode_error(&e)),
        },
        ProtocolVersion::V5 => match v5::Codec::new(0, 0).decode(src) {
            Ok(Some((packet, _))) => frame_from_v5(packet),
            Ok(None) => Err(INCOMPLETE),
            Err(e) => Err(map_decode_error(&e)),
        },
    }
}

fn map_decode_error(e: &DecodeError) -> Bad {
    use ReasonCode as R;
    match e {
        DecodeError::InvalidProtocol => {
            (R::ProtocolError, "protocol name is not MQTT (MQTT-3.1.2-1)")
        }
        DecodeError::InvalidLength => (
            R::MalformedPacket,
            "field lengths do not match the remaining length",
        ),
        DecodeError::MalformedPacket => (
            R::MalformedPacket,
            "malformed packet (bad value, duplicate or unknown property, or zero identifier)",
        ),
        DecodeError::UnsupportedProtocolLevel => (
            R::UnsupportedProtocolVersion,
            "unsupported protocol level (MQTT-3.1.2-2)",
        ),
        DecodeError::ConnectReservedFlagSet => (
            R::MalformedPacket,
            "CONNECT reserved flag is set (MQTT-3.1.2-3)",
        ),
        DecodeError::InvalidConnectFlags => (
            R::MalformedPacket,
            "inconsistent CONNECT flags (MQTT-3.1.2-11/13/15)",
        ),
        DecodeError::ConnAckReservedFlagSet => (R::ProtocolError, "CONNACK reserved flag is set"),
        DecodeError::InvalidClientId => (
            R::ClientIdentifierNotValid,
            "empty client identifier without clean start (MQTT-3.1.3-8)",
        ),
        DecodeError::UnsupportedPacketType => (
            R::MalformedPacket,
            "unknown packet type or wrong fixed header flags",
        ),
        DecodeError::PacketIdRequired => (R::MalformedPacket, "packet identifier required"),
        DecodeError::MaxSizeExceeded { .. } => (R::PacketTooLarge, "packet too large"),
        DecodeError::InvalidTopicFilter => {
            (R::TopicFilterInvalid, "empty topic filter (MQTT-4.7.3-1)")
        }
        DecodeError::InvalidTopicName => (R::TopicNameInvalid, "empty topic name (MQTT-4.7.3-1)"),
        DecodeError::Utf8Error => (
            R::MalformedPacket,
            "string is not valid UTF-8 (MQTT-1.5.4-1)",
        ),
        DecodeError::Io(_) => (R::UnspecifiedError, "i/o error inside rmqtt-codec"),
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound validation
// ---------------------------------------------------------------------------------------------

fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

const NUL: Bad = (
    ReasonCode::MalformedPacket,
    "string contains U+0000 (MQTT-1.5.4-2, 3.1.1 MQTT-1.5.3-2)",
);

fn check_string(s: &str) -> Result<(), Bad> {
    if has_nul(s) {
        Err(NUL)
    } else {
        Ok(())
    }
}

fn check_opt_string(s: &Option<ByteString>) -> Result<(), Bad> {
    s.as_deref().map_or(Ok(()), check_string)
}

fn check_user_properties(props: &UserProperties) -> Result<(), Bad> {
    props
        .iter()
        .try_for_each(|(k, v)| check_string(k).and_then(|()| check_string(v)))
}

/// A topic name: non-empty (MQTT-4.7.3-1), no wildcards (MQTT-3.3.2-2, MQTT-4.7.1-1), no U+0000.
fn check_topic_name(topic: &str) -> Result<(), Bad> {
    if topic.is_empty() {
        return Err((
            ReasonCode::TopicNameInvalid,
            "empty topic name (MQTT-4.7.3-1)",
        ));
    }
    if topic.contains(['+', '#']) {
        return Err((
            ReasonCode::TopicNameInvalid,
            "wildcard in a topic name (MQTT-3.3.2-2)",
        ));
    }
    check_string(topic)
}

/// A topic filter: non-empty (MQTT-4.7.3-1), `#` alone in the last level and `+` alone in its
/// level (MQTT-4.7.1-1/-2 in MQTT 5, MQTT-4.7.1-2/-3 in 3.1.1), no U+0000 (MQTT-4.7.3-2), and a
/// `$share/{name}/{filter}` form with a non-empty name free of wildcards followed by a filter
/// (MQTT-4.8.2-1/-2). Returns whether the filter is a shared subscription.
fn check_topic_filter(filter: &str) -> Result<bool, Bad> {
    const INVALID_SHARE: Bad = (
        ReasonCode::TopicFilterInvalid,
        "shared subscription is not $share/{name}/{filter} (MQTT-4.8.2-1/-2)",
    );
    check_string(filter)?;
    let (plain, shared) = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (name, plain) = rest.split_once('/').ok_or(INVALID_SHARE)?;
            if name.is_empty() || name.contains(['+', '#']) {
                return Err(INVALID_SHARE);
            }
            (plain, true)
        }
        None => (filter, false),
    };
    if plain.is_empty() {
        return Err((
            ReasonCode::TopicFilterInvalid,
            "empty topic filter (MQTT-4.7.3-1)",
        ));
    }
    let mut levels = plain.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err((
                ReasonCode::TopicFilterInvalid,
                "'#' not alone in the last level (MQTT-4.7.1-1)",
            ));
        }
        if level.contains('+') && level != "+" {
            return Err((
                ReasonCode::TopicFilterInvalid,
                "'+' not alone in its level (MQTT-4.7.1-2)",
            ));
        }
    }
    Ok(shared)
}

/// The Payload Format Indicator promises well-formed UTF-8 (MQTT 5 section 3.3.2.3.2); unlike
/// a UTF-8 Encoded String, such a payload may contain U+0000.
fn check_utf8_payload(payload: &[u8]) -> Result<(), Bad> {
    match std::str::from_utf8(payload) {
        Ok(_) => Ok(()),
        Err(_) => Err((
            ReasonCode::PayloadFormatInvalid,
            "payload is not UTF-8 though its Payload Format Indicator says so",
        )),
    }
}

fn validate_connect(c: &Connect) -> Result<(), Bad> {
    if has_nul(&c.client_id) {
        return Err(NUL);
    }
    // Control characters are legal UTF-8 but have no business in an identifier that ends up in
    // topics and logs; the server may refuse any client id (MQTT-3.1.3-9, MQTT 5 MQTT-3.1.3-8).
    if c.client_id.chars().any(char::is_control) {
        return Err((
            ReasonCode::ClientIdentifierNotValid,
            "client identifier contains a control character",
        ));
    }
    check_opt_string(&c.username)?;
    if let Some(will) = &c.will {
        if has_nul(&will.topic) {
            return Err(NUL);
        }
        check_topic_name(&will.topic).map_err(|(_, d)| (ReasonCode::TopicNameInvalid, d))?;
        check_opt_string(&will.content_type)?;
        if let Some(t) = &will.response_topic {
            check_topic_name(t)?;
        }
        check_user_properties(&will.user_properties)?;
        if will.payload_format_utf8 {
            check_utf8_payload(&will.payload)?;
        }
    }
    check_user_properties(&c.user_properties)?;
    check_opt_string(&c.authentication_method)?;
    if c.authentication_data.is_some() && c.authentication_method.is_none() {
        return Err((
            ReasonCode::ProtocolError,
            "Authentication Data without Authentication Method (MQTT 5 3.1.2.11.10)",
        ));
    }
    Ok(())
}

fn validate_publish(p: &Publish, version: ProtocolVersion) -> Result<(), Bad> {
    if p.topic.is_empty() {
        match version {
            ProtocolVersion::V311 => {
                return Err((
                    ReasonCode::MalformedPacket,
                    "empty topic name (MQTT-4.7.3-1)",
                ))
            }
            ProtocolVersion::V5 if p.properties.topic_alias.is_none() => {
                return Err((
                    ReasonCode::ProtocolError,
                    "empty topic name without a Topic Alias (MQTT 5 3.3.2.1)",
                ))
            }
            ProtocolVersion::V5 => {}
        }
    } else {
        check_topic_name(&p.topic)?;
    }
    let props = &p.properties;
    if !props.subscription_identifiers.is_empty() {
        return Err((
            ReasonCode::ProtocolError,
            "client PUBLISH carries a Subscription Identifier (MQTT-3.3.4-6)",
        ));
    }
    check_opt_string(&props.content_type)?;
    if let Some(t) = &props.response_topic {
        check_topic_name(t)?;
    }
    check_user_properties(&props.user_properties)?;
    if props.payload_format_utf8 {
        check_utf8_payload(&p.payload)?;
    }
    Ok(())
}

fn validate_inbound(frame: &Frame, version: ProtocolVersion) -> Result<(), Bad> {
    match frame {
        Frame::Connect(c) => validate_connect(c),
        Frame::Publish(p) => validate_publish(p, version),
        Frame::PubAck(a) | Frame::PubRec(a) | Frame::PubRel(a) | Frame::PubComp(a) => {
            check_opt_string(&a.reason_string)?;
            check_user_properties(&a.user_properties)
        }
        Frame::Subscribe(s) => {
            for (filter, options) in &s.filters {
                let shared = check_topic_filter(filter)?;
                if shared && options.no_local {
                    return Err((
                        ReasonCode::ProtocolError,
                        "No Local on a shared subscription (MQTT-3.8.3-4)",
                    ));
                }
            }
            check_user_properties(&s.user_properties)
        }
        Frame::Unsubscribe(u) => {
            for filter in &u.filters {
                check_topic_filter(filter)?;
            }
            check_user_properties(&u.user_properties)
        }
        Frame::PingReq => Ok(()),
        Frame::Disconnect(d) => {
            check_opt_string(&d.reason_string)?;
            check_opt_string(&d.server_reference)?;
            check_user_properties(&d.user_properties)
        }
        Frame::Auth(a) => {
            check_opt_string(&a.method)?;
            check_opt_string(&a.reason_string)?;
            check_user_properties(&a.user_properties)
        }
        Frame::ConnAck(_) | Frame::SubAck(_) | Frame::UnsubAck(_) | Frame::PingResp => Err((
            ReasonCode::ProtocolError,
            "client sent a packet only a server may send",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// rmqtt-codec to Frame
// ---------------------------------------------------------------------------------------------

fn qos_from(q: rt::QoS) -> QoS {
    match q {
        rt::QoS::AtMostOnce => QoS::AtMostOnce,
        rt::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rt::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to(q: QoS) -> rt::QoS {
    match q {
        QoS::AtMostOnce => rt::QoS::AtMostOnce,
        QoS::AtLeastOnce => rt::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rt::QoS::ExactlyOnce,
    }
}

fn reason_from(v: u8) -> Result<ReasonCode, Bad> {
    ReasonCode::from_u8(v).ok_or((ReasonCode::MalformedPacket, "unknown reason code"))
}

fn publish_from(p: rt::Publish) -> Publish {
    let properties = match p.properties {
        Some(pp) => PublishProperties {
            topic_alias: pp.topic_alias,
            message_expiry_interval: pp.message_expiry_interval.map(NonZeroU32::get),
            payload_format_utf8: pp.is_utf8_payload,
            content_type: pp.content_type,
            response_topic: pp.response_topic,
            correlation_data: pp.correlation_data,
            subscription_identifiers: pp.subscription_ids,
            user_properties: pp.user_properties,
        },
        None => PublishProperties::default(),
    };
    Publish {
        dup: p.dup,
        qos: qos_from(p.qos),
        retain: p.retain,
        topic: p.topic,
        packet_id: p.packet_id,
        payload: p.payload,
        properties,
    }
}

fn frame_from_v3(packet: v3::Packet) -> Frame {
    use v3::Packet as P;
    match packet {
        P::Connect(c) => {
            let c = *c;
            let mut connect = Connect::new(ProtocolVersion::V311, c.client_id);
            connect.clean_start = c.clean_session;
            connect.keep_alive = c.keep_alive;
            connect.username = c.username;
            connect.password = c.password;
            connect.will = c
                .last_will
                .map(|w| Will::new(w.topic, w.message, qos_from(w.qos), w.retain));
            Frame::Connect(Box::new(connect))
        }
        P::ConnectAck(a) => {
            let reason = match a.return_code {
                v3::ConnectAckReason::ConnectionAccepted => ReasonCode::Success,
                v3::ConnectAckReason::UnacceptableProtocolVersion => {
                    ReasonCode::UnsupportedProtocolVersion
                }
                v3::ConnectAckReason::IdentifierRejected => ReasonCode::ClientIdentifierNotValid,
                v3::ConnectAckReason::ServiceUnavailable => ReasonCode::ServerUnavailable,
                v3::ConnectAckReason::BadUserNameOrPassword => ReasonCode::BadUserNameOrPassword,
                v3::ConnectAckReason::NotAuthorized => ReasonCode::NotAuthorized,
                v3::ConnectAckReason::Reserved => ReasonCode::UnspecifiedError,
            };
            Frame::ConnAck(Box::new(ConnAck {
                session_present: a.session_present,
                ..ConnAck::refused(reason)
            }))
        }
        P::Publish(p) => Frame::Publish(publish_from(*p)),
        P::PublishAck { packet_id } => Frame::PubAck(Ack::new(packet_id)),
        P::PublishReceived { packet_id } => Frame::PubRec(Ack::new(packet_id)),
        P::PublishRelease { packet_id } => Frame::PubRel(Ack::new(packet_id)),
        P::PublishComplete { packet_id } => Frame::PubComp(Ack::new(packet_id)),
        P::Subscribe {
            packet_id,
            topic_filters,
        } => Frame::Subscribe(Subscribe {
            packet_id,
            subscription_identifier: None,
            user_properties: Vec::new(),
            filters: topic_filters
                .into_iter()
                .map(|(f, q)| (f, SubscriptionOptions::qos(qos_from(q))))
                .collect(),
        }),
        P::SubscribeAck { packet_id, status } => Frame::SubAck(SubAck {
            packet_id,
            reason_codes: status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(granted) => match granted {
                        rt::QoS::AtMostOnce => ReasonCode::GrantedQoS0,
                        rt::QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                        rt::QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                    },
                    v3::SubscribeReturnCode::Failure => ReasonCode::UnspecifiedError,
                })
                .collect(),
            reason_string: None,
            user_properties: Vec::new(),
        }),
        P::Unsubscribe {
            packet_id,
            topic_filters,
        } => Frame::Unsubscribe(Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            filters: topic_filters,
        }),
        P::UnsubscribeAck { packet_id } => Frame::UnsubAck(UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            reason_string: None,
            user_properties: Vec::new(),
        }),
        P::PingRequest => Frame::PingReq,
        P::PingResponse => Frame::PingResp,
        P::Disconnect => Frame::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection)),
    }
}

fn ack_from_v5(
    packet_id: NonZeroU16,
    reason: u8,
    reason_string: Option<ByteString>,
    props: UserProperties,
) -> Result<Ack, Bad> {
    Ok(Ack {
        packet_id,
        reason: reason_from(reason)?,
        reason_string,
        user_properties: props,
    })
}

fn frame_from_v5(packet: v5::Packet) -> Result<Frame, Bad> {
    use v5::Packet as P;
    Ok(match packet {
        P::Connect(c) => {
            let c = *c;
            Frame::Connect(Box::new(Connect {
                version: ProtocolVersion::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                username: c.username,
                password: c.password,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: qos_from(w.qos),
                    retain: w.retain,
                    delay_interval: w.will_delay_interval_sec.unwrap_or(0),
                    message_expiry: w.message_expiry_interval.map(NonZeroU32::get),
                    content_type: w.content_type,
                    response_topic: w.response_topic,
                    correlation_data: w.correlation_data,
                    payload_format_utf8: w.is_utf8_payload.unwrap_or(false),
                    user_properties: w.user_properties,
                }),
                session_expiry_interval: c.session_expiry_interval_secs,
                receive_maximum: c.receive_max.map_or(65535, NonZeroU16::get),
                maximum_packet_size: c.max_packet_size.map(NonZeroU32::get),
                topic_alias_maximum: c.topic_alias_max,
                request_problem_information: c.request_problem_info,
                request_response_information: c.request_response_info,
                user_properties: c.user_properties,
                authentication_method: c.auth_method,
                authentication_data: c.auth_data,
            }))
        }
        P::ConnectAck(a) => {
            let a = *a;
            Frame::ConnAck(Box::new(ConnAck {
                session_present: a.session_present,
                reason: reason_from(a.reason_code.into())?,
                session_expiry_interval: a.session_expiry_interval_secs,
                receive_maximum: a.receive_max.get(),
                maximum_qos: qos_from(a.max_qos),
                retain_available: a.retain_available,
                maximum_packet_size: a.max_packet_size,
                assigned_client_identifier: a.assigned_client_id,
                topic_alias_maximum: a.topic_alias_max,
                reason_string: a.reason_string,
                wildcard_subscription_available: a.wildcard_subscription_available,
                subscription_identifiers_available: a.subscription_identifiers_available,
                shared_subscription_available: a.shared_subscription_available,
                server_keep_alive: a.server_keepalive_sec,
                response_information: a.response_info,
                server_reference: a.server_reference,
                authentication_method: a.auth_method,
                authentication_data: a.auth_data,
                user_properties: a.user_properties,
            }))
        }
        P::Publish(p) => Frame::Publish(publish_from(*p)),
        P::PublishAck(a) => Frame::PubAck(ack_from_v5(
            a.packet_id,
            a.reason_code.into(),
            a.reason_string,
            a.properties,
        )?),
        P::PublishReceived(a) => Frame::PubRec(ack_from_v5(
            a.packet_id,
            a.reason_code.into(),
            a.reason_string,
            a.properties,
        )?),
        P::PublishRelease(a) => Frame::PubRel(ack_from_v5(
            a.packet_id,
            a.reason_code.into(),
            a.reason_string,
            a.properties,
        )?),
        P::PublishComplete(a) => Frame::PubComp(ack_from_v5(
            a.packet_id,
            a.reason_code.into(),
            a.reason_string,
            a.properties,
        )?),
        P::Subscribe(s) => Frame::Subscribe(Subscribe {
            packet_id: s.packet_id,
            subscription_identifier: s.id,
            user_properties: s.user_properties,
            filters: s
                .topic_filters
                .into_iter()
                .map(|(f, o)| {
                    let retain_handling = match o.retain_handling {
                        v5::RetainHandling::AtSubscribe => RetainHandling::SendAtSubscribe,
                        v5::RetainHandling::AtSubscribeNew => RetainHandling::SendIfNew,
                        v5::RetainHandling::NoAtSubscribe => RetainHandling::DoNotSend,
                    };
                    let options = SubscriptionOptions {
                        qos: qos_from(o.qos),
                        no_local: o.no_local,
                        retain_as_published: o.retain_as_published,
                        retain_handling,
                    };
                    (f, options)
                })
                .collect(),
        }),
        P::SubscribeAck(a) => Frame::SubAck(SubAck {
            packet_id: a.packet_id,
            reason_codes: a
                .status
                .into_iter()
                .map(|c| reason_from(c.into()))
                .collect::<Result<_, _>>()?,
            reason_string: a.reason_string,
            user_properties: a.properties,
        }),
        P::Unsubscribe(u) => Frame::Unsubscribe(Unsubscribe {
            packet_id: u.packet_id,
            user_properties: u.user_properties,
            filters: u.topic_filters,
        }),
        P::UnsubscribeAck(a) => Frame::UnsubAck(UnsubAck {
            packet_id: a.packet_id,
            reason_codes: a
                .status
                .into_iter()
                .map(|c| reason_from(c.into()))
                .collect::<Result<_, _>>()?,
            reason_string: a.reason_string,
            user_properties: a.properties,
        }),
        P::PingRequest => Frame::PingReq,
        P::PingResponse => Frame::PingResp,
        P::Disconnect(d) => Frame::Disconnect(Disconnect {
            reason: reason_from(d.reason_code.into())?,
            session_expiry_interval: d.session_expiry_interval_secs,
            reason_string: d.reason_string,
            server_reference: d.server_reference,
            user_properties: d.user_properties,
        }),
        P::Auth(a) => Frame::Auth(Auth {
            reason: reason_from(a.reason_code.into())?,
            method: a.auth_method,
            data: a.auth_data,
            reason_string: a.reason_string,
            user_properties: a.user_properties,
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// Frame to rmqtt-codec
// ---------------------------------------------------------------------------------------------

fn varint_len(n: u64) -> u64 {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn prefixed_len(n: usize) -> u64 {
    2 + n as u64
}

/// The exact size of a PUBLISH packet as `rmqtt-codec` writes it, fixed header included.
fn publish_packet_size(p: &Publish, version: ProtocolVersion) -> u64 {
    let body = publish_body_size(p, version);
    1 + varint_len(body) + body
}

fn publish_body_size(p: &Publish, version: ProtocolVersion) -> u64 {
    let mut body = prefixed_len(p.topic.len()) + p.payload.len() as u64;
    if p.qos != QoS::AtMostOnce {
        body += 2;
    }
    if version == ProtocolVersion::V5 {
        let pp = &p.properties;
        let opt = |o: Option<usize>| o.map_or(0, |n| 1 + prefixed_len(n));
        let props = pp.topic_alias.map_or(0, |_| 3)
            + opt(pp.correlation_data.as_ref().map(Bytes::len))
            + pp.message_expiry_interval.map_or(0, |_| 5)
            + opt(pp.content_type.as_ref().map(|s| s.len()))
            + if pp.payload_format_utf8 { 2 } else { 0 }
            + opt(pp.response_topic.as_ref().map(|s| s.len()))
            + pp.subscription_identifiers
                .iter()
                .map(|id| 1 + varint_len(u64::from(id.get())))
                .sum::<u64>()
            + user_properties_len(&pp.user_properties);
        body += varint_len(props) + props;
    }
    body
}

fn user_properties_len(props: &UserProperties) -> u64 {
    props
        .iter()
        .map(|(k, v)| 1 + prefixed_len(k.len()) + prefixed_len(v.len()))
        .sum()
}

/// The body size of a 3.1.1 packet, mirroring `rmqtt-codec`'s own computation, so that nothing
/// over the protocol maximum reaches its length writer (which panics on such values).
fn v3_body_size(frame: &Frame) -> u64 {
    match frame {
        Frame::Connect(c) => {
            10 + prefixed_len(c.client_id.len())
                + c.will.as_ref().map_or(0, |w| {
                    prefixed_len(w.topic.len()) + prefixed_len(w.payload.len())
                })
                + c.username.as_ref().map_or(0, |u| prefixed_len(u.len()))
                + c.password.as_ref().map_or(0, |p| prefixed_len(p.len()))
        }
        Frame::Publish(p) => publish_body_size(p, ProtocolVersion::V311),
        Frame::ConnAck(_)
        | Frame::PubAck(_)
        | Frame::PubRec(_)
        | Frame::PubRel(_)
        | Frame::PubComp(_)
        | Frame::UnsubAck(_) => 2,
        Frame::Subscribe(s) => {
            2 + s
                .filters
                .iter()
                .map(|(f, _)| prefixed_len(f.len()) + 1)
                .sum::<u64>()
        }
        Frame::SubAck(s) => 2 + s.reason_codes.len() as u64,
        Frame::Unsubscribe(u) => 2 + u.filters.iter().map(|f| prefixed_len(f.len())).sum::<u64>(),
        Frame::PingReq | Frame::PingResp | Frame::Disconnect(_) | Frame::Auth(_) => 0,
    }
}

fn unencodable(version: ProtocolVersion, detail: &'static str) -> CodecError {
    CodecError::Unencodable {
        version: Some(version),
        detail,
    }
}

fn map_encode_error(e: EncodeError, version: ProtocolVersion, limit: u32) -> CodecError {
    match e {
        EncodeError::OverMaxPacketSize { size, .. } => CodecError::OutboundTooLarge {
            size: u64::from(size) + 1 + varint_len(u64::from(size)),
            max: limit,
        },
        EncodeError::InvalidLength => unencodable(
            version,
            "a string or binary field is longer than 65535 bytes",
        ),
        EncodeError::MalformedPacket => unencodable(
            version,
            "a QoS 0 PUBLISH must not carry a packet identifier",
        ),
        EncodeError::PacketIdRequired => {
            unencodable(version, "a QoS 1 or 2 PUBLISH needs a packet identifier")
        }
        EncodeError::UnsupportedVersion | EncodeError::Io(_) => {
            unencodable(version, "rmqtt-codec refused the packet")
        }
    }
}

fn check_written(start: usize, dst: &BytesMut, limit: u32) -> Result<(), CodecError> {
    let written = (dst.len() - start) as u64;
    if written > u64::from(limit) {
        return Err(CodecError::OutboundTooLarge {
            size: written,
            max: limit,
        });
    }
    Ok(())
}

fn encode_v3(frame: Frame, dst: &mut BytesMut, limit: u32) -> Result<(), CodecError> {
    let v = ProtocolVersion::V311;
    let body = v3_body_size(&frame);
    let size = 1 + varint_len(body) + body;
    if body > u64::from(MAX_REMAINING) || size > u64::from(limit) {
        return Err(CodecError::OutboundTooLarge { size, max: limit });
    }
    let packet = frame_to_v3(frame)?;
    let start = dst.len();
    v3::Codec::new(0)
        .encode(packet, dst)
        .map_err(|e| map_encode_error(e, v, limit))?;
    check_written(start, dst, limit)
}

fn frame_to_v3(frame: Frame) -> Result<v3::Packet, CodecError> {
    use v3::Packet as P;
    let v = ProtocolVersion::V311;
    let plain_ack = |a: &Ack| {
        if a.reason == ReasonCode::Success {
            Ok(a.packet_id)
        } else {
            Err(unencodable(
                v,
                "3.1.1 publish acks carry no reason code: ack plainly or close the connection",
            ))
        }
    };
    Ok(match frame {
        Frame::Connect(c) => {
            let c = *c;
            P::Connect(Box::new(v3::Connect {
                protocol: rt::Protocol(rt::MQTT_LEVEL_311),
                clean_session: c.clean_start,
                keep_alive: c.keep_alive,
                last_will: c.will.map(|w| v3::LastWill {
                    qos: qos_to(w.qos),
                    retain: w.retain,
                    topic: w.topic,
                    message: w.payload,
                }),
                client_id: c.client_id,
                username: c.username,
                password: c.password,
                cert: None,
            }))
        }
        Frame::ConnAck(a) => {
            let code = a.reason.v311_connack_code().ok_or_else(|| {
                unencodable(
                    v,
                    "this CONNACK reason has no 3.1.1 return code: close instead",
                )
            })?;
            let return_code = v3::ConnectAckReason::try_from(code)
                .map_err(|_| unencodable(v, "3.1.1 return code out of range"))?;
            P::ConnectAck(v3::ConnectAck {
                return_code,
                session_present: a.session_present && code == 0,
            })
        }
        Frame::Publish(p) => {
            if p.topic.is_empty() {
                return Err(unencodable(
                    v,
                    "3.1.1 has no topic aliases, so the topic must not be empty",
                ));
            }
            P::Publish(Box::new(rt::Publish {
                dup: p.dup,
                retain: p.retain,
                qos: qos_to(p.qos),
                topic: p.topic,
                packet_id: p.packet_id,
                payload: p.payload,
                properties: None,
            }))
        }
        Frame::PubAck(a) => P::PublishAck {
            packet_id: plain_ack(&a)?,
        },
        Frame::PubRec(a) => P::PublishReceived {
            packet_id: plain_ack(&a)?,
        },
        Frame::PubRel(a) => P::PublishRelease {
            packet_id: plain_ack(&a)?,
        },
        Frame::PubComp(a) => P::PublishComplete {
            packet_id: plain_ack(&a)?,
        },
        Frame::Subscribe(s) => P::Subscribe {
            packet_id: s.packet_id,
            topic_filters: s
                .filters
                .into_iter()
                .map(|(f, o)| (f, qos_to(o.qos)))
                .collect(),
        },
        Frame::SubAck(s) => P::SubscribeAck {
            packet_id: s.packet_id,
            status: s
                .reason_codes
                .into_iter()
                .map(|c| match c {
                    ReasonCode::GrantedQoS0 => {
                        Ok(v3::SubscribeReturnCode::Success(rt::QoS::AtMostOnce))
                    }
                    ReasonCode::GrantedQoS1 => {
                        Ok(v3::SubscribeReturnCode::Success(rt::QoS::AtLeastOnce))
                    }
                    ReasonCode::GrantedQoS2 => {
                        Ok(v3::SubscribeReturnCode::Success(rt::QoS::ExactlyOnce))
                    }
                    // 3.1.1 has a single failure code, so every MQTT 5 failure folds into it.
                    c if c.is_error() => Ok(v3::SubscribeReturnCode::Failure),
                    _ => Err(unencodable(
                        v,
                        "SUBACK code is neither a granted QoS nor a failure",
                    )),
                })
                .collect::<Result<_, _>>()?,
        },
        Frame::Unsubscribe(u) => P::Unsubscribe {
            packet_id: u.packet_id,
            topic_filters: u.filters,
        },
        Frame::UnsubAck(u) => P::UnsubscribeAck {
            packet_id: u.packet_id,
        },
        Frame::PingReq => P::PingRequest,
        Frame::PingResp => P::PingResponse,
        Frame::Disconnect(_) => {
            return Err(unencodable(
                v,
                "a 3.1.1 server never sends DISCONNECT: close the connection",
            ))
        }
        Frame::Auth(_) => return Err(unencodable(v, "AUTH exists only in MQTT 5")),
    })
}

fn encode_v5(
    frame: Frame,
    dst: &mut BytesMut,
    limit: u32,
    problem_information: bool,
) -> Result<(), CodecError> {
    let v = ProtocolVersion::V5;
    let packet = frame_to_v5(frame, !problem_information)?;
    // Only packets whose diagnostics can be dropped get a second chance; keeping a copy costs
    // nothing for the common case of a bare ack.
    let fallback = if has_v5_diagnostics(&packet) {
        let mut copy = packet.clone();
        strip_v5_diagnostics(&mut copy);
        Some(copy)
    } else {
        None
    };
    let start = dst.len();
    let first = v5::Codec::new(0, 0)
        .encode(packet, dst)
        .map_err(|e| map_encode_error(e, v, limit))
        .and_then(|()| check_written(start, dst, limit));
    match (first, fallback) {
        (Err(CodecError::OutboundTooLarge { .. }), Some(stripped)) => {
            dst.truncate(start);
            v5::Codec::new(0, 0)
                .encode(stripped, dst)
                .map_err(|e| map_encode_error(e, v, limit))?;
            check_written(start, dst, limit)
        }
        (result, _) => result,
    }
}

/// Whether a packet other than PUBLISH has a Reason String or User Properties, which the MQTT 5
/// rules (for example MQTT-3.4.2-2, MQTT-3.2.2-19/20, MQTT-3.14.2-3/4) drop rather than exceed
/// the client's Maximum Packet Size.
fn has_v5_diagnostics(p: &v5::Packet) -> bool {
    use v5::Packet as P;
    match p {
        P::ConnectAck(a) => a.reason_string.is_some() || !a.user_properties.is_empty(),
        P::PublishAck(a) | P::PublishReceived(a) => {
            a.reason_string.is_some() || !a.properties.is_empty()
        }
        P::PublishRelease(a) | P::PublishComplete(a) => {
            a.reason_string.is_some() || !a.properties.is_empty()
        }
        P::SubscribeAck(a) => a.reason_string.is_some() || !a.properties.is_empty(),
        P::UnsubscribeAck(a) => a.reason_string.is_some() || !a.properties.is_empty(),
        P::Disconnect(d) => d.reason_string.is_some() || !d.user_properties.is_empty(),
        P::Auth(a) => a.reason_string.is_some() || !a.user_properties.is_empty(),
        _ => false,
    }
}

fn strip_v5_diagnostics(p: &mut v5::Packet) {
    use v5::Packet as P;
    match p {
        P::ConnectAck(a) => {
            a.reason_string = None;
            a.user_properties.clear();
        }
        P::PublishAck(a) | P::PublishReceived(a) => {
            a.reason_string = None;
            a.properties.clear();
        }
        P::PublishRelease(a) | P::PublishComplete(a) => {
            a.reason_string = None;
            a.properties.clear();
        }
        P::SubscribeAck(a) => {
            a.reason_string = None;
            a.properties.clear();
        }
        P::UnsubscribeAck(a) => {
            a.reason_string = None;
            a.properties.clear();
        }
        P::Disconnect(d) => {
            d.reason_string = None;
            d.user_properties.clear();
        }
        P::Auth(a) => {
            a.reason_string = None;
            a.user_properties.clear();
        }
        _ => {}
    }
}

fn check_sub_id(id: NonZeroU32) -> Result<NonZeroU32, CodecError> {
    // rmqtt-codec's variable-length writer panics above this value.
    if id.get() > MAX_REMAINING {
        return Err(unencodable(
            ProtocolVersion::V5,
            "Subscription Identifier above 268,435,455",
        ));
    }
    Ok(id)
}

fn nonzero_expiry(v: Option<u32>) -> Result<Option<NonZeroU32>, CodecError> {
    match v {
        None => Ok(None),
        Some(n) => NonZeroU32::new(n).map(Some).ok_or_else(|| {
            unencodable(
                ProtocolVersion::V5,
                "Message Expiry Interval 0: the message has expired, drop it",
            )
        }),
    }
}

/// Request Problem Information 0 forbids Reason String and User Properties everywhere but
/// PUBLISH, CONNACK and DISCONNECT (MQTT-3.1.2-29), so those packets pass `strip = true`.
fn diagnostics(
    strip: bool,
    s: Option<ByteString>,
    p: UserProperties,
) -> (Option<ByteString>, UserProperties) {
    if strip {
        (None, Vec::new())
    } else {
        (s, p)
    }
}

fn ack1_to_v5(a: Ack, strip: bool) -> Result<v5::PublishAck, CodecError> {
    let (reason_string, properties) = diagnostics(strip, a.reason_string, a.user_properties);
    let reason_code = v5::PublishAckReason::try_from(a.reason.as_u8()).map_err(|_| {
        unencodable(
            ProtocolVersion::V5,
            "reason code not allowed in PUBACK or PUBREC",
        )
    })?;
    Ok(v5::PublishAck {
        packet_id: a.packet_id,
        reason_code,
        properties,
        reason_string,
    })
}

fn ack2_to_v5(a: Ack, strip: bool) -> Result<v5::PublishAck2, CodecError> {
    let (reason_string, properties) = diagnostics(strip, a.reason_string, a.user_properties);
    let reason_code = v5::PublishAck2Reason::try_from(a.reason.as_u8()).map_err(|_| {
        unencodable(
            ProtocolVersion::V5,
            "reason code not allowed in PUBREL or PUBCOMP",
        )
    })?;
    Ok(v5::PublishAck2 {
        packet_id: a.packet_id,
        reason_code,
        properties,
        reason_string,
    })
}

fn frame_to_v5(frame: Frame, strip_problem_information: bool) -> Result<v5::Packet, CodecError> {
    use v5::Packet as P;
    let v = ProtocolVersion::V5;
    let bad_reason = |what: &'static str| move |_| unencodable(v, what);
    let diag = |s, p| diagnostics(strip_problem_information, s, p);
    Ok(match frame {
        Frame::Connect(c) => {
            let c = *c;
            let last_will = match c.will {
                Some(w) => Some(v5::LastWill {
                    qos: qos_to(w.qos),
                    retain: w.retain,
                    topic: w.topic,
                    message: w.payload,
                    will_delay_interval_sec: (w.delay_interval != 0).then_some(w.delay_interval),
                    correlation_data: w.correlation_data,
                    message_expiry_interval: nonzero_expiry(w.message_expiry)?,
                    content_type: w.content_type,
                    user_properties: w.user_properties,
                    is_utf8_payload: w.payload_format_utf8.then_some(true),
                    response_topic: w.response_topic,
                }),
                None => None,
            };
            P::Connect(Box::new(v5::Connect {
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry_interval_secs: c.session_expiry_interval,
                auth_method: c.authentication_method,
                auth_data: c.authentication_data,
                request_problem_info: c.request_problem_information,
                request_response_info: c.request_response_information,
                receive_max: NonZeroU16::new(c.receive_maximum).filter(|n| n.get() != 65535),
                topic_alias_max: c.topic_alias_maximum,
                user_properties: c.user_properties,
                max_packet_size: c.maximum_packet_size.and_then(NonZeroU32::new),
                last_will,
                client_id: c.client_id,
                username: c.username,
                password: c.password,
                cert: None,
            }))
        }
        Frame::ConnAck(a) => {
            let a = *a;
            let success = a.reason == ReasonCode::Success;
            P::ConnectAck(Box::new(v5::ConnectAck {
                session_present: a.session_present && success,
                reason_code: v5::ConnectAckReason::try_from(a.reason.as_u8())
                    .map_err(bad_reason("reason code not allowed in CONNACK"))?,
                session_expiry_interval_secs: a.session_expiry_interval,
                receive_max: NonZeroU16::new(a.receive_maximum)
                    .ok_or_else(|| unencodable(v, "Receive Maximum 0"))?,
                max_qos: qos_to(a.maximum_qos),
                max_packet_size: match a.maximum_packet_size {
                    Some(0) => return Err(unencodable(v, "Maximum Packet Size 0")),
                    other => other,
                },
                assigned_client_id: a.assigned_client_identifier,
                topic_alias_max: a.topic_alias_maximum,
                retain_available: a.retain_available,
                wildcard_subscription_available: a.wildcard_subscription_available,
                subscription_identifiers_available: a.subscription_identifiers_available,
                shared_subscription_available: a.shared_subscription_available,
                server_keepalive_sec: a.server_keep_alive,
                response_info: a.response_information,
                server_reference: a.server_reference,
                auth_method: a.authentication_method,
                auth_data: a.authentication_data,
                reason_string: a.reason_string,
                user_properties: a.user_properties,
            }))
        }
        Frame::Publish(p) => {
            let pp = p.properties;
            P::Publish(Box::new(rt::Publish {
                dup: p.dup,
                retain: p.retain,
                qos: qos_to(p.qos),
                topic: p.topic,
                packet_id: p.packet_id,
                payload: p.payload,
                properties: Some(v5::PublishProperties {
                    topic_alias: pp.topic_alias,
                    correlation_data: pp.correlation_data,
                    message_expiry_interval: nonzero_expiry(pp.message_expiry_interval)?,
                    content_type: pp.content_type,
                    user_properties: pp.user_properties,
                    is_utf8_payload: pp.payload_format_utf8,
                    response_topic: pp.response_topic,
                    subscription_ids: pp
                        .subscription_identifiers
                        .into_iter()
                        .map(check_sub_id)
                        .collect::<Result<_, _>>()?,
                }),
            }))
        }
        Frame::PubAck(a) => P::PublishAck(ack1_to_v5(a, strip_problem_information)?),
        Frame::PubRec(a) => P::PublishReceived(ack1_to_v5(a, strip_problem_information)?),
        Frame::PubRel(a) => P::PublishRelease(ack2_to_v5(a, strip_problem_information)?),
        Frame::PubComp(a) => P::PublishComplete(ack2_to_v5(a, strip_problem_information)?),
        Frame::Subscribe(s) => P::Subscribe(v5::Subscribe {
            packet_id: s.packet_id,
            id: s.subscription_identifier.map(check_sub_id).transpose()?,
            user_properties: s.user_properties,
            topic_filters: s
                .filters
                .into_iter()
                .map(|(f, o)| {
                    let retain_handling = match o.retain_handling {
                        RetainHandling::SendAtSubscribe => v5::RetainHandling::AtSubscribe,
                        RetainHandling::SendIfNew => v5::RetainHandling::AtSubscribeNew,
                        RetainHandling::DoNotSend => v5::RetainHandling::NoAtSubscribe,
                    };
                    let options = v5::SubscriptionOptions {
                        qos: qos_to(o.qos),
                        no_local: o.no_local,
                        retain_as_published: o.retain_as_published,
                        retain_handling,
                    };
                    (f, options)
                })
                .collect(),
        }),
        Frame::SubAck(s) => {
            let (reason_string, properties) = diag(s.reason_string, s.user_properties);
            P::SubscribeAck(v5::SubscribeAck {
                packet_id: s.packet_id,
                status: s
                    .reason_codes
                    .into_iter()
                    .map(|c| {
                        v5::SubscribeAckReason::try_from(c.as_u8())
                            .map_err(bad_reason("reason code not allowed in SUBACK"))
                    })
                    .collect::<Result<_, _>>()?,
                reason_string,
                properties,
            })
        }
        Frame::Unsubscribe(u) => P::Unsubscribe(v5::Unsubscribe {
            packet_id: u.packet_id,
            user_properties: u.user_properties,
            topic_filters: u.filters,
        }),
        Frame::UnsubAck(u) => {
            let (reason_string, properties) = diag(u.reason_string, u.user_properties);
            P::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id: u.packet_id,
                status: u
                    .reason_codes
                    .into_iter()
                    .map(|c| {
                        v5::UnsubscribeAckReason::try_from(c.as_u8())
                            .map_err(bad_reason("reason code not allowed in UNSUBACK"))
                    })
                    .collect::<Result<_, _>>()?,
                reason_string,
                properties,
            })
        }
        Frame::PingReq => P::PingRequest,
        Frame::PingResp => P::PingResponse,
        Frame::Disconnect(d) => P::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::try_from(d.reason.as_u8())
                .map_err(bad_reason("reason code not allowed in DISCONNECT"))?,
            session_expiry_interval_secs: d.session_expiry_interval,
            server_reference: d.server_reference,
            reason_string: d.reason_string,
            user_properties: d.user_properties,
        }),
        Frame::Auth(a) => {
            let (reason_string, user_properties) = diag(a.reason_string, a.user_properties);
            P::Auth(v5::Auth {
                reason_code: v5::AuthReasonCode::try_from(a.reason.as_u8())
                    .map_err(bad_reason("reason code not allowed in AUTH"))?,
                auth_method: a.method,
                auth_data: a.data,
                reason_string,
                user_properties,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProtocolVersion::{V311, V5};

    // ---- helpers -------------------------------------------------------------------------------

    fn pid(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    fn bs(s: &str) -> ByteString {
        ByteString::from(s)
    }

    fn s(x: &[u8]) -> Vec<u8> {
        let mut v = (x.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(x);
        v
    }

    fn varint(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return out;
            }
        }
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
        cat(&[&[first], &varint(body.len()), body])
    }

    fn connect3(flags: u8, payload: &[u8]) -> Vec<u8> {
        pkt(0x10, &cat(&[&s(b"MQTT"), &[4, flags, 0, 60], payload]))
    }

    fn connect5(flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
        pkt(
            0x10,
            &cat(&[
                &s(b"MQTT"),
                &[5, flags, 0, 60],
                &varint(props.len()),
                props,
                payload,
            ]),
        )
    }

    fn minimal_connect(version: ProtocolVersion) -> Vec<u8> {
        match version {
            V311 => connect3(0x02, &s(b"c1")),
            V5 => connect5(0x02, &[], &s(b"c1")),
        }
    }

    fn connected_with(version: ProtocolVersion, max: u32) -> EdgeCodec {
        let mut codec = EdgeCodec::new(max);
        let mut buf = BytesMut::from(&minimal_connect(version)[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Ok(Some(Frame::Connect(_)))
        ));
        assert!(buf.is_empty());
        assert_eq!(codec.version(), Some(version));
        codec
    }

    fn connected(version: ProtocolVersion) -> EdgeCodec {
        connected_with(version, 1 << 20)
    }

    /// Encodes with the codec's own encoder, negotiated to `version`.
    fn encode(version: ProtocolVersion, frame: Frame) -> Vec<u8> {
        let mut codec = connected(version);
        let mut buf = BytesMut::new();
        codec.encode(frame, &mut buf).unwrap();
        buf.to_vec()
    }

    /// Decodes one packet on a connection that has sent its CONNECT, requiring all bytes used.
    fn server_decode(version: ProtocolVersion, bytes: &[u8]) -> Result<Frame, CodecError> {
        let mut codec = connected(version);
        let mut buf = BytesMut::from(bytes);
        let frame = codec.decode(&mut buf)?.expect("a complete packet");
        assert!(buf.is_empty(), "bytes left after {frame:?}");
        Ok(frame)
    }

    /// Decodes a server-to-client packet the way a client would: rmqtt-codec's own decoder.
    fn client_decode(version: ProtocolVersion, bytes: &[u8]) -> Frame {
        let mut buf = BytesMut::from(bytes);
        let frame = match version {
            V311 => frame_from_v3(v3::Codec::new(0).decode(&mut buf).unwrap().unwrap().0),
            V5 => frame_from_v5(v5::Codec::new(0, 0).decode(&mut buf).unwrap().unwrap().0).unwrap(),
        };
        assert!(buf.is_empty());
        frame
    }

    fn first_error(bytes: &[u8]) -> (EdgeCodec, CodecError) {
        let mut codec = EdgeCodec::new(1 << 20);
        let mut buf = BytesMut::from(bytes);
        let err = codec
            .decode(&mut buf)
            .expect_err("the packet must be refused");
        (codec, err)
    }

    fn later_error(version: ProtocolVersion, bytes: &[u8]) -> CodecError {
        server_decode(version, bytes).expect_err("the packet must be refused")
    }

    #[track_caller]
    fn assert_refused(
        err: &CodecError,
        reason: ReasonCode,
        connack: Option<(ProtocolVersion, ReasonCode)>,
    ) {
        assert_eq!(err.disconnect_reason(), reason, "{err}");
        assert_eq!(err.connack(), connack, "{err}");
        assert!(!err.is_recoverable());
    }

    fn reply_bytes(codec: &mut EdgeCodec, err: &CodecError) -> Option<Vec<u8>> {
        let frame = err.reply()?;
        let mut buf = BytesMut::new();
        codec.encode(frame, &mut buf).unwrap();
        Some(buf.to_vec())
    }

    fn full_connect(version: ProtocolVersion) -> Connect {
        let mut c = Connect::new(version, "device-1");
        c.clean_start = false;
        c.keep_alive = 30;
        c.username = Some(bs("user"));
        c.password = Some(Bytes::from_static(b"\x00\xffpw"));
        let mut will = Will::new(
            "devices/1/status",
            Bytes::from_static(b"offline"),
            QoS::AtLeastOnce,
            true,
        );
        if version == V5 {
            will.delay_interval = 5;
            will.message_expiry = Some(60);
            will.content_type = Some(bs("text/plain"));
            will.response_topic = Some(bs("devices/1/reply"));
            will.correlation_data = Some(Bytes::from_static(b"corr"));
            will.payload_format_utf8 = true;
            will.user_properties = vec![(bs("k"), bs("v"))];
            c.session_expiry_interval = 3600;
            c.receive_maximum = 100;
            c.maximum_packet_size = Some(1 << 16);
            c.topic_alias_maximum = 10;
            c.request_problem_information = false;
            c.request_response_information = true;
            c.user_properties = vec![(bs("a"), bs("1")), (bs("a"), bs("2"))];
            c.authentication_method = Some(bs("SCRAM-SHA-1"));
            c.authentication_data = Some(Bytes::from_static(b"client-first"));
        }
        c.will = Some(will);
        c
    }

    fn full_publish(version: ProtocolVersion, qos: QoS) -> Publish {
        let mut p = Publish::new("devices/1/telemetry", Bytes::from_static(b"{\"t\":21.5}"));
        p.qos = qos;
        p.retain = true;
        p.dup = qos != QoS::AtMostOnce;
        p.packet_id = (qos != QoS::AtMostOnce).then(|| pid(7));
        if version == V5 {
            p.properties = PublishProperties {
                topic_alias: Some(pid(3)),
                message_expiry_interval: Some(120),
                payload_format_utf8: true,
                content_type: Some(bs("application/json")),
                response_topic: Some(bs("devices/1/reply")),
                correlation_data: Some(Bytes::from_static(b"\x01\x02")),
                subscription_identifiers: Vec::new(),
                user_properties: vec![(bs("x"), bs("y")), (bs("x"), bs("z"))],
            };
        }
        p
    }

    fn v5_ack(reason: ReasonCode) -> Ack {
        Ack {
            packet_id: pid(9),
            reason,
            reason_string: Some(bs("because")),
            user_properties: vec![(bs("k"), bs("v"))],
        }
    }

    fn full_subscribe(version: ProtocolVersion) -> Subscribe {
        let opts = |qos, no_local, rap, rh| {
            if version == V5 {
                SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published: rap,
                    retain_handling: rh,
                }
            } else {
                SubscriptionOptions::qos(qos)
            }
        };
        Subscribe {
            packet_id: pid(11),
            subscription_identifier: (version == V5).then(|| NonZeroU32::new(268_435_455).unwrap()),
            user_properties: if version == V5 {
                vec![(bs("u"), bs("p"))]
            } else {
                Vec::new()
            },
            filters: vec![
                (
                    bs("devices/+/telemetry"),
                    opts(QoS::AtLeastOnce, true, true, RetainHandling::SendIfNew),
                ),
                (
                    bs("devices/#"),
                    opts(QoS::ExactlyOnce, false, true, RetainHandling::DoNotSend),
                ),
                (
                    bs("$share/group/devices/+"),
                    opts(
                        QoS::AtMostOnce,
                        false,
                        false,
                        RetainHandling::SendAtSubscribe,
                    ),
                ),
            ],
        }
    }

    fn client_frames(version: ProtocolVersion) -> Vec<Frame> {
        let mut frames = vec![
            Frame::Connect(Box::new(full_connect(version))),
            Frame::Publish(full_publish(version, QoS::AtMostOnce)),
            Frame::Publish(full_publish(version, QoS::AtLeastOnce)),
            Frame::Publish(full_publish(version, QoS::ExactlyOnce)),
            Frame::Subscribe(full_subscribe(version)),
            Frame::Unsubscribe(Unsubscribe {
                packet_id: pid(12),
                user_properties: if version == V5 {
                    vec![(bs("u"), bs("p"))]
                } else {
                    Vec::new()
                },
                filters: vec![bs("devices/#"), bs("$share/group/devices/+")],
            }),
            Frame::PingReq,
        ];
        match version {
            V311 => frames.extend([
                Frame::PubAck(Ack::new(pid(1))),
                Frame::PubRec(Ack::new(pid(2))),
                Frame::PubRel(Ack::new(pid(3))),
                Frame::PubComp(Ack::new(pid(4))),
            ]),
            V5 => frames.extend([
                Frame::PubAck(v5_ack(ReasonCode::NoMatchingSubscribers)),
                Frame::PubRec(v5_ack(ReasonCode::QuotaExceeded)),
                Frame::PubRel(v5_ack(ReasonCode::PacketIdentifierNotFound)),
                Frame::PubComp(v5_ack(ReasonCode::Success)),
                Frame::Disconnect(Disconnect {
                    reason: ReasonCode::DisconnectWithWillMessage,
                    session_expiry_interval: Some(0),
                    reason_string: Some(bs("bye")),
                    server_reference: None,
                    user_properties: vec![(bs("k"), bs("v"))],
                }),
                Frame::Auth(Auth {
                    reason: ReasonCode::ContinueAuthentication,
                    method: Some(bs("SCRAM-SHA-1")),
                    data: Some(Bytes::from_static(b"client-final")),
                    reason_string: Some(bs("step 2")),
                    user_properties: vec![(bs("k"), bs("v"))],
                }),
            ]),
        }
        frames
    }

    // ---- round trips ---------------------------------------------------------------------------

    #[test]
    fn client_packets_round_trip_in_both_versions() {
        for version in [V311, V5] {
            for frame in client_frames(version) {
                let bytes = encode(version, frame.clone());
                assert_eq!(
                    server_decode(version, &bytes).unwrap(),
                    frame,
                    "{version:?}"
                );
                // The same bytes also read back through rmqtt-codec's plain decoder.
                assert_eq!(client_decode(version, &bytes), frame, "{version:?}");
            }
        }
    }

    #[test]
    fn first_connect_fixes_the_version_and_limits() {
        for version in [V311, V5] {
            let connect = full_connect(version);
            let bytes = encode(version, Frame::Connect(Box::new(connect.clone())));
            let mut codec = EdgeCodec::new(0);
            assert_eq!(codec.version(), None);
            assert_eq!(codec.max_inbound_packet(), MAX_PACKET);
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(
                codec.decode(&mut buf).unwrap(),
                Some(Frame::Connect(Box::new(connect)))
            );
            assert_eq!(codec.version(), Some(version));
            let expected = if version == V5 { 1 << 16 } else { MAX_PACKET };
            assert_eq!(codec.max_outbound_packet(), expected);
        }
    }

    #[test]
    fn v311_disconnect_decodes_from_spec_bytes() {
        assert_eq!(
            server_decode(V311, &[0xE0, 0x00]).unwrap(),
            Frame::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection))
        );
    }

    #[test]
    fn v5_zero_length_and_short_disconnect_are_accepted() {
        assert_eq!(
            server_decode(V5, &[0xE0, 0x00]).unwrap(),
            Frame::Disconnect(Disconnect::new(ReasonCode::NormalDisconnection))
        );
        assert_eq!(
            server_decode(V5, &[0xE0, 0x01, 0x04]).unwrap(),
            Frame::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage))
        );
    }

    #[test]
    fn server_packets_round_trip_through_a_client_decoder() {
        let full_connack = ConnAck {
            session_present: true,
            reason: ReasonCode::Success,
            session_expiry_interval: Some(600),
            receive_maximum: 50,
            maximum_qos: QoS::AtLeastOnce,
            retain_available: false,
            maximum_packet_size: Some(1 << 20),
            assigned_client_identifier: Some(bs("auto-123")),
            topic_alias_maximum: 16,
            reason_string: Some(bs("welcome")),
            wildcard_subscription_available: false,
            subscription_identifiers_available: false,
            shared_subscription_available: false,
            server_keep_alive: Some(120),
            response_information: Some(bs("replies/")),
            server_reference: None,
            authentication_method: Some(bs("SCRAM-SHA-1")),
            authentication_data: Some(Bytes::from_static(b"server-final")),
            user_properties: vec![(bs("k"), bs("v"))],
        };
        let mut outbound = full_publish(V5, QoS::AtLeastOnce);
        outbound.properties.subscription_identifiers = vec![
            NonZeroU32::new(1).unwrap(),
            NonZeroU32::new(300_000).unwrap(),
        ];
        let v5_frames = vec![
            Frame::ConnAck(Box::new(full_connack)),
            Frame::ConnAck(Box::new(ConnAck::refused(ReasonCode::Banned))),
            Frame::Publish(outbound),
            Frame::PubAck(v5_ack(ReasonCode::NotAuthorized)),
            Frame::PubRec(v5_ack(ReasonCode::PayloadFormatInvalid)),
            Frame::PubRel(v5_ack(ReasonCode::Success)),
            Frame::PubComp(v5_ack(ReasonCode::PacketIdentifierNotFound)),
            Frame::SubAck(SubAck {
                packet_id: pid(11),
                reason_codes: vec![
                    ReasonCode::GrantedQoS0,
                    ReasonCode::GrantedQoS1,
                    ReasonCode::GrantedQoS2,
                    ReasonCode::NotAuthorized,
                    ReasonCode::SharedSubscriptionsNotSupported,
                ],
                reason_string: Some(bs("partly")),
                user_properties: vec![(bs("k"), bs("v"))],
            }),
            Frame::UnsubAck(UnsubAck {
                packet_id: pid(12),
                reason_codes: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
                reason_string: None,
                user_properties: Vec::new(),
            }),
            Frame::PingResp,
            Frame::Disconnect(Disconnect {
                reason: ReasonCode::UseAnotherServer,
                session_expiry_interval: None,
                reason_string: Some(bs("moving")),
                server_reference: Some(bs("other:1883")),
                user_properties: Vec::new(),
            }),
            Frame::Auth(Auth {
                reason: ReasonCode::Success,
                method: Some(bs("SCRAM-SHA-1")),
                data: None,
                reason_string: None,
                user_properties: Vec::new(),
            }),
        ];
        for frame in v5_frames {
            let bytes = encode(V5, frame.clone());
            assert_eq!(client_decode(V5, &bytes), frame);
        }

        // On 3.1.1 properties and reason codes it lacks are left out.
        let cases: Vec<(Frame, Frame)> = vec![
            (
                Frame::ConnAck(Box::new(ConnAck::accepted(true))),
                Frame::ConnAck(Box::new(ConnAck::accepted(true))),
            ),
            (
                Frame::ConnAck(Box::new(ConnAck {
                    session_present: true,
                    ..ConnAck::refused(ReasonCode::BadUserNameOrPassword)
                })),
                Frame::ConnAck(Box::new(ConnAck::refused(
                    ReasonCode::BadUserNameOrPassword,
                ))),
            ),
            (
                Frame::Publish(full_publish(V5, QoS::ExactlyOnce)),
                Frame::Publish(Publish {
                    properties: PublishProperties::default(),
                    ..full_publish(V5, QoS::ExactlyOnce)
                }),
            ),
            (
                Frame::PubAck(Ack {
                    reason_string: Some(bs("x")),
                    ..Ack::new(pid(1))
                }),
                Frame::PubAck(Ack::new(pid(1))),
            ),
            (
                Frame::PubRec(Ack::new(pid(2))),
                Frame::PubRec(Ack::new(pid(2))),
            ),
            (
                Frame::PubRel(Ack::new(pid(3))),
                Frame::PubRel(Ack::new(pid(3))),
            ),
            (
                Frame::PubComp(Ack::new(pid(4))),
                Frame::PubComp(Ack::new(pid(4))),
            ),
            (
                Frame::SubAck(SubAck {
                    packet_id: pid(5),
                    reason_codes: vec![
                        ReasonCode::GrantedQoS2,
                        ReasonCode::NotAuthorized,
                        ReasonCode::GrantedQoS0,
                    ],
                    reason_string: Some(bs("dropped on 3.1.1")),
                    user_properties: Vec::new(),
                }),
                Frame::SubAck(SubAck {
                    packet_id: pid(5),
                    reason_codes: vec![
                        ReasonCode::GrantedQoS2,
                        ReasonCode::UnspecifiedError,
                        ReasonCode::GrantedQoS0,
                    ],
                    reason_string: None,
                    user_properties: Vec::new(),
                }),
            ),
            (
                Frame::UnsubAck(UnsubAck {
                    packet_id: pid(6),
                    reason_codes: vec![ReasonCode::NoSubscriptionExisted],
                    reason_string: None,
                    user_properties: Vec::new(),
                }),
                Frame::UnsubAck(UnsubAck {
                    packet_id: pid(6),
                    reason_codes: Vec::new(),
                    reason_string: None,
                    user_properties: Vec::new(),
                }),
            ),
            (Frame::PingResp, Frame::PingResp),
        ];
        for (sent, expected) in cases {
            let bytes = encode(V311, sent);
            assert_eq!(client_decode(V311, &bytes), expected);
        }
    }

    #[test]
    fn connect_matches_spec_examples() {
        // MQTT 3.1.1 Figure 3.6 variable header (flags 0xCE, keep alive 10) and its payload.
        let v311 = connect3(0xCE, &[]);
        let v311 = {
            let mut body = v311[2..].to_vec();
            body[9] = 10;
            body[8] = 0;
            body.extend(cat(&[
                &s(b"cid"),
                &s(b"a/b"),
                &s(b"hi"),
                &s(b"user"),
                &s(b"pw"),
            ]));
            pkt(0x10, &body)
        };
        assert_eq!(&v311[..12], b"\x10\x22\x00\x04MQTT\x04\xCE\x00\x0A");
        let mut expected = Connect::new(V311, "cid");
        expected.keep_alive = 10;
        expected.username = Some(bs("user"));
        expected.password = Some(Bytes::from_static(b"pw"));
        expected.will = Some(Will::new(
            "a/b",
            Bytes::from_static(b"hi"),
            QoS::AtLeastOnce,
            false,
        ));
        let (frame, bytes) = (Frame::Connect(Box::new(expected)), v311);
        let mut codec = EdgeCodec::new(1024);
        assert_eq!(
            codec.decode(&mut BytesMut::from(&bytes[..])).unwrap(),
            Some(frame.clone())
        );
        assert_eq!(encode(V311, frame), bytes);

        // MQTT 5 Figure 3-8 variable header: flags 0xCE, keep alive 10, Session Expiry 10.
        let v5 = pkt(
            0x10,
            &cat(&[
                b"\x00\x04MQTT\x05\xCE\x00\x0A\x05\x11\x00\x00\x00\x0A",
                &s(b"cid"),
                &[0],
                &s(b"a/b"),
                &s(b"hi"),
                &s(b"user"),
                &s(b"pw"),
            ]),
        );
        assert_eq!(v5[1], 0x29);
        let mut expected = Connect::new(V5, "cid");
        expected.keep_alive = 10;
        expected.session_expiry_interval = 10;
        expected.username = Some(bs("user"));
        expected.password = Some(Bytes::from_static(b"pw"));
        expected.will = Some(Will::new(
            "a/b",
            Bytes::from_static(b"hi"),
            QoS::AtLeastOnce,
            false,
        ));
        let frame = Frame::Connect(Box::new(expected));
        let mut codec = EdgeCodec::new(1024);
        assert_eq!(
            codec.decode(&mut BytesMut::from(&v5[..])).unwrap(),
            Some(frame.clone())
        );
        assert_eq!(encode(V5, frame), v5);
    }

    // ---- CONNECT rejections --------------------------------------------------------------------

    #[test]
    fn unsupported_protocol_levels_get_the_right_connack() {
        let mqisdp = pkt(0x10, &cat(&[&s(b"MQIsdp"), &[3, 0x02, 0, 60], &s(b"c")]));
        let (mut codec, err) = first_error(&mqisdp);
        assert_refused(
            &err,
            ReasonCode::UnsupportedProtocolVersion,
            Some((V311, ReasonCode::UnsupportedProtocolVersion)),
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x02, 0x00, 0x01]
        );

        let level3 = pkt(0x10, &cat(&[&s(b"MQTT"), &[3, 0x02, 0, 60], &s(b"c")]));
        let (mut codec, err) = first_error(&level3);
        assert_eq!(
            err.connack(),
            Some((V311, ReasonCode::UnsupportedProtocolVersion))
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x02, 0x00, 0x01]
        );

        let level6 = pkt(0x10, &cat(&[&s(b"MQTT"), &[6, 0x02, 0, 60, 0], &s(b"c")]));
        let (mut codec, err) = first_error(&level6);
        assert_refused(
            &err,
            ReasonCode::UnsupportedProtocolVersion,
            Some((V5, ReasonCode::UnsupportedProtocolVersion)),
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x03, 0x00, 0x84, 0x00]
        );
    }

    #[test]
    fn wrong_protocol_name_or_first_packet_closes_silently() {
        let (_, err) = first_error(&pkt(
            0x10,
            &cat(&[&s(b"MQTX"), &[4, 0x02, 0, 60], &s(b"c")]),
        ));
        assert_refused(&err, ReasonCode::ProtocolError, None);
        assert_eq!(err.version(), None);
        assert!(err.reply().is_none());

        for first in [
            vec![0xC0, 0x00],
            pkt(0x30, &cat(&[&s(b"t"), b"x"])),
            vec![0x20, 0x02, 0x00, 0x00],
        ] {
            let (_, err) = first_error(&first);
            assert_refused(&err, ReasonCode::ProtocolError, None);
            assert!(err.reply().is_none());
        }
        let (_, err) = first_error(&pkt(0x10, &[0x00]));
        assert_refused(&err, ReasonCode::MalformedPacket, None);
    }

    #[test]
    fn client_identifier_rejections() {
        // An empty id without clean session: 3.1.1 return code 0x02 (MQTT-3.1.3-8/9).
        let (mut codec, err) = first_error(&connect3(0x00, &s(b"")));
        assert_refused(
            &err,
            ReasonCode::ClientIdentifierNotValid,
            Some((V311, ReasonCode::ClientIdentifierNotValid)),
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x02, 0x00, 0x02]
        );

        let (mut codec, err) = first_error(&connect5(0x02, &[], &s(b"dev\x01ice")));
        assert_refused(
            &err,
            ReasonCode::ClientIdentifierNotValid,
            Some((V5, ReasonCode::ClientIdentifierNotValid)),
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x03, 0x00, 0x85, 0x00]
        );

        let (_, err) = first_error(&connect3(0x02, &s(b"dev\x1bice")));
        assert_refused(
            &err,
            ReasonCode::ClientIdentifierNotValid,
            Some((V311, ReasonCode::ClientIdentifierNotValid)),
        );

        // U+0000 is a malformed string: 3.1.1 closes without CONNACK, v5 may say 0x81.
        let (_, err) = first_error(&connect3(0x02, &s(b"a\0b")));
        assert_refused(&err, ReasonCode::MalformedPacket, None);
        let (mut codec, err) = first_error(&connect5(0x02, &[], &s(b"a\0b")));
        assert_refused(
            &err,
            ReasonCode::MalformedPacket,
            Some((V5, ReasonCode::MalformedPacket)),
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x03, 0x00, 0x81, 0x00]
        );

        // Invalid UTF-8 (caught by rmqtt-codec) is malformed too.
        let (_, err) = first_error(&connect5(0x02, &[], &s(b"\xff")));
        assert_refused(
            &err,
            ReasonCode::MalformedPacket,
            Some((V5, ReasonCode::MalformedPacket)),
        );
    }

    #[test]
    fn connect_flag_rejections() {
        for version in [V311, V5] {
            let build = |flags: u8, payload: &[u8]| match version {
                V311 => connect3(flags, payload),
                V5 => connect5(flags, &[], payload),
            };
            let connack = |r| (version == V5).then_some((V5, r));
            let will = |topic: &[u8]| {
                let props: &[u8] = if version == V5 { &[0] } else { &[] };
                cat(&[&s(b"c"), props, &s(topic), &s(b"m")])
            };
            // Reserved flag (MQTT-3.1.2-3).
            let (_, err) = first_error(&build(0x03, &s(b"c")));
            assert_refused(
                &err,
                ReasonCode::MalformedPacket,
                connack(ReasonCode::MalformedPacket),
            );
            // Will Retain or Will QoS without the Will Flag (MQTT-3.1.2-11/13/15).
            for flags in [0x22, 0x0A, 0x12] {
                let (_, err) = first_error(&build(flags, &s(b"c")));
                assert_refused(
                    &err,
                    ReasonCode::MalformedPacket,
                    connack(ReasonCode::MalformedPacket),
                );
            }
            // Will QoS 3.
            let (_, err) = first_error(&build(0x1E, &will(b"a")));
            assert_refused(
                &err,
                ReasonCode::MalformedPacket,
                connack(ReasonCode::MalformedPacket),
            );
            // Will topic: empty, wildcards, U+0000 (MQTT-3.1.3-11).
            for topic in [&b""[..], b"a/+", b"a/#", b"#"] {
                let (_, err) = first_error(&build(0x06, &will(topic)));
                assert_refused(
                    &err,
                    ReasonCode::TopicNameInvalid,
                    connack(ReasonCode::TopicNameInvalid),
                );
            }
            let (_, err) = first_error(&build(0x06, &will(b"a\0b")));
            assert_refused(
                &err,
                ReasonCode::MalformedPacket,
                connack(ReasonCode::MalformedPacket),
            );
            // User name with U+0000.
            let (_, err) = first_error(&build(0x82, &cat(&[&s(b"c"), &s(b"u\0")])));
            assert_refused(
                &err,
                ReasonCode::MalformedPacket,
                connack(ReasonCode::MalformedPacket),
            );
            // Trailing bytes after the payload.
            let (_, err) = first_error(&build(0x02, &cat(&[&s(b"c"), b"\x00"])));
            assert_refused(
                &err,
                ReasonCode::MalformedPacket,
                connack(ReasonCode::MalformedPacket),
            );
            // Truncated payload.
            let (_, err) = first_error(&build(0x82, &s(b"c")));
            assert_refused(
                &err,
                ReasonCode::MalformedPacket,
                connack(ReasonCode::MalformedPacket),
            );
        }
        // Password without user name: malformed on 3.1.1 (MQTT-3.1.2-22), allowed on 5.
        let (_, err) = first_error(&connect3(0x42, &cat(&[&s(b"c"), &s(b"p")])));
        assert_refused(&err, ReasonCode::MalformedPacket, None);
        let mut codec = EdgeCodec::new(1024);
        let frame = codec
            .decode(&mut BytesMut::from(
                &connect5(0x42, &[], &cat(&[&s(b"c"), &s(b"p")]))[..],
            ))
            .unwrap();
        let Some(Frame::Connect(c)) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(
            (c.username, c.password),
            (None, Some(Bytes::from_static(b"p")))
        );
    }

    #[test]
    fn connect_property_rejections() {
        // Authentication Data without Authentication Method.
        let (_, err) = first_error(&connect5(0x02, &cat(&[&[0x16], &s(b"x")]), &s(b"c")));
        assert_refused(
            &err,
            ReasonCode::ProtocolError,
            Some((V5, ReasonCode::ProtocolError)),
        );
        // Duplicate property (rmqtt-codec).
        let (_, err) = first_error(&connect5(0x02, &[0x21, 0, 1, 0x21, 0, 2], &s(b"c")));
        assert_refused(
            &err,
            ReasonCode::MalformedPacket,
            Some((V5, ReasonCode::MalformedPacket)),
        );
        // Receive Maximum 0 (rmqtt-codec).
        let (_, err) = first_error(&connect5(0x02, &[0x21, 0, 0], &s(b"c")));
        assert_refused(
            &err,
            ReasonCode::MalformedPacket,
            Some((V5, ReasonCode::MalformedPacket)),
        );
        // User property with U+0000.
        let (_, err) = first_error(&connect5(
            0x02,
            &cat(&[&[0x26], &s(b"k"), &s(b"v\0")]),
            &s(b"c"),
        ));
        assert_refused(
            &err,
            ReasonCode::MalformedPacket,
            Some((V5, ReasonCode::MalformedPacket)),
        );
        // Will with Payload Format Indicator 1 and a non-UTF-8 payload.
        let payload = cat(&[&s(b"c"), &[2, 0x01, 0x01], &s(b"t"), &s(b"\xff\xfe")]);
        let (_, err) = first_error(&connect5(0x06, &[], &payload));
        assert_refused(
            &err,
            ReasonCode::PayloadFormatInvalid,
            Some((V5, ReasonCode::PayloadFormatInvalid)),
        );
    }

    #[test]
    fn second_connect_is_decoded_for_the_connection_to_reject() {
        for version in [V311, V5] {
            assert!(matches!(
                server_decode(version, &minimal_connect(version)),
                Ok(Frame::Connect(_))
            ));
        }
        // A second CONNECT of the other version is decoded too; the session's version stays.
        let mut codec = connected(V311);
        let frame = codec
            .decode(&mut BytesMut::from(&minimal_connect(V5)[..]))
            .unwrap();
        assert!(matches!(frame, Some(Frame::Connect(c)) if c.version == V5));
        assert_eq!(codec.version(), Some(V311));
        // A broken second CONNECT earns no CONNACK: one was sent already.
        let err = later_error(V5, &connect5(0x03, &[], &s(b"c")));
        assert_refused(&err, ReasonCode::MalformedPacket, None);
        assert_eq!(
            err.reply(),
            Some(Frame::Disconnect(Disconnect::new(
                ReasonCode::MalformedPacket
            )))
        );
    }

    // ---- other rejections ----------------------------------------------------------------------

    fn publish_bytes(version: ProtocolVersion, first: u8, topic: &[u8], props: &[u8]) -> Vec<u8> {
        let id: &[u8] = if (first >> 1) & 3 != 0 { &[0, 1] } else { &[] };
        let props = if version == V5 {
            cat(&[&varint(props.len()), props])
        } else {
            Vec::new()
        };
        pkt(first, &cat(&[&s(topic), id, &props, b"payload"]))
    }

    #[test]
    fn publish_topic_rejections() {
        for version in [V311, V5] {
            for topic in [&b"a/+"[..], b"a/#", b"+", b"#", b"a+b"] {
                assert_refused(
                    &later_error(version, &publish_bytes(version, 0x30, topic, &[])),
                    ReasonCode::TopicNameInvalid,
                    None,
                );
            }
            assert_refused(
                &later_error(version, &publish_bytes(version, 0x32, b"a\0b", &[])),
                ReasonCode::MalformedPacket,
                None,
            );
            assert_refused(
                &later_error(version, &publish_bytes(version, 0x30, b"\xc3\x28", &[])),
                ReasonCode::MalformedPacket,
                None,
            );
        }
        // An empty topic is malformed on 3.1.1 and valid on 5 only with a Topic Alias (3.3.2.1).
        assert_refused(
            &later_error(V311, &publish_bytes(V311, 0x30, b"", &[])),
            ReasonCode::MalformedPacket,
            None,
        );
        assert_refused(
            &later_error(V5, &publish_bytes(V5, 0x30, b"", &[])),
            ReasonCode::ProtocolError,
            None,
        );
        let frame = server_decode(V5, &publish_bytes(V5, 0x30, b"", &[0x23, 0, 5])).unwrap();
        assert!(
            matches!(frame, Frame::Publish(p) if p.topic.is_empty() && p.properties.topic_alias == Some(pid(5)))
        );
    }

    #[test]
    fn publish_header_and_property_rejections() {
        for version in [V311, V5] {
            // QoS 3 is refused from the first two bytes, before the body arrives.
            let mut codec = connected(version);
            let mut buf = BytesMut::from(&[0x36u8, 0x10][..]);
            assert_refused(
                &codec.decode(&mut buf).unwrap_err(),
                ReasonCode::MalformedPacket,
                None,
            );
            // DUP with QoS 0 (MQTT-3.3.1-2).
            assert_refused(
                &later_error(version, &publish_bytes(version, 0x38, b"t", &[])),
                ReasonCode::MalformedPacket,
                None,
            );
            // Packet identifier 0.
            let zero_id = pkt(
                0x32,
                &cat(&[&s(b"t"), &[0, 0], if version == V5 { &[0] } else { &[] }]),
            );
            assert_refused(
                &later_error(version, &zero_id),
                ReasonCode::MalformedPacket,
                None,
            );
        }
        let cases: [(&str, &[u8], ReasonCode); 6] = [
            (
                "Subscription Identifier from a client",
                &[0x0B, 0x01],
                ReasonCode::ProtocolError,
            ),
            (
                "non-UTF-8 payload marked UTF-8",
                &[0x01, 0x01],
                ReasonCode::PayloadFormatInvalid,
            ),
            (
                "U+0000 in a user property",
                &[0x26, 0, 1, b'k', 0, 1, 0],
                ReasonCode::MalformedPacket,
            ),
            (
                "wildcard Response Topic",
                &[0x08, 0, 3, b'a', b'/', b'#'],
                ReasonCode::TopicNameInvalid,
            ),
            (
                "U+0000 in Content Type",
                &[0x03, 0, 1, 0],
                ReasonCode::MalformedPacket,
            ),
            (
                "Topic Alias 0",
                &[0x23, 0, 0],
                ReasonCode::TopicAliasInvalid,
            ),
        ];
        for (what, props, reason) in cases {
            let mut bytes = publish_bytes(V5, 0x30, b"t", props);
            if reason == ReasonCode::PayloadFormatInvalid {
                // The last payload byte becomes one that no UTF-8 sequence contains.
                let n = bytes.len();
                bytes[n - 1] = 0xFF;
            }
            let err = later_error(V5, &bytes);
            assert_eq!(err.disconnect_reason(), reason, "{what}");
        }
        // The same Payload Format Indicator over a UTF-8 payload is accepted, U+0000 included.
        assert!(server_decode(V5, &publish_bytes(V5, 0x30, b"t", &[0x01, 0x01])).is_ok());
        let mut with_nul = publish_bytes(V5, 0x30, b"t", &[0x01, 0x01]);
        let n = with_nul.len();
        with_nul[n - 1] = 0;
        assert!(server_decode(V5, &with_nul).is_ok());
    }

    #[test]
    fn a_zero_subscription_identifier_is_a_protocol_error() {
        // SUBSCRIBE, packet id 1, properties: Subscription Identifier 0, filter "a", QoS 1.
        let bytes = [0x82, 8, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 1];
        let err = later_error(V5, &bytes);
        assert_eq!(err.disconnect_reason(), ReasonCode::ProtocolError);
    }

    #[test]
    fn topic_filter_syntax() {
        for ok in [
            "#",
            "+",
            "a",
            "a/b",
            "a/+/b",
            "a/#",
            "+/+",
            "/",
            "//",
            "+/#",
            "$SYS/#",
            "$share",
            "$share/g/a",
            "$share/g/#",
            "$share/g//",
        ] {
            assert!(check_topic_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(check_topic_filter("$share/g/a/+"), Ok(true));
        assert_eq!(check_topic_filter("a/+"), Ok(false));
        for bad in [
            "",
            "a#",
            "a/#/b",
            "#/a",
            "a+",
            "+a",
            "a/b+/c",
            "$share/g",
            "$share//a",
            "$share/g/",
            "$share/+/a",
            "$share/g#/a",
            "$share/",
        ] {
            assert_eq!(
                check_topic_filter(bad).map_err(|e| e.0),
                Err(ReasonCode::TopicFilterInvalid),
                "{bad}"
            );
        }
        assert_eq!(
            check_topic_filter("a\0").map_err(|e| e.0),
            Err(ReasonCode::MalformedPacket)
        );
    }

    fn subscribe_bytes(version: ProtocolVersion, first: u8, filters: &[(&[u8], u8)]) -> Vec<u8> {
        let mut body = vec![0, 1];
        if version == V5 {
            body.push(0);
        }
        for (f, o) in filters {
            body.extend(s(f));
            body.push(*o);
        }
        pkt(first, &body)
    }

    fn unsubscribe_bytes(version: ProtocolVersion, first: u8, filters: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![0, 1];
        if version == V5 {
            body.push(0);
        }
        for f in filters {
            body.extend(s(f));
        }
        pkt(first, &body)
    }

    #[test]
    fn subscribe_and_unsubscribe_rejections() {
        for version in [V311, V5] {
            for bad in [&b""[..], b"a/#/b", b"a+", b"$share/g", b"$share//x"] {
                assert_refused(
                    &later_error(
                        version,
                        &subscribe_bytes(version, 0x82, &[(b"ok", 0), (bad, 1)]),
                    ),
                    ReasonCode::TopicFilterInvalid,
                    None,
                );
                assert_refused(
                    &later_error(version, &unsubscribe_bytes(version, 0xA2, &[bad])),
                    ReasonCode::TopicFilterInvalid,
                    None,
                );
            }
            assert_refused(
                &later_error(version, &subscribe_bytes(version, 0x82, &[(b"a\0", 0)])),
                ReasonCode::MalformedPacket,
                None,
            );
            assert_refused(
                &later_error(version, &unsubscribe_bytes(version, 0xA2, &[b"a\0"])),
                ReasonCode::MalformedPacket,
                None,
            );
            // No filters (MQTT-3.8.3-3, MQTT-3.10.3-2).
            assert_refused(
                &later_error(version, &subscribe_bytes(version, 0x82, &[])),
                ReasonCode::ProtocolError,
                None,
            );
            assert_refused(
                &later_error(version, &unsubscribe_bytes(version, 0xA2, &[])),
                ReasonCode::ProtocolError,
                None,
            );
            // Reserved fixed header flags (MQTT-3.8.1-1, MQTT-3.10.1-1).
            assert_refused(
                &later_error(version, &subscribe_bytes(version, 0x80, &[(b"a", 0)])),
                ReasonCode::MalformedPacket,
                None,
            );
            assert_refused(
                &later_error(version, &unsubscribe_bytes(version, 0xA0, &[b"a"])),
                ReasonCode::MalformedPacket,
                None,
            );
            // QoS 3 and reserved option bits.
            for options in [0x03, 0xC0, 0x40] {
                assert_refused(
                    &later_error(version, &subscribe_bytes(version, 0x82, &[(b"a", options)])),
                    ReasonCode::MalformedPacket,
                    None,
                );
            }
            // Packet identifier 0.
            let mut zero = subscribe_bytes(version, 0x82, &[(b"a", 0)]);
            zero[3] = 0;
            assert_refused(
                &later_error(version, &zero),
                ReasonCode::MalformedPacket,
                None,
            );
            let mut zero = unsubscribe_bytes(version, 0xA2, &[b"a"]);
            zero[3] = 0;
            assert_refused(
                &later_error(version, &zero),
                ReasonCode::MalformedPacket,
                None,
            );
        }
        // Options only MQTT 5 has are reserved bits on 3.1.1 (MQTT-3.8.3-4).
        for options in [0x04, 0x08, 0x10] {
            assert_refused(
                &later_error(V311, &subscribe_bytes(V311, 0x82, &[(b"a", options)])),
                ReasonCode::MalformedPacket,
                None,
            );
            assert!(server_decode(V5, &subscribe_bytes(V5, 0x82, &[(b"a", options)])).is_ok());
        }
        // Retain Handling 3 and No Local on a shared subscription (MQTT-3.8.3-4).
        assert_refused(
            &later_error(V5, &subscribe_bytes(V5, 0x82, &[(b"a", 0x30)])),
            ReasonCode::MalformedPacket,
            None,
        );
        assert_refused(
            &later_error(V5, &subscribe_bytes(V5, 0x82, &[(b"$share/g/a", 0x04)])),
            ReasonCode::ProtocolError,
            None,
        );
    }

    #[test]
    fn fixed_header_rejections() {
        for version in [V311, V5] {
            let malformed: [(&str, &[u8]); 9] = [
                (
                    "PUBREL without its 0b0010 flags (MQTT-3.6.1-1)",
                    &[0x60, 0x02, 0x00, 0x01],
                ),
                ("PUBREL with a wrong flag", &[0x63, 0x02, 0x00, 0x01]),
                ("PUBACK with a flag", &[0x41, 0x02, 0x00, 0x01]),
                ("PINGREQ with a flag", &[0xC1, 0x00]),
                ("PINGREQ with a body", &[0xC0, 0x01, 0x00]),
                ("DISCONNECT with a flag", &[0xE2, 0x00]),
                ("reserved type 0", &[0x00, 0x00]),
                ("remaining length not minimal", &[0xC0, 0x80, 0x00]),
                (
                    "remaining length of five bytes",
                    &[0x30, 0xFF, 0xFF, 0xFF, 0xFF],
                ),
            ];
            for (what, bytes) in malformed {
                let err = later_error(version, bytes);
                assert_eq!(
                    err.disconnect_reason(),
                    ReasonCode::MalformedPacket,
                    "{what}"
                );
            }
            // Packets only a server sends.
            for bytes in [
                &[0x20u8, 0x02, 0x00, 0x00][..],
                &[0x90, 0x03, 0x00, 0x01, 0x00],
                &[0xB0, 0x02, 0x00, 0x01],
                &[0xD0, 0x00],
            ] {
                assert_refused(
                    &later_error(version, bytes),
                    ReasonCode::ProtocolError,
                    None,
                );
            }
            // An ack with packet identifier 0 is malformed in both versions.
            assert_refused(
                &later_error(version, &[0x40, 0x02, 0x00, 0x00]),
                ReasonCode::MalformedPacket,
                None,
            );
        }
        // 3.1.1 acks, DISCONNECT and AUTH have fixed shapes; an unknown v5 reason is malformed.
        assert_refused(
            &later_error(V311, &[0x40, 0x03, 0x00, 0x01, 0x00]),
            ReasonCode::MalformedPacket,
            None,
        );
        assert_refused(
            &later_error(V311, &[0xE0, 0x01, 0x00]),
            ReasonCode::MalformedPacket,
            None,
        );
        assert_refused(
            &later_error(V311, &[0xF0, 0x00]),
            ReasonCode::MalformedPacket,
            None,
        );
        assert_refused(
            &later_error(V5, &[0xE0, 0x01, 0x05]),
            ReasonCode::MalformedPacket,
            None,
        );
    }

    #[test]
    fn replies_after_connect_follow_the_version() {
        let err = later_error(V5, &publish_bytes(V5, 0x30, b"a/#", &[]));
        assert_eq!(err.version(), Some(V5));
        assert_eq!(
            err.reply(),
            Some(Frame::Disconnect(Disconnect::new(
                ReasonCode::TopicNameInvalid
            )))
        );
        let err = later_error(V311, &publish_bytes(V311, 0x30, b"a/#", &[]));
        assert_eq!(err.version(), Some(V311));
        assert_eq!(err.reply(), None);
    }

    #[test]
    fn decoder_refuses_to_continue_after_an_error() {
        let mut codec = connected(V5);
        assert!(codec
            .decode(&mut BytesMut::from(&[0xC1u8, 0x00][..]))
            .is_err());
        assert!(codec
            .decode(&mut BytesMut::from(&[0xC0u8, 0x00][..]))
            .is_err());
    }

    // ---- sizes ---------------------------------------------------------------------------------

    #[test]
    fn oversized_packet_is_refused_with_only_the_header_buffered() {
        for version in [V311, V5] {
            let mut codec = connected_with(version, 1024);
            let mut buf = BytesMut::with_capacity(16);
            buf.extend_from_slice(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]);
            let err = codec.decode(&mut buf).unwrap_err();
            assert!(
                matches!(
                    err,
                    CodecError::InboundTooLarge {
                        size: 268_435_460,
                        max: 1024,
                        ..
                    }
                ),
                "{err}"
            );
            assert_refused(&err, ReasonCode::PacketTooLarge, None);
            assert_eq!(buf.len(), 5);
            assert!(
                buf.capacity() < 1024,
                "the body must not have been reserved"
            );

            // The limit counts the whole packet: 1021 + 3 header bytes fit, 1022 do not.
            let mut codec = connected_with(version, 1024);
            let props: &[u8] = if version == V5 { &[0] } else { &[] };
            let mut body = cat(&[&s(b"t"), props]);
            body.resize(1021, b'x');
            assert_eq!(body.len(), 1021);
            assert!(matches!(
                codec.decode(&mut BytesMut::from(&pkt(0x30, &body)[..])),
                Ok(Some(Frame::Publish(_)))
            ));
            let mut codec = connected_with(version, 1024);
            let err = codec
                .decode(&mut BytesMut::from(&pkt(0x30, &cat(&[&body, b"x"]))[..3]))
                .unwrap_err();
            assert!(matches!(
                err,
                CodecError::InboundTooLarge { size: 1025, .. }
            ));
        }
        // An oversized first v5 CONNECT may be answered with CONNACK 0x95.
        let mut codec = EdgeCodec::new(64);
        let big = connect5(0x02, &[], &s(&[b'c'; 100]));
        let err = codec.decode(&mut BytesMut::from(&big[..12])).unwrap_err();
        assert_refused(
            &err,
            ReasonCode::PacketTooLarge,
            Some((V5, ReasonCode::PacketTooLarge)),
        );
        assert_eq!(
            reply_bytes(&mut codec, &err).unwrap(),
            [0x20, 0x03, 0x00, 0x95, 0x00]
        );
        let mut codec = EdgeCodec::new(64);
        let err = codec
            .decode(&mut BytesMut::from(&connect3(0x02, &s(&[b'c'; 100]))[..]))
            .unwrap_err();
        assert_refused(&err, ReasonCode::PacketTooLarge, None);
    }

    #[test]
    fn a_large_announced_packet_is_not_reserved_up_front() {
        let mut codec = connected_with(V5, 8 << 20);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&pkt(0x30, &vec![0u8; 4 << 20])[..16]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 16);
        assert!(
            buf.capacity() <= 2 * RESERVE_AHEAD,
            "capacity {}",
            buf.capacity()
        );
    }

    #[test]
    fn publish_size_is_exact() {
        for version in [V311, V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for payload_len in [0usize, 1, 100, 127, 16_000, 70_000] {
                    let mut p = full_publish(version, qos);
                    p.payload = Bytes::from(vec![b'a'; payload_len]);
                    if version == V5 {
                        p.properties.subscription_identifiers =
                            vec![NonZeroU32::new(200).unwrap(), NonZeroU32::new(1).unwrap()];
                    }
                    let size = publish_packet_size(&p, version);
                    let bytes = encode(version, Frame::Publish(p.clone()));
                    assert_eq!(size, bytes.len() as u64);

                    let mut codec = connected(version);
                    codec.set_max_outbound_packet(size as u32);
                    let mut buf = BytesMut::new();
                    codec.encode(Frame::Publish(p.clone()), &mut buf).unwrap();
                    codec.set_max_outbound_packet(size as u32 - 1);
                    let mut buf = BytesMut::new();
                    let err = codec.encode(Frame::Publish(p), &mut buf).unwrap_err();
                    assert!(
                        matches!(err, CodecError::OutboundTooLarge { .. }) && err.is_recoverable()
                    );
                    assert!(buf.is_empty());
                }
            }
        }
    }

    #[test]
    fn client_maximum_packet_size_drops_messages_not_the_stream() {
        let mut codec = EdgeCodec::new(1024);
        let mut buf = BytesMut::from(&connect5(0x02, &[0x27, 0, 0, 0, 64], &s(b"c"))[..]);
        codec.decode(&mut buf).unwrap();
        assert_eq!(codec.max_outbound_packet(), 64);

        let mut out = BytesMut::from(&b"earlier"[..]);
        let err = codec
            .encode(Frame::Publish(Publish::new("t", vec![0u8; 100])), &mut out)
            .unwrap_err();
        assert!(matches!(err, CodecError::OutboundTooLarge { max: 64, .. }));
        assert_eq!(&out[..], b"earlier");
        assert_eq!(err.disconnect_reason(), ReasonCode::PacketTooLarge);

        // A reason string that does not fit is dropped rather than the ack (MQTT-3.4.2-2).
        let ack = Ack {
            reason_string: Some(bs(&"r".repeat(200))),
            ..Ack::with_reason(pid(1), ReasonCode::QuotaExceeded)
        };
        let mut out = BytesMut::new();
        codec.encode(Frame::PubAck(ack), &mut out).unwrap();
        assert_eq!(
            client_decode(V5, &out),
            Frame::PubAck(Ack::with_reason(pid(1), ReasonCode::QuotaExceeded))
        );

        // The stream is intact: a small message still goes out.
        let mut out = BytesMut::new();
        codec
            .encode(Frame::Publish(Publish::new("t", "small")), &mut out)
            .unwrap();
        assert_eq!(
            client_decode(V5, &out),
            Frame::Publish(Publish::new("t", "small"))
        );

        // A SUBACK with more codes than fit cannot be shortened.
        let suback = SubAck {
            packet_id: pid(1),
            reason_codes: vec![ReasonCode::GrantedQoS0; 100],
            reason_string: None,
            user_properties: Vec::new(),
        };
        assert!(matches!(
            codec.encode(Frame::SubAck(suback), &mut BytesMut::new()),
            Err(CodecError::OutboundTooLarge { .. })
        ));
    }

    #[test]
    fn request_problem_information_zero_strips_diagnostics() {
        let mut codec = EdgeCodec::new(1024);
        codec
            .decode(&mut BytesMut::from(
                &connect5(0x02, &[0x17, 0], &s(b"c"))[..],
            ))
            .unwrap();
        let mut out = BytesMut::new();
        codec
            .encode(Frame::PubAck(v5_ack(ReasonCode::NotAuthorized)), &mut out)
            .unwrap();
        assert_eq!(
            client_decode(V5, &out),
            Frame::PubAck(Ack::with_reason(pid(9), ReasonCode::NotAuthorized))
        );
        // DISCONNECT, CONNACK and PUBLISH keep theirs (MQTT-3.1.2-29).
        let disconnect = Disconnect {
            reason_string: Some(bs("why")),
            ..Disconnect::new(ReasonCode::ServerShuttingDown)
        };
        let mut out = BytesMut::new();
        codec
            .encode(Frame::Disconnect(disconnect.clone()), &mut out)
            .unwrap();
        assert_eq!(client_decode(V5, &out), Frame::Disconnect(disconnect));
    }

    // ---- what cannot be encoded ----------------------------------------------------------------

    #[test]
    fn unencodable_frames_write_nothing() {
        let cases_v311 = [
            Frame::PubAck(Ack::with_reason(pid(1), ReasonCode::NotAuthorized)),
            Frame::PubRec(Ack::with_reason(pid(1), ReasonCode::QuotaExceeded)),
            Frame::PubRel(Ack::with_reason(
                pid(1),
                ReasonCode::PacketIdentifierNotFound,
            )),
            Frame::Disconnect(Disconnect::new(ReasonCode::ServerShuttingDown)),
            Frame::Auth(Auth {
                reason: ReasonCode::Success,
                method: None,
                data: None,
                reason_string: None,
                user_properties: Vec::new(),
            }),
            Frame::ConnAck(Box::new(ConnAck::refused(ReasonCode::MalformedPacket))),
            Frame::Publish(Publish::new("", "x")),
            Frame::SubAck(SubAck {
                packet_id: pid(1),
                reason_codes: vec![ReasonCode::NoMatchingSubscribers],
                reason_string: None,
                user_properties: Vec::new(),
            }),
        ];
        let mut p0 = Publish::new("t", "x");
        p0.packet_id = Some(pid(1));
        let mut p1 = Publish::new("t", "x");
        p1.qos = QoS::AtLeastOnce;
        let mut expired = Publish::new("t", "x");
        expired.properties.message_expiry_interval = Some(0);
        let mut big_sub_id = Publish::new("t", "x");
        big_sub_id.properties.subscription_identifiers =
            vec![NonZeroU32::new(MAX_REMAINING + 1).unwrap()];
        let cases_v5 = [
            Frame::PubAck(Ack::with_reason(pid(1), ReasonCode::Banned)),
            Frame::PubRel(Ack::with_reason(pid(1), ReasonCode::NotAuthorized)),
            Frame::ConnAck(Box::new(ConnAck::refused(
                ReasonCode::NoMatchingSubscribers,
            ))),
            Frame::Disconnect(Disconnect::new(ReasonCode::GrantedQoS1)),
            Frame::Publish(p0.clone()),
            Frame::Publish(p1.clone()),
            Frame::Publish(expired),
            Frame::Publish(big_sub_id),
            Frame::Publish(Publish::new("x".repeat(70_000), "x")),
        ];
        for (version, cases) in [(V311, &cases_v311[..]), (V5, &cases_v5[..])] {
            for frame in cases {
                let mut codec = connected(version);
                let mut out = BytesMut::from(&b"kept"[..]);
                let err = codec.encode(frame.clone(), &mut out).unwrap_err();
                assert!(
                    matches!(err, CodecError::Unencodable { .. }),
                    "{version:?} {frame:?}: {err}"
                );
                assert!(err.is_recoverable());
                assert_eq!(&out[..], b"kept");
            }
        }
        for frame in [Frame::Publish(p0), Frame::Publish(p1)] {
            assert!(matches!(
                connected(V311).encode(frame, &mut BytesMut::new()),
                Err(CodecError::Unencodable { .. })
            ));
        }
        let err = EdgeCodec::new(0)
            .encode(Frame::PingResp, &mut BytesMut::new())
            .unwrap_err();
        assert!(matches!(err, CodecError::Unencodable { version: None, .. }));
    }

    #[test]
    fn v311_connack_codes() {
        let cases = [
            (ReasonCode::Success, 0x00),
            (ReasonCode::UnsupportedProtocolVersion, 0x01),
            (ReasonCode::ClientIdentifierNotValid, 0x02),
            (ReasonCode::ServerUnavailable, 0x03),
            (ReasonCode::ServerBusy, 0x03),
            (ReasonCode::UseAnotherServer, 0x03),
            (ReasonCode::BadUserNameOrPassword, 0x04),
            (ReasonCode::BadAuthenticationMethod, 0x04),
            (ReasonCode::NotAuthorized, 0x05),
            (ReasonCode::Banned, 0x05),
        ];
        for (reason, code) in cases {
            let frame = Frame::ConnAck(Box::new(ConnAck {
                session_present: true,
                ..ConnAck::refused(reason)
            }));
            let session_present = u8::from(code == 0);
            assert_eq!(
                encode(V311, frame),
                [0x20, 0x02, session_present, code],
                "{reason:?}"
            );
        }
    }

    #[test]
    fn reason_code_table_is_consistent() {
        for v in 0..=255u8 {
            if let Some(code) = ReasonCode::from_u8(v) {
                assert_eq!(code.as_u8(), v);
                assert_eq!(code.is_error(), v >= 0x80);
            }
        }
        assert_eq!(ReasonCode::NormalDisconnection, ReasonCode::Success);
        assert!(matches!(ReasonCode::Success, ReasonCode::GrantedQoS0));
        assert_eq!(ReasonCode::SharedSubscriptionsNotSupported.as_u8(), 0x9E);
        assert_eq!(QoS::from_u8(3), None);
    }

    // ---- streams -------------------------------------------------------------------------------

    fn v5_stream() -> (Vec<u8>, Vec<Frame>) {
        let frames = client_frames(V5);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| encode(V5, f.clone())).collect();
        (bytes, frames)
    }

    #[test]
    fn byte_at_a_time_decodes_the_same_frames() {
        for version in [V311, V5] {
            let frames = client_frames(version);
            let bytes: Vec<u8> = frames
                .iter()
                .flat_map(|f| encode(version, f.clone()))
                .collect();

            let mut whole = EdgeCodec::new(1 << 20);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut all = Vec::new();
            while let Some(frame) = whole.decode(&mut buf).unwrap() {
                all.push(frame);
            }
            assert!(buf.is_empty());
            assert_eq!(all, frames);

            let mut trickle = EdgeCodec::new(1 << 20);
            let mut buf = BytesMut::new();
            let mut one_by_one = Vec::new();
            for &b in &bytes {
                buf.extend_from_slice(&[b]);
                let before = buf.len();
                match trickle.decode(&mut buf).unwrap() {
                    Some(frame) => one_by_one.push(frame),
                    None => assert_eq!(
                        buf.len(),
                        before,
                        "an incomplete packet must not be consumed"
                    ),
                }
            }
            assert!(buf.is_empty());
            assert_eq!(one_by_one, frames);
        }
    }

    #[test]
    fn two_packets_in_one_buffer() {
        let (bytes, frames) = v5_stream();
        let mut codec = EdgeCodec::new(1 << 20);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(&frames[0]));
        let mut pair = encode(V5, Frame::PingReq);
        pair.extend(encode(V5, frames[2].clone()));
        let mut buf = BytesMut::from(&pair[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::PingReq));
        assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(&frames[2]));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    // ---- fuzz ----------------------------------------------------------------------------------

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        for _ in 0..1 + rng.below(4) {
            let n = v.len();
            match rng.below(8) {
                0 if n > 0 => v[rng.below(n)] ^= 1 << rng.below(8),
                1 if n > 0 => v[rng.below(n)] = rng.byte(),
                2 => v.truncate(rng.below(n + 1)),
                3 => (0..1 + rng.below(16)).for_each(|_| v.push(rng.byte())),
                4 if n > 1 => {
                    // A random remaining length, possibly several bytes long.
                    let bits = 7 * (1 + rng.below(3));
                    let len = varint(rng.below(1 << bits));
                    v.splice(1..2, len);
                }
                5 => v.insert(rng.below(n + 1), rng.byte()),
                6 if n > 0 => {
                    v.remove(rng.below(n));
                }
                7 if n > 0 => {
                    // Set a flag byte somewhere to a boundary value.
                    v[rng.below(n)] = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x23, 0x2B][rng.below(7)];
                }
                _ => {}
            }
        }
        v
    }

    /// Decodes what `input` holds in random chunks, checking the decoder's contract.
    fn drive(rng: &mut XorShift, codec: &mut EdgeCodec, input: &[u8]) -> usize {
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut frames = 0;
        while fed < input.len() {
            let chunk = 1 + rng.below(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + chunk]);
            fed += chunk;
            for _ in 0..64 {
                let before = buf.len();
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        assert!(buf.len() < before, "a frame must consume bytes");
                        frames += 1;
                        check_reencode(codec.version(), frame);
                    }
                    Ok(None) => {
                        assert_eq!(
                            buf.len(),
                            before,
                            "an incomplete packet must not be consumed"
                        );
                        break;
                    }
                    Err(_) => {
                        assert!(buf.len() <= before);
                        return frames;
                    }
                }
            }
        }
        frames
    }

    /// Whatever the decoder accepts must survive our encoder and decoder unchanged.
    fn check_reencode(version: Option<ProtocolVersion>, frame: Frame) {
        let version = match (&frame, version) {
            (Frame::Connect(c), _) => c.version,
            (_, Some(v)) => v,
            (_, None) => panic!("a frame before the version is known: {frame:?}"),
        };
        let mut encoder = connected(version);
        let mut buf = BytesMut::new();
        match encoder.encode(frame.clone(), &mut buf) {
            Ok(()) => assert_eq!(server_decode(version, &buf).unwrap(), frame),
            Err(CodecError::Unencodable { .. }) => {}
            Err(e) => panic!("{e} for {frame:?}"),
        }
    }

    #[test]
    fn fuzz_decode_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let connects = [
            encode(V311, Frame::Connect(Box::new(full_connect(V311)))),
            encode(V5, Frame::Connect(Box::new(full_connect(V5)))),
        ];
        let seeds: [Vec<Vec<u8>>; 2] = [
            client_frames(V311)
                .into_iter()
                .map(|f| encode(V311, f))
                .chain([vec![0xE0, 0x00]])
                .collect(),
            client_frames(V5)
                .into_iter()
                .map(|f| encode(V5, f))
                .chain([vec![0xE0, 0x00]])
                .collect(),
        ];
        let started = std::time::Instant::now();
        let mut accepted = 0;
        for _ in 0..20_000 {
            let vi = rng.below(2);
            let version = [V311, V5][vi];
            match rng.below(4) {
                0 => {
                    let garbage: Vec<u8> = (0..rng.below(48)).map(|_| rng.byte()).collect();
                    accepted += drive(&mut rng, &mut EdgeCodec::new(4096), &garbage);
                }
                1 => {
                    let input = mutate(&mut rng, &connects[vi]);
                    accepted += drive(&mut rng, &mut EdgeCodec::new(4096), &input);
                }
                _ => {
                    let mut codec = connected_with(version, 4096);
                    let seed = &seeds[vi][rng.below(seeds[vi].len())];
                    let mut input = mutate(&mut rng, seed);
                    if rng.below(4) == 0 {
                        input.extend(&seeds[vi][rng.below(seeds[vi].len())]);
                    }
                    accepted += drive(&mut rng, &mut codec, &input);
                }
            }
        }
        // Some mutations stay valid; if none did, the fuzzer would not be reaching the decoders.
        assert!(accepted > 1000, "only {accepted} frames accepted");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }
}
