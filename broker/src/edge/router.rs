//! The edge's glue to the rumqttd router, which stays the fan-out engine: topic matching, the
//! retained store, shared groups and per-filter buffers for slow subscribers.
//!
//! The edge owns all MQTT session state, so the router only ever sees QoS 0 local links:
//! - one **feeder** link, driven by its own OS thread (rumqttd's `LinkTx::send` blocks), through
//!   which every message for subscribers enters the router: device publishes that some
//!   subscription matches (the [`Interest`] index keeps the rest off the router), retained
//!   messages, wills, and Messina's own alerts, presence and replies;
//! - one **subscriber** link per session that subscribes, with an internal Subscription
//!   Identifier per filter so the edge knows which of its subscriptions matched.
//!
//! What the router would lose (the publish QoS, RETAIN for Retain As Published, the publishing
//! session for No Local, an empty non-retained payload, the time for Message Expiry) travels in a
//! private user property, the [`Tag`], that the edge strips on the way out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tokio::sync::{mpsc, oneshot};

/// The user property key of the [`Tag`]; a NUL cannot appear in a client's property (the codec
/// refuses U+0000), so no client can forge or collide with it.
pub const TAG_KEY: &str = "\u{0}messina";

/// Messages waiting for the feeder thread.
const FEED_QUEUE: usize = 8192;

/// What the router must not lose about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The QoS it was published with (delivery is at min(this, granted)).
    pub qos: u8,
    /// Its RETAIN flag as published (for Retain As Published).
    pub retain: bool,
    /// The payload is really empty: the router would treat an empty payload as "delete the
    /// retained message", so a non-retained empty message travels as one placeholder byte.
    pub empty: bool,
    /// The session that published it (0 for Messina itself), for No Local.
    pub origin: u64,
    /// When the edge received it, in Unix milliseconds (for Message Expiry).
    pub received_at: i64,
    /// Its Message Expiry Interval as published, in seconds.
    pub expiry: Option<u32>,
}

impl Tag {
    fn encode(&self) -> String {
        let mut s = format!(
            "q{}r{}e{}o{}t{}",
            self.qos,
            u8::from(self.retain),
            u8::from(self.empty),
            self.origin,
            self.received_at
        );
        if let Some(x) = self.expiry {
            s.push_str(&format!("x{x}"));
        }
        s
    }

    fn decode(s: &str) -> Option<Tag> {
        let mut tag = Tag {
            qos: 0,
            retain: false,
            empty: false,
            origin: 0,
            received_at: 0,
            expiry: None,
        };
        let mut rest = s;
        while let Some(key) = rest.chars().next() {
            rest = &rest[1..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit() && c != '-')
                .unwrap_or(rest.len());
            let value = &rest[..end];
            rest = &rest[end..];
            match key {
                'q' => tag.qos = value.parse().ok()?,
                'r' => tag.retain = value == "1",
                'e' => tag.empty = value == "1",
                'o' => tag.origin = value.parse().ok()?,
                't' => tag.received_at = value.parse().ok()?,
                'x' => tag.expiry = Some(value.parse().ok()?),
                _ => return None,
            }
        }
        Some(tag)
    }

    /// Removes the tag from a forwarded message's user properties and returns it.
    pub fn take(properties: &mut Option<PublishProperties>) -> Option<Tag> {
        let p = properties.as_mut()?;
        let at = p.user_properties.iter().position(|(k, _)| k == TAG_KEY)?;
        let (_, v) = p.user_properties.remove(at);
        Tag::decode(&v)
    }
}

/// What the feeder thread hands to the router, in the order the edge accepted it.
// Not boxed: the queue's slots were `Feed`-sized before barriers existed, and a box would cost
// an allocation for every routed message to spare the rare barrier a larger slot.
#[allow(clippy::large_enum_variant)]
enum Item {
    Message(Feed),
    /// Answered once every item before it is in the router's queue.
    Barrier(oneshot::Sender<()>),
}

/// A message on its way into the router.
pub struct Feed {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    pub properties: PublishProperties,
    pub tag: Tag,
}

impl Feed {
    fn into_packet(mut self) -> Packet {
        let mut tag = self.tag;
        // An empty payload is "delete the retained message" to the router: right for a retained
        // empty message, wrong for any other.
        if self.payload.is_empty() && !self.retain {
            tag.empty = true;
            self.payload = Bytes::from_static(b"\0");
        }
        self.properties
            .user_properties
            .push((TAG_KEY.to_string(), tag.encode()));
        let publish = Publish::new(self.topic, self.payload, self.retain);
        Packet::Publish(publish, Some(self.properties))
    }
}

/// Which topics some subscription matches, so that telemetry nobody subscribes to never
/// reaches the router. Holds each filter (without a `$share/{group}/` prefix) in a trie of topic
/// levels, counted by how many subscriptions hold it, so a lookup costs the topic's depth, not
/// the number of filters (10k devices each subscribed to their own reply topic stay cheap).
#[derive(Default)]
pub struct Interest {
    filters: RwLock<Level>,
    version: AtomicU64,
}

