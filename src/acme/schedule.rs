//! When to order a certificate (sans-IO): renewal times from a certificate's validity, and
//! the backoff after failures. Times are Unix seconds; the caller reads the clock.

/// The renewal knobs of `[tls.acme]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Renew this many seconds before notAfter (or at 2/3 of the lifetime, if earlier).
    pub renew_before: u64,
    /// Wait after the first failure; doubled per further failure.
    pub retry_min: u64,
    /// Longest wait between failed attempts.
    pub retry_max: u64,
}

/// When a certificate valid over `[not_before, not_after]` is due for renewal: at 2/3 of its
/// lifetime or `renew_before` ahead of expiry, whichever comes first, but never in the first
/// third of its life (so a short-lived certificate and a long `renew_before` do not make a
/// renewal loop).
pub fn renew_at(not_before: u64, not_after: u64, policy: &Policy) -> u64 {
    let life = not_after.saturating_sub(not_before);
    let two_thirds = not_before + life / 3 * 2 + (life % 3) * 2 / 3;
    let early = not_after.saturating_sub(policy.renew_before);
    two_thirds.min(early).max(not_before + life / 3)
}

/// How long to wait after `failures` failed attempts in a row (at least one).
pub fn backoff(failures: u32, policy: &Policy) -> u64 {
    let shift = failures.saturating_sub(1).min(32);
    policy
        .retry_min
        .saturating_mul(1u64 << shift)
        .min(policy.retry_max)
        .max(1)
}

/// The last failed attempts: how many in a row, and when the last one ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    /// Failed attempts since the last success.
    pub count: u32,
    /// When the last one ended.
    pub at: u64,
}

/// When to attempt the next order: now without a certificate, at the renewal time with one,
/// and after a failure once the backoff has passed (never before the renewal time).
pub fn next_attempt(
    validity: Option<(u64, u64)>,
    failed: Option<Failures>,
    policy: &Policy,
) -> u64 {
    let due = validity.map_or(0, |(nb, na)| renew_at(nb, na, policy));
    match failed {
        Some(f) if f.count > 0 => due.max(f.at.saturating_add(backoff(f.count, policy))),
        _ => due,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;
    const P: Policy = Policy {
        renew_before: 30 * DAY,
        retry_min: 60,
        retry_max: 6 * 3600,
    };

    #[test]
    fn ninety_day_certificates_renew_thirty_days_ahead() {
        let nb = 1_000 * DAY;
        assert_eq!(renew_at(nb, nb + 90 * DAY, &P), nb + 60 * DAY);
    }

    #[test]
    fn whichever_comes_first_wins() {
        let nb = 1_000 * DAY;
        // A year: 2/3 (day 243.3) comes before 30 days ahead (day 335).
        assert_eq!(renew_at(nb, nb + 365 * DAY, &P), nb + 365 * DAY / 3 * 2);
        // 60 days: 30 days ahead (day 30) comes before 2/3 (day 40).
        assert_eq!(renew_at(nb, nb + 60 * DAY, &P), nb + 30 * DAY);
    }

    #[test]
    fn a_short_certificate_renews_at_two_thirds_and_never_loops() {
        // Six days of life and a 30-day lead: the lead alone would say "now, always".
        let nb = 1_000 * DAY;
        assert_eq!(renew_at(nb, nb + 6 * DAY, &P), nb + 2 * DAY);
        let short = Policy {
            renew_before: 5,
            ..P
        };
        // A 30 s certificate (the lab's pebble): 2/3 is 20 s, 5 s ahead is 25 s.
        assert_eq!(renew_at(100, 130, &short), 120);
        // An already expired one is due at once (its renewal time is in the past).
        assert!(renew_at(100, 130, &short) < 1_000);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1, &P), 60);
        assert_eq!(backoff(2, &P), 120);
        assert_eq!(backoff(3, &P), 240);
        assert_eq!(backoff(20, &P), 6 * 3600);
        assert_eq!(backoff(u32::MAX, &P), 6 * 3600);
    }

    #[test]
    fn next_attempt_is_now_without_a_certificate_then_backs_off() {
        assert_eq!(next_attempt(None, None, &P), 0);
        let f = Failures {
            count: 2,
            at: 5_000,
        };
        assert_eq!(next_attempt(None, Some(f), &P), 5_120);
    }

    #[test]
    fn a_failed_renewal_retries_after_the_backoff_while_the_old_one_serves() {
        let (nb, na) = (0, 90 * DAY);
        let due = 60 * DAY;
        assert_eq!(next_attempt(Some((nb, na)), None, &P), due);
        let f = Failures {
            count: 1,
            at: due + 3,
        };
        assert_eq!(next_attempt(Some((nb, na)), Some(f), &P), due + 63);
        // A success resets it: due at the new certificate's renewal time.
        assert_eq!(
            next_attempt(Some((due, due + 90 * DAY)), None, &P),
            due + 60 * DAY
        );
    }
}
