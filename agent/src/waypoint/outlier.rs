//! Outlier ejection at the waypoint (Istio's DestinationRule
//! `outlierDetection`, as Envoy carries it out): an endpoint whose answers
//! fail `consecutive_errors` times in a row (5xx, or no answer at all) is
//! left out of the choice for `base_ejection_time` times the number of
//! times it has been ejected, unless that would leave out more than
//! `max_ejection_percent` of the service's endpoints. When every endpoint
//! is out, the choice falls back to all of them (Envoy's panic mode).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::state::l7::OutlierDetection;
use crate::state::Name;

/// What the waypoint remembers of each endpoint's recent answers.
#[derive(Default)]
pub(super) struct Outliers {
    endpoints: Mutex<HashMap<Name, Record>>,
}

#[derive(Default)]
struct Record {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Outliers {
    /// Notes one answer (or failure) of `endpoint`, one of `of` endpoints
    /// of its service; ejects it when `d` says so.
    pub(super) fn observe(&self, d: &OutlierDetection, endpoint: &Name, failed: bool, of: usize) {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let ejected_now = map
            .values()
            .filter(|r| r.ejected_until.is_some_and(|t| t > now))
            .count();
        let r = map.entry(endpoint.clone()).or_default();
        if !failed {
            r.consecutive = 0;
            return;
        }
        r.consecutive += 1;
        let already_out = r.ejected_until.is_some_and(|t| t > now);
        // Envoy ejects while the share already out is below the maximum.
        let room = (ejected_now as f64) * 100.0 < f64::from(d.max_ejection_percent) * of as f64;
        if r.consecutive >= d.consecutive_errors && !already_out && room {
            r.ejections += 1;
            r.consecutive = 0;
            let time = d.base_ejection_time.saturating_mul(r.ejections);
            r.ejected_until = Some(now + time);
            tracing::info!(%endpoint, ?time, ejections = r.ejections, "endpoint ejected");
        }
    }

    /// The endpoints out of the choice now.
    pub(super) fn ejected(&self) -> Vec<Name> {
        let map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.iter()
            .filter(|(_, r)| r.ejected_until.is_some_and(|t| t > now))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn name(s: &str) -> Name {
        Name::from(s)
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets() {
        let d = OutlierDetection {
            consecutive_errors: 3,
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 50,
        };
        let o = Outliers::default();
        let (a, b) = (name("a"), name("b"));
        o.observe(&d, &a, true, 2);
        o.observe(&d, &a, true, 2);
        o.observe(&d, &a, false, 2);
        o.observe(&d, &a, true, 2);
        assert!(
            o.ejected().is_empty(),
            "a success in between resets the count"
        );
        o.observe(&d, &a, true, 2);
        o.observe(&d, &a, true, 2);
        assert_eq!(o.ejected(), std::slice::from_ref(&a));
        // Half the endpoints are out: b stays in whatever it does.
        for _ in 0..10 {
            o.observe(&d, &b, true, 2);
        }
        assert_eq!(o.ejected(), [a]);
    }

    #[test]
    fn at_least_one_endpoint_can_go_under_a_small_percentage() {
        let d = OutlierDetection {
            consecutive_errors: 1,
            ..OutlierDetection::default()
        };
        let o = Outliers::default();
        o.observe(&d, &name("a"), true, 3);
        assert_eq!(o.ejected().len(), 1);
        o.observe(&d, &name("b"), true, 3);
        assert_eq!(o.ejected().len(), 1, "10% of 3: one at most");
    }

    #[test]
    fn ejection_ends_after_its_time() {
        let d = OutlierDetection {
            consecutive_errors: 1,
            base_ejection_time: Duration::from_millis(30),
            max_ejection_percent: 100,
        };
        let o = Outliers::default();
        o.observe(&d, &name("a"), true, 1);
        assert_eq!(o.ejected().len(), 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(o.ejected().is_empty());
    }
}
