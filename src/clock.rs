//! Time enters hsmca in one place, so policy and tests can be handed any "now".

use time::OffsetDateTime;

/// A source of the current time.
pub trait Clock {
    /// The current UTC time, truncated to whole seconds (X.509 and the log have no finer grain).
    fn now(&self) -> OffsetDateTime;
}

/// The machine's clock. On an air-gapped host this is a claim, not a proof: the log records it
/// as such and the operator checks it at the start of every ceremony.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        now.replace_nanosecond(0).unwrap_or(now)
    }
}

/// RFC 3339 UTC with a `Z`, as written in the log and reports.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}