/// One level of the filter trie.
#[derive(Default)]
struct Level {
    /// Filters that end at this level.
    here: usize,
    /// Filters that end with `#` after this level (matching this level and everything below).
    rest: usize,
    /// `+` at the next level.
    any: Option<Box<Level>>,
    named: HashMap<String, Level>,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.here == 0 && self.rest == 0 && self.any.is_none() && self.named.is_empty()
    }

    fn add(&mut self, levels: &[&str]) {
        match levels.split_first() {
            None => self.here += 1,
            Some((&"#", _)) => self.rest += 1,
            Some((&"+", tail)) => self.any.get_or_insert_with(Default::default).add(tail),
            Some((name, tail)) => self.named.entry(name.to_string()).or_default().add(tail),
        }
    }

    /// Removes one holder of the filter; prunes levels nothing holds any more.
    fn remove(&mut self, levels: &[&str]) {
        match levels.split_first() {
            None => self.here = self.here.saturating_sub(1),
            Some((&"#", _)) => self.rest = self.rest.saturating_sub(1),
            Some((&"+", tail)) => {
                if let Some(any) = self.any.as_mut() {
                    any.remove(tail);
                    if any.is_empty() {
                        self.any = None;
                    }
                }
            }
            Some((name, tail)) => {
                if let Some(next) = self.named.get_mut(*name) {
                    next.remove(tail);
                    if next.is_empty() {
                        self.named.remove(*name);
                    }
                }
            }
        }
    }

    /// Whether a filter at or below this level matches the remaining `levels`; `root_dollar`
    /// when this is the first level of a topic starting with `$`, which wildcards never match.
    fn matches(&self, levels: &[&str], root_dollar: bool) -> bool {
        if self.rest > 0 && !root_dollar {
            return true;
        }
        let Some((first, tail)) = levels.split_first() else {
            return self.here > 0;
        };
        if let Some(next) = self.named.get(*first) {
            if next.matches(tail, false) {
                return true;
            }
        }
        match &self.any {
            Some(any) if !root_dollar => any.matches(tail, false),
            _ => false,
        }
    }
}

