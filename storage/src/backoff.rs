//! Exponential backoff with jitter, for every retry loop in Messina (storage requests, the bridge's
//! batch writes), so they all back off alike.

use std::time::Duration;

/// Delays that double from `initial` up to `max`, each drawn between half and all of the current
/// step, so many writers retrying against one cluster do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            step: initial.min(max),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.step.mul_f64(0.5 + jitter() * 0.5);
        self.step = (self.step * 2).min(self.max);
        delay
    }
}

/// A cheap pseudo-random number in [0, 1): the sub-second nanoseconds of the clock.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let steps = [100, 200, 350, 350];
        for step in steps {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(step / 2) && d <= Duration::from_millis(step),
                "{d:?} for step {step}"
            );
        }
    }
}
