//! Default sending limits (SPEC section 3.4), derived from licenses and tier, with overrides.

use crate::document::Limits;
use crate::resources::{LimitOverrides, Tier};

/// Messages per registered user per rolling 24 hours, both tiers.
pub const USER_MESSAGES_PER_DAY: u64 = 10_000;
/// Unique recipients per registered user per 24 hours, per license.
pub const USER_UNIQUE_RECIPIENTS_PER_LICENSE: u64 = 130;
/// Tenant recipients per 24 hours, per license (Standard).
pub const CUSTOMER_RECIPIENTS_PER_DAY_PER_LICENSE: u64 = 130;
/// Cap on tenant recipients per 24 hours (Standard).
pub const CUSTOMER_RECIPIENTS_PER_DAY_CAP: u64 = 4_600_000;
/// Tenant recipients per 10 minutes, per license (Standard).
pub const CUSTOMER_RECIPIENTS_PER_10_MIN_PER_LICENSE: u64 = 9;
/// Cap on tenant recipients per 10 minutes (Standard).
pub const CUSTOMER_RECIPIENTS_PER_10_MIN_CAP: u64 = 319_444;
/// Trial tenant recipients per 24 hours.
pub const TRIAL_RECIPIENTS_PER_DAY: u64 = 100;
/// Trial tenant recipients per 10 minutes.
pub const TRIAL_RECIPIENTS_PER_10_MIN: u64 = 50;

/// The limits in force for a tenant: the defaults for its licenses and tier, then any override
/// (an override may raise or lower a limit; it is taken as written).
pub fn effective_limits(licenses: u32, tier: Tier, overrides: Option<&LimitOverrides>) -> Limits {
    let licenses = u64::from(licenses.max(1));
    let (day, ten_minutes) = match tier {
        Tier::Standard => (
            (CUSTOMER_RECIPIENTS_PER_DAY_PER_LICENSE * licenses)
                .min(CUSTOMER_RECIPIENTS_PER_DAY_CAP),
            (CUSTOMER_RECIPIENTS_PER_10_MIN_PER_LICENSE * licenses)
                .min(CUSTOMER_RECIPIENTS_PER_10_MIN_CAP),
        ),
        Tier::Trial => (TRIAL_RECIPIENTS_PER_DAY, TRIAL_RECIPIENTS_PER_10_MIN),
    };
    let mut limits = Limits {
        per_user_messages_per_day: USER_MESSAGES_PER_DAY,
        per_user_unique_recipients_per_day: USER_UNIQUE_RECIPIENTS_PER_LICENSE * licenses,
        per_customer_recipients_per_day: day,
        per_customer_recipients_per_10_minutes: ten_minutes,
        block_all_senders_on_customer_limit: false,
    };
    if let Some(o) = overrides {
        let set = |target: &mut u64, value: Option<u64>| {
            if let Some(v) = value {
                *target = v;
            }
        };
        set(
            &mut limits.per_user_messages_per_day,
            o.per_user.messages_per_day,
        );
        set(
            &mut limits.per_user_unique_recipients_per_day,
            o.per_user.unique_recipients_per_day,
        );
        set(
            &mut limits.per_customer_recipients_per_day,
            o.per_customer.recipients_per_day,
        );
        set(
            &mut limits.per_customer_recipients_per_10_minutes,
            o.per_customer.recipients_per_10_minutes,
        );
        limits.block_all_senders_on_customer_limit = o.block_all_senders_on_customer_limit;
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{PerCustomerLimits, PerUserLimits};

    fn standard(licenses: u32) -> (u64, u64, u64, u64) {
        let l = effective_limits(licenses, Tier::Standard, None);
        (
            l.per_user_messages_per_day,
            l.per_user_unique_recipients_per_day,
            l.per_customer_recipients_per_day,
            l.per_customer_recipients_per_10_minutes,
        )
    }

    #[test]
    fn standard_limits_scale_with_licenses_up_to_the_caps() {
        assert_eq!(standard(1), (10_000, 130, 130, 9));
        assert_eq!(standard(10), (10_000, 1_300, 1_300, 90));
        // 130 x 35,385 = 4,600,050: the first license count past the daily cap.
        assert_eq!(standard(35_384), (10_000, 4_599_920, 4_599_920, 318_456));
        assert_eq!(standard(35_385), (10_000, 4_600_050, 4_600_000, 318_465));
        assert_eq!(
            standard(1_000_000),
            (10_000, 130_000_000, 4_600_000, 319_444)
        );
        // 9 x 35,494 = 319,446: the 10-minute cap bites a little later.
        assert_eq!(standard(35_494).3, 319_444);
        assert_eq!(standard(35_493).3, 319_437);
    }

    #[test]
    fn trial_tenant_limits_ignore_licenses() {
        for licenses in [1, 10, 35_385, 1_000_000] {
            let l = effective_limits(licenses, Tier::Trial, None);
            assert_eq!(l.per_customer_recipients_per_day, 100);
            assert_eq!(l.per_customer_recipients_per_10_minutes, 50);
            assert_eq!(l.per_user_messages_per_day, 10_000);
            assert_eq!(
                l.per_user_unique_recipients_per_day,
                130 * u64::from(licenses)
            );
        }
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let overrides = LimitOverrides {
            per_user: PerUserLimits {
                messages_per_day: Some(500),
                unique_recipients_per_day: None,
            },
            per_customer: PerCustomerLimits {
                recipients_per_day: None,
                recipients_per_10_minutes: Some(20),
            },
            block_all_senders_on_customer_limit: true,
        };
        let l = effective_limits(10, Tier::Standard, Some(&overrides));
        assert_eq!(l.per_user_messages_per_day, 500);
        assert_eq!(l.per_user_unique_recipients_per_day, 1_300);
        assert_eq!(l.per_customer_recipients_per_day, 1_300);
        assert_eq!(l.per_customer_recipients_per_10_minutes, 20);
        assert!(l.block_all_senders_on_customer_limit);
    }
}