impl Interest {
    pub fn add(&self, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        self.filters.write().expect("interest lock").add(&levels);
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn remove(&self, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        self.filters.write().expect("interest lock").remove(&levels);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// A number that changes whenever the set of filters does (for callers that cache answers).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Whether any subscription matches `topic`.
    pub fn wanted(&self, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        self.filters
            .read()
            .expect("interest lock")
            .matches(&levels, topic.starts_with('$'))
    }
}

/// MQTT topic matching (MQTT 4.7): `+` one level, `#` the rest including the parent level, and
/// a wildcard in the first level never matches a topic starting with `$` (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            level => {
                if t.next() != Some(level) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

type MakeLink = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync;

/// The router, its feeder and the interest index.
pub struct Router {
    make_link: Box<MakeLink>,
    feed: FeedSender,
    pub interest: Interest,
    links: AtomicU64,
    feeder: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Router {
    /// Starts rumqttd's router (no listeners of its own) and the feeder thread.
    pub fn start(config: rumqttd::RouterConfig) -> anyhow::Result<Arc<Router>> {
        let router_tx = rumqttd::Router::new(0, config).spawn();
        let make_link = Box::new(move |client_id: &str| {
            // Dynamic filters: a message to a topic no filter matches yet (a retained message,
            // say) must be accepted, not make the router drop the feeder.
            let (tx, rx, _ack) = LinkBuilder::new(client_id, router_tx.clone())
                .dynamic_filters(true)
                .build()
                .map_err(|e: LinkError| e.to_string())?;
            Ok((tx, rx))
        });
        let (feed, mut feeds) = mpsc::channel::<Item>(FEED_QUEUE);
        let (mut feeder_tx, feeder_rx) = make_link("messina-feeder")
            .map_err(|e| anyhow::anyhow!("connecting the feeder link to the router: {e}"))?;
        let feeder = std::thread::Builder::new()
            .name("messina-feeder".into())
            .spawn(move || {
                // The receiving half must stay open, or the router drops the link.
                let _rx = feeder_rx;
                while let Some(item) = feeds.blocking_recv() {
                    let feed = match item {
                        Item::Message(feed) => feed,
                        Item::Barrier(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    // `send` blocks on the router's bounded channel: this is why it has a thread.
                    if let Err(e) = complete(feeder_tx.send(feed.into_packet())) {
                        tracing::error!(error = %e, "the router dropped the feeder link; messages are no longer routed to subscribers");
                        break;
                    }
                }
            })?;
        Ok(Arc::new(Router {
            make_link,
            feed: FeedSender(feed),
            interest: Interest::default(),
            links: AtomicU64::new(0),
            feeder: Mutex::new(Some(feeder)),
        }))
    }

    /// Hands a message to the router; waits while the feeder is behind.
    pub async fn feed(&self, feed: Feed) {
        if self.feed.send(feed).await.is_err() {
            tracing::debug!("feeder stopped; message not routed");
        }
    }

    /// Waits until every message fed before this call is in the router's queue, ahead of
    /// anything a link sends afterwards (the router serves one queue in order).
    ///
    /// A SUBSCRIBE waits on this: a message acknowledged to its publisher may still be on its
    /// way through the feeder, and rumqttd reads retained messages only when it first serves a
    /// new filter, so a retained message arriving in between would be delivered twice (retained,
    /// and live from the filter's log), and a live one would reach a subscription made after
    /// its PUBACK.
    pub async fn barrier(&self) {
        let (done, passed) = oneshot::channel();
        if self.feed.0.send(Item::Barrier(done)).await.is_ok() {
            let _ = passed.await;
        }
    }

    /// A new subscriber link (built on a blocking thread: rumqttd's `build` blocks).
    pub async fn link(self: &Arc<Self>) -> anyhow::Result<(LinkTx, LinkRx)> {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || (this.make_link)(&format!("messina-edge-{n}")))
            .await?
            .map_err(|e| anyhow::anyhow!("connecting a subscriber link to the router: {e}"))
    }

    /// A sender of feeds for tasks that publish on their own (Messina's alerts and replies).
    pub fn feeder(&self) -> FeedSender {
        self.feed.clone()
    }

    /// Waits for the feeder thread once every sender is gone.
    pub fn join(&self) {
        let handle = self.feeder.lock().expect("feeder lock").take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The sending half of the feeder's queue.
#[derive(Clone)]
pub struct FeedSender(mpsc::Sender<Item>);

/// The feeder thread has stopped.
#[derive(Debug)]
pub struct FeederStopped;

impl FeedSender {
    /// Queues `feed` for the router; waits while the queue is full.
    pub async fn send(&self, feed: Feed) -> Result<(), FeederStopped> {
        self.0
            .send(Item::Message(feed))
            .await
            .map_err(|_| FeederStopped)
    }
}

/// `LinkTx::send` is `async` in name only (it never awaits), so polling it once completes it.
pub(crate) fn complete<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching_follows_the_spec() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/c/d"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$conf/x"));
        assert!(matches("$conf/#", "$conf/x"));
        assert!(matches("+", ""));
        assert!(matches("a//c", "a//c"));
        assert!(!matches("a/b", "a"));
    }

    #[test]
    fn the_interest_trie_agrees_with_matching_each_filter() {
        let filters = [
            "devices/+/uploads/response",
            "alerts/#",
            "a/b/c",
            "a/+/c",
            "+/x",
            "#",
            "$conf/#",
            "a/b/#",
            "a//c",
            "+",
        ];
        let topics = [
            "devices/d1/uploads/response",
            "devices/d1/telemetry",
            "alerts/d1/battery_low",
            "alerts",
            "a/b/c",
            "a/z/c",
            "a/b",
            "a/b/c/d",
            "q/x",
            "$conf/x",
            "$SYS/x",
            "a//c",
            "",
            "solo",
        ];
        // Every subset of up to three filters, added and removed again.
        for (i, f1) in filters.iter().enumerate() {
            for f2 in &filters[i..] {
                for f3 in &filters[..3] {
                    let set = [*f1, *f2, *f3];
                    let interest = Interest::default();
                    for f in set {
                        interest.add(f);
                    }
                    for t in topics {
                        let expected = set.iter().any(|f| matches(f, t));
                        assert_eq!(interest.wanted(t), expected, "{set:?} on {t:?}");
                    }
                    for f in set {
                        interest.remove(f);
                    }
                    assert!(
                        topics.iter().all(|t| !interest.wanted(t)),
                        "{set:?} left over"
                    );
                    assert!(
                        interest.filters.read().unwrap().is_empty(),
                        "{set:?} not pruned"
                    );
                }
            }
        }
    }

    #[test]
    fn tags_round_trip() {
        let tag = Tag {
            qos: 2,
            retain: true,
            empty: false,
            origin: 77,
            received_at: 1_700_000_000_123,
            expiry: Some(60),
        };
        assert_eq!(Tag::decode(&tag.encode()), Some(tag));
        let mut props = Some(PublishProperties {
            user_properties: vec![
                ("a".into(), "1".into()),
                (
                    TAG_KEY.into(),
                    Tag {
                        expiry: None,
                        ..tag
                    }
                    .encode(),
                ),
            ],
            ..Default::default()
        });
        assert_eq!(
            Tag::take(&mut props),
            Some(Tag {
                expiry: None,
                ..tag
            })
        );
        assert_eq!(
            props.unwrap().user_properties,
            vec![("a".into(), "1".into())]
        );
    }
}
