//! Rate limits: a token bucket per MQTT connection for publishes, one per source address for
//! new MQTT connections, one per API key or device for HTTP requests. Only the offender waits
//! or is refused; nobody else is slowed.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, up to `burst` saved.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `None` when `rate` is 0 (no limit); a `burst` of 0 means one second's worth.
    pub fn new(rate: u32, burst: u32) -> Option<Bucket> {
        (rate > 0).then(|| {
            let burst = f64::from(if burst == 0 { rate } else { burst });
            Bucket {
                rate: f64::from(rate),
                burst,
                tokens: burst,
                last: Instant::now(),
            }
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token: `Ok` when there was one, else how long until there is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

impl Bucket {
    /// Takes a token even when there is none yet (the caller goes ahead and then waits):
    /// `Some` is how long until the debt is paid.
    pub fn take_owing(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// A token bucket per key, made on first use; full buckets are forgotten when there are many.
pub struct Rates<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq> Default for Rates<K> {
    fn default() -> Self {
        Rates {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

/// Keys kept before the full buckets are forgotten.
const KEPT_BUCKETS: usize = 100_000;

impl<K: Hash + Eq> Rates<K> {
    /// Takes a token from `key`'s bucket of `rate` a second (0: no limit) and `burst` (0: one
    /// second's worth): `Err` is how long until there is one.
    pub fn take(&self, key: K, rate: u32, burst: u32) -> Result<(), Duration> {
        let Some(fresh) = Bucket::new(rate, burst) else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets");
        if buckets.len() > KEPT_BUCKETS {
            // Full buckets say nothing a fresh one would not: forget them.
            buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < b.burst
            });
        }
        buckets.entry(key).or_insert(fresh).take(now)
    }
}

/// New connections per source address.
pub struct ConnectRate {
    rate: u32,
    burst: u32,
    buckets: Rates<IpAddr>,
}

impl ConnectRate {
    pub fn new(rate: u32, burst: u32) -> ConnectRate {
        ConnectRate {
            rate,
            burst,
            buckets: Rates::default(),
        }
    }

    /// Whether `ip` may open a connection now.
    pub fn admit(&self, ip: IpAddr) -> bool {
        self.buckets.take(ip, self.rate, self.burst).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(10, 5).unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // A second later: ten more tokens, but never more than the burst.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..5 {
            assert!(b.take(t1).is_ok());
        }
        assert!(b.take(t1).is_err());
        assert!(Bucket::new(0, 5).is_none());
        // Going ahead without a token is paid back before the next is allowed.
        let mut b = Bucket::new(10, 1).unwrap();
        assert_eq!(b.take_owing(t0), None);
        let wait = b.take_owing(t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9);
        assert!(b.take(t0 + wait).is_err(), "the debt used the refill");
    }

    #[test]
    fn connection_rate_is_per_source_address() {
        let limit = ConnectRate::new(1, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(limit.admit(a) && limit.admit(a));
        assert!(!limit.admit(a));
        assert!(limit.admit(b), "another address is not slowed");
        assert!(ConnectRate::new(0, 0).admit(a));
    }
}
